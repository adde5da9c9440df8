"""The store seam: what the server needs from its database, whichever database it is.

Two implementations share this contract (and the contract tests): ``TraceStore`` (SQLite, the
embedded default: one file, one machine) and ``PostgresStore`` (a server several ``plasma-server
run`` processes share). ``open_store`` picks one from a path or a ``postgresql://`` URL.

Besides traces, versions, audits, acks and learner progress, the store holds *leases*: a named
row (holder id, expiry) taken and renewed atomically, so exactly one process of a fleet
publishes at a time. Version counters live in the store too, so whichever process holds the
publisher lease continues from the last version reserved: versions never go back when it moves.
``next_version(..., holder=H)`` is fenced: it reserves a version only while ``H`` holds the
fleet's publisher lease, in the same transaction, so a publisher that lost its lease without
noticing (a long pause) cannot publish behind the new holder's back.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

from plasma.protocol import AuditRecord, TraceBatch
from plasma.protocol.errors import StoreError

__all__ = ["Ack", "Lease", "LeaseLost", "Store", "publisher_lease"]


class LeaseLost(StoreError):
    """A fenced write by a process that does not hold the lease (any more)."""

    code = "lease_lost"


def publisher_lease(fleet: str) -> str:
    """The name of a fleet's publisher lease."""
    return f"publisher/{fleet}"


@dataclass(frozen=True)
class Ack:
    """A device's answer to a published packet, from its audit topic."""

    fleet: str
    device: str
    slot: str
    version: int
    verdict: str
    """accepted, rejected or rolled_back."""
    received_at: float


@dataclass(frozen=True)
class Lease:
    """Who holds a named lease and until when (the store's clock, seconds since the epoch)."""

    name: str
    holder: str
    expires_at: float


class Store(abc.ABC):
    """The server's database. Every method is safe to call from several threads, and from
    several processes sharing one database (SQLite file or PostgreSQL)."""

    url: str
    """Where the store lives (a file path, ``":memory:"`` or a ``postgresql://`` URL)."""

    # ------------------------------------------------------------------ lifecycle
    @abc.abstractmethod
    def close(self) -> None:
        """Close every connection; idempotent."""

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    @abc.abstractmethod
    def schema_version(self) -> int:
        """The schema version of the database (migrated on open)."""

    # ------------------------------------------------------------------ traces
    @abc.abstractmethod
    def add_traces(self, batch: TraceBatch, received_at: float | None = None) -> bool:
        """Store one frame's rows; False if it was a duplicate (QoS 1 redelivery) or empty."""

    @abc.abstractmethod
    def add_traces_many(self, batches: list[TraceBatch], received_at: float | None = None
                        ) -> list[bool]:
        """``add_traces`` for several frames in one transaction; one flag per frame."""

    @abc.abstractmethod
    def transitions(self, fleet: str, device: str | None = None, *, since: float | None = None,
                    after_id: int = 0, newest: int | None = None) -> TraceBatch | None:
        """Rows of one device (or of the whole fleet, ``device=None``), oldest first; the
        batch's ``seq`` is the last chunk id read (the next cursor). None if there are none."""

    @abc.abstractmethod
    def count_rows(self, fleet: str, device: str | None = None, *, after_id: int = 0) -> int:
        """Rows received after chunk ``after_id`` (the adaptation schedule's trigger)."""

    @abc.abstractmethod
    def last_chunk_id(self, fleet: str, device: str | None = None) -> int:
        """The newest chunk id (0 = none)."""

    @abc.abstractmethod
    def devices(self, fleet: str) -> list[str]:
        """Devices with stored rows, sorted."""

    # ------------------------------------------------------------------ versions
    @abc.abstractmethod
    def next_version(self, fleet: str, slot: str, target: str, *, holder: str | None = None
                     ) -> int:
        """Reserve the next version, persisted before it is used; with ``holder``, only while
        that holder has the fleet's publisher lease (else ``LeaseLost``)."""

    @abc.abstractmethod
    def raise_version_floor(self, fleet: str, slot: str, target: str, version: int) -> None:
        """Make the next version exceed ``version`` (e.g. a retained packet seen on the broker)."""

    @abc.abstractmethod
    def current_version(self, fleet: str, slot: str, target: str) -> int:
        """The highest version reserved so far (0 = none)."""

    @abc.abstractmethod
    def record_publication(self, fleet: str, slot: str, target: str, version: int,
                           packet_id: str, priority: int, size: int, topic: str,
                           packet: bytes | None = None) -> None:
        """Remember a packet that went out (with its signed bytes, when given)."""

    @abc.abstractmethod
    def published_packet(self, fleet: str, slot: str, target: str, version: int
                         ) -> bytes | None:
        """The signed bytes of the packet published as that version (None: unknown)."""

    @abc.abstractmethod
    def published_at(self, fleet: str, slot: str, target: str, version: int) -> float | None:
        """When the packet of that version went out (the publishing server's clock, epoch seconds;
        None: never)."""

    @abc.abstractmethod
    def publications(self, fleet: str) -> list[dict[str, object]]:
        """Packets that went out, oldest first."""

    # ------------------------------------------------------------------ leases
    @abc.abstractmethod
    def acquire_lease(self, name: str, holder: str, ttl_s: float) -> bool:
        """Take the lease if it is free or expired, or renew it if ``holder`` has it; atomic.
        True when ``holder`` holds it for ``ttl_s`` more seconds."""

    @abc.abstractmethod
    def release_lease(self, name: str, holder: str) -> None:
        """Give the lease up at once (a clean stop) if ``holder`` has it."""

    @abc.abstractmethod
    def lease(self, name: str) -> Lease | None:
        """The lease's row (possibly expired), or None if it was never taken."""

    # ------------------------------------------------------------------ audits and acks
    @abc.abstractmethod
    def add_audit(self, record: AuditRecord) -> None:
        """Store a judicial (or other) audit record; a known record id is ignored."""

    @abc.abstractmethod
    def audits(self, fleet: str, device: str | None = None, auditor: str | None = None
               ) -> list[AuditRecord]:
        """Audit records, oldest first."""

    @abc.abstractmethod
    def add_ack(self, record: AuditRecord, received_at: float | None = None) -> bool:
        """Store a device's accept / reject / rollback of a version; False if already known."""

    @abc.abstractmethod
    def acks(self, fleet: str, device: str | None = None) -> list[Ack]:
        """Device acks, oldest first."""

    # ------------------------------------------------------------------ adaptation progress
    @abc.abstractmethod
    def save_learner(self, fleet: str, slot: str, target: str, cursor: int,
                     adapter: bytes | None, rounds: int) -> None:
        """Persist a slot target's data cursor, last accepted adapter (npz) and round count."""

    @abc.abstractmethod
    def load_learner(self, fleet: str, slot: str, target: str) -> dict[str, object] | None:
        """``{"cursor", "adapter", "rounds"}`` as saved, or None."""

    @abc.abstractmethod
    def device_state(self, fleet: str, device: str, slot: str) -> dict[str, object]:
        """The newest version the device accepted and its latest answer."""
