"""The queries both backends run: standard SQL with ``?`` parameters, a few dialect hooks.

A backend provides connections (``_read`` / ``_write``: a context manager yielding an object
with ``execute(sql, params) -> cursor``; ``_write`` is one transaction), its clock
(``_now``) and the dialect's spelling of the few things SQLite and PostgreSQL spell apart
(``_GREATEST``, ``_ORDER``, ``_FOR_UPDATE``). Everything else is written once here.

The chunk id (autoincrement) doubles as a server-side cursor ("rows received after chunk N"),
which does not depend on device clocks. That needs ids to become visible in id order even with
several writers: SQLite serializes writers anyway; PostgreSQL takes a transaction lock around
the insert (``_serialize_chunks``). QoS 1 redelivers a frame now and then: ``(fleet, device,
seq, t_first, rows)`` is unique and a duplicate is ignored.
"""

from __future__ import annotations

import abc
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager
from typing import Any

from plasma.protocol import AuditRecord, TraceBatch

from .base import Ack, Lease, LeaseLost, Store, publisher_lease
from .packing import pack, to_batch

__all__ = ["SqlStore"]


class SqlStore(Store):
    """``Store`` over a DB-API-like connection; subclasses supply connections and dialect."""

    _GREATEST = "MAX"
    """The two-argument maximum (SQLite ``MAX``, PostgreSQL ``GREATEST``)."""
    _ORDER = "rowid"
    """Insertion order of audits and acks (SQLite's rowid, a serial column elsewhere)."""
    _FOR_UPDATE = ""
    """Row lock on a read inside a write transaction (SQLite locks the whole file)."""

    @abc.abstractmethod
    def _read(self) -> AbstractContextManager[Any]:
        """A connection for reads."""

    @abc.abstractmethod
    def _write(self) -> AbstractContextManager[Any]:
        """A connection inside one write transaction (committed on exit, rolled back on error)."""

    def _now(self, conn: Any) -> float:
        """The clock leases are judged by (the database's, where processes share one)."""
        return time.time()

    def _serialize_chunks(self, conn: Any, fleets: list[str]) -> None:
        """Make chunk ids of these fleets visible in id order (in the insert's transaction)."""

    # ------------------------------------------------------------------ traces
    def add_traces(self, batch: TraceBatch, received_at: float | None = None) -> bool:
        return self.add_traces_many([batch], received_at)[0]

    def add_traces_many(self, batches: list[TraceBatch], received_at: float | None = None
                        ) -> list[bool]:
        """Several frames in one transaction (one commit: what ingest does with a backlog)."""
        now = received_at or time.time()
        rows = [(b.fleet, b.device, int(b.seq), float(b.timestamp.min()),
                 float(b.timestamp.max()), len(b), int(b.obs.shape[1]), int(b.action.shape[1]),
                 now, pack(b)) if len(b) else None for b in batches]
        if not any(rows):
            return [False] * len(batches)
        with self._write() as conn:
            self._serialize_chunks(conn, sorted({r[0] for r in rows if r}))
            return [row is not None and conn.execute(
                "INSERT INTO chunks (fleet, device, seq, t_first, t_last, n_rows, obs_dim, "
                "act_dim, received_at, data) VALUES (?,?,?,?,?,?,?,?,?,?) ON CONFLICT DO NOTHING",
                row).rowcount == 1 for row in rows]

    @staticmethod
    def _where(fleet: str, device: str | None, after_id: int) -> tuple[str, list[object]]:
        sql, params = " WHERE fleet = ? AND id > ?", [fleet, after_id]
        if device is not None:
            sql += " AND device = ?"
            params.append(device)
        return sql, params

    def transitions(self, fleet: str, device: str | None = None, *, since: float | None = None,
                    after_id: int = 0, newest: int | None = None) -> TraceBatch | None:
        """``since`` filters on the rows' own timestamps, ``after_id`` on the chunk cursor;
        ``newest`` reads only the newest chunks holding at least that many rows (whole chunks:
        the batch may hold a few more). Two reads: the chunk sizes first (no blobs), then the
        blobs of the chunks needed, bounded by the first read's newest id."""
        where, params = self._where(fleet, device, after_id)
        if since is not None:
            where += " AND t_last >= ?"
            params.append(since)
        with self._read() as conn:
            sizes = conn.execute(f"SELECT id, n_rows FROM chunks{where} ORDER BY id DESC",
                                 params).fetchall()
            if not sizes:
                return None
            first, count = sizes[-1][0], 0
            for chunk_id, n_rows in sizes:  # newest first: stop once enough rows are in
                count += n_rows
                if newest is not None and count >= newest:
                    first = chunk_id
                    break
            rows = conn.execute(f"SELECT id, n_rows, obs_dim, act_dim, data FROM chunks{where} "
                                "AND id >= ? AND id <= ? ORDER BY id",
                                [*params, first, sizes[0][0]]).fetchall()
        return to_batch(fleet, device, rows, since)

    def count_rows(self, fleet: str, device: str | None = None, *, after_id: int = 0) -> int:
        where, params = self._where(fleet, device, after_id)
        with self._read() as conn:
            return int(conn.execute(f"SELECT COALESCE(SUM(n_rows), 0) FROM chunks{where}",
                                    params).fetchone()[0])

    def last_chunk_id(self, fleet: str, device: str | None = None) -> int:
        where, params = self._where(fleet, device, 0)
        with self._read() as conn:
            return int(conn.execute(f"SELECT COALESCE(MAX(id), 0) FROM chunks{where}",
                                    params).fetchone()[0])

    def devices(self, fleet: str) -> list[str]:
        with self._read() as conn:
            rows = conn.execute("SELECT DISTINCT device FROM chunks WHERE fleet = ? "
                                "ORDER BY device", (fleet,)).fetchall()
        return [r[0] for r in rows]

    # ------------------------------------------------------------------ versions
    def next_version(self, fleet: str, slot: str, target: str, *, holder: str | None = None
                     ) -> int:
        with self._write() as conn:
            if holder is not None:
                self._check_holder(conn, publisher_lease(fleet), holder)
            row = conn.execute(
                "INSERT INTO versions (fleet, slot, target, version, updated_at) "
                "VALUES (?,?,?,1,?) ON CONFLICT (fleet, slot, target) DO UPDATE SET "
                "version = versions.version + 1, updated_at = excluded.updated_at "
                "RETURNING version", (fleet, slot, target, time.time())).fetchone()
        return int(row[0])

    def raise_version_floor(self, fleet: str, slot: str, target: str, version: int) -> None:
        with self._write() as conn:
            conn.execute(
                "INSERT INTO versions (fleet, slot, target, version, updated_at) "
                "VALUES (?,?,?,?,?) ON CONFLICT (fleet, slot, target) DO UPDATE SET "
                f"version = {self._GREATEST}(versions.version, excluded.version), "
                "updated_at = excluded.updated_at",
                (fleet, slot, target, int(version), time.time()))

    def current_version(self, fleet: str, slot: str, target: str) -> int:
        with self._read() as conn:
            row = conn.execute("SELECT version FROM versions WHERE fleet=? AND slot=? AND target=?",
                               (fleet, slot, target)).fetchone()
        return int(row[0]) if row else 0

    def record_publication(self, fleet: str, slot: str, target: str, version: int,
                           packet_id: str, priority: int, size: int, topic: str,
                           packet: bytes | None = None) -> None:
        with self._write() as conn:
            conn.execute("INSERT INTO publications (fleet, slot, target, version, packet_id, "
                         "priority, size, topic, published_at, packet) "
                         "VALUES (?,?,?,?,?,?,?,?,?,?)",
                         (fleet, slot, target, version, packet_id, priority, size, topic,
                          time.time(), packet))

    def published_packet(self, fleet: str, slot: str, target: str, version: int
                         ) -> bytes | None:
        with self._read() as conn:
            row = conn.execute("SELECT packet FROM publications WHERE fleet = ? AND slot = ? AND "
                               "target = ? AND version = ? AND packet IS NOT NULL "
                               "ORDER BY id DESC LIMIT 1",
                               (fleet, slot, target, version)).fetchone()
        return bytes(row[0]) if row is not None else None

    def published_at(self, fleet: str, slot: str, target: str, version: int) -> float | None:
        with self._read() as conn:
            row = conn.execute("SELECT MIN(published_at) FROM publications WHERE fleet = ? AND "
                               "slot = ? AND target = ? AND version = ?",
                               (fleet, slot, target, version)).fetchone()
        return float(row[0]) if row is not None and row[0] is not None else None

    def publications(self, fleet: str) -> list[dict[str, object]]:
        with self._read() as conn:
            rows = conn.execute("SELECT slot, target, version, packet_id, priority, size, topic, "
                                "published_at FROM publications WHERE fleet = ? ORDER BY id",
                                (fleet,)).fetchall()
        keys = ("slot", "target", "version", "packet_id", "priority", "size", "topic",
                "published_at")
        return [dict(zip(keys, r, strict=True)) for r in rows]

    # ------------------------------------------------------------------ leases
    def acquire_lease(self, name: str, holder: str, ttl_s: float) -> bool:
        with self._write() as conn:
            now = self._now(conn)
            cur = conn.execute(
                "INSERT INTO leases (name, holder, expires_at, acquired_at) VALUES (?,?,?,?) "
                "ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, "
                "expires_at = excluded.expires_at, acquired_at = CASE WHEN leases.holder = "
                "excluded.holder THEN leases.acquired_at ELSE excluded.acquired_at END "
                "WHERE leases.holder = excluded.holder OR leases.expires_at < ?",
                (name, holder, now + ttl_s, now, now))
            return bool(cur.rowcount == 1)

    def release_lease(self, name: str, holder: str) -> None:
        with self._write() as conn:
            conn.execute("UPDATE leases SET expires_at = 0 WHERE name = ? AND holder = ?",
                         (name, holder))

    def lease(self, name: str) -> Lease | None:
        with self._read() as conn:
            row = conn.execute("SELECT name, holder, expires_at FROM leases WHERE name = ?",
                               (name,)).fetchone()
        return Lease(row[0], row[1], float(row[2])) if row else None

    def _check_holder(self, conn: Any, name: str, holder: str) -> None:
        row = conn.execute(f"SELECT holder, expires_at FROM leases WHERE name = ?{self._FOR_UPDATE}",
                           (name,)).fetchone()
        if row is None or row[0] != holder or float(row[1]) < self._now(conn):
            raise LeaseLost(f"{holder} does not hold the lease {name}"
                            + (f" ({row[0]} does)" if row and row[0] != holder else ""))

    # ------------------------------------------------------------------ audits and acks
    def add_audit(self, record: AuditRecord) -> None:
        with self._write() as conn:
            conn.execute("INSERT INTO audits (record_id, auditor, fleet, device, slot, version, "
                         "verdict, created_at, record) VALUES (?,?,?,?,?,?,?,?,?) "
                         "ON CONFLICT DO NOTHING",
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
            rows = conn.execute(sql + f" ORDER BY created_at, {self._ORDER}", params).fetchall()
        return [AuditRecord.model_validate_json(r[0]) for r in rows]

    def add_ack(self, record: AuditRecord, received_at: float | None = None) -> bool:
        if record.fleet is None or record.device is None or record.slot is None \
                or record.version is None:
            raise ValueError("an ack needs fleet, device, slot and version")
        with self._write() as conn:
            cur = conn.execute("INSERT INTO acks (fleet, device, slot, version, verdict, "
                               "record_id, received_at, record) VALUES (?,?,?,?,?,?,?,?) "
                               "ON CONFLICT DO NOTHING",
                               (record.fleet, record.device, record.slot, record.version,
                                record.verdict, record.record_id, received_at or time.time(),
                                record.model_dump_json()))
            return bool(cur.rowcount == 1)

    def acks(self, fleet: str, device: str | None = None) -> list[Ack]:
        sql, params = "SELECT fleet, device, slot, version, verdict, received_at FROM acks " \
                      "WHERE fleet = ?", [fleet]
        if device is not None:
            sql += " AND device = ?"
            params.append(device)
        with self._read() as conn:
            rows = conn.execute(sql + f" ORDER BY received_at, {self._ORDER}", params).fetchall()
        return [Ack(*r) for r in rows]

    # ------------------------------------------------------------------ adaptation progress
    def save_learner(self, fleet: str, slot: str, target: str, cursor: int,
                     adapter: bytes | None, rounds: int) -> None:
        with self._write() as conn:
            conn.execute("INSERT INTO learners (fleet, slot, target, cursor, adapter, rounds, "
                         "updated_at) VALUES (?,?,?,?,?,?,?) ON CONFLICT (fleet, slot, target) "
                         "DO UPDATE SET cursor = excluded.cursor, adapter = excluded.adapter, "
                         "rounds = excluded.rounds, updated_at = excluded.updated_at",
                         (fleet, slot, target, int(cursor), adapter, int(rounds), time.time()))

    def load_learner(self, fleet: str, slot: str, target: str) -> dict[str, object] | None:
        with self._read() as conn:
            row = conn.execute("SELECT cursor, adapter, rounds FROM learners WHERE fleet=? AND "
                               "slot=? AND target=?", (fleet, slot, target)).fetchone()
        if row is None:
            return None
        return {"cursor": int(row[0]), "adapter": bytes(row[1]) if row[1] is not None else None,
                "rounds": int(row[2])}

    def device_state(self, fleet: str, device: str, slot: str) -> dict[str, object]:
        with self._read() as conn:
            accepted = conn.execute(
                "SELECT MAX(version) FROM acks WHERE fleet=? AND device=? AND slot=? AND "
                "verdict='accepted'", (fleet, device, slot)).fetchone()[0]
            last = conn.execute(
                "SELECT version, verdict FROM acks WHERE fleet=? AND device=? AND slot=? "
                f"ORDER BY received_at DESC, {self._ORDER} DESC LIMIT 1",
                (fleet, device, slot)).fetchone()
        return {"accepted_version": int(accepted or 0),
                "last_version": int(last[0]) if last else 0,
                "last_verdict": last[1] if last else None}


def statements(script: str) -> Iterator[str]:
    """Split a migration into statements (executescript would commit our transaction)."""
    return (s.strip() for s in script.split(";") if s.strip())
