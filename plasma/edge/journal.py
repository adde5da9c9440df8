"""Edge stage 9a: accepted packet bytes -> crash-safe state directory (what to re-apply after a restart).

Layout (fixed names: nothing here comes from a packet field, so ids cannot traverse paths)::

    STATE/journal.log      append-only log of records (``journal_record``), mode 0600
    STATE/quarantine/      damaged log spans and stored packets that no longer verify: kept for
                           forensics, never read

Every record's version counts for ``highest``: a rolled-back or withdrawn version stays refused.

``commit`` appends one record with one ``os.write`` and makes it durable with ONE
``os.fdatasync`` before it returns, i.e. before the merge is activated (rollback protection,
docs/design.md section 5). A record is atomic by its crc: a torn one is discarded whole on load,
so the state is the one before the commit or the one after it. One append and one sync cost
a fraction of a tmp + fsync + rename + directory fsync per accept (docs/benchmarks.md, "Edge
journal"). A failed append is cut back to the previous length, so no half record is
left for the next load; an open log whose directory was removed is refused, not written.

``load`` scans the records in order. A torn or corrupt tail (what a crash mid-append leaves)
ends the scan: the damaged bytes are copied to quarantine and cut off, so later appends stay
readable. Damage followed by valid records (bit rot in the middle) keeps the valid records and
rewrites the log without the damage. Per slot the records rebuild a stack of accepted packets
minus rolled-back ones; the newest one whose bytes ``verify`` accepts is re-applied (the same
bytes are re-verified: time-of-check = time-of-use), the ones above it are withdrawn.

Compaction: when the log passes ``COMPACT_BYTES`` (and twice what it would keep) or
``COMPACT_RECORDS``, the start of the next ``commit`` rewrites it atomically (tmp, fsync,
rename, directory fsync) with one FLOOR record and the last two packets per slot.

Errors: ``JournalError`` (code ``state_write_failed``) when the directory is full, read-only
or gone; the daemon turns it into a rejection and keeps the adapters it runs. ``load`` never
raises for a damaged or unwritable directory: it returns what it could read, with notes.
"""

from __future__ import annotations

import errno
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from plasma.protocol import SLOTS, DecodedPacket, Slot
from plasma.protocol.errors import JournalError

from . import journal_files as files
from .journal_files import Quiet, atomic_write, fsync_dir, why, write_all
from .journal_record import (
    ACCEPT,
    FLOOR,
    HEAD,
    MAX_STATE_FILE,
    ROLLBACK,
    WITHDRAWN,
    Damage,
    Rec,
    check,
    encode_record,
    scan,
)

__all__ = ["Journal", "JournalError", "Pending", "Restored", "Verify", "atomic_write"]

log = logging.getLogger(__name__)

LOG = "journal.log"
QUARANTINE = "quarantine"
COMPACT_BYTES = 1024 * 1024
COMPACT_RECORDS = 4096  # bounds the load scan when the log is mostly small ROLLBACK records
KEEP_PER_SLOT = 2  # the current packet and the fallback if its bytes stop verifying

Verify = Callable[[bytes], "DecodedPacket | str"]
"""Re-verification of stored bytes: the decoded packet, or words saying why it is unusable."""


@dataclass(frozen=True)
class Restored:
    """What a restart brings back."""

    packets: Mapping[Slot, DecodedPacket]
    """slot -> the packet to re-apply (current, or the previous good one)."""
    raw: Mapping[Slot, bytes]
    highest: Mapping[Slot, int]
    problems: tuple[str, ...] = field(default=())
    """Operator-readable notes about damaged or quarantined files."""


@dataclass
class Pending:
    """An ACCEPT record written by ``Journal.begin`` whose fdatasync runs on a helper thread."""

    slot: Slot
    version: int
    start: int
    length: int
    payload_len: int
    _done: threading.Event = field(default_factory=threading.Event)
    _error: OSError | None = None

    def sync(self, fd: int) -> None:
        try:
            files.datasync(fd)
        except OSError as exc:
            self._error = exc
        finally:
            self._done.set()

    def wait(self, timeout: float = 30.0) -> OSError | None:
        if not self._done.wait(timeout):
            return OSError(errno.ETIMEDOUT, f"fdatasync took more than {timeout:.0f} s")
        return self._error


