"""Phantom paths from one real state: what ``PlasmaAgent.think`` returns.

``PhantomPathSimulator.pre_emptive_rollout(state)`` rolls the current policy and
``num_simulations`` perturbed variants of it through the world model for ``horizon`` steps from
that state, each path on one member of the model (so the spread between paths carries the
model's own uncertainty). ``success_probability`` is the share of perturbed paths whose
predicted return beats the current policy's own predicted return from the same state: how
likely a change of behaviour found by practising there is to help, by the model's account.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from plasma.protocol import WorldState

from ..server.policy_net import LoRA, MLPPolicy
from ..server.tasks import TaskSpec

__all__ = ["NominalModel", "PhantomPath", "PhantomPathSimulator", "SimulationResult",
           "WorldModelLike"]


class WorldModelLike(Protocol):
    """What the simulator needs from a world model (the server's models all have it)."""

    members: list[Any]

    def step_member(self, member: int, obs: np.ndarray, act: np.ndarray) -> np.ndarray: ...

    def disagreement(self, obs: np.ndarray, act: np.ndarray) -> np.ndarray: ...


class NominalModel:
    """The task's nominal simulator as a one-member world model (no data yet, no
    disagreement): what the base policy was trained in."""

    def __init__(self, task: TaskSpec) -> None:
        if task.sim_step is None:
            raise ValueError(f"{task.env_id} has no simulator: fit a world model on traces first")
        self.task = task
        self.members: list[Any] = [None]
        self.physics = task.physics()

    def step_member(self, member: int, obs: np.ndarray, act: np.ndarray) -> np.ndarray:
        assert self.task.sim_step is not None
        return self.task.sim_step(obs, act, self.physics)

    def disagreement(self, obs: np.ndarray, act: np.ndarray) -> np.ndarray:
        return np.zeros(len(obs), np.float32)


@dataclass(frozen=True)
class PhantomPath:
    """One imagined trajectory."""

    obs: np.ndarray
    """(horizon + 1, obs_dim) observations, the real start state first."""
    actions: np.ndarray
    """(horizon, act_dim) actions taken."""
    rewards: np.ndarray
    """(horizon,) predicted rewards."""
    predicted_return: float
    """Sum of ``rewards``."""
    disagreement: float
    """Mean ensemble disagreement along the path (how much the members differ there)."""
    member: int
    """The model member that drove the path."""


@dataclass(frozen=True)
class SimulationResult:
    """Phantom paths from one real state; path 0 is the current policy without noise."""

    initial_state: WorldState
    paths: tuple[PhantomPath, ...]
    policy_return: float
    """The current policy's predicted return from the start state (mean over members)."""
    success_probability: float
    """Share of the perturbed paths whose predicted return beats ``policy_return``."""
    horizon: int

    @property
    def predicted_returns(self) -> np.ndarray:
        """(paths,) predicted return of each path."""
        return np.array([p.predicted_return for p in self.paths])

    @property
    def disagreement(self) -> float:
        """Mean disagreement over all paths."""
        return float(np.mean([p.disagreement for p in self.paths])) if self.paths else 0.0

    @property
    def best(self) -> PhantomPath:
        """The path with the highest predicted return."""
        return max(self.paths, key=lambda p: p.predicted_return)


class PhantomPathSimulator:
    """Rolls the policy and perturbed variants of it through a world model."""

    def __init__(self, model: WorldModelLike, task: TaskSpec, policy: MLPPolicy, *,
                 horizon: int = 10, num_simulations: int = 5, noise: float = 0.3,
                 seed: int = 0) -> None:
        if horizon < 1 or num_simulations < 1:
            raise ValueError("horizon and num_simulations must be at least 1")
        self.model, self.task, self.policy = model, task, policy
        self.horizon, self.num_simulations, self.noise = horizon, num_simulations, noise
        self.rng = np.random.default_rng(seed)

    def pre_emptive_rollout(self, initial_state: WorldState | np.ndarray,
                            lora: LoRA | None = None) -> SimulationResult:
        """The policy (with ``lora``) and ``num_simulations`` noisy variants from one state."""
        state = _world_state(initial_state)
        s0 = np.asarray(state.obs, np.float32)
        if s0.shape != (self.task.obs_dim,):
            raise ValueError(f"initial state has shape {s0.shape}, the task wants "
                             f"({self.task.obs_dim},)")
        n_members = len(self.model.members)
        policy_returns = [self._path(s0, m, lora, noisy=False).predicted_return
                          for m in range(n_members)]
        paths = [self._path(s0, 0, lora, noisy=False)]
        paths += [self._path(s0, i % n_members, lora, noisy=True)
                  for i in range(self.num_simulations)]
        policy_return = float(np.mean(policy_returns))
        wins = sum(p.predicted_return > policy_return for p in paths[1:])
        return SimulationResult(state, tuple(paths), policy_return, wins / self.num_simulations,
                                self.horizon)

    def get_best_phantom_path(self, results: SimulationResult) -> PhantomPath:
        """The path with the highest predicted return."""
        return results.best

    def _path(self, s0: np.ndarray, member: int, lora: LoRA | None, *, noisy: bool) -> PhantomPath:
        task, h = self.task, self.horizon
        obs = np.empty((h + 1, task.obs_dim), np.float32)
        act = np.empty((h, task.act_dim), np.float32)
        rew = np.empty(h, np.float32)
        dis = np.empty(h, np.float32)
        obs[0] = s0
        sigma = self.noise * 0.5 * (task.act_high - task.act_low)
        for t in range(h):
            a = self.policy.forward(obs[t:t + 1], lora)  # (1, act_dim)
            if noisy:
                a = np.clip(a + sigma * self.rng.standard_normal(a.shape), task.act_low,
                            task.act_high).astype(np.float32)
            nxt = task.project_obs(self.model.step_member(member, obs[t:t + 1], a))
            rew[t] = _reward(task, obs[t:t + 1], a, nxt)
            dis[t] = float(self.model.disagreement(obs[t:t + 1], a)[0])
            act[t], obs[t + 1] = a[0], nxt[0]
        return PhantomPath(obs, act, rew, float(rew.sum()), float(dis.mean()), member)


def _reward(task: TaskSpec, obs: np.ndarray, act: np.ndarray, nxt: np.ndarray) -> float:
    if task.reward is None:
        raise ValueError(f"{task.env_id} has no known reward: phantom paths need one")
    return float(task.reward(obs, act, nxt)[0])


def _world_state(state: WorldState | np.ndarray) -> WorldState:
    if isinstance(state, WorldState):
        return state
    return WorldState(fleet="local", device="agent",
                      obs=tuple(float(x) for x in np.asarray(state, np.float64).ravel()))
