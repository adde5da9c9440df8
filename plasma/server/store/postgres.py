"""PostgreSQL store (``PostgresStore``): one database several server processes share.

``--store postgresql://USER:PASSWORD@HOST:PORT/DB`` (psycopg 3, ``pip install
'plasma[postgres]'``). The queries are the SQLite store's (``SqlStore``); what differs is here:

- one connection per thread, autocommit outside ``_write`` (each read sees the latest commits);
  a broken connection is dropped and the next call opens a new one; psycopg failures become
  ``StoreError``;
- the schema version lives in the table ``plasma_schema``, and a migration runs under an
  advisory lock (processes starting together migrate once);
- chunk ids come from an identity column, but a later id could commit before an earlier one
  and a reader's cursor would skip the earlier (cursors are per fleet); an advisory lock per
  fleet, held for the insert's transaction, keeps commit order = id order; those commits do
  not wait for the WAL flush (``synchronous_commit = off`` for them only: a frame is PUBACKed
  on receipt anyway);
- leases are judged by the database's clock (``clock_timestamp()``), not the hosts' clocks,
  and a fenced version reservation locks the lease row (``FOR UPDATE``).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from plasma.protocol.errors import StoreError

from .sql import SqlStore, statements

__all__ = ["PG_MIGRATIONS", "PostgresStore"]

log = logging.getLogger(__name__)

_MIGRATE_LOCK = 0x706C61736D61  # "plasma": the advisory lock key of schema migrations

PG_MIGRATIONS: tuple[str, ...] = (
    # 0 -> 1: the SQLite schema 4 in PostgreSQL types
    """
    CREATE TABLE chunks (
        id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        fleet TEXT NOT NULL, device TEXT NOT NULL, seq BIGINT NOT NULL,
        t_first DOUBLE PRECISION NOT NULL, t_last DOUBLE PRECISION NOT NULL,
        n_rows INTEGER NOT NULL, obs_dim INTEGER NOT NULL, act_dim INTEGER NOT NULL,
        received_at DOUBLE PRECISION NOT NULL, data BYTEA NOT NULL,
        UNIQUE (fleet, device, seq, t_first, n_rows)
    );
    CREATE INDEX chunks_device_time ON chunks (fleet, device, t_last);
    CREATE INDEX chunks_device_id ON chunks (fleet, device, id);
    CREATE TABLE versions (
        fleet TEXT NOT NULL, slot TEXT NOT NULL, target TEXT NOT NULL,
        version BIGINT NOT NULL, updated_at DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (fleet, slot, target)
    );
    CREATE TABLE publications (
        id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        fleet TEXT NOT NULL, slot TEXT NOT NULL, target TEXT NOT NULL,
        version BIGINT NOT NULL, packet_id TEXT NOT NULL, priority INTEGER NOT NULL,
        size INTEGER NOT NULL, topic TEXT NOT NULL, published_at DOUBLE PRECISION NOT NULL
    );
    CREATE INDEX publications_target ON publications (fleet, slot, target, version);
    CREATE TABLE audits (
        n BIGINT GENERATED ALWAYS AS IDENTITY,
        record_id TEXT PRIMARY KEY, auditor TEXT NOT NULL, fleet TEXT, device TEXT,
        slot TEXT, version BIGINT, verdict TEXT NOT NULL, created_at DOUBLE PRECISION NOT NULL,
        record TEXT NOT NULL
    );
    CREATE INDEX audits_device ON audits (fleet, device, created_at);
    CREATE TABLE acks (
        n BIGINT GENERATED ALWAYS AS IDENTITY,
        fleet TEXT NOT NULL, device TEXT NOT NULL, slot TEXT NOT NULL,
        version BIGINT NOT NULL, verdict TEXT NOT NULL, record_id TEXT NOT NULL,
        received_at DOUBLE PRECISION NOT NULL, record TEXT NOT NULL,
        PRIMARY KEY (fleet, device, slot, version, verdict)
    );
    CREATE TABLE learners (
        fleet TEXT NOT NULL, slot TEXT NOT NULL, target TEXT NOT NULL,
        cursor BIGINT NOT NULL, adapter BYTEA, rounds INTEGER NOT NULL,
        updated_at DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (fleet, slot, target)
    );
    CREATE TABLE leases (
        name TEXT PRIMARY KEY, holder TEXT NOT NULL, expires_at DOUBLE PRECISION NOT NULL,
        acquired_at DOUBLE PRECISION NOT NULL
    );
    """,
    # 1 -> 2: the signed bytes of each published packet (SQLite schema 5)
    """
    ALTER TABLE publications ADD COLUMN packet BYTEA;
    """,
)
PG_SCHEMA_VERSION = len(PG_MIGRATIONS)


class _Conn:
    """A psycopg connection that takes the shared queries' ``?`` parameters."""

    def __init__(self, conn: Any) -> None:
        self.raw = conn

    def execute(self, sql: str, params: Any = ()) -> Any:
        return self.raw.execute(sql.replace("?", "%s"), params)