class _Syncer:
    """One long-lived thread that runs the fdatasyncs of ``Journal.begin``.

    Starting a thread per accept cost 1-3 ms under load here (``Thread.start`` waits for the
    new thread to take the GIL); a queue hand-over costs microseconds.
    """

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[tuple[Pending, int]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def submit(self, pending: Pending, fd: int) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="plasma-journal-sync",
                                                daemon=True)
                self._thread.start()
        self._jobs.put((pending, fd))

    def _run(self) -> None:
        while True:
            pending, fd = self._jobs.get()
            pending.sync(fd)


class Journal:
    """The device's state directory. Used from one thread (the daemon's packet worker)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.path = self.root / LOG
        try:
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
            (self.root / QUARANTINE).mkdir(mode=0o700, exist_ok=True)
        except OSError as exc:
            raise JournalError(f"cannot create state directory {self.root}: {why(exc)}") from None
        self._highest: dict[Slot, int] = {slot: 0 for slot in SLOTS}
        self._stacks: dict[Slot, list[Rec]] = {slot: [] for slot in SLOTS}
        self._fd: int | None = None  # open O_APPEND once the log is known to end on a record
        self._syncer = _Syncer()
        self._size = 0
        self._records = 0

    # -- reading ------------------------------------------------------------------------------
    def load(self, verify: Verify) -> Restored:
        """Re-verify the stored packets; withdraw what no longer verifies and fall back to the previous one."""
        self.close()
        problems: list[str] = []
        # Appends only onto a log read whole: never onto one that failed to read.
        buf = self._read(problems)
        writable = buf is not None
        buf = buf or b""
        damage = self._index(buf, problems)
        packets, raw, withdrawn = self._pick(buf, verify, problems)
        try:
            if not writable:
                raise JournalError(f"{self.path} is not usable")
            self._attach(damage)
            for slot, version in withdrawn:  # so the next load does not judge them again
                self._append(WITHDRAWN, slot, version)
            if self._due():  # at startup, off the accept path
                self._compact()
        except JournalError as exc:
            problems.append(f"{exc}; accepted packets are refused until it is fixed")
        if self.path.exists():
            with Quiet():
                self.path.with_name(LOG + ".tmp").unlink(missing_ok=True)  # a crashed compaction
        return Restored(packets, raw, dict(self._highest), tuple(problems))

    def highest(self) -> dict[Slot, int]:
        return dict(self._highest)

    def _pick(self, buf: bytes, verify: Verify, problems: list[str]
              ) -> tuple[dict[Slot, DecodedPacket], dict[Slot, bytes], list[tuple[Slot, int]]]:
        """Per slot, the newest stored packet that verifies; the ones above it are withdrawn."""
        packets: dict[Slot, DecodedPacket] = {}
        raw: dict[Slot, bytes] = {}
        withdrawn: list[tuple[Slot, int]] = []
        for slot in SLOTS:
            stack = self._stacks[slot]
            while stack:
                rec = stack[-1]
                data = bytes(buf[rec.offset:rec.end])
                result = check(verify(data) if data else "empty", rec)
                if not isinstance(result, str):
                    packets[slot], raw[slot] = result, data
                    break
                problems.append(f"{LOG}: stored {slot} packet v{rec.version} is unusable "
                                f"({result}); withdrawn, a copy is in {QUARANTINE}/")
                self._quarantine(f"{slot}.unusable", data)
                withdrawn.append((slot, rec.version))
                stack.pop()
        return packets, raw, withdrawn

    def _read(self, problems: list[str]) -> bytes | None:
        try:
            return self.path.read_bytes() if self.path.exists() else b""
        except OSError as exc:
            problems.append(f"cannot read {self.path}: {why(exc)}")
            return None

    def _index(self, buf: bytes, problems: list[str]) -> list[Damage]:
        """Rebuild highest and the per-slot stacks from ``buf``; note and quarantine damage."""
        records, damage = scan(buf)
        self._highest = {slot: 0 for slot in SLOTS}
        self._stacks = {slot: [] for slot in SLOTS}
        for rec in records:
            self._apply(rec)
        self._size, self._records = len(buf), len(records)
        for start, end, reason in damage:
            what = "torn or corrupt tail" if end == len(buf) else "damaged span"
            problems.append(f"{LOG}: {what} at bytes {start}-{end} ({reason}); cut off, a copy is "
                            f"in {QUARANTINE}/")
            self._quarantine("journal.damaged", buf[start:end])
        return damage

    def _apply(self, rec: Rec) -> None:
        self._highest[rec.slot] = max(self._highest[rec.slot], rec.version)
        if rec.kind == ACCEPT:
            self._stacks[rec.slot].append(rec)
        elif rec.kind in (ROLLBACK, WITHDRAWN):
            self._stacks[rec.slot] = [r for r in self._stacks[rec.slot] if r.version != rec.version]

    # -- writing ------------------------------------------------------------------------------
    def commit(self, slot: Slot, data: bytes, version: int) -> None:
        """Persist an accepted packet and its version BEFORE it goes live; raises JournalError.

        One append and one fdatasync; a compaction (atomic rewrite, ~12 ms) first when due.
        """
        self.finish(self.begin(slot, data, version))

    def begin(self, slot: Slot, data: bytes, version: int) -> Pending:
        """Start ``commit`` with its fdatasync on a helper thread; ``finish`` or ``withdraw`` it.

        The pipeline stages and probes the candidate while the disk syncs (both release the
        GIL), so an accept costs max(sync, stage + probes) instead of their sum: the sync is
        ~4 ms on this machine's disk, stage + probes ~2-4 ms (edge/pipeline.py).
        """
        if len(data) > MAX_STATE_FILE:
            raise JournalError(f"a {len(data)}-byte packet is larger than the journal stores")
        self._ensure_attached()
        if self._due():
            try:
                self._compact()
            except JournalError as exc:
                log.warning("journal compaction skipped: %s", exc)
                self._ensure_attached()
        if self._fd is None:
            raise JournalError(f"{self.path} is not open for appends (invariant)")
        record, start = encode_record(ACCEPT, slot, version, data), self._size
        try:
            if os.fstat(self._fd).st_nlink == 0:
                self.close()
                raise FileNotFoundError(errno.ENOENT, "the state directory was removed")
            write_all(self._fd, record)
        except OSError as exc:
            self._cut_back(start)
            raise JournalError(f"cannot persist {slot} v{version} in {self.path}: "
                               f"{why(exc)}") from None
        pending = Pending(slot, version, start, len(record), len(data))
        self._size = start + len(record)  # later appends go after it, whatever happens
        self._syncer.submit(pending, self._fd)
        return pending

    def finish(self, pending: Pending) -> None:
        """Wait for the sync of ``begin``: the packet and its version are durable after this."""
        error = pending.wait()
        if error is not None:
            self._cut_back(pending.start)
            self._size = pending.start
            raise JournalError(f"cannot persist {pending.slot} v{pending.version} in "
                               f"{self.path}: {why(error)}")
        self._records += 1
        self._apply(Rec(ACCEPT, pending.slot, pending.version, pending.start + HEAD.size,
                         pending.payload_len))

    def withdraw(self, pending: Pending) -> None:
        """The candidate failed after ``begin``: record that it must never be re-applied.

        Its version still counts (replays stay refused). Raises JournalError if the
        withdrawal cannot be persisted; the restart path re-audits restored packets anyway.
        """
        error = pending.wait()
        if error is not None:  # the record never became durable: just cut it off
            self._cut_back(pending.start)
            self._size = pending.start
            return
        self._records += 1
        self._apply(Rec(ACCEPT, pending.slot, pending.version, pending.start + HEAD.size,
                         pending.payload_len))
        self._append(WITHDRAWN, pending.slot, pending.version)

    def mark_bad(self, slot: Slot, version: int) -> None:
        """The canary rolled the active packet of ``slot`` back: its predecessor becomes current again."""
        self._ensure_attached()
        self._append(ROLLBACK, slot, version)

    def close(self) -> None:
        if self._fd is not None:
            with Quiet():
                os.close(self._fd)
            self._fd = None

    def _append(self, kind: int, slot: Slot, version: int, payload: bytes = b"") -> None:
        if self._fd is None:
            raise JournalError(f"{self.path} is not open for appends (invariant)")
        record, start = encode_record(kind, slot, version, payload), self._size
        try:
            if os.fstat(self._fd).st_nlink == 0:  # the open log was deleted with its directory
                self.close()
                raise FileNotFoundError(errno.ENOENT, "the state directory was removed")
            write_all(self._fd, record)
            files.datasync(self._fd)
        except OSError as exc:
            self._cut_back(start)
            raise JournalError(f"cannot persist {slot} v{version} in {self.path}: "
                               f"{why(exc)}") from None
        self._size, self._records = start + len(record), self._records + 1
        self._apply(Rec(kind, slot, version, start + HEAD.size, len(payload)))

    def _cut_back(self, length: int) -> None:
        """Remove a half-written record; if even that fails, the next use re-scans the log."""
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, length)
            files.datasync(self._fd)
        except OSError as exc:
            log.error("cannot cut %s back to %d bytes (%s); it is re-scanned before the next "
                      "write", self.path, length, why(exc))
            self.close()

    def _ensure_attached(self) -> None:
        if self._fd is not None:
            return
        problems: list[str] = []
        buf = self._read(problems)
        if buf is None:
            raise JournalError(problems[0])
        known = self._highest
        damage = self._index(buf, problems)
        logged = self._highest
        self._highest = {slot: max(known[slot], logged[slot]) for slot in SLOTS}
        for note in problems:
            log.error("state: %s", note)
        self._attach(damage)
        for slot in SLOTS:  # a log lost under us (recreated directory): versions still never drop
            if known[slot] > logged[slot]:
                self._append(FLOOR, slot, known[slot])

    def _attach(self, damage: list[Damage]) -> None:
        """Open the log for appends, first cutting off damage so that it ends on a record."""
        created = not self.path.exists()
        tail_only = len(damage) == 1 and damage[0][1] == self._size  # what a crash leaves
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise JournalError(f"cannot open {self.path}: {why(exc)}") from None
        self._fd = fd
        try:
            if os.fstat(fd).st_size != self._size:
                self.close()
                raise JournalError(f"{self.path} changed while it was read; retry")
            if created:
                fsync_dir(self.root)  # the log's directory entry, once
            if tail_only:
                os.ftruncate(fd, damage[0][0])
                os.fsync(fd)
                self._size = damage[0][0]
        except OSError as exc:
            self.close()
            raise JournalError(f"cannot repair {self.path}: {why(exc)}") from None
        if damage and not tail_only:
            self._compact()  # damage before valid records (bit rot): rewrite without it

    def _due(self) -> bool:
        """Compaction pays off: the log is big and mostly history, or long."""
        kept = sum(HEAD.size + r.length for stack in self._stacks.values()
                   for r in stack[-KEEP_PER_SLOT:])
        return self._size > max(COMPACT_BYTES, 2 * kept) or self._records > COMPACT_RECORDS

    def _compact(self) -> None:
        """Rewrite the log with only what ``load`` needs; atomic, so a crash keeps the old log."""
        if self._fd is None:
            raise JournalError(f"{self.path} is not open (invariant)")
        parts: list[bytes] = []
        try:
            for slot in SLOTS:
                if self._highest[slot]:
                    parts.append(encode_record(FLOOR, slot, self._highest[slot]))
                for rec in self._stacks[slot][-KEEP_PER_SLOT:]:
                    parts.append(encode_record(ACCEPT, slot, rec.version,
                                         os.pread(self._fd, rec.length, rec.offset)))
        except OSError as exc:
            raise JournalError(f"cannot read {self.path}: {why(exc)}") from None
        data = b"".join(parts)
        atomic_write(self.path, data)
        self.close()
        self._index(data, [])
        self._attach([])
        log.info("compacted %s to %d bytes", self.path, len(data))

    # -- quarantine --------------------------------------------------------------------------
    def _quarantine(self, label: str, data: bytes) -> None:
        """Keep a copy for forensics; best effort (the note already says what was wrong)."""
        target = self.root / QUARANTINE / f"{label}.{time.time_ns()}"
        try:
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                write_all(fd, data[:MAX_STATE_FILE])
            finally:
                os.close(fd)
        except OSError as exc:
            log.error("cannot quarantine a copy to %s: %s", target, why(exc))
