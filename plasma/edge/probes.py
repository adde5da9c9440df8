"""Edge stage 8b: staged candidate weights -> model-level audit scores and reasons (behaviour probes).

Two steps, so each check is a pure table-testable function:

1. measure: ``delta_ratios`` (weights only) and ``behaviour_scores`` (runs the current, the
   candidate and the shipped base policy on the same probe batch) produce plain floats;
2. judge: ``check_*`` functions compare those floats (a ``ModelEvidence``) with
   ``AuditThresholds`` and return a ``CheckResult`` (reason or None, and the scores they
   judged); ``WEIGHT_CHECKS`` run before the probes, ``BEHAVIOUR_CHECKS`` after them.

Probe observations come from the device's own recent real observations (``ObservationRing``,
written by the control loop), or from the manifest's observation bounds while it is empty.
Dynamic int8 quantizes activations per tensor, so a row's action depends on the other rows of
its batch (~1e-3, docs/design.md section 6): every comparison runs the models on the same batch.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

from plasma.protocol import Adapter
from plasma.protocol.checks import Check, CheckResult, judge_all
from plasma.protocol.wire import Reason

__all__ = ["AuditThresholds", "ObservationRing", "behaviour_scores", "check_action_bounds",
           "check_action_change", "check_delta_norm", "check_finite", "check_sensitivity",
           "delta_ratios", "probe_observations", "judge_behaviour",
           "BEHAVIOUR_CHECKS", "WEIGHT_CHECKS", "ModelCheck", "ModelEvidence"]

Policy = Callable[[np.ndarray], np.ndarray]
"""(n, obs_dim) -> (n, act_dim)."""


@dataclass(frozen=True)
class AuditThresholds:
    """Limits of the device-side model checks. Defaults are deliberately loose: the server's
    judicial auditor is the main gate; these catch hostile or broken adapters."""

    max_delta_ratio: float = 1.0
    """Per layer, ``||delta W||_F / ||W_base||_F``. The server's judicial limit too: adapters that
    close the Pendulum m=1.6,g=12 gap measured 0.7-1.25 on the 64->1 output layer (capped at
    0.45 they only reached -460 to -900 against -223 for the oracle), so 0.5 refused good ones."""
    max_mean_action_change: float = 0.35
    """Mean over probes of the largest per-dimension ``|a_new - a_now|``, as a fraction of the
    action range. Not yet measured against real server adapters: configurable, loose."""
    max_p90_action_change: float = 0.75
    """The same, 90th percentile over probes. Not the maximum: a saturating (bang-bang) policy
    such as a Pendulum swing-up flips full range near its switching surface, so a legitimate
    adapter that moves that surface changes a few probe actions by 100 %."""
    action_bound_tolerance: float = 1e-3
    """How far outside ``[act_low, act_high]`` (fraction of the range) an action may stray (int8 rounding)."""
    max_sensitivity_ratio: float = 4.0
    """Adversarial probe: mean action change under small observation perturbations, candidate over base."""
    perturbation: float = 0.05
    """Size of those perturbations, as a fraction of the manifest's ``obs_std`` per dimension."""
    sensitivity_floor: float = 1e-3
    """Base-policy change (fraction of action range) below which the ratio uses this floor instead."""
    probe_count: int = 32
    """Observations per probe batch (recent real ones first). 32 x (1 + 2 perturbations) rows
    keep the three probe runs near 1 ms for a 64-256x3-8 MLP; 64 x 5 took ~3 ms of a 5 ms
    publish-to-swap budget (bench e2e)."""
    perturbation_count: int = 2
    """Random perturbations per probe observation in the adversarial probe."""

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if not (np.isfinite(value) and value > 0):
                raise ValueError(f"audit threshold {name} must be a positive number, got {value!r}")


class ObservationRing:
    """The last ``capacity`` real observations: preallocated, written by the control thread."""

    def __init__(self, capacity: int, obs_dim: int) -> None:
        self._buf = np.zeros((capacity, obs_dim), np.float32)  # (capacity, obs_dim)
        self._count = 0
        self._lock = threading.Lock()

    def push(self, obs: np.ndarray) -> None:
        with self._lock:  # ~0.2 us uncontended; the worker holds it only to copy
            self._buf[self._count % len(self._buf)] = obs
            self._count += 1

    def snapshot(self) -> np.ndarray:
        """(n, obs_dim) copy of what is stored, oldest first."""
        with self._lock:
            n, cap = self._count, len(self._buf)
            if n <= cap:
                return self._buf[:n].copy()
            k = n % cap
            return np.concatenate([self._buf[k:], self._buf[:k]])

    def __len__(self) -> int:
        return min(self._count, len(self._buf))


