"""Server task specs: what the server knows about each environment (bounds, reward, physics).

A ``TaskSpec`` is everything the world model, the phantom paths and the base-policy trainer
need to know about an environment besides its dynamics: dimensions and bounds, the observation
normalization the policy bakes in, the reward as a vectorized function, how physics overrides
are applied, and (where one exists) a vectorized copy of the true simulator used to train base
and oracle policies. Adding an environment is one ``TaskSpec`` entry in ``TASKS``.

Why the reward is given, not learned: for Pendulum-v1 the reward is a fixed, published cost
on the pre-step state and the action (angle^2 + 0.1 thdot^2 + 0.001 u^2). It is part of the
task definition, not of the device's physics, so a physics shift never changes it. Learning it
would spend model capacity and real transitions on something known exactly, and would give the
planner a second learned function to exploit. The world model therefore learns dynamics only;
``TaskSpec.reward`` is None only for tasks whose reward is not known, and then
``WorldModel(learn_reward=True)`` learns it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["apply_physics", "get_task", "make_env", "MOUNTAINCAR", "mountaincar_reward",
           "mountaincar_step", "PENDULUM", "pendulum_reward", "pendulum_step", "RewardFn",
           "SimStepFn", "TASKS", "TaskSpec"]

RewardFn = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]
"""reward(obs (B, obs_dim), act (B, act_dim), next_obs (B, obs_dim)) -> (B,)"""
SimStepFn = Callable[[np.ndarray, np.ndarray, Mapping[str, float]], np.ndarray]
"""sim_step(obs (B, obs_dim), act (B, act_dim), physics) -> next_obs (B, obs_dim)"""


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
    """Steps per episode (the TimeLimit of the registered env)."""
    default_physics: Mapping[str, float]
    """Physics attribute names on the unwrapped env and their default values."""
    reward: RewardFn | None
    """Known vectorized reward, or None if it must be learned."""
    project_obs: Callable[[np.ndarray], np.ndarray] = field(default=lambda o: o)
    """Maps a predicted observation back onto the valid manifold (e.g. the unit circle)."""
    sim_step: SimStepFn | None = None
    """Vectorized true simulator on observations, used only to train base/oracle policies."""

    def physics(self, overrides: Mapping[str, float] | None = None) -> dict[str, float]:
        """Default physics with ``overrides`` applied; unknown names are refused."""
        phys = dict(self.default_physics)
        for name, value in (overrides or {}).items():
            if name not in phys:
                raise KeyError(f"{self.env_id} has no physics attribute {name!r}; known: {sorted(phys)}")
            phys[name] = float(value)
        return phys


# --------------------------------------------------------------------------- Pendulum-v1


def _angle_normalize(th: np.ndarray) -> np.ndarray:
    return ((th + np.pi) % (2 * np.pi)) - np.pi


def pendulum_reward(obs: np.ndarray, act: np.ndarray, next_obs: np.ndarray | None = None) -> np.ndarray:
    """Pendulum-v1 reward: -(th^2 + 0.1 thdot^2 + 0.001 u^2) on the PRE-step state."""
    th = np.arctan2(obs[..., 1], obs[..., 0])  # already in (-pi, pi]
    u = np.clip(act[..., 0], -2.0, 2.0)
    return -(th**2 + 0.1 * obs[..., 2] ** 2 + 0.001 * u**2)


def pendulum_step(obs: np.ndarray, act: np.ndarray, physics: Mapping[str, float]) -> np.ndarray:
    """Vectorized copy of ``PendulumEnv.step`` on observations (the state is th, thdot)."""
    g, m, length = physics["g"], physics["m"], physics["l"]
    dt, max_speed, max_torque = physics["dt"], physics["max_speed"], physics["max_torque"]
    th = np.arctan2(obs[..., 1], obs[..., 0])
    thdot = obs[..., 2]
    u = np.clip(act[..., 0], -max_torque, max_torque)
    newthdot = np.clip(thdot + (3 * g / (2 * length) * np.sin(th) + 3.0 / (m * length**2) * u) * dt,
                       -max_speed, max_speed)
    newth = th + newthdot * dt
    return np.stack([np.cos(newth), np.sin(newth), newthdot], axis=-1).astype(obs.dtype, copy=False)


def _project_unit_circle(obs: np.ndarray) -> np.ndarray:
    """Put (cos, sin) back on the unit circle after a learned step (PETS-style obs postproc)."""
    norm = np.sqrt(obs[..., 0] ** 2 + obs[..., 1] ** 2) + 1e-8
    out = obs.copy()
    out[..., 0] /= norm
    out[..., 1] /= norm
    out[..., 2] = np.clip(out[..., 2], -8.0, 8.0)
    return out


PENDULUM = TaskSpec(
    env_id="Pendulum-v1",
    obs_dim=3,
    act_dim=1,
    obs_low=np.array([-1.0, -1.0, -8.0], np.float32),
    obs_high=np.array([1.0, 1.0, 8.0], np.float32),
    act_low=np.array([-2.0], np.float32),
    act_high=np.array([2.0], np.float32),
    obs_mean=np.zeros(3, np.float32),
    obs_std=np.array([1.0, 1.0, 4.0], np.float32),
    episode_steps=200,
    default_physics={"g": 10.0, "m": 1.0, "l": 1.0, "dt": 0.05, "max_speed": 8.0, "max_torque": 2.0},
    reward=pendulum_reward,
    project_obs=_project_unit_circle,
    sim_step=pendulum_step,
)

# --------------------------------------------------------------------------- MountainCarContinuous-v0


def mountaincar_reward(obs: np.ndarray, act: np.ndarray, next_obs: np.ndarray) -> np.ndarray:
    """MountainCarContinuous-v0 reward: 100 on reaching the goal, minus 0.1 a^2."""
    reached = (next_obs[..., 0] >= 0.45) & (next_obs[..., 1] >= 0.0)
    return 100.0 * reached - 0.1 * np.clip(act[..., 0], -1.0, 1.0) ** 2


def mountaincar_step(obs: np.ndarray, act: np.ndarray, physics: Mapping[str, float]) -> np.ndarray:
    """Vectorized copy of ``Continuous_MountainCarEnv.step`` (gravity 0.0025 is hard-coded there)."""
    pos, vel = obs[..., 0].astype(np.float64), obs[..., 1].astype(np.float64)
    force = np.clip(act[..., 0], -1.0, 1.0)
    speed = physics["max_speed"]
    vel = np.clip(vel + force * physics["power"] - 0.0025 * np.cos(3 * pos), -speed, speed)
    pos = np.clip(pos + vel, -1.2, 0.6)
    vel = np.where((pos <= -1.2) & (vel < 0), 0.0, vel)
    return np.stack([pos, vel], axis=-1).astype(obs.dtype, copy=False)


MOUNTAINCAR = TaskSpec(
    env_id="MountainCarContinuous-v0",
    obs_dim=2,
    act_dim=1,
    obs_low=np.array([-1.2, -0.07], np.float32),
    obs_high=np.array([0.6, 0.07], np.float32),
    act_low=np.array([-1.0], np.float32),
    act_high=np.array([1.0], np.float32),
    obs_mean=np.array([-0.3, 0.0], np.float32),
    obs_std=np.array([0.9, 0.07], np.float32),
    episode_steps=999,
    default_physics={"power": 0.0015, "max_speed": 0.07},
    reward=mountaincar_reward,
    sim_step=mountaincar_step,
)

TASKS: dict[str, TaskSpec] = {t.env_id: t for t in (PENDULUM, MOUNTAINCAR)}


def get_task(env_id: str) -> TaskSpec:
    """The spec for ``env_id``; raises KeyError listing the supported ids."""
    try:
        return TASKS[env_id]
    except KeyError:
        raise KeyError(f"unsupported env {env_id!r}; supported: {sorted(TASKS)}") from None


def apply_physics(env: Any, physics: Mapping[str, float]) -> None:
    """Set each physics attribute on the unwrapped env; refuse names the env does not have."""
    base = env.unwrapped
    for name, value in physics.items():
        if not hasattr(base, name):
            raise KeyError(f"{type(base).__name__} has no attribute {name!r}")
        setattr(base, name, float(value))


def make_env(env_id: str, physics: Mapping[str, float] | None = None) -> Any:
    """A Gymnasium env with ``physics`` overrides set on the unwrapped env (gymnasium imported here)."""
    try:
        import gymnasium as gym
    except ImportError:
        raise ImportError("gymnasium is needed for environments: pip install 'plasma[server]'") from None
    env = gym.make(env_id)
    if physics:
        get_task(env_id).physics(physics)  # validates names against the spec
        apply_physics(env, physics)
    return env
