"""Edge stages 7-9 assembled: packet bytes -> audit -> staged merge -> probes -> journal -> live.

One ``AdapterPipeline`` per device, driven by the daemon's packet worker thread (never the
control thread). Order for a packet: protocol audit (size, signature, digest, parse, target,
expiry, version, base model, shapes), stage the merge into the inactive side, model audit on
exactly those staged weights, persist bytes and version (``Journal.commit``), then one
reference flip makes it live and the canary is armed. Anything that fails before the flip
leaves the live adapters untouched. Every call ends in an ``Outcome`` holding an AuditRecord.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType

import numpy as np

from plasma.protocol import SLOTS, DecodedPacket, Slot
from plasma.protocol.wire import AuditRecord, Reason

from .audit import (
    AuditContext,
    ModelPolicies,
    ModelSpace,
    audit_model,
    audit_packet,
    base_model_matches,
    record_for,
    shapes_match,
    target_matches,
)
from .canary import Canary, CanaryVerdict
from .journal import Journal, JournalError, Pending
from .merge import MergeEngine, MergeError, Staged
from .probes import AuditThresholds, ObservationRing
from .runtime import PolicyRuntime

__all__ = ["AdapterPipeline", "Outcome", "StageClock"]

log = logging.getLogger(__name__)

# On restart the stored bytes are re-verified (signature, digest, target, base model, shapes);
# expiry and version are not re-judged: they were judged when the packet arrived.
_RESTORE_CHECKS = (target_matches, base_model_matches, shapes_match)


@dataclass(frozen=True)
class Outcome:
    """What happened to one packet (or one canary window), ready to log and publish."""

    record: AuditRecord
    packet: DecodedPacket | None = None
    size: int = 0
    elapsed_s: float = 0.0
    source: str = ""
    stages_ms: Mapping[str, float] = field(default_factory=dict)
    """Where ``elapsed_s`` went, in order (``handle``): ``audit`` (verify, decode, protocol
    checks), ``journal_append``, ``stage``, ``probes``, ``sync_wait`` (the rest of the journal's
    fdatasync), ``flip``; the ones reached. For benches (``bench e2e``) and operators."""

    def describe(self) -> str:
        """One line an operator can act on."""
        r, p = self.record, self.packet
        what = f"{p.header.slot} adapter v{p.header.version}" if p is not None else \
            f"packet on the {self.source or '?'} topic"
        if r.verdict == "accepted" and p is not None:
            body = "clears the slot" if not p.header.layers else \
                f"rank {p.header.rank}, {len(p.header.layers)} layers"
            return f"accepted {what} ({body}, {self.size / 1024:.1f} KB) in " \
                   f"{self.elapsed_s * 1e3:.1f} ms"
        reasons = "; ".join(f"{x.message} [{x.code}]" for x in r.reasons) or r.verdict
        verb = "rolled back" if r.verdict == "rolled_back" else "rejected"
        return f"{verb} {what}: {reasons}"


class StageClock:
    """Milliseconds between successive ``mark`` calls (perf_counter), by stage name."""

    __slots__ = ("ms", "_last")

    def __init__(self) -> None:
        self.ms: dict[str, float] = {}
        self._last = time.perf_counter()

    def mark(self, stage: str) -> None:
        now = time.perf_counter()
        self.ms[stage] = (now - self._last) * 1e3
        self._last = now


class AdapterPipeline:
    """Owns the adapter state of one device: what is live, what was before, what is persisted."""

    def __init__(self, runtime: PolicyRuntime, engine: MergeEngine, journal: Journal,
                 ctx: AuditContext, canary: Canary, ring: ObservationRing | None,
                 thresholds: AuditThresholds = AuditThresholds(), *,
                 defer_upgrade: bool = False) -> None:
        """``defer_upgrade``: an accept leaves the new side's prepacked upgrade owed, not started;
        the caller wakes it with ``runtime.request_upgrade()`` once it has reported the accept
        (the daemon, ``bench e2e``), or an attached control loop builds it about one period
        later."""
        self.defer_upgrade = defer_upgrade
        self.runtime, self.engine, self.journal = runtime, engine, journal
        self.ctx, self.canary, self.ring, self.thresholds = ctx, canary, ring, thresholds
        self.space = ModelSpace.from_manifest(runtime.bundle.manifest)
        self._base_norms = {name: float(np.linalg.norm(w))  # the fp32 master never changes
                            for name, w in runtime.bundle.weights.items()}
        runtime.base_act_batch(self.space.obs_low[None])  # build the base session now, not later
        self._live: dict[Slot, DecodedPacket | None] = {slot: None for slot in SLOTS}
        self._before: dict[Slot, DecodedPacket | None] | None = None
        self._last_tag: tuple[Slot, int] | None = None
        self._probe_seed = 0
        self.slot_versions: Mapping[Slot, int] = MappingProxyType({slot: 0 for slot in SLOTS})
        """Slot -> version live in act() (0: none); replaced whole, read by the control thread."""
        self.versions: tuple[int, ...] = tuple(self.slot_versions.values())
        """The same versions in slot-table order: (fleet, device)."""

    # -- restart ------------------------------------------------------------------------------
    def restore(self) -> tuple[str, ...]:
        """Re-apply what the journal holds; returns operator notes (damaged files...)."""
        restored = self.journal.load(self._verify_stored)
        adapters = {slot: (p.adapter if p.adapter.layers else None)
                    for slot, p in restored.packets.items()}
        if adapters:
            try:
                self.engine.restore(adapters)
            except MergeError as exc:  # verified bytes the merge refuses: run the base model
                return (*restored.problems, f"stored adapters not re-applied ({exc.code}: {exc})")
            self._live.update(restored.packets)
        self._publish_versions()
        return restored.problems

    def _verify_stored(self, data: bytes) -> DecodedPacket | str:
        ctx = replace(self.ctx, highest_version={})
        verdict = audit_packet(data, ctx, checks=_RESTORE_CHECKS)
        packet = verdict.packet
        if not verdict.accepted or packet is None:
            first = verdict.record.reasons[0] if verdict.record.reasons else None
            return f"{first.code}: {first.message}" if first else "not accepted"
        # The model audit again, on the staged weights: a crash between a packet's journal
        # record and its withdrawal (journal.begin runs beside the probes) must not bring a
        # refused adapter back, and stricter thresholds apply to what is on disk too.
        try:
            staged = self.engine.stage({packet.header.slot: packet.adapter
                                        if packet.adapter.layers else None})
        except MergeError as exc:
            return f"{exc.code}: {exc}"
        reasons, _ = self._probe(packet, staged)
        if reasons:
            return f"{reasons[0].code}: {reasons[0].message}"
        return packet

    # -- a packet -----------------------------------------------------------------------------
    def handle(self, data: bytes, source: str = "", received_at: float | None = None) -> Outcome:
        """Judge one packet and make it live if it passes. Never raises for bad input."""
        t0 = time.perf_counter() if received_at is None else received_at
        clock = StageClock()
        ctx = replace(self.ctx, highest_version=self.journal.highest())
        if source in SLOTS:  # mix-and-match: a packet is judged for the topic it came on
            ctx = replace(ctx, slots=(source,))
        verdict = audit_packet(data, ctx)
        clock.mark("audit")
        packet = verdict.packet
        if not verdict.accepted or packet is None:
            record = self._already_active(verdict.record, packet, ctx)
            return Outcome(record, packet, len(data), time.perf_counter() - t0, source, clock.ms)
        record = self._merge(packet, data, ctx, clock)
        return Outcome(record, packet, len(data), time.perf_counter() - t0, source, clock.ms)

    def _merge(self, packet: DecodedPacket, data: bytes, ctx: AuditContext,
               clock: StageClock) -> AuditRecord:
        slot, version = packet.header.slot, packet.header.version
        try:  # the disk syncs while the candidate is staged and probed (journal.begin)
            pending = self.journal.begin(slot, data, version)
        except JournalError as exc:
            return self._reject(packet, ctx, exc.code, f"{exc}; keeping the adapters in use",
                                "journal")
        clock.mark("journal_append")
        try:
            staged = self.engine.stage({slot: packet.adapter if packet.adapter.layers else None})
        except MergeError as exc:
            self._withdraw(pending)
            return self._reject(packet, ctx, exc.code,
                                f"merge refused the adapter: {exc.code}: {exc}", "merge")
        clock.mark("stage")
        reasons, scores = self._probe(packet, staged)
        clock.mark("probes")
        if reasons:
            self._withdraw(pending)
            return record_for(packet, ctx, "rejected", reasons, scores)
        try:
            self.journal.finish(pending)  # persisted BEFORE it goes live
        except JournalError as exc:
            return self._reject(packet, ctx, exc.code, f"{exc}; keeping the adapters in use",
                                "journal", scores)
        clock.mark("sync_wait")
        # The record is ready before the flip: right after it the prepacked upgrade build of the
        # new side may start (control loop or background thread; see defer_upgrade) and compete
        # for the GIL with what is left of the accept (bench e2e: ~0.3 ms more).
        record = record_for(packet, ctx, "accepted", (), scores)
        before = dict(self._live)
        self.engine.activate(staged, wake_upgrade=not self.defer_upgrade)
        clock.mark("flip")
        self._before = before
        self._live[slot] = packet
        self._last_tag = (slot, version)
        self._publish_versions()
        self.canary.arm(self._last_tag)
        return record

    def _probe(self, packet: DecodedPacket, staged: Staged
               ) -> tuple[tuple[Reason, ...], dict[str, float]]:
        """The model audit on exactly the staged weights."""
        self._probe_seed += 1
        policies = ModelPolicies(current=self.runtime.act_batch, candidate=staged.act_batch,
                                 base=self.runtime.base_act_batch)
        return audit_model(packet, self.runtime.bundle.weights, policies, self.space,
                           self.ring, self.thresholds, seed=self._probe_seed,
                           base_norms=self._base_norms)

    def _already_active(self, record: AuditRecord, packet: DecodedPacket | None,
                        ctx: AuditContext) -> AuditRecord:
        """The broker re-sends retained packets on every (re)subscribe: the live one is no replay."""
        if packet is None or [r.code for r in record.reasons] != ["replayed_version"]:
            return record
        live = self._live[packet.header.slot]
        if live is None or live.header != packet.header:
            return record
        reason = Reason(code="already_active", check="version",
                        message=f"this {packet.header.slot} adapter v{packet.header.version} is "
                                "the one running (a retained copy)")
        return record_for(packet, ctx, "rejected", (reason,))

    def _withdraw(self, pending: Pending) -> None:
        try:
            self.journal.withdraw(pending)
        except JournalError as exc:  # restore() re-audits restored packets, so this stays safe
            log.error("could not record the withdrawal of %s v%d: %s", pending.slot,
                      pending.version, exc)

    def _reject(self, packet: DecodedPacket, ctx: AuditContext, code: str, message: str,
                check: str, scores: Mapping[str, float] | None = None) -> AuditRecord:
        reason = Reason(code=code, message=message[:1000], check=check)
        return record_for(packet, ctx, "rejected", (reason,), scores)

    # -- the canary ---------------------------------------------------------------------------
    def on_canary(self, verdict: CanaryVerdict) -> Outcome | None:
        """Roll back a merge whose canary window regressed; None if it passed or is stale."""
        tag = self._last_tag
        if tag is None or verdict.tag != tag or self._before is None:
            return None  # nothing live to judge, or a later packet replaced the merge it judged
        slot, version = tag
        packet = self._live[slot]
        if not verdict.regressed:
            log.info("canary passed for %s adapter v%d: reward per step %.3f -> %.3f", slot,
                     version, verdict.baseline_mean, verdict.canary_mean)
            return None
        reasons = [Reason(code="reward_regression", check="canary",
                          message=f"real reward per step fell from {verdict.baseline_mean:.3f} to "
                                  f"{verdict.canary_mean:.3f} over {verdict.canary_steps} steps "
                                  f"(allowed drop {verdict.threshold:.3f})")]
        self.engine.rollback()
        self._live, self._before, self._last_tag = self._before, None, None
        self._publish_versions()
        try:
            self.journal.mark_bad(slot, version)
        except JournalError as exc:
            reasons.append(Reason(code=exc.code, check="journal", message=str(exc)[:1000]))
        record = record_for(packet, self.ctx, "rolled_back", tuple(reasons), verdict.scores())
        return Outcome(record, packet, packet.size if packet else 0, 0.0, "canary")

    @property
    def live(self) -> Mapping[str, DecodedPacket | None]:
        """The packet live in each slot (None: none)."""
        return dict(self._live)

    def _publish_versions(self) -> None:
        live = {slot: (packet.header.version if packet else 0)
                for slot, packet in ((s, self._live.get(s)) for s in SLOTS)}
        self.slot_versions = MappingProxyType(live)
        self.versions = tuple(live.values())
