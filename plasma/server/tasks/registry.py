"""Server task specs and their registry: what the server knows about each environment.

A ``TaskSpec`` is everything the world model, the phantom paths and the base-policy trainer
need to know about an environment besides its dynamics: dimensions and bounds, the observation
normalization the policy bakes in, the reward as a vectorized function (None: the world model
learns it), the physics names a shift may override, and (where one exists) a vectorized copy of
the true simulator: it trains base and oracle policies, and ``plasma.server.sysid`` identifies
its parameters on the device's real transitions.

``register_task`` adds any Gymnasium environment with Box spaces (``docs/tasks.md``).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from plasma.edge.physics import Override, apply_overrides, parse_overrides
from plasma.protocol.errors import ConfigError

__all__ = ["apply_physics", "BUILDERS", "get_task", "load_task_modules", "make_env", "register_task",
           "resolve_physics", "RewardFn", "SimStepFn", "TASKS", "TaskSpec", "UnknownPhysics"]

RewardFn = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]
"""reward(obs (B, obs_dim), act (B, act_dim), next_obs (B, obs_dim)) -> (B,)"""
SimStepFn = Callable[[np.ndarray, np.ndarray, Mapping[str, float]], np.ndarray]
"""sim_step(obs (B, obs_dim), act (B, act_dim), physics) -> next_obs (B, obs_dim)"""


class UnknownPhysics(ConfigError, KeyError):
    """A physics name the task does not have: a ConfigError (``bad_config``), and a KeyError for
    the callers that caught the lookup failure before names were typed."""


@dataclass(frozen=True)
class TaskSpec:
    """Static description of one environment, shared by every server stage."""

    env_id: str
    """Gymnasium id, e.g. ``Pendulum-v1``."""
    obs_dim: int
    """Length of an observation vector."""
    act_dim: int
    """Length of an action vector."""
    obs_low: np.ndarray
    """(obs_dim,) lower observation bounds (finite)."""
    obs_high: np.ndarray
    """(obs_dim,) upper observation bounds (finite)."""
    act_low: np.ndarray
    """(act_dim,) lower action bounds."""
    act_high: np.ndarray
    """(act_dim,) upper action bounds."""
    obs_mean: np.ndarray
    """(obs_dim,) policy input normalization: x = (obs - obs_mean) / obs_std."""
    obs_std: np.ndarray
    """(obs_dim,) policy input normalization scale."""
    episode_steps: int
    """Steps of an imagined episode (phantom paths, base training): the env's TimeLimit, or
    fewer where the task is stationary (a balance held for 200 steps is held for 1000)."""
    default_physics: Mapping[str, float]
    """Every physics name a shift may override (``plasma.edge.physics``) and its nominal value."""
    reward: RewardFn | None
    """Known vectorized reward, or None if it must be learned."""
    project_obs: Callable[[np.ndarray], np.ndarray] = field(default=lambda o: o)
    """Maps a predicted observation back onto the valid manifold (e.g. the unit circle)."""
    sim_step: SimStepFn | None = None
    """Vectorized true simulator on observations (base/oracle training, system identification)."""
    sim_rows: bool = False
    """``sim_step`` is elementwise over leading batch dimensions (obs (..., obs_dim)) and also
    takes each physics value as an array broadcasting against them (one parameter set per row,
    or per group of rows), with exactly the result the floats give row by row:
    ``PhysicsModel.step_blocks`` then steps every member's paths in one call (the classic
    tasks; a MuJoCo model takes one parameter set per call)."""
    identify: tuple[str, ...] | None = None
    """The physics names system identification fits (None: all of ``default_physics``)."""
    adapt: Mapping[str, Any] = field(default_factory=dict)
    """The round's budget scaled to this task's cost and horizon: ``AdaptConfig`` fields by
    name (``"planner.horizon"`` for a nested one) that ``AdaptConfig.for_task`` sets."""

    def physics(self, overrides: Mapping[str, float] | None = None) -> dict[str, float]:
        """Default physics with ``overrides`` applied; unknown names are a ConfigError."""
        phys = dict(self.default_physics)
        for name, value in (overrides or {}).items():
            if name not in phys:
                raise UnknownPhysics(f"{self.env_id} has no physics name {name!r}; known: "
                                     f"{', '.join(phys)}")
            phys[name] = float(value)
        return phys


TASKS: dict[str, TaskSpec] = {}
BUILDERS: dict[str, Callable[[], TaskSpec]] = {}
"""Shipped tasks registered on first use (a MuJoCo task loads gymnasium and mujoco to build)."""


def load_task_modules(modules: str | None) -> list[str]:
    """Import the comma-separated modules that register tasks (``register_task`` at import), so
    a server, a bench or a Ray worker knows a user's task before it resolves ``--env``; returns
    the module names. A module that cannot be imported (or fails while importing) is a
    ConfigError naming it."""
    names = [m.strip() for m in (modules or "").split(",") if m.strip()]
    for name in names:
        try:
            importlib.import_module(name)
        except ConfigError as exc:
            raise ConfigError(f"tasks module {name}: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - any failure of a user's module is a config error
            raise ConfigError(f"tasks module {name} could not be imported: "
                              f"{type(exc).__name__}: {exc}") from None
    return names


def get_task(env_id: str) -> TaskSpec:
    """The spec for ``env_id``; raises KeyError listing the registered ids."""
    if env_id not in TASKS and env_id in BUILDERS:
        TASKS[env_id] = BUILDERS[env_id]()
    try:
        return TASKS[env_id]
    except KeyError:
        raise KeyError(f"unsupported env {env_id!r}; registered: "
                       f"{sorted(set(TASKS) | set(BUILDERS))}") from None


def resolve_physics(env_id: str, text: str | Mapping[str, float] | None) -> dict[str, float]:
    """Override text (``"body_mass.pole=*3,opt.gravity.z=-12"``) -> absolute values by name,
    relative ones resolved against the task's nominal physics. ConfigError on a bad name."""
    task = get_task(env_id)
    overrides = parse_overrides(text) if isinstance(text, str) else {
        k: Override(k, float(v), False) for k, v in (text or {}).items()}
    nominal = task.physics()
    out = {}
    for name, ov in overrides.items():
        if name not in nominal:
            raise UnknownPhysics(f"{env_id} has no physics name {name!r}; known: {', '.join(nominal)}")
        out[name] = ov.resolve(nominal[name])
    return out