def probe_observations(recent: np.ndarray, count: int, obs_low: np.ndarray, obs_high: np.ndarray,
                       rng: np.random.Generator) -> np.ndarray:
    """(count, obs_dim): a sample of recent real observations, or uniform draws within the bounds."""
    if len(recent) >= count:
        return recent[rng.choice(len(recent), size=count, replace=False)].astype(np.float32)
    fill = rng.uniform(obs_low, obs_high, size=(count - len(recent), len(obs_low)))
    return np.concatenate([recent, fill]).astype(np.float32)


# -- measure ----------------------------------------------------------------------------------
def delta_ratios(adapter: Adapter, base: Mapping[str, np.ndarray],
                 base_norms: Mapping[str, float] | None = None) -> dict[str, float]:
    """layer -> ``||delta W||_F / ||W_base||_F`` (inf if delta W is not finite).

    ``base_norms`` (layer -> ``||W_base||_F``) saves recomputing them for every packet.

    ``||c B A||_F^2 = c^2 sum((B^T B) * (A A^T))``: two (rank, rank) Gram matrices instead of the
    (out, in) product (0.28 -> 0.05 ms for rank 4 on 64-256x3-8, measured). Factors large enough
    for the float32 product the merge computes to overflow take the explicit path, so a delta
    that is inf in float32 is reported as inf here too.
    """
    out = {}
    for name, (a, b) in adapter.layers.items():
        with np.errstate(over="ignore", invalid="ignore"):
            norm = _delta_norm(adapter.scale, a, b) if _gram_safe(adapter.scale, a, b) \
                else float(np.linalg.norm(adapter.delta(name)))
        w_norm = base_norms[name] if base_norms is not None else float(np.linalg.norm(base[name]))
        out[name] = norm / max(w_norm, 1e-12) if np.isfinite(norm) else float("inf")
    return out


_GRAM_LIMIT = 1e30  # far below float32's 3.4e38: no partial sum of B @ A can overflow


def _gram_safe(scale: float, a: np.ndarray, b: np.ndarray) -> bool:
    if a.size == 0 or b.size == 0:
        return True
    bound = abs(scale) * float(np.abs(a).max()) * float(np.abs(b).max()) * a.shape[0]
    return bool(np.isfinite(bound) and bound < _GRAM_LIMIT)


def _delta_norm(scale: float, a: np.ndarray, b: np.ndarray) -> float:
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    sq = float(np.sum((b64.T @ b64) * (a64 @ a64.T)))
    return abs(scale) * float(np.sqrt(max(sq, 0.0)))


def behaviour_scores(current: Policy, candidate: Policy, base: Policy, obs: np.ndarray,
                     act_low: np.ndarray, act_high: np.ndarray, th: AuditThresholds,
                     obs_std: np.ndarray, rng: np.random.Generator) -> dict[str, float]:
    """Action change vs the live policy, bound violations and the perturbation sensitivity ratio."""
    span = (act_high - act_low).astype(np.float32)  # (act_dim,)
    k, n = th.perturbation_count, len(obs)
    noise = rng.uniform(-1.0, 1.0, size=(k, n, obs.shape[1])) * th.perturbation * obs_std
    batch = np.concatenate([obs, (obs[None] + noise).reshape(k * n, -1)]).astype(np.float32)
    cand = candidate(batch)  # ((k + 1) n, act_dim): one batch, one activation scale
    now = current(batch)[:n]
    ref = base(batch)
    change = (np.abs(cand[:n] - now) / span).max(axis=1)  # (n,)
    below = ((act_low - cand) / span).max()
    above = ((cand - act_high) / span).max()
    moved_cand = _moved(cand, n, k, span)
    moved_base = max(_moved(ref, n, k, span), th.sensitivity_floor)
    return {
        "action_change_mean": float(change.mean()),
        "action_change_p90": _percentile(change, 90.0),
        "action_change_max": float(change.max()),
        "action_out_of_bounds": float(max(below, above, 0.0)),
        "action_finite": float(np.isfinite(cand).all()),
        "sensitivity_ratio": float(moved_cand / moved_base),
    }


