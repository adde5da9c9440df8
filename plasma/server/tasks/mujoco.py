"""MuJoCo tasks: the env's own model stepped from observations, in batches, at any physics.

``MujocoSim`` is the vectorized true simulator a ``TaskSpec`` needs (``sim_step``): it puts
each row's (qpos, qvel), recovered from the observation, into the model's full physics state,
applies the action for the env's ``frame_skip`` steps with ``mujoco.rollout`` (one C call for
the whole batch) and reads the next observation back. The physics mapping sets the model fields
of ``plasma.edge.physics`` (``body_mass.pole``...) before stepping, so system identification
can fit them on the device's transitions the way it fits Pendulum's g and m.

The shipped task is InvertedPendulum-v5 (obs = qpos ++ qvel: the state is fully observed).
Its reward is the env's own, 1 per step while the pole is within 0.2 rad: the judicial audit
checks the phantom reward against the recorded rewards, and a dense surrogate (minus the lean
and the cart's offset) was refused for it (0.47 real-reward stds off, measured).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from plasma.edge.physics import field_names, get_field, set_field

__all__ = ["HALF_CHEETAH_ID", "INVERTED_PENDULUM_ID", "MujocoSim", "half_cheetah",
           "half_cheetah_reward", "inverted_pendulum", "inverted_pendulum_reward", "mujoco_physics"]

INVERTED_PENDULUM_ID = "InvertedPendulum-v5"
HALF_CHEETAH_ID = "HalfCheetah-v5"

StateOfObs = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
ObsOfState = Callable[[np.ndarray, np.ndarray], np.ndarray]


def mujoco_physics(model: Any) -> dict[str, float]:
    """Every supported field of ``model`` and its value (the task's nominal physics)."""
    return {name: get_field(model, name) for name in field_names(model)}


class MujocoSim:
    """``sim_step(obs, act, physics) -> next_obs`` on a private copy of a MuJoCo env's model."""

    def __init__(self, model: Any, frame_skip: int, state_of_obs: StateOfObs | None = None,
                 obs_of_state: ObsOfState | None = None) -> None:
        import copy

        import mujoco
        from mujoco import rollout

        self._rollout = rollout.rollout
        self.model = copy.deepcopy(model)
        types, affinities = self.model.geom_contype, self.model.geom_conaffinity
        if not any(int(t) & int(a) for t in types for a in affinities):
            # no geom pair can ever touch: skipping collision detection changes nothing (~20% faster)
            self.model.opt.disableflags |= mujoco.mjtDisableBit.mjDSBL_CONTACT
        self.data = mujoco.MjData(self.model)
        self.frame_skip = frame_skip
        self.nq, self.nv = self.model.nq, self.model.nv
        spec = mujoco.mjtState.mjSTATE_FULLPHYSICS
        self.template = np.empty(mujoco.mj_stateSize(self.model, spec))
        mujoco.mj_getState(self.model, self.data, self.template, spec)
        self.state_of_obs = state_of_obs or self._split
        self.obs_of_state = obs_of_state or (lambda q, v: np.concatenate([q, v], axis=-1))
        self._set: dict[str, float] = {}
        self._lock = threading.Lock()  # one model: physics set and stepped together

    @classmethod
    def of_env(cls, env: Any, state_of_obs: StateOfObs | None = None,
               obs_of_state: ObsOfState | None = None) -> MujocoSim | None:
        """The simulator of a Gymnasium MuJoCo env, or None when its observation does not give
        the state (then the world model is the learned ensemble)."""
        base = env.unwrapped
        sim = cls(base.model, int(getattr(base, "frame_skip", 1)), state_of_obs, obs_of_state)
        if state_of_obs is None and env.observation_space.shape[0] != sim.nq + sim.nv:
            return None
        obs, _ = env.reset(seed=0)
        q, v = sim.state_of_obs(np.asarray(obs, np.float64)[None])
        if not (np.allclose(q[0], base.data.qpos) and np.allclose(v[0], base.data.qvel)):
            return None  # the observation is not (qpos, qvel): no simulator from it
        return sim

    def _split(self, obs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return obs[..., : self.nq], obs[..., self.nq: self.nq + self.nv]

    def __call__(self, obs: np.ndarray, act: np.ndarray, physics: Mapping[str, float]) -> np.ndarray:
        shape = obs.shape
        obs2 = np.asarray(obs, np.float64).reshape(-1, shape[-1])
        ctrl = np.asarray(act, np.float64).reshape(len(obs2), 1, -1)
        q, v = self.state_of_obs(obs2)
        state = np.tile(self.template, (len(obs2), 1))
        state[:, 1: 1 + self.nq] = q
        state[:, 1 + self.nq: 1 + self.nq + self.nv] = v
        with self._lock:
            for name, value in physics.items():
                if "." in name and self._set.get(name) != value:
                    set_field(self.model, name, value)
                    self._set[name] = value
            out, _ = self._rollout(self.model, self.data, state, ctrl, nstep=self.frame_skip)
        last = out[:, -1]
        nxt = self.obs_of_state(last[:, 1: 1 + self.nq], last[:, 1 + self.nq: 1 + self.nq + self.nv])
        return nxt.reshape(shape).astype(obs.dtype, copy=False)


def inverted_pendulum_reward(obs: np.ndarray, act: np.ndarray, next_obs: np.ndarray) -> np.ndarray:
    """InvertedPendulum-v5's own reward: 1 while the pole is within 0.2 rad after the step."""
    upright = np.isfinite(next_obs).all(-1) & (np.abs(next_obs[..., 1]) <= 0.2)
    return upright.astype(np.float32)


def inverted_pendulum() -> Any:
    """Register InvertedPendulum-v5 (the cart-pole of MuJoCo; obs = x, angle, their speeds)."""
    from .registry import register_task

    return register_task(
        INVERTED_PENDULUM_ID, reward=inverted_pendulum_reward,
        identify=("body_mass.pole", "body_mass.cart", "actuator_gear.slide", "opt.gravity.z",
                  "dof_damping.hinge", "dof_damping.slider"),
        obs_low=[-1.0, -0.6, -6.0, -12.0], obs_high=[1.0, 0.6, 6.0, 12.0],
        obs_mean=[0.0, 0.0, 0.0, 0.0], obs_std=[0.5, 0.1, 1.0, 1.0],
        episode_steps=50, replace=True,
        # a MuJoCo step costs ~20 us (Pendulum's ~1 us): the default planner's 8.6 M model steps
        # of labels were 190 s of CPU per round (profiled); this budget is ~15x cheaper
        adapt={"expert_paths": 8, "expert_iterations": 1, "label_states": 160,
               "planner.candidates": 48, "planner.horizon": 20, "planner.iterations": 2})


# ---------------------------------------------------------------------------- HalfCheetah-v5

_HC_NQ = 9  # rootx, rootz, rooty, six joints; the observation drops rootx (qpos[1:] ++ qvel)


def _hc_state_of_obs(obs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """HalfCheetah's dynamics do not depend on rootx (the runner's position): put it at 0."""
    q = np.concatenate([np.zeros(obs.shape[:-1] + (1,), obs.dtype), obs[..., : _HC_NQ - 1]], -1)
    return q, obs[..., _HC_NQ - 1:]


def _hc_obs_of_state(q: np.ndarray, v: np.ndarray) -> np.ndarray:
    return np.concatenate([q[..., 1:], v], -1)


def half_cheetah_reward(obs: np.ndarray, act: np.ndarray, next_obs: np.ndarray) -> np.ndarray:
    """HalfCheetah-v5's reward: forward speed minus 0.1 * |action|^2. The env measures the speed
    as the root's displacement over the step, which the observation does not carry; the mean of
    the root's x velocity before and after the step stands for it (the audit compares this
    reward with the recorded ones, docs/tasks.md gives the error)."""
    speed = 0.5 * (obs[..., _HC_NQ - 1] + next_obs[..., _HC_NQ - 1])
    return (speed - 0.1 * np.sum(np.square(act), -1)).astype(np.float32)


def half_cheetah() -> Any:
    """Register HalfCheetah-v5 (17-dim observation, 6 motors, dense reward, no termination).

    Identified: the torso's mass (a payload) and each motor's gear (a worn or stronger motor).
    Phantom episodes are 100 steps (5 s): the task is a stationary gait, and the simulator's
    contacts cost about 30 us per step, so whole 1000-step episodes would take the round's
    budget ten times over; ``adapt`` scales the round's budget to that cost."""
    import gymnasium as gym

    from .registry import register_task

    env = gym.make(HALF_CHEETAH_ID)
    base = env.unwrapped
    sim = MujocoSim(base.model, int(base.frame_skip), _hc_state_of_obs, _hc_obs_of_state)
    env.close()
    high = np.array([0.6, 1.2, 1.2, 1.2, 1.2, 1.2, 1.2, 1.2,
                     16.0, 6.0, 12.0, 25.0, 25.0, 25.0, 25.0, 25.0, 25.0], np.float32)
    return register_task(
        HALF_CHEETAH_ID, reward=half_cheetah_reward, sim_step=sim,
        identify=("body_mass.torso",) + tuple(f"actuator_gear.{a}" for a in
                                              ("bthigh", "bshin", "bfoot", "fthigh", "fshin", "ffoot")),
        obs_low=-high, obs_high=high, obs_mean=np.zeros(17), obs_std=high / 2,
        episode_steps=100, replace=True,
        # measured on the SB3 base at torso x2 (docs/tasks.md): receding-horizon expert episodes
        # drifted far from the policy and MPPI's default noise (0.5 of the half range) gave labels
        # whose imitation lost two thirds of the phantom return; local search around the policy
        # (noise 0.1, DAgger labels only) is the only setting whose iterates did not lose
        adapt={"expert_paths": 0, "planner.noise_std": 0.1, "box_starts": 0.0, "phantom_paths": 64,
               "phantom_horizon": 30, "label_states": 192, "select_paths": 32,
               "planner.candidates": 32, "planner.horizon": 12, "planner.iterations": 2,
               "sysid.max_rows": 1000, "sysid.iterations": 12, "sysid.member_iterations": 3,
               "judicial.paths": 64, "judicial.horizon": 50, "judicial.support_points": 1000,
               # the reward stands the step's displacement in with the mean speed: 0.12-0.17
               # real-reward stds off on the SB3 base's own transitions (nominal and torso x2)
               "judicial.max_reward_error": 0.3})