def apply_physics(env: Any, physics: Mapping[str, float]) -> None:
    """Set each physics value on the unwrapped env (the device's code path); ConfigError on a
    name the env does not have."""
    apply_overrides(env.unwrapped, physics)


def make_env(env_id: str, physics: Mapping[str, float] | None = None) -> Any:
    """A Gymnasium env with ``physics`` overrides set on the unwrapped env (gymnasium imported here)."""
    try:
        import gymnasium as gym
    except ImportError:
        raise ImportError("gymnasium is needed for environments: pip install 'plasma[server]'") from None
    if physics and env_id in TASKS:
        get_task(env_id).physics(physics)  # validates names against the spec
    env = gym.make(env_id)
    if physics:
        apply_physics(env, physics)
    return env


def register_task(env_id: str, *, reward: RewardFn | None = None,
                  physics: tuple[str, ...] | None = None, identify: tuple[str, ...] | None = None,
                  obs_low: Any = None, obs_high: Any = None, obs_mean: Any = None,
                  obs_std: Any = None, episode_steps: int | None = None,
                  project_obs: Callable[[np.ndarray], np.ndarray] | None = None,
                  sim_step: SimStepFn | None = None,
                  state_of_obs: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]] | None = None,
                  obs_of_state: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
                  adapt: Mapping[str, Any] | None = None, replace: bool = False) -> TaskSpec:
    """Register a Gymnasium env with Box observation and action spaces and return its spec.

    ``reward``: a vectorized ``reward(obs, act, next_obs)``; None: the world model learns it
    from the devices' rewards (and the task then has no simulator: planning in a simulator
    needs the reward). ``physics``: the classic-control attribute names a shift may override
    (default: every numeric attribute of the unwrapped env); a MuJoCo env also gets every field
    of ``plasma.edge.physics`` its model has. ``identify``: the names system identification
    fits. Observation bounds default to the Box's where finite, else to the range seen on 2,000
    random-action steps widened by half; the normalization to their midpoint and half-width.
    A MuJoCo env gets a vectorized simulator when its observation is ``qpos ++ qvel`` or when
    ``state_of_obs`` / ``obs_of_state`` map between the two; ``sim_step`` gives one directly.
    ``adapt``: the round's budget for this task (``TaskSpec.adapt``). ConfigError on anything that
    cannot be a task (a non-Box space, an unknown physics name).
    """
    if env_id in TASKS and not replace:
        raise ConfigError(f"{env_id} is already registered (pass replace=True)")
    try:
        import gymnasium as gym
        from gymnasium.spaces import Box
    except ImportError:
        raise ImportError("gymnasium is needed for environments: pip install 'plasma[server]'") from None
    try:
        env = gym.make(env_id)
    except gym.error.Error as exc:
        raise ConfigError(f"register_task({env_id!r}): {exc}") from None
    for what in ("observation_space", "action_space"):
        space = getattr(env, what)
        if not isinstance(space, Box) or len(space.shape) != 1:
            raise ConfigError(f"{env_id}: its {what} is {space}, a task needs a 1-D Box")
    base = env.unwrapped
    names = _classic_names(base, physics)
    default = {n: float(getattr(base, n)) for n in names}
    mujoco_sim = None
    if hasattr(getattr(base, "model", None), "body_mass"):
        from .mujoco import MujocoSim, mujoco_physics

        default.update(mujoco_physics(base.model))
        if sim_step is None and reward is not None:
            mujoco_sim = MujocoSim.of_env(env, state_of_obs, obs_of_state)
    for name in identify or ():
        if name not in default:
            raise ConfigError(f"{env_id}: cannot identify {name!r}; known: {', '.join(default)}")
    low, high = _obs_bounds(env, obs_low, obs_high)
    mean = np.asarray(obs_mean if obs_mean is not None else (low + high) / 2, np.float32)
    std = np.asarray(obs_std if obs_std is not None else (high - low) / 2, np.float32)
    step = sim_step if sim_step is not None else mujoco_sim
    spec = TaskSpec(
        env_id=env_id, obs_dim=low.size, act_dim=int(env.action_space.shape[0]),
        obs_low=low, obs_high=high, act_low=env.action_space.low.astype(np.float32),
        act_high=env.action_space.high.astype(np.float32), obs_mean=mean, obs_std=std,
        episode_steps=int(episode_steps or env.spec.max_episode_steps or 1000),
        default_physics=default, reward=reward,
        project_obs=project_obs or (lambda o: o),
        sim_step=step if reward is not None else None, identify=identify,
        adapt=dict(adapt or {}))
    env.close()
    TASKS[env_id] = spec
    return spec


