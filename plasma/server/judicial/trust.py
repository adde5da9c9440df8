"""Server stage 5: where the world model can be trusted - near real states, where its members agree."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..tasks import TaskSpec
from ..worldmodel import WorldModel
from .config import JudicialConfig, RealData

__all__ = ["TrustModel", "nearest_distance"]


class TrustModel:
    """Where the world model can be trusted: near real states (or reached by transitions the
    identified prior confirms), where members agree."""

    def __init__(self, model: WorldModel, real: RealData, cfg: JudicialConfig,
                 task: TaskSpec | None = None) -> None:
        rng = np.random.default_rng(cfg.seed)
        self.model = model
        self.max_model_error = cfg.max_model_error
        self.prior: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None
        if cfg.vouch_prior and task is not None and task.sim_step is not None \
                and len(real.obs) >= 10:
            from ..sysid import SysIdConfig, identify

            ident = identify(task, real.obs, real.act, real.next_obs,
                             SysIdConfig(members=1, member_iterations=0, seed=cfg.seed))
            physics, sim, project = ident.physics, task.sim_step, task.project_obs
            self.prior = lambda o, a: project(sim(o, a, physics))
        self.scale = real.obs.std(0) + 1e-6  # (od,)
        keep = rng.choice(len(real.obs), min(cfg.support_points, len(real.obs)), replace=False)
        self.points = (real.obs[keep] / self.scale).astype(np.float32)  # (m, od)
        nn = nearest_distance(self.points, self.points, exclude_self=True)
        self.support_radius = float(np.quantile(nn, cfg.support_quantile)) + 1e-6 \
            if len(nn) > 1 else 1.0
        dis = model.disagreement(real.obs, real.act)
        self.trusted_disagreement = float(np.quantile(dis, cfg.disagreement_quantile)) + 1e-6
        span = real.obs.max(0) - real.obs.min(0) + 1e-6
        self.low, self.high = real.obs.min(0) - 0.1 * span, real.obs.max(0) + 0.1 * span
        self.span = span

    def disagreement_ratio(self, obs: np.ndarray, act: np.ndarray) -> np.ndarray:
        return self.model.disagreement(obs, act) / self.trusted_disagreement

    def support_ratio(self, obs: np.ndarray) -> np.ndarray:
        return nearest_distance(obs / self.scale, self.points) / self.support_radius

    def box_excess(self, obs: np.ndarray) -> np.ndarray:
        """Cheap support proxy for the planner: distance outside the real range, in spans."""
        excess = (np.maximum(self.low - obs, 0) + np.maximum(obs - self.high, 0)) / self.span
        return excess.sum(-1)

    def untrust(self, obs: np.ndarray, act: np.ndarray) -> np.ndarray:
        """MOPO's u: disagreement in excess of the real-data level (0 where members agree)."""
        return np.maximum(self.disagreement_ratio(obs, act) - 1, 0)

    def untrust_fast(self, obs: np.ndarray, act: np.ndarray) -> np.ndarray:
        """The planner's penalty: ``untrust`` + distance outside the real range (no neighbours)."""
        return self.untrust(obs, act) + self.box_excess(obs)

    def prior_error(self, obs: np.ndarray, act: np.ndarray) -> np.ndarray:
        """obs (N, H + 1, od), act (N, H, ad) -> (N, H) miss of each path transition against the
        identified prior, in real-observation stds (worst dimension); empty without a prior."""
        n, h = act.shape[:2]
        if self.prior is None:
            return np.empty((0, 0), np.float32)
        pred = self.prior(obs[:, :-1].reshape(n * h, -1), act.reshape(n * h, -1)).reshape(n, h, -1)
        return (np.abs(pred - obs[:, 1:]) / self.scale).max(-1)

    def vouched(self, obs: np.ndarray, act: np.ndarray) -> np.ndarray:
        """obs (N, H + 1, od), act (N, H, ad) -> (N, H) bool: every transition up to step t matches
        the auditor's identified prior (all False without one)."""
        if self.prior is None:
            return np.zeros(act.shape[:2], bool)
        err = self.prior_error(obs, act)  # (N, H)
        return np.logical_and.accumulate(err <= self.max_model_error, axis=1)

    def trusted_states(self, obs: np.ndarray, act: np.ndarray, max_support: float) -> np.ndarray:
        """(n,) bool: members agree and the state is within ``max_support`` support radii."""
        return (self.untrust(obs, act) <= 0) & (self.support_ratio(obs) <= max_support)


def nearest_distance(queries: np.ndarray, points: np.ndarray, exclude_self: bool = False,
                     chunk: int = 2048) -> np.ndarray:
    """(q,) Euclidean distance from each query to its nearest point."""
    out = np.empty(len(queries), np.float32)
    p2 = (points**2).sum(1)  # (m,)
    for i in range(0, len(queries), chunk):
        q = queries[i:i + chunk].astype(np.float32)
        d2 = (q**2).sum(1)[:, None] + p2[None] - 2 * q @ points.T  # (chunk, m)
        if exclude_self:
            d2[np.arange(len(q)), np.arange(i, i + len(q))] = np.inf
        out[i:i + chunk] = np.sqrt(np.maximum(d2.min(1), 0))
    return out
