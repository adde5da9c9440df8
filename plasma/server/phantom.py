"""Server stage 3: world model + policy -> batched phantom paths and planner actions."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from plasma.protocol import SimulationResult

from .policy_net import LoRA, MLPPolicy
from .tasks import TaskSpec
from .worldmodel import WorldModel, WorldModelConfig

__all__ = ["bench_phantom", "blas_threads", "Blocks", "Dynamics", "member_blocks", "ModelDynamics",
           "mppi_plan", "PhantomBenchConfig", "PhantomConfig", "PhantomPathSimulator",
           "PhantomRollout", "PlannerConfig", "PlanResult", "policy_plan", "SimDynamics",
           "step_obs", "step_paths"]

Blocks = list[tuple[int, slice]]
"""(member, rows) pairs, ``member_blocks``' answer: the rows of a batch each member steps."""

_REWARD_ROWS = 1 << 16
"""Rows per call of the task's reward in the planner (``_sequence_returns``)."""


@contextmanager
def blas_threads(n: int | None) -> Iterator[None]:
    """Run the block with numpy's BLAS limited to ``n`` threads (None: leave it alone).

    One thread is fastest for these small matmuls: thread hand-offs on 200-row matmuls cost more
    than they save (figures in docs/benchmarks.md, "World-model rollouts: BLAS threads")."""
    if not n:
        yield
        return
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=int(n), user_api="blas"):
        yield


class Dynamics(Protocol):
    """Anything that steps a batch with one of ``n_members`` models (the ensemble or the true sim)."""

    n_members: int

    def step_member(self, member: int, obs: np.ndarray, act: np.ndarray) -> np.ndarray:
        """obs (batch, obs_dim), act (batch, act_dim) -> next target (batch, obs_dim [+1 reward])."""
        ...


@dataclass
class SimDynamics:
    """The true simulator as a one-member ``Dynamics`` (base/oracle training and tests only)."""

    task: TaskSpec
    physics: Mapping[str, float]
    n_members: int = 1

    def step_member(self, member: int, obs: np.ndarray, act: np.ndarray) -> np.ndarray:
        if self.task.sim_step is None:
            raise ValueError(f"{self.task.env_id} has no vectorized simulator")
        return self.task.sim_step(obs, act, self.task.physics(self.physics))


class ModelDynamics:
    """A ``WorldModel`` seen as ``Dynamics``: member i is one ensemble member."""

    def __init__(self, model: WorldModel) -> None:
        self.model = model
        self.n_members = len(model.members)
        self.step_blocks: Callable[[np.ndarray, np.ndarray, Blocks], np.ndarray | None] | None = \
            getattr(model, "step_blocks", None)
        """The model's own step of every block in one call (``PhysicsModel.step_blocks``), if
        it has one: ``step_paths`` uses it and falls back to a call per member on None."""

    def step_member(self, member: int, obs: np.ndarray, act: np.ndarray) -> np.ndarray:
        return self.model.step_member(member, obs, act)


