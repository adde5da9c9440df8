"""The adaptation round, written once: world-model fit -> phantom DAgger -> LoRA -> judicial review.

``plasma-server run`` (its ``AdaptationWorker``), ``bench adapt`` and ``bench audit`` all call this
module; none has private learning knobs. One round for one slot (a device's, or the fleet's):

1. **World model** (``fit_model``): with a simulator in the task (``TaskSpec.sim_step``), the
   nominal simulator with the device's physics parameters identified on its real transitions and
   bootstrap members for uncertainty (``sysid.PhysicsModel``); without one, the learned ensemble
   (``worldmodel.WorldModel``). Either is warm-started from the device's previous round.
2. **Phantom DAgger** (``phantom_dagger``): roll the adapted policy in the model from real start
   states, relabel visited states with MPPI in the model, distil the labels into the LoRA adapter.
   Labels are aggregated across rounds (DAgger's aggregate, newest ``label_memory`` kept).
3. **Distillation with a trust region**: starts from the last accepted adapter and is anchored to
   that adapter's actions on the device's real states, so successive packets do not swing the
   policy (the first round anchors to the base policy).
4. **Judicial review**: the last ``heldout_members`` members are kept from the planner; the
   auditor audits the candidate against the reference (the slot's current adapter) and may ask
   for one redistillation under the uncertainty penalty. Fleet rounds (``devices=``) first drop
   devices whose traces contradict the others and then require the approved candidate not to
   hurt any kept device in its own identified physics (``judicial.fleet``, docs/auditing.md).

Per-device state that persists across rounds (model, labels, accepted adapter) lives in a
``Learner``; ``plasma-server run`` keeps one per device (and one for the fleet slot) and persists
the adapter and its data cursor in the store, so a restart resumes.

Which world model is the default was chosen by measurement (``docs/adaptation.md``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from .budget import BUDGETS, AdaptConfig, Model, adapt_config, seeded
from .distill import LoRADistiller
from .judicial import (
    Decision,
    DeviceScreen,
    JudicialAuditor,
    RealData,
    StateFilter,
    fleet_decision,
    judge_devices,
    pool,
    screen_devices,
    split_members,
)
from .phantom import (
    ModelDynamics,
    PhantomConfig,
    PhantomPathSimulator,
    PlannerConfig,
    member_blocks,
    mppi_plan,
    policy_plan,
    step_obs,
)
from .policy_net import LoRA, MLPPolicy
from .residual import ResidualModel, residual_model
from .slots import Combination
from .sysid import PhysicsModel
from .tasks import TaskSpec
from .worldmodel import WorldModel

__all__ = ["AdaptConfig", "BUDGETS", "Labels", "Learner", "Model", "RoundResult", "adapt_config",
           "adaptation_round", "expert_labels", "fit_model", "new_model", "phantom_dagger",
           "seeded"]

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------- stage 2


def new_model(task: TaskSpec, cfg: AdaptConfig) -> Model:
    if cfg.kind(task) == "physics":
        return residual_model(task, cfg.sysid, cfg.residual)
    model_cfg = cfg.model if task.reward is not None else replace(cfg.model, learn_reward=True)
    return WorldModel(task.obs_dim, task.act_dim, model_cfg)  # type: ignore[return-value]


def fit_model(task: TaskSpec, real: RealData, cfg: AdaptConfig, model: Model | None = None
              ) -> Model:
    """Stage 2: fit (or refit, warm-started) the world model on the round's real transitions."""
    model = model if model is not None else new_model(task, cfg)
    learn_reward = isinstance(model, WorldModel) and model.cfg.learn_reward
    model.fit(real.obs, real.act, real.next_obs, real.rew if learn_reward else None)
    return model


# ---------------------------------------------------------------------------- stages 3-4


@dataclass
class Labels:
    """Planner labels aggregated across rounds (DAgger): states and the planner's actions."""

    obs: np.ndarray
    act: np.ndarray

    @classmethod
    def empty(cls, task: TaskSpec) -> Labels:
        return cls(np.empty((0, task.obs_dim), np.float32), np.empty((0, task.act_dim), np.float32))

    def plus(self, obs: np.ndarray, act: np.ndarray, memory: int) -> Labels:
        o, a = np.concatenate([self.obs, obs]), np.concatenate([self.act, act])
        return Labels(o[-memory:], a[-memory:])

    def __len__(self) -> int:
        return len(self.obs)


