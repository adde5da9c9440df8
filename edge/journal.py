"""Edge stage 9a: accepted packet bytes -> crash-safe state directory (what to re-apply after a restart).

Layout (fixed names: nothing here comes from a packet field, so ids cannot traverse paths)::

    STATE/versions.json        {"fleet": N, "device": M}: highest version ever accepted per slot
    STATE/fleet.pkt            raw verified bytes of the active fleet-slot packet
    STATE/fleet.prev.pkt       the packet active before it (the fallback if fleet.pkt is damaged)
    STATE/device.pkt, device.prev.pkt
    STATE/quarantine/          damaged files and packets the canary rolled back, kept for forensics

Every write is: tmp file, fsync, rename, fsync the directory. ``commit`` writes the packet, then
the versions file, and returns before the merge is activated (rollback protection, DESIGN.md
section 5). A crash between the two leaves ``versions.json`` one version behind the packet; the
load takes the maximum of both, so versions never go backwards. The same bytes are re-verified
on load (time-of-check = time-of-use): the journal stores bytes, never decoded state.

Errors: ``JournalError`` (code ``state_write_failed``) when the directory is full, read-only
or gone; the daemon turns it into a rejection and keeps the adapters it runs.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from plasma.protocol import SLOTS, DecodedPacket, PlasmaError, Slot

__all__ = ["Journal", "JournalError", "Restored", "Verify", "atomic_write"]

log = logging.getLogger(__name__)

VERSIONS = "versions.json"
QUARANTINE = "quarantine"
MAX_STATE_FILE = 4 * 1024 * 1024  # far above the packet cap; a bigger file is damage, not a packet

Verify = Callable[[bytes], "DecodedPacket | str"]
"""Re-verification of stored bytes: the decoded packet, or words saying why it is unusable."""


class JournalError(PlasmaError):
    code = "state_write_failed"


def _current(slot: Slot) -> str:
    return f"{slot}.pkt"


def _previous(slot: Slot) -> str:
    return f"{slot}.prev.pkt"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, *, sync_dir: bool = True) -> None:
    """tmp, fsync, rename, fsync dir; raises JournalError (the tmp file is removed on failure)."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        _write_synced(tmp, data)
        os.replace(tmp, path)
        if sync_dir:
            _fsync_dir(path.parent)
    except OSError as exc:
        with _quiet():
            tmp.unlink(missing_ok=True)
        raise JournalError(f"cannot write {path}: {_why(exc)}") from None