def _classic_names(base: Any, physics: tuple[str, ...] | None) -> list[str]:
    numeric = [k for k, v in vars(base).items()
               if isinstance(v, (int, float)) and not isinstance(v, bool) and not k.startswith("_")]
    if physics is None:
        return [] if hasattr(getattr(base, "model", None), "body_mass") else sorted(numeric)
    unknown = [n for n in physics if n not in numeric]
    if unknown:
        raise ConfigError(f"{type(base).__name__} has no numeric attribute(s) {unknown}; "
                          f"known: {', '.join(sorted(numeric))}")
    return list(physics)


def _obs_bounds(env: Any, low: Any, high: Any) -> tuple[np.ndarray, np.ndarray]:
    space = env.observation_space
    lo = np.asarray(low if low is not None else space.low, np.float64)
    hi = np.asarray(high if high is not None else space.high, np.float64)
    if np.all(np.isfinite(lo)) and np.all(np.isfinite(hi)):
        return lo.astype(np.float32), hi.astype(np.float32)
    seen = [env.reset(seed=0)[0]]
    env.action_space.seed(0)
    for _ in range(2000):
        obs, _, term, trunc, _ = env.step(env.action_space.sample())
        seen.append(obs)
        if term or trunc:
            seen.append(env.reset()[0])
    arr = np.asarray(seen, np.float64)
    pad = 0.5 * (arr.max(0) - arr.min(0)) + 1e-3
    lo = np.where(np.isfinite(lo), lo, arr.min(0) - pad)
    hi = np.where(np.isfinite(hi), hi, arr.max(0) + pad)
    return lo.astype(np.float32), hi.astype(np.float32)