def phantom_dagger(task: TaskSpec, policy: MLPPolicy, model: Model, real: RealData,
                   cfg: AdaptConfig, *, init: LoRA | None = None, labels: Labels | None = None,
                   keep: StateFilter | None = None) -> tuple[LoRA, Labels]:
    """Stages 3-4, the only copy of the loop: phantom paths of the adapted policy, MPPI labels on
    visited states, LoRA distilled on every label so far, from ``init`` and anchored to it.

    ``task`` may carry a penalized reward (the auditor's correction) and ``keep`` drops untrusted
    label states. Returns the adapter and the labels (the earlier ones plus this round's)."""
    rng = np.random.default_rng(cfg.seed)
    sim = PhantomPathSimulator(model, task, PhantomConfig(  # type: ignore[arg-type]
        paths=cfg.phantom_paths, horizon=cfg.phantom_horizon, action_noise=0.05,
        with_disagreement=False, seed=cfg.seed))
    planner = cfg.planner
    if _is_physics(model):  # members agree to ~1e-5: scoring on each is the same work E times
        planner = replace(planner, average_members=False)
    distiller = LoRADistiller(policy, cfg.distill)
    lora = init.copy() if init is not None else distiller.init_adapter()
    labels = labels if labels is not None else Labels.empty(task)
    if cfg.expert_paths and keep is None and _is_physics(model):
        e_obs, e_act = expert_labels(task, model, policy, init, _starts(
            task, model, real, cfg.expert_paths, rng, cfg), task.episode_steps,
            replace(planner, iterations=cfg.expert_iterations), rng)
        labels = labels.plus(e_obs, e_act, cfg.label_memory)
    starts = _starts(task, model, real, cfg.select_paths, rng, cfg)
    at_start = init is not None  # the accepted adapter: beaten only by a clear margin
    best, best_ret = lora, _episode_return(sim, policy, lora if init is not None else None, starts,
                                           task.episode_steps) if cfg.select_paths else 0.0
    for _ in range(cfg.dagger_iters):
        roll = sim.rollout(real.obs, policy, lora)
        visited = roll.obs[:, :-1].reshape(-1, task.obs_dim)  # (paths * horizon, obs_dim)
        pick = rng.choice(len(visited), min(cfg.label_states, len(visited)), replace=False)
        extra = real.obs[rng.choice(len(real.obs), cfg.label_states // 4)]
        states = np.concatenate([visited[pick], extra]).astype(np.float32)
        if keep is not None:
            states = states[keep(states)]
            if len(states) < 16:
                log.info("correction: fewer than 16 trusted label states; keeping the adapter")
                break
        plan = sim.plan(states, policy, lora, planner)
        labels = labels.plus(states, plan.actions.astype(np.float32), cfg.label_memory)
        lora = distiller.fit(labels.obs, labels.act, anchor_states=real.obs, init=lora,
                             anchor_to=init).adapter
        if cfg.select_paths:
            ret = _episode_return(sim, policy, lora, starts, task.episode_steps)
            log.info("selection: iterate phantom episode return %.2f against %.2f", ret, best_ret)
            if ret > best_ret + (cfg.select_margin * abs(best_ret) if at_start else 0.0):
                best, best_ret, at_start = lora, ret, False
        else:
            best = lora
    return best, labels


def expert_labels(task: TaskSpec, model: Model, policy: MLPPolicy, lora: LoRA | None,
                  starts: np.ndarray, steps: int, planner: PlannerConfig,
                  rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Receding-horizon MPPI in the world model (warm-started plans, as ``train-base`` makes its
    expert on the nominal simulator): the states it visits over whole episodes from real start
    states, and its actions. obs (steps * paths, od), act (steps * paths, ad)."""
    dyn = ModelDynamics(model)  # type: ignore[arg-type]
    blocks = member_blocks(len(starts), dyn.n_members)
    obs = starts.astype(np.float32)
    plan = policy_plan(dyn, task, policy, lora, obs, planner.horizon)
    out_obs, out_act = [], []
    for _ in range(steps):
        res = mppi_plan(dyn, task, obs, plan, planner, rng)
        out_obs.append(obs)
        out_act.append(res.actions.astype(np.float32))
        obs, _ = step_obs(dyn, task, obs, res.actions, blocks)
        plan = np.concatenate([res.plan[:, 1:], res.plan[:, -1:]], axis=1)
    return np.concatenate(out_obs), np.concatenate(out_act)


def _starts(task: TaskSpec, model: Model, real: RealData, n: int, rng: np.random.Generator,
            cfg: AdaptConfig) -> np.ndarray:
    """Start states of whole phantom episodes: recorded real states; with the physics prior,
    ``cfg.box_starts`` of them (half by default) drawn uniformly from the task's observation box
    instead (the prior holds there too, and the device's next episodes may start anywhere its
    real ones have not)."""
    pick = real.obs[rng.integers(0, len(real.obs), n)].astype(np.float32)
    if _is_physics(model):
        k = int(n * cfg.box_starts)
        box = rng.uniform(task.obs_low, task.obs_high, (k, task.obs_dim)).astype(np.float32)
        pick[:k] = task.project_obs(box)
    return pick


def _is_physics(model: object) -> bool:
    return isinstance(model, PhysicsModel)


def _episode_return(sim: PhantomPathSimulator, policy: MLPPolicy, lora: LoRA | None,
                    starts: np.ndarray, horizon: int) -> float:
    """Mean phantom return of whole episodes from the given real start states (deterministic)."""
    from .judicial import rollout_paths

    return float(rollout_paths(sim.dyn, sim.task, policy, lora, starts, horizon)[2].sum(1).mean())


# ---------------------------------------------------------------------------- the round


@dataclass
class RoundResult:
    """What one slot round produced and decided."""

    verdict: str
    """published, corrected or blocked."""
    adapter: LoRA | None
    """The adapter to publish (None when blocked)."""
    decision: Decision
    """The judicial ``Decision`` (both candidates and both judgements)."""
    record: Any
    """The judicial AuditRecord."""
    transitions: int
    """Real transitions the round used."""
    seconds: float
    """Wall time of the round."""
    cpu_seconds: float = 0.0
    """CPU time of the round (this process, all threads)."""
    model_kind: str = ""
    """``physics`` or ``ensemble``."""
    scores: dict[str, float] = field(default_factory=dict)
    """Model figures of the round (fit error, identified parameters)."""


def adaptation_round(task: TaskSpec, policy: MLPPolicy, real: RealData, cfg: AdaptConfig,
                     auditor: JudicialAuditor | None = None, *, fleet: str, slot: str,
                     device: str | None, reference: LoRA | None = None,
                     subject: str = "candidate", model: Model | None = None,
                     labels: Labels | None = None, refit: bool | None = None,
                     devices: Mapping[str, RealData] | None = None,
                     screen: DeviceScreen | None = None,
                     running: Mapping[str, Combination] | None = None
                     ) -> tuple[RoundResult, Model, Labels]:
    """One round: fit (unless ``model`` is given and ``refit`` is False), produce from the
    ``reference`` adapter, review with one correction. Returns the result, the fitted model and the
    labels including this round's (the caller keeps them for the next round).

    ``devices`` (fleet rounds: each contributing device's own transitions): devices whose traces
    contradict the others' physics are excluded (``real`` becomes the kept devices' pooled data;
    the record names the excluded), and an approved candidate must not hurt any kept device in
    its own identified physics (``judicial.fleet``). ``screen``: that screening when the caller
    already ran it (``Learner.round`` fits the model on the kept devices first).
    ``running``: what each device runs (``plasma.server.slots``); a fleet candidate is then
    judged on each kept device as base ⊕ candidate ⊕ that device's adapter.

    ``task`` is the phantom world's task (its reward is what the planner maximizes); the auditor
    judges in that same world. ``refit`` defaults to True when no model is given."""
    t0, c0 = time.perf_counter(), time.process_time()
    auditor = auditor or JudicialAuditor(task, policy, cfg.judicial)
    if screen is None and devices:
        screen = screen_devices(task, devices, auditor.cfg)
    if screen is not None and devices:
        real = pool(devices, screen.kept)
        if screen.excluded:
            log.warning("fleet round: excluded %s", screen.message)
    if model is None or (refit if refit is not None else False):
        model = fit_model(task, real, cfg, model)
    planning, heldout = split_members(model, cfg.heldout_members)  # type: ignore[arg-type]
    prior = labels
    candidate, labels_out = phantom_dagger(task, policy, planning, real, cfg, init=reference,
                                           labels=prior)

    def redistill(penalized: TaskSpec, keep: StateFilter) -> LoRA:
        return phantom_dagger(penalized, policy, planning, real, cfg, init=reference,
                              labels=prior, keep=keep)[0]

    decision = auditor.review(candidate, model=planning, real=real, fleet=fleet,  # type: ignore[arg-type]
                              slot=slot, device=device,  # type: ignore[arg-type]
                              reference=reference, heldout=heldout, redistill=redistill,
                              subject=subject)
    if screen is not None and devices:
        kept = {d: devices[d] for d in screen.kept}
        gains = judge_devices(task, policy, decision.adapter, reference, kept, auditor.cfg,
                              running, planning) if decision.adapter is not None else {}
        decision = fleet_decision(decision, screen, gains, auditor.cfg, running)
    scores: dict[str, float] = {}
    if isinstance(model, PhysicsModel):
        scores = {f"physics_{k}": v for k, v in model.physics.items() if k in model.names}
    if isinstance(model, ResidualModel):
        scores["residual_share"] = model.residual_share
    result = RoundResult(decision.verdict, decision.adapter, decision, decision.record,
                         len(real.obs), time.perf_counter() - t0, time.process_time() - c0,
                         "physics" if isinstance(model, PhysicsModel) else "ensemble", scores)
    # labels of a candidate blocked for anything but "no gain" may come from an exploited model
    honest = decision.adapter is not None or all(r.code == "no_predicted_gain"
                                                 for r in decision.first.reasons)
    return result, model, labels_out if honest else (prior or Labels.empty(task))


class Learner:
    """What persists across the rounds of one slot target (a device, or the fleet): the world
    model (warm-started), the aggregated labels and the last accepted adapter.

    ``plasma-server run`` keeps one per device; ``bench adapt`` one for its device."""

    def __init__(self, task: TaskSpec, cfg: AdaptConfig, adapter: LoRA | None = None) -> None:
        self.task, self.cfg = task, cfg.for_task(task)
        self.model: Model | None = None
        self.labels = Labels.empty(task)
        self.adapter = adapter
        """The last accepted adapter (the next round's start and trust-region anchor)."""
        self.rounds = 0
        self.last: RoundResult | None = None

    def reset_adapter(self) -> None:
        """The device refused or rolled back the adapter: start again from its base (the labels
        were made for a policy the device no longer runs; the model is still right)."""
        self.adapter = None
        self.labels = Labels.empty(self.task)

    def round(self, policy: MLPPolicy, real: RealData, *, fleet: str, slot: str,
              device: str | None, subject: str = "candidate",
              auditor: JudicialAuditor | None = None,
              devices: Mapping[str, RealData] | None = None,
              running: Mapping[str, Combination] | None = None) -> RoundResult:
        """Refit the model on ``real``, produce from the accepted adapter, review; remember the
        outcome (the adapter only when approved). ``devices``: the fleet slot's per-device data
        (the model is then fitted on the devices the screen keeps, see ``adaptation_round``);
        ``running``: what each of them runs (the fleet candidate is judged with its adapter)."""
        screen = None
        if devices:
            screen = screen_devices(self.task, devices,
                                    auditor.cfg if auditor is not None else self.cfg.judicial)
            real = pool(devices, screen.kept)
        self.model = fit_model(self.task, real, self.cfg, self.model)
        result, self.model, self.labels = adaptation_round(
            self.task, policy, real, self.cfg, auditor, fleet=fleet, slot=slot, device=device,
            reference=self.adapter, subject=subject, model=self.model, labels=self.labels,
            refit=False, devices=devices, screen=screen, running=running)
        if result.adapter is not None:
            self.adapter = result.adapter
        self.rounds += 1
        self.last = result
        return result
