"""The classic-control tasks: Pendulum-v1 and MountainCarContinuous-v0, with vectorized copies
of their true simulators (on observations) and their published rewards.

Why the reward is given, not learned: for Pendulum-v1 the reward is a fixed, published cost
on the pre-step state and the action (angle^2 + 0.1 thdot^2 + 0.001 u^2). It is part of the
task definition, not of the device's physics, so a physics shift never changes it. Learning it
would spend model capacity and real transitions on something known exactly, and would give the
planner a second learned function to exploit.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from .registry import TaskSpec

__all__ = ["MOUNTAINCAR", "mountaincar_reward", "mountaincar_step", "PENDULUM", "pendulum_reward",
           "pendulum_step"]


# --------------------------------------------------------------------------- Pendulum-v1


def _angle_normalize(th: np.ndarray) -> np.ndarray:
    return ((th + np.pi) % (2 * np.pi)) - np.pi


def pendulum_reward(obs: np.ndarray, act: np.ndarray, next_obs: np.ndarray | None = None) -> np.ndarray:
    """Pendulum-v1 reward: -(th^2 + 0.1 thdot^2 + 0.001 u^2) on the PRE-step state."""
    th = np.arctan2(obs[..., 1], obs[..., 0])  # already in (-pi, pi]
    u = np.clip(act[..., 0], -2.0, 2.0)
    return -(th**2 + 0.1 * obs[..., 2] ** 2 + 0.001 * u**2)


def _like(value: float | np.ndarray, arr: np.ndarray) -> float | np.ndarray:
    """A physics value as the arithmetic with ``arr`` uses it: a float stays a float (NumPy casts
    it to ``arr``'s dtype), an array of parameter sets (``TaskSpec.sim_rows``) is cast the same
    way, so one call with stacked sets gives, row by row, exactly what one call per set gives."""
    return value.astype(arr.dtype, copy=False) if isinstance(value, np.ndarray) else value


def pendulum_step(obs: np.ndarray, act: np.ndarray, physics: Mapping[str, float]) -> np.ndarray:
    """Vectorized copy of ``PendulumEnv.step`` on observations (..., 3) (the state is th, thdot);
    physics values may be floats or arrays broadcasting against the batch (``TaskSpec.sim_rows``)."""
    g, m, length = physics["g"], physics["m"], physics["l"]
    th = np.arctan2(obs[..., 1], obs[..., 0])
    thdot = obs[..., 2]
    max_torque = physics["max_torque"]
    u = np.clip(act[..., 0], -_like(max_torque, act), _like(max_torque, act))
    accel = _like(3 * g / (2 * length), th) * np.sin(th) + _like(3.0 / (m * length**2), u) * u
    dt = physics["dt"]
    speed = thdot + accel * _like(dt, accel)
    max_speed = _like(physics["max_speed"], speed)
    newthdot = np.clip(speed, -max_speed, max_speed)
    newth = th + newthdot * _like(dt, newthdot)
    out = np.empty((*th.shape, 3), obs.dtype)
    out[..., 0] = np.cos(newth)
    out[..., 1] = np.sin(newth)
    out[..., 2] = newthdot
    return out


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
    sim_rows=True,
)

# --------------------------------------------------------------------------- MountainCarContinuous-v0


def mountaincar_reward(obs: np.ndarray, act: np.ndarray, next_obs: np.ndarray) -> np.ndarray:
    """MountainCarContinuous-v0 reward: 100 on reaching the goal, minus 0.1 a^2."""
    reached = (next_obs[..., 0] >= 0.45) & (next_obs[..., 1] >= 0.0)
    return 100.0 * reached - 0.1 * np.clip(act[..., 0], -1.0, 1.0) ** 2


def mountaincar_step(obs: np.ndarray, act: np.ndarray, physics: Mapping[str, float]) -> np.ndarray:
    """Vectorized copy of ``Continuous_MountainCarEnv.step`` (gravity 0.0025 is hard-coded there);
    physics values may be floats or arrays broadcasting against the batch (``TaskSpec.sim_rows``)."""
    pos, vel = obs[..., 0].astype(np.float64), obs[..., 1].astype(np.float64)
    force = np.clip(act[..., 0], -1.0, 1.0)
    speed = _like(physics["max_speed"], vel)
    vel = np.clip(vel + force * _like(physics["power"], force) - 0.0025 * np.cos(3 * pos), -speed, speed)
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
    sim_rows=True,
)
