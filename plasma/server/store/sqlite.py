"""SQLite store (``TraceStore``): the embedded default, one file (or ``":memory:"``).

Schema versions live in ``PRAGMA user_version``; ``MIGRATIONS[i]`` takes a file from
version ``i`` to ``i + 1``. A file newer than this code is refused, never downgraded.

Threads: the ingest thread writes, the adaptation worker and the publisher read and
write. File stores give each thread its own connection (WAL: readers never block the
writer) and serialize writes with one lock; ``":memory:"`` stores share one connection
under that lock (the stand-in for unit tests). Several processes on one machine may share a
file: ``BEGIN IMMEDIATE`` takes SQLite's write lock at the start of every write transaction
(leases included), so two processes never interleave a read-modify-write. For processes on
several machines use ``PostgresStore`` (SQLite over a network file system is not safe).
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from plasma.protocol.errors import StoreError

from .sql import SqlStore, statements

__all__ = ["MIGRATIONS", "SCHEMA_VERSION", "TraceStore"]

log = logging.getLogger(__name__)

MIGRATIONS: tuple[str, ...] = (
    # 0 -> 1: traces and versions
    """
    CREATE TABLE chunks (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        fleet TEXT NOT NULL, device TEXT NOT NULL, seq INTEGER NOT NULL,
        t_first REAL NOT NULL, t_last REAL NOT NULL, n_rows INTEGER NOT NULL,
        obs_dim INTEGER NOT NULL, act_dim INTEGER NOT NULL,
        received_at REAL NOT NULL, data BLOB NOT NULL,
        UNIQUE (fleet, device, seq, t_first, n_rows)
    );
    CREATE INDEX chunks_device_time ON chunks (fleet, device, t_last);
    CREATE INDEX chunks_device_id ON chunks (fleet, device, id);
    CREATE TABLE versions (
        fleet TEXT NOT NULL, slot TEXT NOT NULL, target TEXT NOT NULL,
        version INTEGER NOT NULL, updated_at REAL NOT NULL,
        PRIMARY KEY (fleet, slot, target)
    );
    """,
    # 1 -> 2: what was published, what was judged, what devices answered
    """
    CREATE TABLE publications (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        fleet TEXT NOT NULL, slot TEXT NOT NULL, target TEXT NOT NULL,
        version INTEGER NOT NULL, packet_id TEXT NOT NULL, priority INTEGER NOT NULL,
        size INTEGER NOT NULL, topic TEXT NOT NULL, published_at REAL NOT NULL
    );
    CREATE INDEX publications_target ON publications (fleet, slot, target, version);
    CREATE TABLE audits (
        record_id TEXT PRIMARY KEY, auditor TEXT NOT NULL, fleet TEXT, device TEXT,
        slot TEXT, version INTEGER, verdict TEXT NOT NULL, created_at REAL NOT NULL,
        record TEXT NOT NULL
    );
    CREATE INDEX audits_device ON audits (fleet, device, created_at);
    CREATE TABLE acks (
        fleet TEXT NOT NULL, device TEXT NOT NULL, slot TEXT NOT NULL,
        version INTEGER NOT NULL, verdict TEXT NOT NULL, record_id TEXT NOT NULL,
        received_at REAL NOT NULL, record TEXT NOT NULL,
        PRIMARY KEY (fleet, device, slot, version, verdict)
    );
    """,
    # 2 -> 3: adaptation progress per slot target, so a restarted server resumes
    """
    CREATE TABLE learners (
        fleet TEXT NOT NULL, slot TEXT NOT NULL, target TEXT NOT NULL,
        cursor INTEGER NOT NULL, adapter BLOB, rounds INTEGER NOT NULL, updated_at REAL NOT NULL,
        PRIMARY KEY (fleet, slot, target)
    );
    """,
    # 3 -> 4: leases (one publisher per fleet among processes sharing the store)
    """
    CREATE TABLE leases (
        name TEXT PRIMARY KEY, holder TEXT NOT NULL, expires_at REAL NOT NULL,
        acquired_at REAL NOT NULL
    );
    """,
    # 4 -> 5: the signed bytes of each published packet (which weights a device's reported
    # version names: plasma.server.slots)
    """
    ALTER TABLE publications ADD COLUMN packet BLOB;
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)


class TraceStore(SqlStore):
    """The server's SQLite file (or ``":memory:"``)."""

    def __init__(self, path: str | Path = ":memory:") -> None:
        self.path = self.url = str(path)
        self._memory = self.path == ":memory:"
        self._lock = threading.RLock()
        self._local = threading.local()
        self._conns: list[sqlite3.Connection] = []
        self._closed = False
        if not self._memory:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._shared = self._open() if self._memory else None
        with self._lock:
            self._migrate(self._conn())

    # ------------------------------------------------------------------ connections
    def _open(self) -> sqlite3.Connection:
        try:
            conn = sqlite3.connect(self.path, timeout=10.0, isolation_level=None,
                                   check_same_thread=False)  # closed from the owner thread
            if not self._memory:
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable at checkpoints
            conn.execute("PRAGMA foreign_keys=ON")
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open trace store {self.path}: {exc}") from None
        self._conns.append(conn)
        return conn

    def _conn(self) -> sqlite3.Connection:
        if self._closed:
            raise StoreError("the trace store is closed")
        if self._shared is not None:
            return self._shared
        conn = getattr(self._local, "conn", None)
        if conn is None:
            with self._lock:
                conn = self._local.conn = self._open()
        return conn

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One serialized write transaction (BEGIN IMMEDIATE: no upgrade deadlocks)."""
        with self._lock:
            conn = self._conn()
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        if self._memory:
            with self._lock:
                yield self._conn()
        else:
            yield self._conn()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for conn in self._conns:
                conn.close()
            self._conns.clear()

    # ------------------------------------------------------------------ schema
    @property
    def schema_version(self) -> int:
        with self._read() as conn:
            return int(conn.execute("PRAGMA user_version").fetchone()[0])

    def _migrate(self, conn: sqlite3.Connection, target: int = SCHEMA_VERSION) -> None:
        """Each step reads the version inside its write transaction: two processes opening
        one file at once migrate it once."""
        while True:
            conn.execute("BEGIN IMMEDIATE")
            try:
                current = int(conn.execute("PRAGMA user_version").fetchone()[0])
                if current > SCHEMA_VERSION:
                    raise StoreError(f"{self.path} has schema version {current}; this build knows "
                                     f"up to {SCHEMA_VERSION}. Upgrade plasma or use another "
                                     "--store file.")
                if current >= target:
                    conn.execute("COMMIT")
                    return
                for statement in statements(MIGRATIONS[current]):
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {current + 1}")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
            log.info("trace store %s: schema migrated to version %d", self.path, current + 1)
