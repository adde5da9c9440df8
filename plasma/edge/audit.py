"""Edge stage 8: packet bytes -> AuditRecord (accepted or rejected, with reasons).

The EdgeAuditor is a tuple of small named checks, each returning its ``Reason`` (or
``None``) and its scores (``plasma.protocol.checks``, after Gymnasium's ``check_env``):
never ``assert``, never an exception for a rejection.  Protocol checks run first, in
the order of docs/design.md section 3 (size cap, signature, length, digest, parse); then the
semantic checks (``audit_packet``).  The model-level checks (``audit_model``: finite
values, delta norms, behaviour probes; see ``plasma.edge.probes``) run afterwards on the
merge engine's staged, inactive side: exactly the weights that would go live.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

import numpy as np

from plasma.protocol import (
    DEFAULT_MAX_PACKET_BYTES,
    SLOTS,
    DecodedPacket,
    PacketError,
    Slot,
    TrustStore,
    check_base_model,
    check_expiry,
    check_layers,
    check_target,
    check_version,
    decode_packet,
)
from plasma.protocol.bundle import Manifest
from plasma.protocol.checks import Check, CheckResult, judge_all
from plasma.protocol.wire import AuditRecord, Reason, Verdict

from .probes import (
    BEHAVIOUR_CHECKS,
    WEIGHT_CHECKS,
    AuditThresholds,
    ModelCheck,
    ModelEvidence,
    ObservationRing,
    Policy,
    behaviour_scores,
    delta_ratios,
    probe_observations,
)

__all__ = ["audit_model", "audit_packet", "AuditContext", "Check", "DEFAULT_MAX_RANK",
           "ModelPolicies", "ModelSpace", "PacketVerdict", "PROTOCOL_CHECKS", "record_for"]

DEFAULT_MAX_RANK = 16


@dataclass(frozen=True)
class AuditContext:
    """What the device knows when it judges a packet; None means 'not known here'."""

    trust: TrustStore
    fleet: str | None = None
    device: str | None = None
    base_sha256: str | None = None
    layers: Mapping[str, tuple[int, int]] | None = None
    """Target layers of the model: name -> (in_features, out_features)."""
    highest_version: Mapping[Slot, int] = field(default_factory=dict)
    """Highest version ever accepted per slot (persisted by the journal)."""
    slots: tuple[Slot, ...] = SLOTS
    max_rank: int = DEFAULT_MAX_RANK
    max_bytes: int = DEFAULT_MAX_PACKET_BYTES
    now: float | None = None


PacketCheck = Check[DecodedPacket, AuditContext, Reason]


def target_matches(p: DecodedPacket, ctx: AuditContext) -> CheckResult[Reason]:
    return CheckResult(check_target(p.header, ctx.fleet, ctx.device, ctx.slots), {})


def not_expired(p: DecodedPacket, ctx: AuditContext) -> CheckResult[Reason]:
    return CheckResult(check_expiry(p.header, time.time() if ctx.now is None else ctx.now), {})


def version_is_new(p: DecodedPacket, ctx: AuditContext) -> CheckResult[Reason]:
    return CheckResult(check_version(p.header, ctx.highest_version.get(p.header.slot, 0)), {})


def base_model_matches(p: DecodedPacket, ctx: AuditContext) -> CheckResult[Reason]:
    if ctx.base_sha256 is None:
        return CheckResult(None, {})
    return CheckResult(check_base_model(p.header, ctx.base_sha256), {})


def shapes_match(p: DecodedPacket, ctx: AuditContext) -> CheckResult[Reason]:
    if ctx.layers is None:
        if p.header.rank > ctx.max_rank:
            return CheckResult(Reason(code="rank_too_high", check="shapes",
                                      message=f"rank {p.header.rank} exceeds the limit {ctx.max_rank}"),
                               {})
        return CheckResult(None, {})
    return CheckResult(check_layers(p.header, ctx.layers, ctx.max_rank), {})


PROTOCOL_CHECKS: tuple[PacketCheck, ...] = (target_matches, not_expired, version_is_new,
                                              base_model_matches, shapes_match)
"""The semantic checks of a decoded packet, in order (decoding has checked the bytes)."""


@dataclass(frozen=True)
class PacketVerdict:
    record: AuditRecord
    packet: DecodedPacket | None
    """The decoded packet when it parsed (accepted or not), else None."""

    @property
    def accepted(self) -> bool:
        return self.record.verdict == "accepted"


def audit_packet(data: bytes, ctx: AuditContext, subject: str = "packet",
                 checks: tuple[PacketCheck, ...] = PROTOCOL_CHECKS) -> PacketVerdict:
    """Verify, decode and judge one packet. Never raises for bad bytes."""
    try:
        packet = decode_packet(data, ctx.trust, max_bytes=ctx.max_bytes)
    except PacketError as exc:
        reason = Reason(code=exc.code, message=str(exc), check="decode")
        return PacketVerdict(_record(subject, ctx, None, "rejected", (reason,)), None)
    reasons, _ = judge_all(checks, packet, ctx)
    verdict: Verdict = "rejected" if reasons else "accepted"
    return PacketVerdict(_record(f"packet:{packet.header.packet_id}", ctx, packet, verdict,
                                 reasons), packet)


def _record(subject: str, ctx: AuditContext, packet: DecodedPacket | None, verdict: Verdict,
            reasons: tuple[Reason, ...], scores: Mapping[str, float] | None = None
            ) -> AuditRecord:
    header = packet.header if packet is not None else None
    return AuditRecord(
        auditor="edge", subject=subject[:256], fleet=ctx.fleet, device=ctx.device,
        slot=header.slot if header else None, version=header.version if header else None,
        verdict=verdict, reasons=reasons, scores=dict(scores or {}),
    )


# -- model-level checks -------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelPolicies:
    """The three policies the probes compare, each (n, obs_dim) -> (n, act_dim)."""

    current: Policy
    """What act() runs now (``PolicyRuntime.act_batch``)."""
    candidate: Policy
    """The staged, inactive side (``Staged.act_batch``)."""
    base: Policy
    """The shipped base model (``PolicyRuntime.base_act_batch``)."""


@dataclass(frozen=True)
class ModelSpace:
    """What the probes need from the bundle manifest, as arrays."""

    obs_low: np.ndarray
    obs_high: np.ndarray
    obs_std: np.ndarray
    act_low: np.ndarray
    act_high: np.ndarray

    @classmethod
    def from_manifest(cls, m: Manifest) -> ModelSpace:
        """Missing obs bounds become mean +- 3 std."""
        mean = np.asarray(m.obs_mean, np.float32)
        std = np.asarray(m.obs_std, np.float32)
        low = np.asarray(m.obs_low, np.float32) if m.obs_low is not None else mean - 3 * std
        high = np.asarray(m.obs_high, np.float32) if m.obs_high is not None else mean + 3 * std
        return cls(obs_low=low, obs_high=high, obs_std=std,
                   act_low=np.asarray(m.act_low, np.float32),
                   act_high=np.asarray(m.act_high, np.float32))


def audit_model(packet: DecodedPacket, base_weights: Mapping[str, np.ndarray],
                policies: ModelPolicies, space: ModelSpace, ring: ObservationRing | None,
                th: AuditThresholds = AuditThresholds(), seed: int = 0,
                base_norms: Mapping[str, float] | None = None,
                weight_checks: tuple[ModelCheck, ...] = WEIGHT_CHECKS,
                behaviour_checks: tuple[ModelCheck, ...] = BEHAVIOUR_CHECKS,
                ) -> tuple[tuple[Reason, ...], dict[str, float]]:
    """Model-level reasons (empty: passed) and scores for a packet whose candidate is staged.

    A packet that clears its slot has no delta: only the behaviour probes run.
    ``base_norms``: ``||W_base||_F`` per layer, if the caller keeps them (see ``delta_ratios``).
    """
    adapter = packet.adapter
    ev = ModelEvidence(ratios=delta_ratios(adapter, base_weights, base_norms),
                       finite=adapter.is_finite())
    weight_reasons, scores = judge_all(weight_checks, ev, th)
    if weight_reasons:  # never run a non-finite or huge candidate, even on probes
        return weight_reasons, _finite_scores(scores)
    rng = np.random.default_rng(seed)
    recent = ring.snapshot() if ring is not None else np.zeros((0, len(space.obs_std)), np.float32)
    obs = probe_observations(recent, th.probe_count, space.obs_low, space.obs_high, rng)
    probe = behaviour_scores(policies.current, policies.candidate, policies.base, obs,
                             space.act_low, space.act_high, th, space.obs_std, rng)
    reasons, judged = judge_all(behaviour_checks, replace(ev, behaviour=probe), th)
    scores.update(probe)  # the whole measurement, judged or not, then what the checks add
    scores.update(judged)
    scores["probe_real_fraction"] = min(len(recent), th.probe_count) / th.probe_count
    return reasons, _finite_scores(scores)


def _finite_scores(scores: Mapping[str, float]) -> dict[str, float]:
    """AuditRecord refuses NaN/Inf: report those as -1 (the reason says what happened)."""
    return {k: (float(v) if np.isfinite(v) else -1.0) for k, v in scores.items()}


def record_for(packet: DecodedPacket | None, ctx: AuditContext, verdict: Verdict,
               reasons: tuple[Reason, ...] = (), scores: Mapping[str, float] | None = None,
               subject: str | None = None) -> AuditRecord:
    """An edge AuditRecord about ``packet`` (or about bytes that never parsed)."""
    if subject is None:
        subject = f"packet:{packet.header.packet_id}" if packet is not None else "packet"
    return _record(subject, ctx, packet, verdict, reasons, scores)