def redact(url: str) -> str:
    """The URL without its password (for logs and ``url``)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


class PostgresStore(SqlStore):
    """``Store`` on a PostgreSQL database (created tables on first open)."""

    _GREATEST = "GREATEST"
    _ORDER = "n"
    _FOR_UPDATE = " FOR UPDATE"

    def __init__(self, url: str, connect_timeout_s: float = 10.0) -> None:
        try:
            import psycopg
        except ImportError:
            raise StoreError("--store postgresql://... needs psycopg: pip install "
                             "'plasma[postgres]'") from None
        self._psycopg = psycopg
        self._dsn, self.url = url, redact(url)
        self._timeout = connect_timeout_s
        self._local = threading.local()
        self._lock = threading.Lock()
        self._conns: list[Any] = []
        self._closed = False
        self._migrate()

    # ------------------------------------------------------------------ connections
    def _conn(self) -> _Conn:
        if self._closed:
            raise StoreError("the trace store is closed")
        conn: _Conn | None = getattr(self._local, "conn", None)
        if conn is not None and (conn.raw.closed or conn.raw.broken):
            conn = None
        if conn is None:
            try:
                raw = self._psycopg.connect(self._dsn, autocommit=True,
                                            connect_timeout=max(1, int(self._timeout)))
            except self._psycopg.Error as exc:
                raise StoreError(f"cannot open trace store {self.url}: "
                                 f"{str(exc).strip()}") from None
            conn = self._local.conn = _Conn(raw)
            with self._lock:
                self._conns.append(raw)
        return conn

    @contextmanager
    def _read(self) -> Iterator[_Conn]:
        conn = self._conn()
        try:
            yield conn
        except self._psycopg.Error as exc:
            raise StoreError(f"trace store {self.url}: {str(exc).strip()}") from None

    @contextmanager
    def _write(self) -> Iterator[_Conn]:
        conn = self._conn()
        try:
            with conn.raw.transaction():
                yield conn
        except self._psycopg.Error as exc:
            raise StoreError(f"trace store {self.url}: {str(exc).strip()}") from None

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for raw in self._conns:
                raw.close()
            self._conns.clear()

    # ------------------------------------------------------------------ dialect
    def _now(self, conn: Any) -> float:
        return float(conn.execute("SELECT EXTRACT(EPOCH FROM clock_timestamp())").fetchone()[0])

    def _serialize_chunks(self, conn: Any, fleets: list[str]) -> None:
        # Telemetry commits do not wait for the WAL flush (only this transaction): the frame
        # was PUBACKed on receipt and sat in the ingest queue, so a crash already loses the
        # last instants of telemetry; versions, leases and learners stay synchronous. Measured
        # here (one writer, fsync on): 164 frames/s waiting for each flush under this lock.
        conn.execute("SET LOCAL synchronous_commit = off")
        for fleet in fleets:  # sorted: two writers take their locks in one order
            conn.execute("SELECT pg_advisory_xact_lock(hashtext(?))", (f"plasma-chunks/{fleet}",))

    # ------------------------------------------------------------------ schema
    @property
    def schema_version(self) -> int:
        with self._read() as conn:
            return self._version(conn)

    @staticmethod
    def _version(conn: _Conn) -> int:
        if conn.execute("SELECT to_regclass('plasma_schema')").fetchone()[0] is None:
            return 0
        return int(conn.execute("SELECT version FROM plasma_schema").fetchone()[0])

    def _migrate(self) -> None:
        with self._write() as conn:
            conn.execute("SELECT pg_advisory_xact_lock(?)", (_MIGRATE_LOCK,))
            current = self._version(conn)
            if current > PG_SCHEMA_VERSION:
                raise StoreError(f"{self.url} has schema version {current}; this build knows up "
                                 f"to {PG_SCHEMA_VERSION}. Upgrade plasma or use another "
                                 "database.")
            if current == 0:
                conn.execute("CREATE TABLE plasma_schema (version INTEGER NOT NULL)")
                conn.execute("INSERT INTO plasma_schema VALUES (0)")
            for version in range(current, PG_SCHEMA_VERSION):
                for statement in statements(PG_MIGRATIONS[version]):
                    conn.execute(statement)
                conn.execute("UPDATE plasma_schema SET version = ?", (version + 1,))
                log.info("trace store %s: schema migrated to version %d", self.url, version + 1)
