"""Server stage 2, what the simulator lacks: the identified simulator as the prior plus a learned
residual ensemble trained on the device's real transitions only.

``PhysicsModel`` can represent a device whose dynamics are the simulator's with other parameters
(a payload, a worn motor). A device with an effect the simulator has no parameter for (an
actuation delay, friction it does not model, a bent link) leaves a one-step error the
identification cannot remove. ``ResidualModel`` fits the physics first, then an ensemble of
small MLPs (``worldmodel.WorldModel``) on ``next_obs - sim_step(obs, act, physics)``: member m
predicts ``sim_step(obs, act, physics_m) + residual_m(obs, act)``, so the spread of the members
is the spread of the identified parameters plus that of the residual nets, and the planner and
the judicial auditor use it exactly as they use the physics members (the same ``Model``).

The residual is used only when it earns its place: on transitions held out of its training it
must remove at least ``min_gain`` of the prior's one-step error, and that error must be above
``min_error`` (an honest physics fit misses by ~1e-4 delta stds: learning noise there would
only add variance). Otherwise the model is exactly the ``PhysicsModel`` it extends, which is
what keeps devices inside the simulator's parameter space where they were.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from .sysid import PhysicsModel, SysIdConfig
from .tasks import TaskSpec
from .worldmodel import FitReport, WorldModel, WorldModelConfig

__all__ = ["MemberPhysics", "ResidualConfig", "ResidualModel", "residual_model"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ResidualConfig:
    """How the residual on the identified simulator is learned and when it is used."""

    enabled: bool = True
    """False: the identified simulator alone (``PhysicsModel``)."""
    hidden: tuple[int, ...] = (64, 64)
    """Hidden widths of each residual net."""
    max_epochs: int = 40
    """Upper bound on passes over the training split (early stopping on a held-out split)."""
    patience: int = 5
    """Epochs without held-out improvement before stopping."""
    holdout: float = 0.2
    """Share of the transitions kept out to decide whether the residual is used."""
    min_error: float = 1e-3
    """The prior's held-out one-step mse (delta-std units) below which no residual is learned."""
    min_gain: float = 0.2
    """Share of the prior's held-out one-step error the residual must remove to be used."""
    max_rows: int = 6000
    """Newest transitions used to learn the residual."""
    seed: int = 0
    """Seed of the split, init and minibatches."""


class MemberPhysics(dict):  # type: ignore[type-arg]
    """One member's physics mapping (what ``sim_step`` takes) that also names its residual net,
    so a view keeping some members (``judicial.member_view``) keeps their nets with them."""

    def __init__(self, physics: dict[str, float], net: int) -> None:
        super().__init__(physics)
        self.net = net

    def __reduce__(self) -> tuple[object, ...]:  # pickles for Ray workers
        return (MemberPhysics, (dict(self), self.net))