def member_blocks(n_paths: int, n_members: int) -> Blocks:
    """TS-inf assignment: path p uses member p * n_members // n_paths, as contiguous slices.

    Contiguous blocks keep every member a plain 2-D matmul on a view (no gather): about 5x
    faster than one 3-D np.matmul over members (docs/benchmarks.md)."""
    edges = [(m * n_paths) // n_members for m in range(n_members + 1)]
    return [(m, slice(edges[m], edges[m + 1])) for m in range(n_members) if edges[m + 1] > edges[m]]


def step_paths(dyn: Dynamics, task: TaskSpec, obs: np.ndarray, act: np.ndarray,
               blocks: Blocks) -> tuple[np.ndarray, np.ndarray]:
    """One step of every path: obs (paths, obs_dim), act (paths, act_dim) -> next_obs, reward (paths,).

    A model that steps every block in one call (``PhysicsModel.step_blocks``: its members'
    parameters stacked row by row) does so; otherwise one ``step_member`` call per block."""
    next_obs, learned = step_obs(dyn, task, obs, act, blocks)
    rew = task.reward(obs, act, next_obs) if task.reward is not None else learned
    return next_obs, rew.astype(np.float32)  # type: ignore[union-attr]


def step_obs(dyn: Dynamics, task: TaskSpec, obs: np.ndarray, act: np.ndarray,
             blocks: Blocks) -> tuple[np.ndarray, np.ndarray | None]:
    """``step_paths`` without the task's reward: next_obs (paths, obs_dim) and, when the model
    learns the reward (``task.reward`` is None), its predicted reward (paths,), else None."""
    batched = getattr(dyn, "step_blocks", None)
    out = batched(obs, act, blocks) if batched is not None else None
    if out is not None:
        out = out.astype(np.float32, copy=False)
    else:
        out = np.empty((len(obs), task.obs_dim + (0 if task.reward is not None else 1)), np.float32)
        for member, sl in blocks:
            out[sl] = dyn.step_member(member, obs[sl], act[sl])
    next_obs = task.project_obs(out[:, : task.obs_dim])
    return next_obs, (out[:, task.obs_dim] if task.reward is None else None)


@dataclass
class PlannerConfig:
    """MPPI over open-loop action sequences, centred on the policy's own plan."""

    candidates: int = 64
    """Sampled action sequences per start state."""
    horizon: int = 30
    """Planning horizon in steps (Pendulum: 30 steps = 1.5 s, enough to see a swing pay off)."""
    iterations: int = 3
    """MPPI refinements per call."""
    noise_std: float = 0.5
    """Sampling std as a fraction of the half action range."""
    kappa: float = 10.0
    """MPPI inverse temperature on returns rescaled to [0, 1] over the candidates."""
    discount: float = 1.0
    """Reward discount inside the horizon."""
    average_members: bool = True
    """Score each candidate by its mean return over every member (PETS-style), not under one member.
    Scoring a candidate under one member lets MPPI pick the member that flatters it (model exploitation)."""
    score_plan: bool = True
    """Roll the refined plan once more to report its return exactly; off, report the MPPI-weighted
    candidate return instead and save one pass (a third of the cost at 2 iterations)."""
    seed: int = 0
    """Seed of the sampling noise."""


@dataclass
class PlanResult:
    """What the planner found for a batch of start states."""

    actions: np.ndarray
    """(states, act_dim) first action of the refined plan (the label for distillation)."""
    plan: np.ndarray
    """(states, horizon, act_dim) refined open-loop plan (to warm-start receding-horizon control)."""
    plan_return: np.ndarray
    """(states,) model return of the refined plan."""
    prior_return: np.ndarray
    """(states,) model return of the prior (policy) plan."""


def _sequence_returns(dyn: Dynamics, task: TaskSpec, start: np.ndarray, seqs: np.ndarray,
                      discount: float, average_members: bool = False) -> np.ndarray:
    """Returns of open-loop sequences. start (S, od); seqs (C, S, H, ad) -> (C, S).

    average_members: every candidate runs under every member (E * C * S paths) and scores the mean;
    otherwise candidate c runs under member c * E // C (TS-inf across candidates)."""
    n_cand, n_states, horizon, ad = seqs.shape
    reps = dyn.n_members if average_members else 1
    n_paths = reps * n_cand * n_states
    obs = np.tile(start, (reps * n_cand, 1)).astype(np.float32)  # (E*C*S, od), member-major, candidate-major
    blocks = member_blocks(n_paths, reps if average_members else min(dyn.n_members, n_cand))
    acts = seqs.transpose(2, 0, 1, 3).reshape(horizon, n_cand * n_states, ad)  # each step contiguous
    acts = np.tile(acts, (1, reps, 1)) if reps > 1 else acts  # (H, E*C*S, ad)
    gains = []
    g = 1.0
    for _ in range(horizon):
        gains.append(g)
        g *= discount
    if task.reward is None:  # the model's own reward, step by step
        ret = np.zeros(n_paths, np.float32)
        for t in range(horizon):
            obs, rew = step_paths(dyn, task, obs, acts[t], blocks)
            ret += gains[t] * rew
        return ret.reshape(reps, n_cand, n_states).mean(0)
    # the states only, then the task's reward for a chunk of steps in one call (a chunk of about
    # _REWARD_ROWS rows: bigger ones cost more in fresh memory than they save in calls)
    ret = np.zeros(n_paths, np.float32)
    od, chunk = task.obs_dim, max(1, min(horizon, _REWARD_ROWS // max(n_paths, 1)))
    for t0 in range(0, horizon, chunk):
        traj = [obs]
        for t in range(t0, min(t0 + chunk, horizon)):
            traj.append(step_obs(dyn, task, traj[-1], acts[t], blocks)[0])
        obs, k = traj[-1], len(traj) - 1
        path = np.stack(traj)  # (k + 1, paths, od)
        rew = task.reward(path[:-1].reshape(-1, od), acts[t0:t0 + k].reshape(-1, ad),
                          path[1:].reshape(-1, od)).astype(np.float32).reshape(k, n_paths)
        for i in range(k):  # step by step, in order: the sums are those of one step at a time
            ret += gains[t0 + i] * rew[i]
    return ret.reshape(reps, n_cand, n_states).mean(0)


def policy_plan(dyn: Dynamics, task: TaskSpec, policy: MLPPolicy, lora: LoRA | None, start: np.ndarray,
                horizon: int) -> np.ndarray:
    """The policy's own action sequence along its mean-model rollout: (S, H, act_dim)."""
    obs = start.astype(np.float32)
    blocks = member_blocks(len(obs), dyn.n_members)
    acts = np.empty((len(obs), horizon, task.act_dim), np.float32)
    for t in range(horizon):
        acts[:, t] = policy.forward(obs, lora)
        obs, _ = step_obs(dyn, task, obs, acts[:, t], blocks)
    return acts


def mppi_plan(dyn: Dynamics, task: TaskSpec, start: np.ndarray, prior: np.ndarray, cfg: PlannerConfig,
              rng: np.random.Generator | None = None) -> PlanResult:
    """Refine the prior plans (S, H, ad) from start states (S, od) by MPPI; all states in one batch."""
    rng = rng or np.random.default_rng(cfg.seed)
    low, high = task.act_low, task.act_high
    sigma = cfg.noise_std * 0.5 * (high - low)
    mean = prior.astype(np.float32).copy()  # (S, H, ad)
    prior_ret = None
    weighted = np.zeros(len(start), np.float32)
    for _ in range(cfg.iterations):
        noise = rng.standard_normal((cfg.candidates, *mean.shape)).astype(np.float32) * sigma
        noise[0] = 0.0  # candidate 0 is the current mean: the plan never gets worse in the model
        seqs = np.clip(mean[None] + noise, low, high)  # (C, S, H, ad)
        ret = _sequence_returns(dyn, task, start, seqs, cfg.discount, cfg.average_members)  # (C, S)
        if prior_ret is None:
            prior_ret = ret[0].copy()
        spread = ret.max(0) - ret.min(0) + 1e-6
        w = np.exp(cfg.kappa * (ret - ret.max(0)) / spread)  # (C, S)
        w /= w.sum(0)
        mean = np.einsum("cs,csha->sha", w, seqs).astype(np.float32)
        weighted = (w * ret).sum(0)
    if cfg.score_plan:
        final = _sequence_returns(dyn, task, start, mean[None], cfg.discount, cfg.average_members)[0]
    else:
        final = weighted
    return PlanResult(mean[:, 0].copy(), mean, final, prior_ret if prior_ret is not None else final)


@dataclass
class PhantomRollout:
    """Batched phantom paths; ``summary`` gives the protocol's ``SimulationResult``."""

    obs: np.ndarray
    """(paths, horizon + 1, obs_dim) observations along each path."""
    actions: np.ndarray
    """(paths, horizon, act_dim) actions taken."""
    rewards: np.ndarray
    """(paths, horizon) rewards."""
    returns: np.ndarray
    """(paths,) undiscounted path returns."""
    disagreement: np.ndarray
    """(paths, horizon) ensemble disagreement at each step (zeros if not computed)."""
    members: np.ndarray
    """(paths,) ensemble member that drove each path (TS-inf)."""

    def summary(self, *, fleet: str, device: str | None, world_model_version: str,
                planner: str, planned_return: float | None = None,
                simulation_id: str | None = None) -> SimulationResult:
        """The protocol's SimulationResult for these paths (the arrays stay here)."""
        base = float(self.returns.mean()) if len(self.returns) else 0.0
        extra = {"simulation_id": simulation_id} if simulation_id else {}
        return SimulationResult(
            fleet=fleet, device=device, world_model_version=world_model_version,
            n_paths=int(self.obs.shape[0]), horizon=int(self.actions.shape[1]), planner=planner,
            base_predicted_return=base,
            planned_predicted_return=base if planned_return is None else float(planned_return),
            disagreement_mean=float(self.disagreement.mean()) if self.disagreement.size else 0.0,
            disagreement_max=float(self.disagreement.max()) if self.disagreement.size else 0.0,
            **extra)


@dataclass
class PhantomConfig:
    """Phantom paths: how many, how long, how noisy."""

    paths: int = 1000
    """Paths per batch."""
    horizon: int = 30
    """Steps per path."""
    action_noise: float = 0.0
    """Gaussian exploration noise added to policy actions, fraction of the half action range."""
    with_disagreement: bool = True
    """Evaluate every member on every path each step to record disagreement (about 5x the compute)."""
    seed: int = 0
    """Seed for start-state sampling and noise."""


class PhantomPathSimulator:
    """Rolls a (LoRA-adapted) policy through the world model from real start states."""

    def __init__(self, model: WorldModel, task: TaskSpec, cfg: PhantomConfig | None = None) -> None:
        self.model = model
        self.task = task
        self.cfg = cfg or PhantomConfig()
        self.dyn = ModelDynamics(model)
        self.rng = np.random.default_rng(self.cfg.seed)

    def rollout(self, start_pool: np.ndarray, policy: MLPPolicy, lora: LoRA | None = None,
                paths: int | None = None, horizon: int | None = None,
                with_disagreement: bool | None = None) -> PhantomRollout:
        """Start states are drawn from ``start_pool`` (real observations, (n, obs_dim))."""
        n = paths or self.cfg.paths
        h = horizon or self.cfg.horizon
        with_dis = self.cfg.with_disagreement if with_disagreement is None else with_disagreement
        task = self.task
        obs = start_pool[self.rng.integers(0, len(start_pool), n)].astype(np.float32)  # (paths, od)
        blocks = member_blocks(n, self.dyn.n_members)
        members = np.empty(n, np.int64)
        for m, sl in blocks:
            members[sl] = m
        out_obs = np.empty((n, h + 1, task.obs_dim), np.float32)
        out_act = np.empty((n, h, task.act_dim), np.float32)
        out_rew = np.empty((n, h), np.float32)
        dis = np.zeros((n, h), np.float32)
        out_obs[:, 0] = obs
        sigma = self.cfg.action_noise * 0.5 * (task.act_high - task.act_low)
        for t in range(h):
            act = policy.forward(obs, lora)
            if self.cfg.action_noise > 0:
                act = np.clip(act + sigma * self.rng.standard_normal(act.shape).astype(np.float32),
                              task.act_low, task.act_high)
            if with_dis:
                dis[:, t] = self.model.disagreement(obs, act)
            obs, rew = step_paths(self.dyn, task, obs, act, blocks)
            out_act[:, t], out_rew[:, t], out_obs[:, t + 1] = act, rew, obs
        return PhantomRollout(out_obs, out_act, out_rew, out_rew.sum(1), dis, members)

    def plan(self, states: np.ndarray, policy: MLPPolicy, lora: LoRA | None = None,
             cfg: PlannerConfig | None = None) -> PlanResult:
        """Planner actions for visited states (S, obs_dim), with the policy's plan as MPPI prior."""
        cfg = cfg or PlannerConfig()
        prior = policy_plan(self.dyn, self.task, policy, lora, states, cfg.horizon)
        return mppi_plan(self.dyn, self.task, states, prior, cfg, self.rng)


# --------------------------------------------------------------------------- bench


@dataclass
class PhantomBenchConfig:
    """``plasma-server bench phantom``: raw batched-rollout throughput of both world models."""

    members: int = 5
    """Ensemble size."""
    hidden: tuple[int, ...] = (200, 200)
    """Hidden widths of each member."""
    paths: int = 1000
    """Paths per batch."""
    horizon: int = 30
    """Steps per path."""
    repeats: int = 5
    """Timed repetitions (best is reported)."""
    env_id: str = "Pendulum-v1"
    """Task whose dimensions and reward are used."""
    blas_threads: int | None = 1
    """OpenBLAS threads during the bench (1 measured fastest for these sizes; None = numpy's default)."""
    physics: Mapping[str, float] = field(default_factory=lambda: {"m": 1.6, "g": 12.0})
    """The physics the identified simulator is identified on (its members then differ as in a
    round: bootstrap parameter sets)."""
    transitions: int = 600
    """Transitions of that physics it is identified on (a round's first three hundred-step batches)."""


def bench_phantom(cfg: PhantomBenchConfig | None = None) -> dict[str, Any]:
    """Model steps per second of batched phantom paths (a policy acting, the model stepping, the
    task's reward) through two world models: the learned ensemble (untrained: its cost does not
    depend on its weights) and, for a task with a simulator, the model a round uses there, the
    identified simulator (``adapt.new_model`` with the default budget: ``ResidualModel``, fitted
    on ``transitions`` random-action transitions of ``physics``)."""
    from .tasks import get_task

    cfg = cfg or PhantomBenchConfig()
    task = get_task(cfg.env_id)
    model = WorldModel(task.obs_dim, task.act_dim, WorldModelConfig(ensemble_size=cfg.members, hidden=cfg.hidden))
    policy = MLPPolicy.init(task.obs_dim, task.act_dim, (64, 64), obs_mean=task.obs_mean, obs_std=task.obs_std,
                            act_low=task.act_low, act_high=task.act_high)
    rng = np.random.default_rng(0)
    pool = rng.uniform(task.obs_low, task.obs_high, (4096, task.obs_dim)).astype(np.float32)
    result: dict[str, Any] = {"paths": cfg.paths, "horizon": cfg.horizon, "members": cfg.members}

    def best_rollout(sim: PhantomPathSimulator) -> float:
        best = np.inf
        with blas_threads(cfg.blas_threads):
            for _ in range(cfg.repeats):
                t0 = time.perf_counter()
                sim.rollout(pool, policy)
                best = min(best, time.perf_counter() - t0)
        return float(best)

    for key, with_dis in (("model_steps_per_s", False), ("model_steps_per_s_with_disagreement", True)):
        best = best_rollout(PhantomPathSimulator(model, task, PhantomConfig(
            cfg.paths, cfg.horizon, with_disagreement=with_dis)))
        result[key] = cfg.paths * cfg.horizon / best
        result[key.replace("model_steps_per_s", "rollout_s")] = best
    if task.sim_step is not None:
        physics = _identified(task, cfg, rng)
        best = best_rollout(PhantomPathSimulator(physics, task, PhantomConfig(
            cfg.paths, cfg.horizon, with_disagreement=False)))
        result.update({"physics_model_steps_per_s": cfg.paths * cfg.horizon / best,
                       "physics_rollout_s": best, "physics_model": type(physics).__name__,
                       "physics_members": len(physics.members),
                       "physics": dict(cfg.physics), "physics_transitions": cfg.transitions})
    return result


def _identified(task: TaskSpec, cfg: PhantomBenchConfig, rng: np.random.Generator) -> Any:
    """The default world model of a task with a simulator, identified on random-action
    transitions of ``cfg.physics`` from states in the observation box."""
    from .adapt import adapt_config, new_model

    truth = task.physics(cfg.physics)
    obs = task.project_obs(rng.uniform(task.obs_low, task.obs_high,
                                       (cfg.transitions, task.obs_dim)).astype(np.float32))
    act = rng.uniform(task.act_low, task.act_high, (cfg.transitions, task.act_dim)).astype(np.float32)
    model = new_model(task, adapt_config("default"))
    model.fit(obs, act, task.sim_step(obs, act, truth))  # type: ignore[misc]
    return model
