"""What a packet does to the real device, told apart from evaluation noise.

A packet is judged against the device's base on the *same* real start states (paired episodes:
the gym env reset with the same seeds, every policy deterministic), so the start state's luck
cancels out of each episode's difference. Whether the packet is worse is a one-sided paired
sign-flip test (a permutation test on the mean difference: under "no effect" each episode's
difference is as likely negative as positive). It makes no normality assumption, which matters
here: a swing-up succeeds or fails, so returns and their differences are bimodal.

``Outcome.worse`` (significantly worse at ``alpha``) is what ``bench audit`` calls *harmful*
(an exploit's control) and a *significant regression* (a published packet).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["ALPHA", "Outcome", "compare", "one_sided_p"]

ALPHA = 0.05
"""Significance level of the one-sided test."""

_DRAWS = 20_000


@dataclass(frozen=True)
class Outcome:
    """A candidate's real returns against the base's on the same episodes."""

    episodes: int
    base_mean: float
    cand_mean: float
    mean_diff: float
    """Mean of (candidate - base) per episode."""
    sem_diff: float
    """Standard error of that mean."""
    p_worse: float
    """One-sided p-value of "the candidate is worse" (small: significantly worse)."""
    p_better: float
    """One-sided p-value of "the candidate is better"."""
    alpha: float = ALPHA

    @property
    def worse(self) -> bool:
        """Significantly worse than base at ``alpha``."""
        return self.p_worse < self.alpha

    @property
    def better(self) -> bool:
        return self.p_better < self.alpha

    def as_dict(self) -> dict[str, float | int | bool]:
        return {"episodes": self.episodes, "base": round(self.base_mean, 2),
                "candidate": round(self.cand_mean, 2), "mean_diff": round(self.mean_diff, 2),
                "sem_diff": round(self.sem_diff, 2), "p_worse": round(self.p_worse, 5),
                "p_better": round(self.p_better, 5), "worse": self.worse, "better": self.better}


def one_sided_p(diff: np.ndarray, *, seed: int = 0, draws: int = _DRAWS) -> float:
    """p-value of "mean(diff) < 0" by a paired sign-flip test (add-one estimate, never 0)."""
    d = np.asarray(diff, np.float64)
    if d.size == 0:
        raise ValueError("no paired episodes")
    observed = d.mean()
    if np.allclose(d, 0.0):
        return 1.0
    signs = np.random.default_rng(seed).choice(np.array([-1.0, 1.0]), (draws, d.size))
    null = (signs * np.abs(d)).mean(1)
    return float((1 + np.count_nonzero(null <= observed + 1e-12)) / (draws + 1))


def compare(base: np.ndarray, cand: np.ndarray, *, alpha: float = ALPHA, seed: int = 0) -> Outcome:
    """Paired outcome of per-episode returns ``cand`` against ``base`` (same episodes, same order)."""
    b, c = np.asarray(base, np.float64), np.asarray(cand, np.float64)
    if b.shape != c.shape or b.ndim != 1:
        raise ValueError(f"paired returns must be two equal 1-d arrays, got {b.shape} and {c.shape}")
    d = c - b
    sem = float(d.std(ddof=1) / np.sqrt(d.size)) if d.size > 1 else 0.0
    return Outcome(int(d.size), float(b.mean()), float(c.mean()), float(d.mean()), sem,
                   one_sided_p(d, seed=seed), one_sided_p(-d, seed=seed + 1), alpha)

