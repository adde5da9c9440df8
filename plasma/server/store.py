"""Server store: trace chunks, published versions, audit records and device acks in SQLite.

Why transitions are stored as one compact blob per telemetry frame (a *chunk*), not one
SQL row per transition: a device sends frames of tens to hundreds of rows, and the
adaptation worker always reads "every transition of device D since T" as whole numpy
columns. One INSERT per frame keeps ingest at frame rate rather than row rate, the blob
is the frame's own column layout (``numpy.frombuffer`` back, no pickle), and the
index on ``(fleet, device, t_last)`` finds the chunks of a time range; rows of the first
chunk older than T are then masked out in numpy. The chunk id (autoincrement) doubles
as a server-side cursor ("rows received after chunk N"), which does not depend on
device clocks. QoS 1 redelivers a frame now and then: ``(fleet, device, seq, t_first,
rows)`` is unique and a duplicate is ignored.

Schema versions live in ``PRAGMA user_version``; ``MIGRATIONS[i]`` takes a file from
version ``i`` to ``i + 1``. A file newer than this code is refused, never downgraded.

Threads: the ingest thread writes, the adaptation worker and the publisher read and
write. File stores give each thread its own connection (WAL: readers never block the
writer) and serialize writes with one lock; ``":memory:"`` stores share one connection
under that lock (the stand-in for unit tests).
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from plasma.protocol import AuditRecord, TraceBatch
from plasma.protocol.errors import StoreError

__all__ = ["Ack", "MIGRATIONS", "SCHEMA_VERSION", "TraceStore"]

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
)
SCHEMA_VERSION = len(MIGRATIONS)

_COLUMNS = (  # the blob layout: the telemetry frame's columns, in this order
    ("episode", "<u4", False), ("step", "<u4", False), ("obs", "<f4", True),
    ("action", "<f4", True), ("reward", "<f4", False), ("next_obs", "<f4", True),
    ("terminated", "u1", False), ("truncated", "u1", False), ("fleet_version", "<u4", False),
    ("device_version", "<u4", False), ("timestamp", "<f8", False),
)


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


def _pack(batch: TraceBatch) -> bytes:
    return b"".join(np.ascontiguousarray(getattr(batch, name), dtype=dt).tobytes()
                    for name, dt, _ in _COLUMNS)


def _unpack(blob: bytes, n: int, obs_dim: int, act_dim: int) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    offset = 0
    for name, dt, wide in _COLUMNS:
        width = (act_dim if name == "action" else obs_dim) if wide else 1
        arr = np.frombuffer(blob, dtype=dt, count=n * width, offset=offset)
        offset += arr.nbytes
        out[name] = arr.reshape(n, width) if wide else arr
    out["terminated"] = out["terminated"].astype(bool)
    out["truncated"] = out["truncated"].astype(bool)
    return out


class TraceStore:
    """The server's one SQLite file (or ``":memory:"``)."""

    def __init__(self, path: str | Path = ":memory:") -> None:
        self.path = str(path)
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

    def __enter__(self) -> TraceStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ schema
    @property
    def schema_version(self) -> int:
        with self._read() as conn:
            return int(conn.execute("PRAGMA user_version").fetchone()[0])

    def _migrate(self, conn: sqlite3.Connection, target: int = SCHEMA_VERSION) -> None:
        current = int(conn.execute("PRAGMA user_version").fetchone()[0])
        if current > SCHEMA_VERSION:
            raise StoreError(f"{self.path} has schema version {current}; this build knows up to "
                             f"{SCHEMA_VERSION}. Upgrade plasma or use another --store file.")
        for version in range(current, target):
            conn.execute("BEGIN IMMEDIATE")
            try:
                for statement in _statements(MIGRATIONS[version]):
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {version + 1}")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
            log.info("trace store %s: schema migrated to version %d", self.path, version + 1)

    # ------------------------------------------------------------------ traces
    def add_traces(self, batch: TraceBatch, received_at: float | None = None) -> bool:
        """Store one frame's rows; False if it was a duplicate (QoS 1 redelivery) or empty."""
        n = len(batch)
        if n == 0:
            return False
        row = (batch.fleet, batch.device, int(batch.seq), float(batch.timestamp.min()),
               float(batch.timestamp.max()), n, int(batch.obs.shape[1]),
               int(batch.action.shape[1]), received_at or time.time(), _pack(batch))
        with self._write() as conn:
            cur = conn.execute(
                "INSERT OR IGNORE INTO chunks (fleet, device, seq, t_first, t_last, n_rows, "
                "obs_dim, act_dim, received_at, data) VALUES (?,?,?,?,?,?,?,?,?,?)", row)
            return cur.rowcount == 1

    def transitions(self, fleet: str, device: str | None = None, *, since: float | None = None,
                    after_id: int = 0, newest: int | None = None) -> TraceBatch | None:
        """Rows of one device (or of every device of the fleet, ``device=None``), oldest first.

        ``since`` filters on the rows' own timestamps, ``after_id`` on the chunk cursor;
        ``newest`` reads only the newest chunks holding at least that many rows (whole
        chunks: the batch may hold a few more). Only chunks with the dims of the newest
        chunk are returned (a device that changed model does not mix shapes). The batch's
        ``seq`` is the last chunk id read (the next cursor); ``device`` is ``"*"`` for a
        fleet-wide read. None if there are no rows.
        """
        sql = "SELECT id, n_rows, obs_dim, act_dim, data FROM chunks WHERE fleet = ? AND id > ?"
        params: list[object] = [fleet, after_id]
        if device is not None:
            sql += " AND device = ?"
            params.append(device)
        if since is not None:
            sql += " AND t_last >= ?"
            params.append(since)
        with self._read() as conn:
            cursor = conn.execute(sql + " ORDER BY id DESC", params)
            rows, count = [], 0
            for row in cursor:  # newest first: stop reading blobs once enough rows are in
                rows.append(row)
                count += row[1]
                if newest is not None and count >= newest:
                    break
        rows.reverse()
        if not rows:
            return None
        dims = rows[-1][2:4]
        parts = [_unpack(r[4], r[1], r[2], r[3]) for r in rows if r[2:4] == dims]
        cols = {name: np.concatenate([p[name] for p in parts]) for name, _, _ in _COLUMNS}
        if since is not None:
            keep = cols["timestamp"] >= since
            cols = {k: v[keep] for k, v in cols.items()}
        if len(cols["reward"]) == 0:
            return None
        # the blob holds the two version columns of schema 1; a new slot kind needs a migration
        versions = {slot: cols.pop(f"{slot}_version") for slot in ("fleet", "device")}
        return TraceBatch(fleet=fleet, device=device or "*", seq=int(rows[-1][0]),
                          versions=versions, **cols)

    def count_rows(self, fleet: str, device: str | None = None, *, after_id: int = 0) -> int:
        """Rows received after chunk ``after_id`` (the adaptation schedule's trigger)."""
        sql = "SELECT COALESCE(SUM(n_rows), 0) FROM chunks WHERE fleet = ? AND id > ?"
        params: list[object] = [fleet, after_id]
        if device is not None:
            sql += " AND device = ?"
            params.append(device)
        with self._read() as conn:
            return int(conn.execute(sql, params).fetchone()[0])

    def last_chunk_id(self, fleet: str, device: str | None = None) -> int:
        sql = "SELECT COALESCE(MAX(id), 0) FROM chunks WHERE fleet = ?"
        params: list[object] = [fleet]
        if device is not None:
            sql += " AND device = ?"
            params.append(device)
        with self._read() as conn:
            return int(conn.execute(sql, params).fetchone()[0])

    def devices(self, fleet: str) -> list[str]:
        with self._read() as conn:
            rows = conn.execute("SELECT DISTINCT device FROM chunks WHERE fleet = ? "
                                "ORDER BY device", (fleet,)).fetchall()
        return [r[0] for r in rows]

    # ------------------------------------------------------------------ versions
    def next_version(self, fleet: str, slot: str, target: str) -> int:
        """Reserve the next version of (fleet, slot, target), persisted before it is used."""
        with self._write() as conn:
            row = conn.execute("SELECT version FROM versions WHERE fleet=? AND slot=? AND target=?",
                               (fleet, slot, target)).fetchone()
            version = (row[0] if row else 0) + 1
            conn.execute("INSERT OR REPLACE INTO versions VALUES (?,?,?,?,?)",
                         (fleet, slot, target, version, time.time()))
        return version

    def raise_version_floor(self, fleet: str, slot: str, target: str, version: int) -> None:
        """Make the next version exceed ``version`` (e.g. a retained packet seen on the broker)."""
        with self._write() as conn:
            conn.execute(
                "INSERT INTO versions VALUES (?,?,?,?,?) ON CONFLICT (fleet, slot, target) "
                "DO UPDATE SET version = MAX(version, excluded.version), "
                "updated_at = excluded.updated_at",
                (fleet, slot, target, int(version), time.time()))

    def current_version(self, fleet: str, slot: str, target: str) -> int:
        """The highest version reserved so far (0 = none)."""
        with self._read() as conn:
            row = conn.execute("SELECT version FROM versions WHERE fleet=? AND slot=? AND target=?",
                               (fleet, slot, target)).fetchone()
        return int(row[0]) if row else 0

    def record_publication(self, fleet: str, slot: str, target: str, version: int, packet_id: str,
                           priority: int, size: int, topic: str) -> None:
        with self._write() as conn:
            conn.execute("INSERT INTO publications (fleet, slot, target, version, packet_id, "
                         "priority, size, topic, published_at) VALUES (?,?,?,?,?,?,?,?,?)",
                         (fleet, slot, target, version, packet_id, priority, size, topic,
                          time.time()))

    def publications(self, fleet: str) -> list[dict[str, object]]:
        with self._read() as conn:
            rows = conn.execute("SELECT slot, target, version, packet_id, priority, size, topic, "
                                "published_at FROM publications WHERE fleet = ? ORDER BY id",
                                (fleet,)).fetchall()
        keys = ("slot", "target", "version", "packet_id", "priority", "size", "topic",
                "published_at")
        return [dict(zip(keys, r, strict=True)) for r in rows]

    # ------------------------------------------------------------------ audits and acks
    def add_audit(self, record: AuditRecord) -> None:
        with self._write() as conn:
            conn.execute("INSERT OR IGNORE INTO audits VALUES (?,?,?,?,?,?,?,?,?)",
                         (record.record_id, record.auditor, record.fleet, record.device,
                          record.slot, record.version, record.verdict, record.created_at,
                          record.model_dump_json()))

    def audits(self, fleet: str, device: str | None = None, auditor: str | None = None
               ) -> list[AuditRecord]:
        sql, params = "SELECT record FROM audits WHERE fleet = ?", [fleet]
        if device is not None:
            sql += " AND device = ?"
            params.append(device)
        if auditor is not None:
            sql += " AND auditor = ?"
            params.append(auditor)
        with self._read() as conn:
            rows = conn.execute(sql + " ORDER BY created_at, rowid", params).fetchall()
        return [AuditRecord.model_validate_json(r[0]) for r in rows]

    def add_ack(self, record: AuditRecord, received_at: float | None = None) -> bool:
        """Store a device's accept / reject / rollback of a version; False if already known."""
        if record.fleet is None or record.device is None or record.slot is None \
                or record.version is None:
            raise ValueError("an ack needs fleet, device, slot and version")
        with self._write() as conn:
            cur = conn.execute("INSERT OR IGNORE INTO acks VALUES (?,?,?,?,?,?,?,?)",
                               (record.fleet, record.device, record.slot, record.version,
                                record.verdict, record.record_id, received_at or time.time(),
                                record.model_dump_json()))
            return cur.rowcount == 1

    def acks(self, fleet: str, device: str | None = None) -> list[Ack]:
        sql, params = "SELECT fleet, device, slot, version, verdict, received_at FROM acks " \
                      "WHERE fleet = ?", [fleet]
        if device is not None:
            sql += " AND device = ?"
            params.append(device)
        with self._read() as conn:
            rows = conn.execute(sql + " ORDER BY received_at, rowid", params).fetchall()
        return [Ack(*r) for r in rows]

    # ------------------------------------------------------------------ adaptation progress
    def save_learner(self, fleet: str, slot: str, target: str, cursor: int,
                     adapter: bytes | None, rounds: int) -> None:
        """Persist a slot target's data cursor (last chunk id a completed round read), its last
        accepted adapter (npz bytes, None = base) and its round count."""
        with self._write() as conn:
            conn.execute("INSERT OR REPLACE INTO learners VALUES (?,?,?,?,?,?,?)",
                         (fleet, slot, target, int(cursor), adapter, int(rounds), time.time()))

    def load_learner(self, fleet: str, slot: str, target: str) -> dict[str, object] | None:
        """``{"cursor", "adapter", "rounds"}`` as saved, or None if the target never had a round."""
        with self._read() as conn:
            row = conn.execute("SELECT cursor, adapter, rounds FROM learners WHERE fleet=? AND "
                               "slot=? AND target=?", (fleet, slot, target)).fetchone()
        if row is None:
            return None
        return {"cursor": int(row[0]), "adapter": bytes(row[1]) if row[1] is not None else None,
                "rounds": int(row[2])}

    def device_state(self, fleet: str, device: str, slot: str) -> dict[str, object]:
        """Per slot: the newest version the device accepted and the verdict of its latest answer."""
        with self._read() as conn:
            accepted = conn.execute(
                "SELECT MAX(version) FROM acks WHERE fleet=? AND device=? AND slot=? AND "
                "verdict='accepted'", (fleet, device, slot)).fetchone()[0]
            last = conn.execute(
                "SELECT version, verdict FROM acks WHERE fleet=? AND device=? AND slot=? "
                "ORDER BY received_at DESC, rowid DESC LIMIT 1", (fleet, device, slot)).fetchone()
        return {"accepted_version": int(accepted or 0),
                "last_version": int(last[0]) if last else 0,
                "last_verdict": last[1] if last else None}


def _statements(script: str) -> list[str]:
    """Split a migration into statements (executescript would commit our transaction)."""
    return [s.strip() for s in script.split(";") if s.strip()]

