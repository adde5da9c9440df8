"""Judging real traces before they are learned from: reward spikes, anomalous patterns and
distribution shift, each a named check; flagged traces are corrected or kept out of learning.

Packets are judged by the server's judicial auditor (``plasma.server.judicial``) inside every
learning round; this auditor guards the other door, the data. A reward that the task's own
reward function contradicts is a spike (corrected to the task's value); a transition the world
model cannot have produced, a non-finite value or a frozen sensor is a pattern anomaly
(dropped); an observation far outside what the device has seen so far is a distribution shift
(kept, flagged: it is new data, not bad data, but the operator should know).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from plasma.protocol import AuditRecord, Reason, StateTrace

from ..server.tasks import TaskSpec
from .simulation import WorldModelLike

__all__ = ["JudicialAuditor", "TraceAuditConfig", "TraceCheck"]

CheckOutcome = tuple[Reason | None, dict[str, float]]
TraceCheck = Callable[["JudicialAuditor", StateTrace], CheckOutcome]


@dataclass(frozen=True)
class TraceAuditConfig:
    """Thresholds of the trace checks."""

    reward_tolerance: float = 1e-3
    """A recorded reward may differ from the task's reward by this much (float32 rounding)."""
    reward_sigmas: float = 6.0
    """Without a known reward: a spike is this many running stds from the running mean."""
    model_error_sigmas: float = 8.0
    """A transition is anomalous when the model misses it by this many typical errors."""
    frozen_steps: int = 20
    """This many identical consecutive observations is a frozen sensor."""
    shift_sigmas: float = 5.0
    """An observation this many running stds from the running mean is a distribution shift."""
    warmup: int = 50
    """Traces seen before the running statistics are trusted."""


class JudicialAuditor:
    """Audits real traces one at a time, keeping running statistics of what it has seen."""

    def __init__(self, task: TaskSpec, model: WorldModelLike | None = None,
                 cfg: TraceAuditConfig = TraceAuditConfig()) -> None:
        self.task, self.model, self.cfg = task, model, cfg
        self.n = 0
        self._obs_sum = np.zeros(task.obs_dim)
        self._obs_sq = np.zeros(task.obs_dim)
        self._rew_sum = self._rew_sq = 0.0
        self._model_err = 0.0
        self._last_obs: tuple[float, ...] | None = None
        self._frozen = 0

    checks: tuple[tuple[str, TraceCheck], ...] = ()  # filled below the class

    def audit_state_trace(self, trace: StateTrace) -> AuditRecord:
        """One record per trace: ``accepted``, or ``rejected`` with the failing checks'
        reasons; running statistics then absorb the trace."""
        reasons: list[Reason] = []
        scores: dict[str, float] = {}
        for _, check in self.checks:
            reason, s = check(self, trace)
            scores.update(s)
            if reason is not None:
                reasons.append(reason)
        self._absorb(trace)
        return AuditRecord(auditor="judicial", subject=f"trace:{trace.episode}/{trace.step}",
                           fleet=trace.fleet, device=trace.device,
                           verdict="rejected" if reasons else "accepted", reasons=tuple(reasons),
                           scores=scores)

    def apply_correction(self, record: AuditRecord, trace: StateTrace) -> StateTrace | None:
        """The trace to learn from: unchanged when accepted or only shifted, the reward
        replaced by the task's own value after a spike, None when it must not be learned from."""
        codes = {r.code for r in record.reasons}
        if codes & {"pattern_anomaly", "non_finite", "frozen_sensor"}:
            return None
        if "reward_spike" in codes:
            if self.task.reward is None:
                return None
            fixed = self._task_reward(trace)
            return trace.model_copy(update={"reward": fixed})
        return trace

    # -- statistics ---------------------------------------------------------------------------

    def _absorb(self, trace: StateTrace) -> None:
        obs = np.asarray(trace.obs, np.float64)
        if not np.isfinite(obs).all() or not np.isfinite(trace.reward):
            return
        self.n += 1
        self._obs_sum += obs
        self._obs_sq += obs ** 2
        self._rew_sum += trace.reward
        self._rew_sq += trace.reward ** 2
        self._frozen = self._frozen + 1 if trace.obs == self._last_obs else 0
        self._last_obs = trace.obs

    def _mean_std(self, total: np.ndarray | float, sq: np.ndarray | float) -> tuple[np.ndarray,
                                                                                 np.ndarray]:
        mean = np.asarray(total) / max(self.n, 1)
        var = np.maximum(np.asarray(sq) / max(self.n, 1) - mean ** 2, 0.0)
        return mean, np.sqrt(var) + 1e-6

    def _task_reward(self, trace: StateTrace) -> float:
        assert self.task.reward is not None
        obs, act = np.array([trace.obs], np.float32), np.array([trace.action], np.float32)
        return float(self.task.reward(obs, act, np.array([trace.next_obs], np.float32))[0])