def _write_synced(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def _why(exc: OSError) -> str:
    hint = {errno.ENOSPC: " (disk full)", errno.EROFS: " (read-only file system)",
            errno.EACCES: " (permission denied)", errno.EDQUOT: " (quota exceeded)"}
    return f"{exc.strerror or exc}{hint.get(exc.errno or 0, '')}"


class _quiet:
    """Suppress OSError during cleanup of a write that already failed."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type | None, exc: BaseException | None, tb: object) -> bool:
        return kind is not None and issubclass(kind, OSError)


@dataclass(frozen=True)
class Restored:
    """What a restart brings back."""

    packets: Mapping[Slot, DecodedPacket]
    """slot -> the packet to re-apply (current, or the previous good one)."""
    raw: Mapping[Slot, bytes]
    highest: Mapping[Slot, int]
    problems: tuple[str, ...] = field(default=())
    """Operator-readable notes about damaged or quarantined files."""


class Journal:
    """The device's state directory. Used from one thread (the daemon's packet worker)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        try:
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
            (self.root / QUARANTINE).mkdir(mode=0o700, exist_ok=True)
        except OSError as exc:
            raise JournalError(f"cannot create state directory {self.root}: {_why(exc)}") from None
        self._highest: dict[Slot, int] = {slot: 0 for slot in SLOTS}

    # -- reading ------------------------------------------------------------------------------
    def load(self, verify: Verify) -> Restored:
        """Re-verify the stored packets; quarantine what is damaged and fall back to the previous one."""
        problems: list[str] = []
        highest = self._read_versions(problems)
        packets: dict[Slot, DecodedPacket] = {}
        raw: dict[Slot, bytes] = {}
        for slot in SLOTS:
            for name in (_current(slot), _previous(slot)):
                got = self._read_packet(name, slot, verify, problems)
                if got is not None:
                    packets[slot], raw[slot] = got
                    break
        for slot, packet in packets.items():  # a crash between packet and versions write
            highest[slot] = max(highest[slot], packet.header.version)
        highest = self._highest_from_quarantine(highest)
        self._highest = highest
        return Restored(packets, raw, dict(highest), tuple(problems))

    def highest(self) -> dict[Slot, int]:
        return dict(self._highest)

    def _read_versions(self, problems: list[str]) -> dict[Slot, int]:
        path = self.root / VERSIONS
        out: dict[Slot, int] = {slot: 0 for slot in SLOTS}
        if not path.exists():
            return out
        try:
            data = json.loads(path.read_bytes()[:4096])
            for slot in SLOTS:
                value = data.get(slot, 0)
                if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                    raise ValueError(f"bad version for {slot}: {value!r}")
                out[slot] = value
        except (OSError, ValueError, AttributeError) as exc:  # JSONDecodeError is a ValueError
            problems.append(f"{VERSIONS} is damaged ({exc}); rebuilt from the stored packets")
            self._quarantine(path, "damaged")
        return out

    def _read_packet(self, name: str, slot: Slot, verify: Verify, problems: list[str]
                     ) -> tuple[DecodedPacket, bytes] | None:
        path = self.root / name
        if not path.exists():
            return None
        try:
            with path.open("rb") as fh:
                data = fh.read(MAX_STATE_FILE + 1)
        except OSError as exc:
            problems.append(f"cannot read {name}: {_why(exc)}")
            return None
        result = verify(data) if len(data) <= MAX_STATE_FILE else "larger than any packet"
        if isinstance(result, str):
            problems.append(f"{name} is unusable ({result}); quarantined")
            self._quarantine(path, "damaged")
            return None
        if result.header.slot != slot:
            problems.append(f"{name} holds a {result.header.slot}-slot packet; quarantined")
            self._quarantine(path, "damaged")
            return None
        return result, data

    def _highest_from_quarantine(self, highest: dict[Slot, int]) -> dict[Slot, int]:
        """Versions of rolled-back packets still count: a replay of them must stay refused."""
        for path in (self.root / QUARANTINE).glob("*.rolled_back.v*"):
            slot, _, version = path.name.partition(".rolled_back.v")
            if slot in SLOTS and version.isdigit():
                highest[slot] = max(highest[slot], int(version))  # type: ignore[index]
        return highest

    # -- writing ------------------------------------------------------------------------------
    def commit(self, slot: Slot, data: bytes, version: int) -> None:
        """Persist an accepted packet and its version BEFORE it goes live; raises JournalError.

        Three fsyncs (packet, versions, directory) instead of five with a directory fsync per
        rename: they are most of an accept on the dev VM's disk (p50 20 ms there, 1.2 ms with
        the state on tmpfs). The renames are ordered packet first, versions last, and one
        directory fsync makes them durable before ``commit`` returns.
        """
        current, previous = self.root / _current(slot), self.root / _previous(slot)
        new, versions = self.root / (_current(slot) + ".new"), self.root / (VERSIONS + ".tmp")
        highest = {**self._highest, slot: max(self._highest[slot], version)}
        try:
            _write_synced(new, data)
            _write_synced(versions, json.dumps(highest, sort_keys=True).encode())
            if current.exists():
                os.replace(current, previous)  # a crash right here: load falls back to .prev
            os.replace(new, current)
            os.replace(versions, self.root / VERSIONS)
            _fsync_dir(self.root)
        except OSError as exc:
            for leftover in (new, versions):
                with _quiet():
                    leftover.unlink(missing_ok=True)
            raise JournalError(f"cannot persist {slot} packet v{version} in {self.root}: "
                               f"{_why(exc)}") from None
        self._highest = highest

    def mark_bad(self, slot: Slot, version: int) -> None:
        """The canary rolled the active packet of ``slot`` back: its predecessor becomes current again."""
        current, previous = self.root / _current(slot), self.root / _previous(slot)
        try:
            if current.exists():
                os.replace(current, self.root / QUARANTINE / f"{slot}.rolled_back.v{version}")
            if previous.exists():
                os.replace(previous, current)
            _fsync_dir(self.root)
            _fsync_dir(self.root / QUARANTINE)
        except OSError as exc:
            raise JournalError(f"cannot mark {current} as rolled back: {_why(exc)}") from None

    def _quarantine(self, path: Path, why: str) -> None:
        target = self.root / QUARANTINE / f"{path.name}.{why}.{time.time_ns()}"
        try:
            os.replace(path, target)
            log.error("moved %s to %s", path, target)
        except OSError as exc:
            log.error("cannot quarantine %s: %s", path, _why(exc))