@dataclass
class ResidualModel(PhysicsModel):
    """The identified simulator plus a learned residual ensemble (see the module docstring)."""

    residual_cfg: ResidualConfig = field(default_factory=ResidualConfig)
    residual: WorldModel | None = None
    """The residual ensemble while it is in use; None: the prior alone."""
    prior_error: float = float("nan")
    """Held-out one-step mse of the identified simulator alone (delta-std units)."""
    residual_error: float = float("nan")
    """Held-out one-step mse with the residual (delta-std units; nan when none was learned)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self._nets: WorldModel | None = None  # kept across rounds (warm start) even when unused

    @property
    def residual_share(self) -> float:
        """Share of the prior's held-out error the residual removes (0 when it is not used)."""
        if self.residual is None or not self.prior_error > 0:
            return 0.0
        return float(1.0 - self.residual_error / self.prior_error)

    def fit(self, obs: np.ndarray, act: np.ndarray, next_obs: np.ndarray,
            rew: np.ndarray | None = None, **kw: object) -> FitReport:
        """Identify the physics (``PhysicsModel.fit``), then learn and judge the residual."""
        report = super().fit(obs, act, next_obs, rew, **kw)
        self.members = [MemberPhysics(m, i) for i, m in enumerate(self.members)]
        rc = self.residual_cfg
        self.residual = None
        if not rc.enabled:
            return report
        obs, act, nxt = (np.asarray(a, np.float32)[-rc.max_rows:] for a in (obs, act, next_obs))
        n = len(obs)
        if n < 50:
            return report
        prior = self.task.sim_step(obs, act, self.physics).astype(np.float32)  # type: ignore[misc]
        scale = self.out_std
        rng = np.random.default_rng(rc.seed + n)
        perm = rng.permutation(n)
        n_hold = max(10, int(rc.holdout * n))
        hold, train = perm[:n_hold], perm[n_hold:]
        self.prior_error = float(np.mean(((nxt[hold] - prior[hold]) / scale) ** 2))
        self.residual_error = float("nan")
        if self.prior_error < rc.min_error:
            log.info("residual: not learned (prior held-out mse %.2e < %.0e)", self.prior_error,
                     rc.min_error)
            return report
        if self._nets is None:
            self._nets = WorldModel(self.obs_dim, self.act_dim, WorldModelConfig(
                ensemble_size=len(self.members), hidden=rc.hidden, max_epochs=rc.max_epochs,
                patience=rc.patience, seed=rc.seed))
        # the nets learn delta = next - prior: fed prior-corrected "next" observations
        target = obs + (nxt - prior)
        self._nets.fit(obs[train], act[train], target[train])
        corrected = prior[hold] + (self._nets.step_mean(obs[hold], act[hold]) - obs[hold])
        self.residual_error = float(np.mean(((nxt[hold] - corrected) / scale) ** 2))
        used = self.residual_error <= (1.0 - rc.min_gain) * self.prior_error
        self.residual = self._nets if used else None
        log.info("residual: held-out one-step mse %.3e -> %.3e (delta-std units): %s",
                 self.prior_error, self.residual_error, "used" if used else "not used")
        if used:
            dis = float(np.mean(self.disagreement(obs, act)))
            report = FitReport(report.n_train, n_hold, report.epochs, self.residual_error,
                               self.residual_error * float(np.mean(scale**2)), report.val_nll, dis)
        return report

    def step_member(self, member: int, obs: np.ndarray, act: np.ndarray) -> np.ndarray:
        nxt = super().step_member(member, obs, act)
        if self.residual is None:
            return nxt
        return nxt + self._correction(member, obs, act, nxt.dtype)

    def _correction(self, member: int, obs: np.ndarray, act: np.ndarray, dtype: np.dtype
                    ) -> np.ndarray:
        """What member ``member``'s residual net adds to the simulator's next observation."""
        assert self.residual is not None
        net = getattr(self.members[member], "net", member) % len(self.residual.members)
        return (self.residual.step_member(net, obs, act) - obs).astype(dtype, copy=False)

    def step_blocks(self, obs: np.ndarray, act: np.ndarray, blocks: Sequence[tuple[int, slice]]
                    ) -> np.ndarray | None:
        """``PhysicsModel.step_blocks`` (the simulator in one call) plus each block's member's
        residual net: row by row exactly what ``step_member`` gives."""
        if type(self).step_member is not ResidualModel.step_member:
            return None
        nxt = self._sim_blocks(obs, act, blocks)
        if nxt is None or self.residual is None:
            return nxt
        for member, sl in blocks:
            nxt[sl] = nxt[sl] + self._correction(member, obs[sl], act[sl], nxt.dtype)
        return nxt


def residual_model(task: TaskSpec, sysid: SysIdConfig, cfg: ResidualConfig) -> PhysicsModel:
    """The default world model of a task with a simulator: the prior with its residual (or the
    prior alone when ``cfg.enabled`` is False)."""
    if not cfg.enabled:
        return PhysicsModel(task, sysid)
    return ResidualModel(task, sysid, residual_cfg=cfg)