def check_finite(auditor: JudicialAuditor, trace: StateTrace) -> CheckOutcome:
    values = (*trace.obs, *trace.action, *trace.next_obs, trace.reward)
    if all(np.isfinite(values)):
        return None, {}
    return Reason(code="non_finite", check="pattern", message="a value of the trace is NaN or "
                  "infinite"), {}


def check_reward_spike(auditor: JudicialAuditor, trace: StateTrace) -> CheckOutcome:
    """The recorded reward against the task's reward function (or the running statistics)."""
    if not np.isfinite(trace.reward):
        return None, {}
    if auditor.task.reward is not None:
        want = auditor._task_reward(trace)
        gap = abs(trace.reward - want)
        if gap <= auditor.cfg.reward_tolerance * max(1.0, abs(want)):
            return None, {"reward_error": gap}
        return Reason(code="reward_spike", check="reward_spike",
                      message=f"recorded reward {trace.reward:.4g} but the task's reward for "
                              f"this transition is {want:.4g}"), {"reward_error": gap}
    if auditor.n < auditor.cfg.warmup:
        return None, {}
    mean, std = auditor._mean_std(auditor._rew_sum, auditor._rew_sq)
    z = float(abs(trace.reward - mean) / std)
    if z <= auditor.cfg.reward_sigmas:
        return None, {"reward_z": z}
    return Reason(code="reward_spike", check="reward_spike",
                  message=f"reward {trace.reward:.4g} is {z:.1f} stds from the running mean "
                          f"{float(mean):.4g}"), {"reward_z": z}


def check_pattern(auditor: JudicialAuditor, trace: StateTrace) -> CheckOutcome:
    """A frozen sensor, or a transition the world model cannot have produced."""
    if trace.obs == auditor._last_obs and auditor._frozen + 1 >= auditor.cfg.frozen_steps:
        return Reason(code="frozen_sensor", check="pattern",
                      message=f"the observation has not changed for {auditor._frozen + 1} "
                              "steps"), {}
    model = auditor.model
    if model is None or not np.isfinite(trace.next_obs).all():
        return None, {}
    obs = np.array([trace.obs], np.float32)
    act = np.array([trace.action], np.float32)
    pred = np.mean([model.step_member(m, obs, act) for m in range(len(model.members))], axis=0)
    err = float(np.abs(pred[0] - np.asarray(trace.next_obs)).max())
    typical = auditor._model_err / max(auditor.n, 1) + 1e-3
    auditor._model_err += min(err, 10 * typical)  # one outlier must not raise the bar for long
    if auditor.n < auditor.cfg.warmup or err <= auditor.cfg.model_error_sigmas * typical:
        return None, {"model_error": err}
    return Reason(code="pattern_anomaly", check="pattern",
                  message=f"the world model misses this transition by {err:.3g} "
                          f"({err / typical:.0f}x its typical error)"), {"model_error": err}


def check_distribution_shift(auditor: JudicialAuditor, trace: StateTrace) -> CheckOutcome:
    if auditor.n < auditor.cfg.warmup or not np.isfinite(trace.obs).all():
        return None, {}
    mean, std = auditor._mean_std(auditor._obs_sum, auditor._obs_sq)
    z = float(np.max(np.abs(np.asarray(trace.obs) - mean) / std))
    if z <= auditor.cfg.shift_sigmas:
        return None, {"obs_z": z}
    return Reason(code="distribution_shift", check="distribution_shift",
                  message=f"an observation component is {z:.1f} stds from what the device has "
                          "seen"), {"obs_z": z}


JudicialAuditor.checks = (
    ("finite", check_finite),
    ("reward_spike", check_reward_spike),
    ("pattern", check_pattern),
    ("distribution_shift", check_distribution_shift),
)
