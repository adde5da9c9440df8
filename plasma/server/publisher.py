"""Server stage 6: approved adapter -> signed, versioned, retained packet on MQTT; acks back.

- A priority queue (0 = most urgent, then FIFO). A packet carries a complete adapter, so a
  newer job for the same (slot, target) replaces one still waiting: only the latest matters.
- The version is reserved in the store (persisted) at the moment of signing, so versions per
  (fleet, slot, target) strictly increase in publication order and never repeat after a
  restart. At start the publisher also reads the retained packets on the broker that verify
  with its own key and raises the version floor above them (a lost store file cannot make
  it reuse a version either).
- QoS 1, retained on the slot topic; a rate limit per target (``min_interval_s``) keeps a
  device from being flooded; a waiting job is published when its target's turn comes.
- Device acknowledgements: the edge publishes its ``AuditRecord`` (auditor "edge", verdict
  accepted / rejected / rolled_back, with the version) on its audit topic; they are checked
  against the topic and stored as acks.
- One publisher per fleet: with ``lease_holder`` set, the publisher publishes only while it holds
  the fleet's publisher lease in the store (renewed every ``lease_ttl_s / 3``); without it jobs
  wait. Versions are reserved fenced (``next_version(..., holder=)``): a publisher that lost the
  lease during a pause cannot reserve one, and the next holder continues from the store's
  counter, so versions never go back when the lease moves. A clean stop releases the lease.
- The signed bytes of every packet are kept with its publication in the store: a device
  reports versions, and the server reads the weights a version names from there
  (``plasma.server.slots``).
- Judicial audit records go to the server topic ``plasma/v1/{fleet}/server/audit`` (QoS 1,
  not retained): one place to watch every server-side decision, for fleet and device slots.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from pydantic import ValidationError

from plasma.protocol import (
    Adapter,
    AuditRecord,
    PacketError,
    Provenance,
    SigningKey,
    Slot,
    TopicError,
    TrustStore,
    decode_packet,
    encode_packet,
    new_id,
    slot_kind,
    slot_topic,
    topics,
)
from plasma.protocol.bus import Bus, Message

from .store import LeaseLost, Store, StoreError, publisher_lease

__all__ = ["ACK_VERDICTS", "judicial_topic", "MAX_ACK_BYTES", "Published", "Publisher",
           "PublisherConfig"]

log = logging.getLogger(__name__)

MAX_ACK_BYTES = 64 * 1024
ACK_VERDICTS = ("accepted", "rejected", "rolled_back")


def judicial_topic(fleet: str) -> str:
    """Where the server publishes its judicial audit records (one topic per fleet)."""
    return topics.server_audit(fleet)


@dataclass(frozen=True)
class PublisherConfig:
    """How packets are built and paced."""

    fleet: str
    """Fleet whose slots this publisher owns."""
    base_sha256: str
    """sha256 of the base model (model.int8.onnx) every adapter is relative to."""
    dtype: str = "int8"
    """Factor encoding on the wire: int8 (per-row scales), fp16 or fp32."""
    expires_in_s: float = 7 * 24 * 3600.0
    """Validity of a packet from its creation (freeze attacks: devices refuse expired ones)."""
    min_interval_s: float = 30.0
    """At most one packet per target (device, or the fleet slot) per this many seconds."""
    sync_timeout_s: float = 1.0
    """How long to collect retained packets at start to raise the version floor."""
    lease_holder: str | None = None
    """This process's id for the fleet's publisher lease; None = no lease (publish always)."""
    lease_ttl_s: float = 15.0
    """Lease validity; renewed every third of it. A crashed holder is replaced after this."""


@dataclass(order=True)
class _Job:
    priority: int
    seq: int
    slot: Slot = field(compare=False)
    device: str | None = field(compare=False)
    adapter: Adapter | None = field(compare=False)
    provenance: Provenance | None = field(compare=False)
    cancelled: bool = field(default=False, compare=False)

    @property
    def key(self) -> tuple[str, str]:
        return self.slot, self.device or ""


@dataclass(frozen=True)
class Published:
    """One packet that went out."""

    slot: str
    target: str
    version: int
    packet_id: str
    size: int
    topic: str
    priority: int


class Publisher:
    """Signs and publishes queued adapters; tracks device acknowledgements in the store."""

    def __init__(self, bus: Bus, store: Store, key: SigningKey, cfg: PublisherConfig,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.bus, self.store, self.key, self.cfg = bus, store, key, cfg
        self._clock = clock
        self._heap: list[_Job] = []
        self._pending: dict[tuple[str, str], _Job] = {}
        self._last_sent: dict[tuple[str, str], float] = {}
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stop = False
        self.sent: list[Published] = []
        self.ack_refused: Counter[str] = Counter()
        """Audit-topic messages that were not valid device acks, per reason."""
        self.acks = 0
        self._leader = threading.Event()
        if cfg.lease_holder is None:
            self._leader.set()
        self._lease_thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self, *, sync_versions: bool = True) -> None:
        """Subscribe to device audit topics, raise the version floor, start the worker."""
        self.bus.subscribe(topics.device_filter(self.cfg.fleet, "audit"), self._on_ack, qos=1)
        if sync_versions:
            self.sync_versions_from_broker()
        self._stop = False
        if self.cfg.lease_holder is not None:
            self.renew_lease()
            self._lease_thread = threading.Thread(target=self._keep_lease, name="plasma-lease",
                                                  daemon=True)
            self._lease_thread.start()
        self._thread = threading.Thread(target=self._work, name="plasma-publisher", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        for thread in (self._thread, self._lease_thread):
            if thread is not None:
                thread.join(timeout)
        self._thread = self._lease_thread = None
        if self.cfg.lease_holder is not None and self._leader.is_set():
            self._leader.clear()
            try:
                self.store.release_lease(publisher_lease(self.cfg.fleet), self.cfg.lease_holder)
            except StoreError as exc:  # the lease then expires by itself after lease_ttl_s
                log.warning("publisher: could not release the lease: %s", exc)

    # ------------------------------------------------------------------ the lease
    @property
    def is_leader(self) -> bool:
        """True while this publisher may publish (it holds the lease, or there is none)."""
        return self._leader.is_set()

    def renew_lease(self) -> bool:
        """Take or renew the fleet's publisher lease once; returns whether we hold it."""
        holder = self.cfg.lease_holder
        if holder is None:
            return True
        try:
            held = self.store.acquire_lease(publisher_lease(self.cfg.fleet), holder,
                                            self.cfg.lease_ttl_s)
        except StoreError as exc:
            log.warning("publisher: lease renewal failed (%s); not publishing until it works", exc)
            held = False
        if held != self._leader.is_set():
            log.info("publisher %s: %s the publisher lease of fleet %s", holder,
                     "took" if held else "does not hold", self.cfg.fleet)
        if held:
            self._leader.set()
        else:
            self._leader.clear()
        with self._cond:
            self._cond.notify_all()
        return held

    def _keep_lease(self) -> None:
        while True:
            with self._cond:
                if self._stop or self._cond.wait_for(lambda: self._stop,
                                                     self.cfg.lease_ttl_s / 3):
                    return
            self.renew_lease()

    def sync_versions_from_broker(self) -> int:
        """Raise each slot's version floor above our retained packets; returns how many seen."""
        trust = TrustStore([self.key.public_key])
        seen: list[tuple[str, str, int]] = []
        listening = threading.Event()
        listening.set()

        def on_retained(message: Message) -> None:
            # the Bus has no unsubscribe: after the window this handler ignores our own packets
            if not listening.is_set() or not message.payload:
                return
            try:
                header = decode_packet(message.payload, trust).header
            except PacketError:
                return  # not ours, or not a packet: it says nothing about our versions
            if header.fleet == self.cfg.fleet:
                seen.append((header.slot, header.target, header.version))

        self.bus.subscribe(topics.fleet_adapter(self.cfg.fleet), on_retained, qos=1)
        self.bus.subscribe(f"{topics.ROOT}/{self.cfg.fleet}/device/+/adapter", on_retained, qos=1)
        time.sleep(0.0 if self.bus.retained_is_synchronous else self.cfg.sync_timeout_s)
        listening.clear()
        for slot, target, version in list(seen):
            self.store.raise_version_floor(self.cfg.fleet, slot, target, version)
        if seen:
            log.info("publisher: %d retained packet(s) of ours on the broker; version floors "
                     "raised",
                     len(seen))
        return len(seen)

    # ------------------------------------------------------------------ queue
    def submit(self, adapter: Adapter | None, slot: Slot, device: str | None = None, *,
               priority: int = 5, provenance: Provenance | None = None) -> None:
        """Queue a complete adapter for a slot (``None`` clears it); replaces a waiting one."""
        if slot_kind(slot).per_device != (device is not None):
            raise ValueError("slot 'device' needs a device id; slot 'fleet' must not have one")
        if not 0 <= priority <= 9:
            raise ValueError("priority must be in 0..9")
        job = _Job(priority, next(self._seq), slot, device, adapter, provenance)
        with self._cond:
            old = self._pending.get(job.key)
            if old is not None:
                old.cancelled = True
                log.info("publisher: a newer adapter for %s %s replaces one still waiting",
                         slot, device or self.cfg.fleet)
            self._pending[job.key] = job
            heapq.heappush(self._heap, job)
            self._cond.notify_all()

    def pending(self) -> int:
        with self._cond:
            return len(self._pending)

    def waiting(self, slot: Slot, device: str | None = None) -> bool:
        """True while an adapter for that slot target waits in the queue."""
        with self._cond:
            return (slot, device or "") in self._pending

    def _next_ready(self) -> tuple[_Job | None, float]:
        """The most urgent job whose target may receive now, else the wait until one may."""
        now = self._clock()
        wait, held = 1.0, []
        job = None
        while self._heap:
            candidate = heapq.heappop(self._heap)
            if candidate.cancelled:
                continue
            free_at = self._last_sent.get(candidate.key, -1e18) + self.cfg.min_interval_s
            if free_at <= now:
                job = candidate
                break
            held.append(candidate)
            wait = min(wait, free_at - now)
        for h in held:
            heapq.heappush(self._heap, h)
        return job, max(wait, 0.0)

    def publish_ready(self) -> list[Published]:
        """Publish every job whose target is not rate-limited, most urgent first (worker's step)."""
        out = []
        while self._leader.is_set():
            with self._cond:
                job, _ = self._next_ready()
                if job is None:
                    return out
                del self._pending[job.key]
                self._last_sent[job.key] = self._clock()
            published = self._try_publish(job)
            if published is not None:
                out.append(published)
        return out

    def _work(self) -> None:
        while True:
            with self._cond:
                if self._stop:
                    return
                if not self._leader.is_set():  # jobs wait (newer ones replace them)
                    self._cond.wait(1.0)
                    continue
                job, wait = self._next_ready()
                if job is None:
                    self._cond.wait(wait)
                    continue
                del self._pending[job.key]
                self._last_sent[job.key] = self._clock()
            try:
                self._try_publish(job)
            except Exception:  # keep publishing other slots; logged with the job
                log.exception("publisher: could not publish %s %s", job.slot, job.device or "")

    def _try_publish(self, job: _Job) -> Published | None:
        """Publish, or put the job back (unless a newer one replaced it) if the lease was lost."""
        try:
            return self._publish(job)
        except LeaseLost as exc:
            log.warning("publisher: %s; %s %s waits for the lease", exc, job.slot,
                        job.device or self.cfg.fleet)
            self._leader.clear()
            with self._cond:
                self._last_sent.pop(job.key, None)
                if job.key not in self._pending:
                    self._pending[job.key] = job
                    heapq.heappush(self._heap, job)
            return None

    def _publish(self, job: _Job) -> Published:
        fleet = self.cfg.fleet
        target = job.device or fleet
        version = self.store.next_version(fleet, job.slot, target,  # persisted before use
                                          holder=self.cfg.lease_holder)
        packet_id = new_id()
        data = encode_packet(job.adapter, key=self.key, fleet=fleet, slot=job.slot,
                             device=job.device, version=version, base_sha256=self.cfg.base_sha256,
                             dtype=self.cfg.dtype, expires_in=self.cfg.expires_in_s,
                             priority=job.priority, provenance=job.provenance,
                             packet_id=packet_id)
        topic = slot_topic(fleet, job.slot, job.device)
        self.bus.publish(topic, data, qos=1, retain=True)
        self.store.record_publication(fleet, job.slot, target, version, packet_id, job.priority,
                                      len(data), topic, packet=data)
        pub = Published(job.slot, target, version, packet_id, len(data), topic, job.priority)
        self.sent.append(pub)
        log.info("published %s adapter v%d for %s (%d bytes, priority %d, sha256 %s...)",
                 job.slot, version, target, len(data), job.priority,
                 hashlib.sha256(data).hexdigest()[:12])
        return pub

    # ------------------------------------------------------------------ audit records
    def publish_audit(self, record: AuditRecord) -> None:
        """Store a judicial record and publish it on the fleet's server audit topic."""
        self.store.add_audit(record)
        self.bus.publish(judicial_topic(self.cfg.fleet), record.model_dump_json().encode(), qos=1)

    def _on_ack(self, message: Message) -> None:
        code = self.handle_ack(message)
        if code is not None:
            self.ack_refused[code] += 1
            log.debug("publisher: ignored a message on %s (%s)", message.topic, code)

    def handle_ack(self, message: Message) -> str | None:
        """Store one device ack; returns a refusal code or None."""
        if len(message.payload) > MAX_ACK_BYTES:
            return "too_large"
        try:
            topic = topics.parse(message.topic)
            record = AuditRecord.model_validate_json(message.payload)
        except (TopicError, ValidationError):
            return "malformed"
        if record.auditor != "edge":
            return None  # not an ack (e.g. someone else's record): nothing to track
        if (record.fleet, record.device) != (topic.fleet, topic.device):
            return "identity_mismatch"
        if record.verdict not in ACK_VERDICTS or record.slot is None or record.version is None:
            return "not_an_ack"
        if self.store.add_ack(record):
            self.acks += 1
            log.info("device %s %s %s adapter v%d%s", record.device, record.verdict, record.slot,
                     record.version,
                     f" ({', '.join(r.code for r in record.reasons)})" if record.reasons else "")
        return None
