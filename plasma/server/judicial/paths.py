"""Server stage 5: the auditor's own phantom paths - deterministic rollouts, one member or a view of some."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np

from ..phantom import ModelDynamics, member_blocks, step_paths
from ..policy_net import LoRA, MLPPolicy
from ..tasks import TaskSpec
from ..worldmodel import WorldModel

__all__ = ["OneMember", "member_view", "rollout_paths", "split_members"]


class OneMember:
    """One ensemble member as a ``Dynamics`` (every path under that member)."""

    n_members = 1

    def __init__(self, model: WorldModel, member: int) -> None:
        self.model, self.member = model, member

    def step_member(self, member: int, obs: np.ndarray, act: np.ndarray) -> np.ndarray:
        return self.model.step_member(self.member, obs, act)


def rollout_paths(dyn: ModelDynamics | OneMember, task: TaskSpec, policy: MLPPolicy,
                  lora: LoRA | None, starts: np.ndarray, horizon: int
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Deterministic paths: obs (N, H + 1, od), act (N, H, ad), rew (N, H); path p: member pM//N."""
    n = len(starts)
    blocks = member_blocks(n, dyn.n_members)
    obs = np.empty((n, horizon + 1, task.obs_dim), np.float32)
    act = np.empty((n, horizon, task.act_dim), np.float32)
    rew = np.empty((n, horizon), np.float32)
    obs[:, 0] = starts
    for t in range(horizon):
        act[:, t] = policy.forward(obs[:, t], lora)
        obs[:, t + 1], rew[:, t] = step_paths(dyn, task, obs[:, t], act[:, t], blocks)
    return obs, act, rew


def member_view(model: WorldModel, members: Sequence[int]) -> WorldModel:
    """A WorldModel of some members only, sharing the normalization (no copy of weights)."""
    view = copy.copy(model)  # keeps a subclass (a wrapped or corrupted model) and its stats
    view.members = [model.members[i] for i in members]
    return view


def split_members(model: WorldModel, n_heldout: int) -> tuple[WorldModel, WorldModel | None]:
    """(members the producer plans with, members kept back for the auditor)."""
    n = len(model.members)
    if n_heldout <= 0:
        return model, None
    if n_heldout >= n:
        raise ValueError(f"cannot hold out {n_heldout} of {n} members")
    return member_view(model, range(n - n_heldout)), member_view(model, range(n - n_heldout, n))
