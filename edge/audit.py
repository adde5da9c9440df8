"""Edge stage 8: packet bytes -> AuditRecord (accepted or rejected, with reasons).

The EdgeAuditor is a list of small named checks, each returning a ``Reason`` or
``None`` (Gymnasium's ``check_env`` is the model): never ``assert``, never an
exception for a rejection.  Protocol checks run first, in the order of DESIGN.md
section 3 (size cap, signature, length, digest, parse); then the semantic checks.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from plasma.protocol import (
    DEFAULT_MAX_PACKET_BYTES,
    AuditRecord,
    DecodedPacket,
    PacketError,
    Reason,
    Slot,
    TrustStore,
    check_base_model,
    check_expiry,
    check_layers,
    check_target,
    check_version,
    decode_packet,
)

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
    slots: tuple[Slot, ...] = ("fleet", "device")
    max_rank: int = DEFAULT_MAX_RANK
    max_bytes: int = DEFAULT_MAX_PACKET_BYTES
    now: float | None = None


Check = Callable[[DecodedPacket, AuditContext], "Reason | None"]


def _target(p: DecodedPacket, ctx: AuditContext) -> Reason | None:
    return check_target(p.header, ctx.fleet, ctx.device, ctx.slots)


def _expiry(p: DecodedPacket, ctx: AuditContext) -> Reason | None:
    return check_expiry(p.header, time.time() if ctx.now is None else ctx.now)


def _version(p: DecodedPacket, ctx: AuditContext) -> Reason | None:
    return check_version(p.header, ctx.highest_version.get(p.header.slot, 0))


def _base_model(p: DecodedPacket, ctx: AuditContext) -> Reason | None:
    return None if ctx.base_sha256 is None else check_base_model(p.header, ctx.base_sha256)


def _shapes(p: DecodedPacket, ctx: AuditContext) -> Reason | None:
    if ctx.layers is None:
        if p.header.rank > ctx.max_rank:
            return Reason(code="rank_too_high", check="shapes",
                          message=f"rank {p.header.rank} exceeds the limit {ctx.max_rank}")
        return None
    return check_layers(p.header, ctx.layers, ctx.max_rank)


PROTOCOL_CHECKS: tuple[tuple[str, Check], ...] = (
    ("target", _target),
    ("expiry", _expiry),
    ("version", _version),
    ("base_model", _base_model),
    ("shapes", _shapes),
)


@dataclass(frozen=True)
class PacketVerdict:
    record: AuditRecord
    packet: DecodedPacket | None
    """The decoded packet when it parsed (accepted or not), else None."""

    @property
    def accepted(self) -> bool:
        return self.record.verdict == "accepted"


def audit_packet(data: bytes, ctx: AuditContext, subject: str = "packet",
                 checks: tuple[tuple[str, Check], ...] = PROTOCOL_CHECKS) -> PacketVerdict:
    """Verify, decode and judge one packet. Never raises for bad bytes."""
    try:
        packet = decode_packet(data, ctx.trust, max_bytes=ctx.max_bytes)
    except PacketError as exc:
        reason = Reason(code=exc.code, message=str(exc), check="decode")
        return PacketVerdict(_record(subject, ctx, None, "rejected", (reason,)), None)
    reasons = tuple(r for _, check in checks if (r := check(packet, ctx)) is not None)
    verdict = "rejected" if reasons else "accepted"
    return PacketVerdict(_record(f"packet:{packet.header.packet_id}", ctx, packet, verdict,
                                 reasons), packet)


def _record(subject: str, ctx: AuditContext, packet: DecodedPacket | None, verdict: str,
            reasons: tuple[Reason, ...], scores: Mapping[str, float] | None = None
            ) -> AuditRecord:
    header = packet.header if packet is not None else None
    return AuditRecord(
        auditor="edge", subject=subject[:256], fleet=ctx.fleet, device=ctx.device,
        slot=header.slot if header else None, version=header.version if header else None,
        verdict=verdict, reasons=reasons, scores=dict(scores or {}),  # type: ignore[arg-type]
    )
