"""What one adaptation round does and how much it may spend: ``AdaptConfig`` and its named budgets.

``adapt_config("default")`` is what ``plasma-server run`` uses; ``small`` is a cheaper planner,
distillation and audit (tests, demos on slow machines). ``seeded`` gives every stage one seed.
``Model`` is what the phantom simulator and the auditor use of a world model. The round itself
is ``plasma.server.adapt``, which re-exports these names.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import numpy as np

from .distill import DistillConfig
from .judicial import JudicialConfig
from .phantom import PlannerConfig
from .residual import ResidualConfig
from .sysid import SysIdConfig
from .tasks import TaskSpec
from .worldmodel import WorldModelConfig

__all__ = ["AdaptConfig", "BUDGETS", "Model", "adapt_config", "seeded", "with_fields"]

BUDGETS = ("default", "small")


class Model(Protocol):
    """What the phantom simulator and the auditor use of a world model."""

    members: list[Any]
    obs_dim: int
    act_dim: int

    def fit(self, obs: np.ndarray, act: np.ndarray, next_obs: np.ndarray,
            rew: np.ndarray | None = None) -> Any: ...

    def step_member(self, member: int, obs: np.ndarray, act: np.ndarray) -> np.ndarray: ...

    def step_mean(self, obs: np.ndarray, act: np.ndarray) -> np.ndarray: ...

    def disagreement(self, obs: np.ndarray, act: np.ndarray) -> np.ndarray: ...


@dataclass(frozen=True)
class AdaptConfig:
    """Everything one adaptation round does, with its budgets (``adapt_config`` names them)."""

    world_model: str = "auto"
    """``physics``: the task's simulator with identified parameters (needs ``sim_step``);
    ``ensemble``: learned MLP ensemble; ``auto``: physics when the task has a simulator."""
    sysid: SysIdConfig = field(default_factory=lambda: SysIdConfig(members=5))
    """Physics identification (members = bootstrap parameter sets)."""
    residual: ResidualConfig = field(default_factory=ResidualConfig)
    """The residual ensemble learned on the identified simulator (``plasma.server.residual``):
    what the simulator lacks, used only where it removes held-out one-step error."""
    model: WorldModelConfig = field(default_factory=lambda: WorldModelConfig(
        ensemble_size=7, hidden=(128, 128), max_epochs=40, patience=5))
    """Learned-ensemble settings (tasks without a simulator, or ``world_model="ensemble"``)."""
    heldout_members: int = 2
    """Members the planner never sees: the judicial auditor validates the gain on them."""
    dagger_iters: int = 2
    """Phantom DAgger iterations per round: roll the adapted policy in the model, relabel, refit."""
    phantom_paths: int = 128
    """Phantom paths per DAgger iteration (start states drawn from the real traces)."""
    phantom_horizon: int = 60
    """Steps per phantom path."""
    label_states: int = 500
    """Visited phantom states relabelled by the planner per DAgger iteration (plus a quarter as
    many recorded real states)."""
    expert_paths: int = 16
    """Whole episodes of receding-horizon MPPI in the world model per round, from real start
    states (warm-started plans: far better labels than one cold MPPI call per state); their states
    and actions join the labels. With the physics prior only: a learned ensemble step costs about
    50x more (measured: minutes per round). 0: DAgger labels only."""
    box_starts: float = 0.5
    """Share of the expert's and the selection's whole-episode starts drawn uniformly from the
    task's observation box (physics prior only); the rest are recorded real states. A task whose
    box holds states it never visits (a HalfCheetah on its back) sets 0."""
    expert_iterations: int = 2
    """MPPI refinements per expert step (its plans are warm-started: ``train-base`` uses 2)."""
    select_paths: int = 128
    """Producer-side selection: after each DAgger iteration the adapter's whole-episode phantom
    return from this many real start states is measured; the best iterate (or the starting
    adapter) is the candidate, so a round never submits something its own model says is worse
    over an episode (the audit's horizon is shorter). 0: the last iterate."""
    select_margin: float = 0.03
    """An iterate replaces the starting (accepted) adapter only if its whole-episode phantom
    return is better by this fraction: tiny gains are not worth a packet (the audit's probes
    call them fragile, and each packet moves the device's policy)."""
    label_memory: int = 6000
    """Planner labels kept across rounds (newest first); the adapter is distilled on all of them."""
    planner: PlannerConfig = field(default_factory=lambda: PlannerConfig(
        candidates=96, horizon=30, iterations=3, score_plan=False))
    """MPPI in the world model, centred on the adapted policy's own plan."""
    distill: DistillConfig = field(default_factory=lambda: DistillConfig(rank=8, steps=500,
                                                                        anchor=0.05))
    """LoRA distillation; ``anchor`` is the trust region's weight: squared action change against
    the last accepted adapter (the base policy in the first round) on real states."""
    max_transitions: int = 20_000
    """Newest real transitions used per round."""
    judicial: JudicialConfig = field(default_factory=JudicialConfig)
    """The auditor's budgets and thresholds."""
    seed: int = 0
    """Seed of model init, phantom paths, planner and distillation."""

    def kind(self, task: TaskSpec) -> str:
        """The world model this config builds for ``task``."""
        if self.world_model == "auto":
            return "physics" if task.sim_step is not None else "ensemble"
        if self.world_model == "physics" and task.sim_step is None:
            raise ValueError(f"{task.env_id} has no simulator: world_model must be ensemble")
        return self.world_model

    def for_task(self, task: TaskSpec) -> AdaptConfig:
        """This config with the world model resolved for ``task`` (``Learner`` calls it): the
        learned ensemble gets the planner and distillation budgets calibrated for it."""
        kind = self.kind(task)
        cfg = self if kind == self.world_model else \
            _ensemble_budget(replace(self, world_model=kind)) if kind == "ensemble" else \
            replace(self, world_model=kind)
        return with_fields(cfg, task.adapt)


def with_fields(cfg: Any, values: Mapping[str, Any]) -> Any:
    """``cfg`` (a frozen dataclass) with fields set by name; ``"planner.horizon"`` sets a nested
    one. A name the config does not have is a ValueError naming it."""
    out = cfg
    for name, value in values.items():
        head, _, rest = name.partition(".")
        if not hasattr(out, head):
            raise ValueError(f"{type(out).__name__} has no field {head!r} (from {name!r})")
        out = replace(out, **{head: with_fields(getattr(out, head), {rest: value}) if rest else value})
    return out


def _ensemble_budget(cfg: AdaptConfig) -> AdaptConfig:
    """The learned ensemble's budget: each model step is an MLP per member (about 50x the
    physics prior's cost), so the planner and distillation of the former ``run --budget
    default`` (about a minute per round on two cores), no expert episodes."""
    if cfg.planner.candidates <= 32:  # already small
        return replace(cfg, expert_paths=0)
    return replace(cfg, expert_paths=0, label_states=300,
                   planner=replace(cfg.planner, candidates=32, iterations=2),
                   distill=replace(cfg.distill, rank=4, steps=200))


def adapt_config(budget: str = "default", seed: int = 0, max_transitions: int = 20_000,
                 world_model: str = "auto") -> AdaptConfig:
    """The named budgets. ``default``: what ``plasma-server run`` uses (seconds per round with the
    physics prior, see docs/adaptation.md); ``small``: a cheaper planner, distillation and audit
    (tests, demos on slow machines). Both are seeded throughout."""
    if budget not in BUDGETS:
        raise ValueError(f"budget must be one of {BUDGETS}")
    if budget == "small":
        cfg = AdaptConfig(
            world_model=world_model, sysid=SysIdConfig(members=4, seed=seed),
            model=WorldModelConfig(ensemble_size=5, hidden=(64, 64), max_epochs=30, patience=4),
            heldout_members=1, dagger_iters=2, phantom_paths=64, phantom_horizon=40,
            label_states=200, label_memory=3000,
            planner=PlannerConfig(candidates=32, horizon=25, iterations=2, score_plan=False),
            distill=DistillConfig(rank=4, steps=200, anchor=0.05), expert_paths=8,
            judicial=JudicialConfig(paths=128, horizon=60, probe_repeats=1, support_points=1000))
    else:
        cfg = AdaptConfig(world_model=world_model, sysid=SysIdConfig(members=5, seed=seed))
        if world_model == "ensemble":
            cfg = _ensemble_budget(cfg)
    return seeded(replace(cfg, max_transitions=max_transitions), seed)


def seeded(cfg: AdaptConfig, seed: int) -> AdaptConfig:
    """One seed for everything: model, planner, distiller and auditor."""
    return replace(cfg, seed=seed, sysid=replace(cfg.sysid, seed=seed),
                   residual=replace(cfg.residual, seed=seed),
                   model=replace(cfg.model, seed=seed), planner=replace(cfg.planner, seed=seed),
                   distill=replace(cfg.distill, seed=seed), judicial=replace(cfg.judicial, seed=seed))
