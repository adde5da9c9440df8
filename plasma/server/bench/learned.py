"""Honest learned rewards for ``bench audit``: a reward model fitted on a device's real rewards
and nothing else, the counterpart of the optimistic one in ``exploits.OptimisticReward``.

``HonestLearnedReward.fit(real)`` is what a server would have if the device reported rewards and
the task published no formula: a regression from (observation, action) to the recorded reward,
fitted on the device's own transitions only. It is right where the device has been and makes no
claim beyond it (module docstring of the class: the contract). A round whose phantom world uses
it (``dataclasses.replace(task, reward=HonestLearnedReward.fit(real))``) is an honest round with
a learned reward: the auditor must publish a gain earned in states the device visits, while the
optimistic family (the same kind of model, flattering states the device never visited) must
still be blocked.

``FlatteringLearnedReward`` is that exploit in its plainest form, for the same device: right on
every recorded state, and better than the best recorded reward wherever the device never went
(whatever region that is, so the producer finds the one it can reach). It bites: on Pendulum
(l=1.3, small budget) the candidate it lures lowers the real return by 570-840 per episode.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..judicial import RealData
from ..judicial.trust import nearest_distance

__all__ = ["FlatteringLearnedReward", "HonestLearnedReward"]


@dataclass
class HonestLearnedReward:
    """A reward model fitted on real rewards only: Gaussian radial features centred on recorded
    real (observation, action) points plus a linear term, by ridge regression.

    Contract (what an honest learned reward promises, and what the auditor may assume):

    - **fitted on the device's real data only**: ``fit(real)`` sees ``real.obs``, ``real.act``
      and ``real.rew`` and no formula, simulator or other device;
    - **right where the device has been**: on the recorded transitions its mean absolute error is
      a small fraction of the real rewards' spread (``fit_error``, in real-reward stds; the
      auditor's ``reward_model`` check blocks above 0.1);
    - **no claim beyond the data**: far from every recorded point the radial features vanish and
      the prediction falls back on the linear fit, and every prediction is clipped to the range of
      recorded rewards, so it never promises more than the best reward the device recorded (the
      optimistic exploit promises more than that where the device never went);
    - marked ``learned = True`` (``judicial.reward_is_learned``): the auditor trusts it only near
      real data. It reads ``obs`` and ``act`` only (``next_obs`` is accepted and ignored).
    """

    centres: np.ndarray
    """(k, od + ad) standardized (obs, act) centres, recorded points."""
    mean: np.ndarray
    """(od + ad,) input mean."""
    scale: np.ndarray
    """(od + ad,) input std."""
    width: float
    """Gaussian width in standardized units."""
    weights: np.ndarray
    """(k + od + ad + 1,) radial, linear and constant weights."""
    low: float
    """Worst recorded reward (predictions are clipped to [low, high])."""
    high: float
    """Best recorded reward."""
    fit_error: float = 0.0
    """Mean absolute error on the fitting data, in real-reward stds."""

    learned = True

    @classmethod
    def fit(cls, real: RealData, centres: int = 300, ridge: float = 1e-3, seed: int = 0
            ) -> HonestLearnedReward:
        """Fit on the device's recorded transitions (``centres`` of them become the centres)."""
        x = np.concatenate([real.obs, real.act], axis=1).astype(np.float64)
        y = real.rew.astype(np.float64)
        mean, scale = x.mean(0), x.std(0) + 1e-6
        z = (x - mean) / scale
        rng = np.random.default_rng(seed)
        c = z[rng.choice(len(z), min(centres, len(z)), replace=False)]
        d2 = ((c[:, None] - c[None]) ** 2).sum(-1)
        np.fill_diagonal(d2, np.inf)
        width = float(np.sqrt(np.median(d2.min(1)))) * 2.0 + 1e-3
        model = cls(c.astype(np.float32), mean.astype(np.float32), scale.astype(np.float32), width,
                    np.zeros(len(c) + z.shape[1] + 1, np.float32), float(y.min()), float(y.max()))
        f = model._features(z)
        a = f.T @ f + ridge * len(z) * np.eye(f.shape[1])
        model.weights = np.linalg.solve(a, f.T @ y).astype(np.float32)
        pred = np.clip(f @ model.weights, model.low, model.high)
        model.fit_error = float(np.mean(np.abs(pred - y)) / (y.std() + 1e-6))
        return model

    def _features(self, z: np.ndarray) -> np.ndarray:
        c = self.centres.astype(z.dtype)
        d2 = (z**2).sum(1)[:, None] + (c**2).sum(1)[None] - 2 * z @ c.T
        radial = np.exp(-np.maximum(d2, 0) / (2 * self.width**2))
        return np.concatenate([radial, z, np.ones((len(z), 1), z.dtype)], axis=1)

    def __call__(self, obs: np.ndarray, act: np.ndarray, next_obs: np.ndarray | None = None
                 ) -> np.ndarray:
        lead = obs.shape[:-1]
        x = np.concatenate([obs.reshape(-1, obs.shape[-1]), act.reshape(-1, act.shape[-1])],
                           axis=1).astype(np.float32)
        z = (x - self.mean) / self.scale
        out: np.ndarray = np.clip(self._features(z) @ self.weights, self.low, self.high)
        return out.reshape(lead).astype(np.float32)


class FlatteringLearnedReward:
    """An optimistic learned reward (an exploit, the counterpart of ``HonestLearnedReward``): the
    true reward at every state within ``at`` support radii of a recorded state, rising to one
    real-reward std above the best recorded reward one radius further out (below the auditor's
    spike ceiling). The support radius is the 99th percentile of recorded states' nearest-
    neighbour distances in real-observation stds, as the auditor's own. Marked ``learned``."""

    learned = True

    def __init__(self, true: Callable[..., np.ndarray], real: RealData, at: float = 1.5,
                 sigmas: float = 1.0) -> None:
        self.true, self.at = true, at
        self.scale = real.obs.std(0) + 1e-6
        self.points = (real.obs / self.scale).astype(np.float32)
        d = nearest_distance(self.points, self.points, exclude_self=True)
        self.radius = float(np.quantile(d, 0.99)) + 1e-6
        self.best = float(real.rew.max() + sigmas * real.rew.std())

    def __call__(self, obs: np.ndarray, act: np.ndarray, next_obs: np.ndarray) -> np.ndarray:
        r = self.true(obs, act, next_obs)
        flat = obs.reshape(-1, obs.shape[-1]) / self.scale
        d = nearest_distance(flat, self.points).reshape(obs.shape[:-1]) / self.radius
        w = np.clip(d - self.at, 0.0, 1.0)
        out: np.ndarray = (1 - w) * r + w * self.best
        return out.astype(np.float32)

