"""Server base policies: an expert on the true simulator (MPPI, or the LQR gain of its
linearization for stabilization tasks whose simulator step is costly), cloned into an MLP with
DAgger."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from .phantom import PlannerConfig, SimDynamics, mppi_plan, policy_plan
from .policy_net import Adam, LoRA, MLPPolicy
from .tasks import TaskSpec, get_task, make_env

__all__ = ["behaviour_clone", "cache_key", "lqr_gain", "cached_policy", "collect", "default_cache_dir",
           "EVAL_SEED0", "evaluate", "export_policy", "mppi_expert", "PolicyFn",
           "sim_rollout_states", "TASK_BUDGETS", "train_base", "train_config", "train_policy",
           "TrainBaseConfig"]

log = logging.getLogger(__name__)

PolicyFn = Callable[[np.ndarray], np.ndarray]
"""obs (batch, obs_dim) -> actions (batch, act_dim)."""

EVAL_SEED0 = 10_000
"""First of the fixed evaluation seeds (training never resets with seeds in this range)."""


@dataclass
class TrainBaseConfig:
    """``plasma-server train-base``: train an MLP policy at given physics and export a bundle."""

    env_id: str = "Pendulum-v1"
    """Gymnasium id of a task in ``plasma.server.tasks.TASKS``."""
    physics: dict[str, float] = field(default_factory=dict)
    """Physics overrides (e.g. {"m": 1.6, "g": 12.0}); empty = defaults."""
    out_dir: str | None = None
    """Bundle directory to export to (None: do not export)."""
    hidden: tuple[int, ...] = (64, 64)
    """Hidden widths of the policy MLP."""
    expert_episodes: int = 16
    """Episodes of receding-horizon MPPI on the true simulator, run as one batch."""
    expert_iterations: int = 2
    """MPPI refinements per control step in the expert (warm-started plans need few)."""
    dagger_iters: int = 3
    """DAgger rounds: roll the MLP, relabel its states with the planner, refit."""
    dagger_episodes: int = 16
    """Policy episodes per DAgger round (batched on the true simulator)."""
    label_states: int = 2000
    """States relabelled per DAgger round."""
    planner: PlannerConfig = field(default_factory=lambda: PlannerConfig(candidates=128, horizon=30, iterations=4))
    """MPPI settings used for labelling (and, with ``expert_iterations``, for the expert)."""
    bc_steps: int = 1500
    """Adam steps of behaviour cloning per fit."""
    batch_size: int = 256
    """Behaviour-cloning minibatch."""
    lr: float = 3e-3
    """Behaviour-cloning learning rate."""
    eval_episodes: int = 10
    """Evaluation episodes on the real gym env, seeds EVAL_SEED0 ... EVAL_SEED0 + n - 1."""
    seed: int = 0
    """Seed for init, sampling and training resets."""
    expert: str = "mppi"
    """``mppi``: receding-horizon MPPI on the true simulator; ``lqr``: the LQR gain of the true
    simulator linearized at the origin (stabilization tasks: exact, and seconds instead of CPU-
    minutes where a simulator step is costly)."""
    lqr_q: tuple[float, ...] = ()
    """LQR state weights (one per observation dimension; empty: 1 / obs_std^2)."""
    lqr_r: float = 0.1
    """LQR action weight."""
    output_gain: float = 0.01
    """Init scale of the last layer against 1/sqrt(fan_in) (``MLPPolicy.init``'s 0.01: actions
    start near the middle). 1.0 lets the output layer carry the action scale: the judicial audit
    bounds ||dW|| / ||W|| per layer, and a clone whose output layer stays tiny (an LQR clone: 0.22
    against 1.16 for Pendulum's base) cannot be adapted to a rescaled action within that bound."""


TASK_BUDGETS: dict[str, dict[str, Any]] = {
    # A MuJoCo step costs ~10 us of CPU against ~0.05 us for a numpy Pendulum row: the expert
    # and the labels are made with a smaller planner and fewer rows (about 5 CPU-minutes).
    "InvertedPendulum-v5": dict(expert="lqr", lqr_q=(1.0, 10.0, 0.1, 0.1), lqr_r=0.1, output_gain=1.0,
                                expert_episodes=16, dagger_iters=4, dagger_episodes=16,
                                label_states=3000, bc_steps=2000),
}
"""Per-task training budgets (``train_config``); tasks not named use ``TrainBaseConfig``'s."""


def train_config(env_id: str, physics: Mapping[str, float] | None = None, **kw: Any) -> TrainBaseConfig:
    """The training settings of ``env_id`` (its ``TASK_BUDGETS`` entry), ``kw`` on top."""
    return TrainBaseConfig(env_id=env_id, physics=dict(physics or {}),
                           **{**TASK_BUDGETS.get(env_id, {}), **kw})


def evaluate(act: PolicyFn, env_id: str, physics: Mapping[str, float] | None, episodes: int = 10,
             seed0: int = EVAL_SEED0, wrapper: str | None = None) -> dict[str, Any]:
    """Mean return over fixed seeds on the real gym env; all episodes step in lock-step as one batch.
    ``wrapper``: a device-side wrapper (``module:Class``, as ``plasma-edge run --wrapper``)."""
    envs = [make_env(env_id, physics) for _ in range(episodes)]
    if wrapper:
        from plasma.edge.envs import wrap_env

        envs = [wrap_env(e, wrapper) for e in envs]
    obs = np.stack([e.reset(seed=seed0 + i)[0] for i, e in enumerate(envs)]).astype(np.float32)
    returns = np.zeros(episodes)
    done = np.zeros(episodes, bool)
    while not done.all():
        actions = act(obs)
        for i, e in enumerate(envs):
            if done[i]:
                continue
            o, r, term, trunc, _ = e.step(actions[i])
            returns[i] += r
            obs[i] = o
            done[i] = term or trunc
    return {"mean": float(returns.mean()), "std": float(returns.std()),
            "sem": float(returns.std() / np.sqrt(episodes)), "returns": returns.tolist()}


def collect(act: PolicyFn, env_id: str, physics: Mapping[str, float] | None, episodes: int, seed0: int,
            noise: float = 0.0, rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
    """Real transitions of ``episodes`` lock-stepped episodes: obs, act, rew, next_obs (flat) and returns."""
    task = get_task(env_id)
    rng = rng or np.random.default_rng(seed0)
    envs = [make_env(env_id, physics) for _ in range(episodes)]
    obs = np.stack([e.reset(seed=seed0 + i)[0] for i, e in enumerate(envs)]).astype(np.float32)
    rows: dict[str, list[np.ndarray]] = {"obs": [], "act": [], "rew": [], "next_obs": []}
    returns = np.zeros(episodes)
    alive = np.ones(episodes, bool)
    sigma = noise * 0.5 * (task.act_high - task.act_low)
    while alive.any():
        a = act(obs)
        if noise > 0:
            a = np.clip(a + sigma * rng.standard_normal(a.shape), task.act_low, task.act_high).astype(np.float32)
        for i, e in enumerate(envs):
            if not alive[i]:
                continue
            o, r, term, trunc, _ = e.step(a[i])
            rows["obs"].append(obs[i].copy())
            rows["act"].append(a[i].copy())
            rows["rew"].append(np.float32(r))
            rows["next_obs"].append(np.asarray(o, np.float32))
            returns[i] += r
            obs[i] = o
            alive[i] = not (term or trunc)
    out = {k: np.asarray(v, np.float32) for k, v in rows.items()}
    out["returns"] = returns
    return out


def behaviour_clone(policy: MLPPolicy, obs: np.ndarray, labels: np.ndarray, steps: int, batch: int, lr: float,
                    rng: np.random.Generator) -> float:
    """Fit all policy weights to planner labels by MSE in half-range-normalized action units."""
    opt = Adam(policy.params(), lr=lr)
    half = 0.5 * (policy.act_high - policy.act_low)
    loss = 0.0
    for i in range(steps):
        idx = rng.integers(0, len(obs), min(batch, len(obs)))
        a, cache = policy.forward_cache(obs[idx])
        err = (a - labels[idx]) / half  # (batch, act_dim)
        loss = float(np.mean(err**2))
        grads, _ = policy.backward(cache, 2 * err / half / err.size)
        for g_i, g in enumerate(grads):
            grads[g_i] = g.astype(np.float32)
        opt.lr = lr * (1 - i / steps) + 1e-4  # linear decay
        opt.step(grads)
    return loss


def _reset_states(task: TaskSpec, physics: Mapping[str, float], n: int, seed0: int) -> np.ndarray:
    """n start observations from the env's own reset distribution (seeds seed0 .. seed0 + n - 1)."""
    env = make_env(task.env_id, physics)
    return np.stack([env.reset(seed=seed0 + i)[0] for i in range(n)]).astype(np.float32)


def mppi_expert(task: TaskSpec, physics: Mapping[str, float], start: np.ndarray, steps: int, cfg: PlannerConfig,
                iterations: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Receding-horizon MPPI on the true simulator for a batch of episodes.

    Returns visited obs (steps, E, od), actions (steps, E, ad), and returns (E,)."""
    dyn = SimDynamics(task, physics)
    step_cfg = PlannerConfig(**{**cfg.__dict__, "iterations": iterations})
    plan = np.zeros((len(start), cfg.horizon, task.act_dim), np.float32)
    obs = start.astype(np.float32)
    all_obs, all_act, ret = [], [], np.zeros(len(start))
    for _ in range(steps):
        res = mppi_plan(dyn, task, obs, plan, step_cfg, rng)
        act = res.actions
        all_obs.append(obs)
        all_act.append(act)
        nxt = task.sim_step(obs, act, task.physics(physics))  # type: ignore[misc]
        ret += task.reward(obs, act, nxt)  # type: ignore[misc]
        obs = nxt.astype(np.float32)
        plan = np.concatenate([res.plan[:, 1:], res.plan[:, -1:]], axis=1)  # shift the warm start
    return np.stack(all_obs), np.stack(all_act), ret


def sim_rollout_states(task: TaskSpec, physics: Mapping[str, float], policy: MLPPolicy, lora: LoRA | None,
                       start: np.ndarray, steps: int, noise: float, rng: np.random.Generator) -> np.ndarray:
    """States visited by the policy on the true simulator: (steps * E, obs_dim)."""
    obs = start.astype(np.float32)
    sigma = noise * 0.5 * (task.act_high - task.act_low)
    out = []
    for _ in range(steps):
        out.append(obs)
        a = policy.forward(obs, lora)
        a = np.clip(a + sigma * rng.standard_normal(a.shape), task.act_low, task.act_high)
        obs = task.sim_step(obs, a, task.physics(physics)).astype(np.float32)  # type: ignore[misc]
    return np.concatenate(out)


def lqr_gain(task: TaskSpec, physics: Mapping[str, float], q: tuple[float, ...] = (),
             r: float = 0.1) -> np.ndarray:
    """(act_dim, obs_dim) infinite-horizon discrete LQR gain of ``task.sim_step`` linearized
    (central differences) at zero observation and action: the expert is ``-K @ obs``."""
    od, ad, eps = task.obs_dim, task.act_dim, 1e-5
    zero_o, zero_a = np.zeros((1, od)), np.zeros((1, ad))

    def f(o: np.ndarray, a: np.ndarray) -> np.ndarray:
        return task.sim_step(o, a, physics)[0]  # type: ignore[misc]

    a_mat = np.stack([(f(zero_o + eps * np.eye(od)[i], zero_a) - f(zero_o - eps * np.eye(od)[i], zero_a))
                      / (2 * eps) for i in range(od)], axis=1)
    b_mat = np.stack([(f(zero_o, zero_a + eps * np.eye(ad)[i]) - f(zero_o, zero_a - eps * np.eye(ad)[i]))
                      / (2 * eps) for i in range(ad)], axis=1)
    qm = np.diag(q if q else 1.0 / task.obs_std.astype(np.float64) ** 2)
    rm = r * np.eye(ad)
    p = qm.copy()
    for _ in range(5000):  # Riccati recursion to its fixed point
        k = np.linalg.solve(rm + b_mat.T @ p @ b_mat, b_mat.T @ p @ a_mat)
        p_new = qm + a_mat.T @ p @ (a_mat - b_mat @ k)
        if np.max(np.abs(p_new - p)) < 1e-10 * max(1.0, float(np.max(np.abs(p)))):
            break
        p = p_new
    return k


def _lqr_expert(task: TaskSpec, physics: Mapping[str, float], cfg: TrainBaseConfig, start: np.ndarray,
                rng: np.random.Generator) -> tuple[PolicyFn, np.ndarray, np.ndarray, np.ndarray]:
    """The LQR expert, and its episodes on the true simulator (obs, act, returns) from ``start``."""
    gain = lqr_gain(task, physics, cfg.lqr_q, cfg.lqr_r)

    def expert(obs: np.ndarray) -> np.ndarray:
        return np.clip(-obs @ gain.T, task.act_low, task.act_high).astype(np.float32)

    obs, all_obs, all_act, ret = start.astype(np.float32), [], [], np.zeros(len(start))
    sigma = 0.1 * 0.5 * (task.act_high - task.act_low)
    for _ in range(task.episode_steps):
        act = expert(obs)
        noisy = np.clip(act + sigma * rng.standard_normal(act.shape), task.act_low, task.act_high)
        all_obs.append(obs)
        all_act.append(act)
        nxt = task.sim_step(obs, noisy, physics).astype(np.float32)  # type: ignore[misc]
        ret += task.reward(obs, noisy, nxt)  # type: ignore[misc]
        obs = nxt
    return expert, np.stack(all_obs), np.stack(all_act), ret


def train_policy(cfg: TrainBaseConfig) -> tuple[MLPPolicy, dict[str, Any]]:
    """Expert on the true simulator (MPPI, or LQR) -> behaviour cloning -> DAgger. No gym env in
    the loop."""
    task = get_task(cfg.env_id)
    if task.sim_step is None or task.reward is None:
        raise ValueError(f"{cfg.env_id}: train-base needs a vectorized simulator and a known reward")
    physics = task.physics(cfg.physics)
    rng = np.random.default_rng(cfg.seed)
    t0 = time.perf_counter()
    start = _reset_states(task, physics, cfg.expert_episodes, seed0=cfg.seed * 1000)
    if cfg.expert == "lqr":
        return _train_lqr(task, physics, cfg, start, rng, t0)
    e_obs, e_act, e_ret = mppi_expert(task, physics, start, task.episode_steps, cfg.planner,
                                      cfg.expert_iterations, rng)
    data_obs = e_obs.reshape(-1, task.obs_dim)
    data_act = e_act.reshape(-1, task.act_dim)
    log.info("expert: mean return %.1f on the true simulator (%.1fs)", e_ret.mean(), time.perf_counter() - t0)
    policy = MLPPolicy.init(task.obs_dim, task.act_dim, cfg.hidden, obs_mean=task.obs_mean, obs_std=task.obs_std,
                            act_low=task.act_low, act_high=task.act_high, seed=cfg.seed)
    loss = behaviour_clone(policy, data_obs, data_act, cfg.bc_steps, cfg.batch_size, cfg.lr, rng)
    dyn = SimDynamics(task, physics)
    for it in range(cfg.dagger_iters):
        start = _reset_states(task, physics, cfg.dagger_episodes, seed0=cfg.seed * 1000 + 100 * (it + 1))
        states = sim_rollout_states(task, physics, policy, None, start, task.episode_steps, 0.1, rng)
        states = states[rng.choice(len(states), min(cfg.label_states, len(states)), replace=False)]
        prior = policy_plan(dyn, task, policy, None, states, cfg.planner.horizon)
        labels = mppi_plan(dyn, task, states, prior, cfg.planner, rng).actions
        data_obs = np.concatenate([data_obs, states])
        data_act = np.concatenate([data_act, labels])
        loss = behaviour_clone(policy, data_obs, data_act, cfg.bc_steps, cfg.batch_size, cfg.lr, rng)
        log.info("dagger %d: %d labels, bc loss %.4f (%.1fs)", it, len(data_obs), loss, time.perf_counter() - t0)
    info = {"expert_return_sim": float(e_ret.mean()), "bc_loss": loss, "labels": len(data_obs),
            "train_s": time.perf_counter() - t0}
    return policy, info


def _train_lqr(task: TaskSpec, physics: Mapping[str, float], cfg: TrainBaseConfig, start: np.ndarray,
               rng: np.random.Generator, t0: float) -> tuple[MLPPolicy, dict[str, Any]]:
    """BC on the LQR expert's noisy episodes, then DAgger rounds labelled by the same gain."""
    expert, e_obs, e_act, e_ret = _lqr_expert(task, physics, cfg, start, rng)
    data_obs, data_act = e_obs.reshape(-1, task.obs_dim), e_act.reshape(-1, task.act_dim)
    policy = MLPPolicy.init(task.obs_dim, task.act_dim, cfg.hidden, obs_mean=task.obs_mean, obs_std=task.obs_std,
                            act_low=task.act_low, act_high=task.act_high, seed=cfg.seed)
    policy.layers[-1][0][...] *= cfg.output_gain / 0.01  # MLPPolicy.init's last layer is 0.01
    loss = behaviour_clone(policy, data_obs, data_act, cfg.bc_steps, cfg.batch_size, cfg.lr, rng)
    for it in range(cfg.dagger_iters):
        start = _reset_states(task, physics, cfg.dagger_episodes, seed0=cfg.seed * 1000 + 100 * (it + 1))
        states = sim_rollout_states(task, physics, policy, None, start, task.episode_steps, 0.1, rng)
        states = states[rng.choice(len(states), min(cfg.label_states, len(states)), replace=False)]
        data_obs = np.concatenate([data_obs, states])
        data_act = np.concatenate([data_act, expert(states)])
        loss = behaviour_clone(policy, data_obs, data_act, cfg.bc_steps, cfg.batch_size, cfg.lr, rng)
        log.info("dagger %d: %d labels, bc loss %.4f (%.1fs)", it, len(data_obs), loss, time.perf_counter() - t0)
    return policy, {"expert_return_sim": float(e_ret.mean()), "bc_loss": loss, "labels": len(data_obs),
                    "train_s": time.perf_counter() - t0, "expert": "lqr"}


def export_policy(policy: MLPPolicy, out_dir: str | Path, task: TaskSpec, physics: Mapping[str, float],
                  meta: Mapping[str, Any] | None = None) -> Path:
    """Write a bundle with the exporter (plasma.server.export), plus our own ``policy.npz`` beside it."""
    from .export import export_bundle

    out = export_bundle(Path(out_dir), policy.layers, obs_mean=policy.obs_mean, obs_std=policy.obs_std,
                        act_low=policy.act_low, act_high=policy.act_high, hidden_activation="tanh",
                        obs_low=task.obs_low, obs_high=task.obs_high, env_id=task.env_id,
                        physics=dict(physics), meta=dict(meta or {}))
    policy.save_npz(Path(out) / "policy.npz")
    return Path(out)


def train_base(cfg: TrainBaseConfig) -> dict[str, Any]:
    """Train, evaluate on the real gym env over fixed seeds, and export a bundle if ``out_dir`` is set."""
    policy, info = train_policy(cfg)
    score = evaluate(policy.forward, cfg.env_id, cfg.physics, cfg.eval_episodes)
    result: dict[str, Any] = {"env_id": cfg.env_id, "physics": dict(cfg.physics), "mean_return": score["mean"],
                              "std_return": score["std"], "eval_episodes": cfg.eval_episodes,
                              "eval_seed0": EVAL_SEED0, **info}
    log.info("base policy %s %s: mean return %.1f +- %.1f", cfg.env_id, cfg.physics, score["mean"], score["sem"])
    if cfg.out_dir:
        task = get_task(cfg.env_id)
        result["bundle"] = str(export_policy(policy, cfg.out_dir, task, task.physics(cfg.physics),
                                             meta={"train": "mppi-expert+dagger", "mean_return": score["mean"]}))
    result["policy"] = policy
    return result


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "plasma"


def cache_key(cfg: TrainBaseConfig) -> str:
    """Readable env + physics prefix, then a digest of every training setting (budgets included)."""
    import hashlib

    parts = [cfg.env_id] + [f"{k}={float(v):g}" for k, v in sorted(cfg.physics.items())]
    digest = hashlib.sha1(repr(replace(cfg, out_dir=None, physics={})).encode()).hexdigest()[:10]
    return "_".join(parts + [digest]).replace("/", "-")


def cached_policy(cfg: TrainBaseConfig, cache_dir: str | Path | None = None
                  ) -> tuple[MLPPolicy, dict[str, Any], Path]:
    """``train_policy`` cached under ``cache_dir`` (default ~/.cache/plasma) keyed by ``cache_key``.

    Returns the policy, its training info and its cache directory."""
    import json

    root = Path(cache_dir) if cache_dir else default_cache_dir()
    d = root / cache_key(cfg)
    if (d / "policy.npz").exists() and (d / "info.json").exists():
        return MLPPolicy.load_npz(d / "policy.npz"), json.loads((d / "info.json").read_text()), d
    policy, info = train_policy(cfg)
    d.mkdir(parents=True, exist_ok=True)
    policy.save_npz(d / "policy.npz")
    (d / "info.json").write_text(json.dumps(info))
    return policy, info, d
