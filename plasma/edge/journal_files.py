"""Edge stage 9a, file handling: the durable writes the journal is built from.

``atomic_write`` (tmp, fsync, rename, directory fsync) for whole-file rewrites, ``write_all``
and ``datasync`` for the journal's one-write-one-sync appends, and ``why`` turning an OSError
into the words an operator acts on.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from plasma.protocol.errors import JournalError

__all__ = ["Quiet", "atomic_write", "datasync", "fsync_dir", "why", "write_all"]


def fsync_dir(path: Path) -> None:
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
            fsync_dir(path.parent)
    except OSError as exc:
        with Quiet():
            tmp.unlink(missing_ok=True)
        raise JournalError(f"cannot write {path}: {why(exc)}") from None


def _write_synced(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:  # one call unless the kernel writes short (a nearly full disk)
        view = view[os.write(fd, view):]


def datasync(fd: int) -> None:
    """The append's one durable sync: data and the new length, not the mtime."""
    getattr(os, "fdatasync", os.fsync)(fd)  # macOS has no fdatasync: fsync, at a higher price


def why(exc: OSError) -> str:
    hint = {errno.ENOSPC: " (disk full)", errno.EROFS: " (read-only file system)",
            errno.EACCES: " (permission denied)", errno.EDQUOT: " (quota exceeded)"}
    return f"{exc.strerror or exc}{hint.get(exc.errno or 0, '')}"


class Quiet:
    """Suppress OSError during cleanup of a write that already failed."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: object) -> bool:
        return kind is not None and issubclass(kind, OSError)
