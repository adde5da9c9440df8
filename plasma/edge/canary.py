"""Edge stage 10b: real per-step rewards around a merge -> keep or roll back (the canary).

The control thread feeds every reward with ``push``. ``arm`` (called by the packet worker right
after a merge is activated) freezes the last ``window`` rewards as the baseline; after a grace
period the next ``window`` rewards are the canary window. When it is full, ``push`` returns a
``CanaryVerdict``: a regression if the mean dropped by more than
``max(k_sigma * standard error, min_drop_fraction * |baseline mean|)``.

Per-step rewards are autocorrelated (an episode is a swing-up then balancing), so the standard
error underestimates the noise; the fractional floor keeps two windows of the same policy from
tripping it. ``push`` never blocks and never rolls back itself: the caller hands the verdict to
the packet worker (the control loop never waits on a merge).
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import numpy as np

__all__ = ["Canary", "CanaryConfig", "CanaryVerdict", "regression"]


@dataclass(frozen=True)
class CanaryConfig:
    """When a merge counts as a regression."""

    window: int = 400
    """Steps per window (baseline and canary): two Pendulum episodes."""
    grace: int = 50
    """Steps ignored right after a merge (the switch transient)."""
    k_sigma: float = 3.0
    """Drop must exceed this many standard errors of the difference of means..."""
    min_drop_fraction: float = 0.10
    """...and this fraction of |baseline mean|."""
    min_baseline: int = 100
    """Fewer baseline steps than this: the canary cannot judge and the merge stands."""
    enabled: bool = True

    def __post_init__(self) -> None:
        if self.window < 2 or self.grace < 0 or self.min_baseline < 2:
            raise ValueError("canary window >= 2, grace >= 0, min_baseline >= 2")
        if not (self.k_sigma >= 0 and self.min_drop_fraction >= 0):
            raise ValueError("canary k_sigma and min_drop_fraction must be >= 0")


@dataclass(frozen=True)
class CanaryVerdict:
    """The outcome of one canary window."""

    tag: object
    """Whatever ``arm`` was given (the pipeline passes the activated slot and version)."""
    regressed: bool
    baseline_mean: float
    canary_mean: float
    drop: float
    threshold: float
    baseline_steps: int
    canary_steps: int

    def scores(self) -> dict[str, float]:
        return {"baseline_mean": self.baseline_mean, "canary_mean": self.canary_mean,
                "drop": self.drop, "threshold": self.threshold,
                "baseline_steps": float(self.baseline_steps),
                "canary_steps": float(self.canary_steps)}


def regression(baseline: np.ndarray, canary: np.ndarray, cfg: CanaryConfig
               ) -> tuple[bool, float, float]:
    """(regressed, drop, threshold) for two reward windows."""
    m0, m1 = float(baseline.mean()), float(canary.mean())
    se = math.sqrt(baseline.var(ddof=1) / len(baseline) + canary.var(ddof=1) / len(canary))
    threshold = max(cfg.k_sigma * se, cfg.min_drop_fraction * abs(m0))
    drop = m0 - m1
    return drop > threshold, drop, threshold


class Canary:
    """Rolling rewards plus at most one armed watch; ``push`` is called by the control thread only."""

    def __init__(self, cfg: CanaryConfig = CanaryConfig()) -> None:
        self.cfg = cfg
        self._recent = np.zeros(cfg.window, np.float64)  # ring of the last `window` rewards
        self._count = 0
        self._lock = threading.Lock()
        self._baseline: np.ndarray | None = None
        self._watch = np.zeros(cfg.window, np.float64)
        self._seen = 0  # steps since arm (including grace)
        self._tag: object = None

    def arm(self, tag: object) -> None:
        """Start watching a merge that just went live (worker thread)."""
        with self._lock:
            if not self.cfg.enabled:
                return
            self._baseline = self._last(self.cfg.window)
            self._seen = 0
            self._tag = tag

    def disarm(self) -> None:
        with self._lock:
            self._baseline = None

    @property
    def armed(self) -> bool:
        return self._baseline is not None

    def push(self, reward: float) -> CanaryVerdict | None:
        """Record one real reward; a verdict when an armed canary window completes."""
        with self._lock:
            self._recent[self._count % self.cfg.window] = reward
            self._count += 1
            if self._baseline is None:
                return None
            self._seen += 1
            k = self._seen - self.cfg.grace
            if k <= 0:
                return None
            self._watch[k - 1] = reward
            if k < self.cfg.window:
                return None
            baseline, self._baseline = self._baseline, None
            watch, tag = self._watch.copy(), self._tag
        return self._verdict(tag, baseline, watch)

    def rolling_mean(self) -> float | None:
        """Mean reward over the last window (None before the first step)."""
        with self._lock:
            n = min(self._count, self.cfg.window)
            return float(self._recent[:n].mean()) if n else None

    def _last(self, n: int) -> np.ndarray:
        have = min(self._count, self.cfg.window, n)
        idx = (self._count - have + np.arange(have)) % self.cfg.window
        return self._recent[idx].copy()

    def _verdict(self, tag: object, baseline: np.ndarray, watch: np.ndarray) -> CanaryVerdict:
        if len(baseline) < self.cfg.min_baseline:
            regressed, drop, threshold = False, 0.0, float("inf")
        else:
            regressed, drop, threshold = regression(baseline, watch, self.cfg)
        return CanaryVerdict(tag=tag, regressed=regressed,
                             baseline_mean=float(baseline.mean()) if len(baseline) else 0.0,
                             canary_mean=float(watch.mean()), drop=drop,
                             threshold=threshold if math.isfinite(threshold) else -1.0,
                             baseline_steps=len(baseline), canary_steps=len(watch))