def _percentile(x: np.ndarray, q: float) -> float:
    """``np.percentile(x, q)`` (linear interpolation) for a small 1-d array, ~20x faster."""
    s = np.sort(x)
    pos = (len(s) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return float(s[lo] + (pos - lo) * (s[hi] - s[lo]))


def _moved(actions: np.ndarray, n: int, k: int, span: np.ndarray) -> float:
    """Mean over probes and perturbations of the largest action change (fraction of range)."""
    clean, perturbed = actions[:n], actions[n:].reshape(k, n, -1)
    return float((np.abs(perturbed - clean[None]) / span).max(axis=2).mean())


# -- judge ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelEvidence:
    """What the model checks judge: the delta norms and, once the probes ran, their scores."""

    ratios: Mapping[str, float]
    """layer -> ``||delta W||_F / ||W_base||_F`` (``delta_ratios``)."""
    finite: bool = True
    """Every factor of the adapter is finite."""
    behaviour: Mapping[str, float] = field(default_factory=dict)
    """``behaviour_scores`` of the staged candidate (empty before the probes ran)."""


ModelCheck = Check[ModelEvidence, AuditThresholds, Reason]


def check_finite(ev: ModelEvidence, th: AuditThresholds) -> CheckResult[Reason]:
    """Factors and the deltas they make must be finite (fp16/fp32 payloads are checked at decode;
    B @ A can still overflow float32)."""
    bad = [name for name, r in ev.ratios.items() if not np.isfinite(r)]
    if not ev.finite or bad:
        return CheckResult(Reason(code="non_finite", check="finite",
                                  message=f"delta W is not finite in layer(s) {', '.join(bad) or '?'}"),
                           {})
    return CheckResult(None, {})


def check_delta_norm(ev: ModelEvidence, th: AuditThresholds) -> CheckResult[Reason]:
    scores = {f"delta_ratio.{name}": r for name, r in ev.ratios.items()}
    worst = max(ev.ratios.items(), key=lambda kv: kv[1], default=None)
    if worst is not None and worst[1] > th.max_delta_ratio:
        return CheckResult(Reason(code="delta_too_large", check="delta_norm",
                                  message=f"layer {worst[0]}: ||dW||/||W|| = {worst[1]:.3g} exceeds "
                                          f"{th.max_delta_ratio:g}"), scores)
    return CheckResult(None, scores)


def check_action_change(ev: ModelEvidence, th: AuditThresholds) -> CheckResult[Reason]:
    mean, p90 = ev.behaviour["action_change_mean"], ev.behaviour["action_change_p90"]
    scores = {"action_change_mean": mean, "action_change_p90": p90}
    if not (mean <= th.max_mean_action_change and p90 <= th.max_p90_action_change):
        return CheckResult(Reason(code="action_change_too_large", check="action_change",
                                  message=f"actions move {mean:.1%} of their range on average (limit "
                                          f"{th.max_mean_action_change:.0%}), {p90:.1%} on 10 % of the "
                                          f"probes (limit {th.max_p90_action_change:.0%})"), scores)
    return CheckResult(None, scores)


def check_action_bounds(ev: ModelEvidence, th: AuditThresholds) -> CheckResult[Reason]:
    finite, out = ev.behaviour["action_finite"], ev.behaviour["action_out_of_bounds"]
    scores = {"action_out_of_bounds": out, "action_finite": finite}
    if finite < 1.0:
        return CheckResult(Reason(code="non_finite_action", check="action_bounds",
                                  message="the adapted policy outputs NaN or Inf"), scores)
    if out > th.action_bound_tolerance:
        return CheckResult(Reason(code="action_out_of_bounds", check="action_bounds",
                                  message=f"actions leave their bounds by {out:.1%} of the range"),
                           scores)
    return CheckResult(None, scores)


def check_sensitivity(ev: ModelEvidence, th: AuditThresholds) -> CheckResult[Reason]:
    ratio = ev.behaviour["sensitivity_ratio"]
    scores = {"sensitivity_ratio": ratio}
    if not ratio <= th.max_sensitivity_ratio:
        return CheckResult(Reason(code="too_sensitive", check="sensitivity",
                                  message=f"small observation perturbations move the adapted policy "
                                          f"{ratio:.1f}x as much as the base policy (limit "
                                          f"{th.max_sensitivity_ratio:g}x)"), scores)
    return CheckResult(None, scores)


WEIGHT_CHECKS: tuple[ModelCheck, ...] = (check_finite, check_delta_norm)
"""Judged on the weights alone, before the probes: a candidate failing one never runs."""
BEHAVIOUR_CHECKS: tuple[ModelCheck, ...] = (check_action_bounds, check_action_change,
                                            check_sensitivity)
"""Judged on the probe scores of the staged candidate (``ModelEvidence.behaviour``)."""


def judge_behaviour(scores: Mapping[str, float], th: AuditThresholds) -> tuple[Reason, ...]:
    """Every failing behaviour check (bounds, action change, sensitivity) on probe scores."""
    reasons, _ = judge_all(BEHAVIOUR_CHECKS, ModelEvidence(ratios={}, behaviour=scores), th)
    return reasons
