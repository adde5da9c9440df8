"""Trace store: schema and migrations, range queries as numpy, versions across reopen, acks, leases.

The contract tests run on every backend: SQLite in memory, a SQLite file, and a real PostgreSQL
started by the tests (skipped, with the reason, only when PostgreSQL is not installed)."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from plasma.protocol import AuditRecord, TraceBatch
from plasma.server.store import (
    MIGRATIONS,
    SCHEMA_VERSION,
    LeaseLost,
    Store,
    StoreError,
    TraceStore,
    open_store,
    publisher_lease,
)
from tests.helpers.postgres import PostgresServer


def make_batch(fleet: str, device: str, t0: float, n: int = 8, seq: int = 0, obs_dim: int = 3,
               act_dim: int = 1) -> TraceBatch:
    rng = np.random.default_rng(int(t0 * 10) + seq)
    return TraceBatch(
        fleet=fleet, device=device, episode=np.zeros(n, np.uint32),
        step=np.arange(n, dtype=np.uint32),
        obs=rng.standard_normal((n, obs_dim)).astype(np.float32),
        action=rng.standard_normal((n, act_dim)).astype(np.float32),
        reward=rng.standard_normal(n).astype(np.float32),
        next_obs=rng.standard_normal((n, obs_dim)).astype(np.float32),
        terminated=np.zeros(n, bool), truncated=np.arange(n) == n - 1,
        versions={"fleet": np.full(n, 2, np.uint32), "device": np.full(n, 3, np.uint32)},
        timestamp=t0 + np.arange(n, dtype=np.float64), seq=seq)


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresServer]:
    """One real PostgreSQL for this module (each test gets its own database)."""
    try:
        server = PostgresServer()
    except FileNotFoundError as exc:
        pytest.skip(f"{exc}: the PostgreSQL store tests need it (deploy/scripts/run-tests.sh "
                    "installs it)")
    try:
        server.start()
        yield server
    finally:
        server.stop()


def _location(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    """Where a store of this kind lives: several stores opened on it share one database."""
    if kind == "postgresql":
        return request.getfixturevalue("postgres").new_database()  # type: ignore[no-any-return]
    return str(tmp_path / "plasma.db") if kind == "file" else ":memory:"


@pytest.fixture(params=["memory", "file", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    s = open_store(_location(request.param, tmp_path, request))
    yield s
    s.close()


@pytest.fixture(params=["file", "postgresql"])
def shared(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A database two processes can share: its path or URL."""
    return _location(request.param, tmp_path, request)


def test_schema_is_current_and_wal(tmp_path: Path) -> None:
    with TraceStore(tmp_path / "s.db") as s:
        assert s.schema_version == SCHEMA_VERSION == len(MIGRATIONS)
    conn = sqlite3.connect(tmp_path / "s.db")
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    indexes = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='index'")}
    assert {"chunks_device_time", "chunks_device_id"} <= indexes


def test_old_schema_is_migrated_and_newer_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    conn.executescript(MIGRATIONS[0] + "PRAGMA user_version = 1;")
    conn.close()
    with TraceStore(path) as s:
        assert s.schema_version == SCHEMA_VERSION
        s.add_audit(AuditRecord(auditor="judicial", subject="x", fleet="f", verdict="blocked"))
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.commit()
    conn.close()
    with pytest.raises(StoreError, match="schema version"):
        TraceStore(path)


def test_round_trip_and_time_range(store: Store) -> None:
    a, b = make_batch("f1", "d1", 100.0, seq=0), make_batch("f1", "d1", 108.0, seq=1)
    assert store.add_traces(a) and store.add_traces(b)
    assert not store.add_traces(a)  # QoS 1 redelivery is ignored
    store.add_traces(make_batch("f1", "d2", 100.0))
    everything = store.transitions("f1", "d1")
    assert len(everything) == 16
    np.testing.assert_array_equal(everything.obs[:8], a.obs)
    np.testing.assert_array_equal(everything.truncated[8:], b.truncated)
    assert everything.obs.dtype == np.float32 and everything.obs.shape == (16, 3)
    recent = store.transitions("f1", "d1", since=105.0)
    assert len(recent) == 11 and recent.timestamp.min() == 105.0
    assert store.transitions("f1", "d1", since=1e9) is None
    assert len(store.transitions("f1")) == 24  # the whole fleet
    assert store.devices("f1") == ["d1", "d2"]


def test_cursor_counts_new_rows(store: Store) -> None:
    store.add_traces(make_batch("f2", "d1", 0.0, n=5))
    cursor = store.last_chunk_id("f2", "d1")
    assert store.count_rows("f2", "d1", after_id=cursor) == 0
    store.add_traces(make_batch("f2", "d1", 10.0, n=7, seq=1))
    assert store.count_rows("f2", "d1", after_id=cursor) == 7
    assert len(store.transitions("f2", "d1", after_id=cursor)) == 7


def test_mixed_dims_keep_the_newest(store: Store) -> None:
    store.add_traces(make_batch("f3", "d1", 0.0, obs_dim=3))
    store.add_traces(make_batch("f3", "d1", 50.0, obs_dim=4, seq=1))
    assert store.transitions("f3", "d1").obs.shape == (8, 4)


def test_versions_strictly_increase_across_reopen(tmp_path: Path) -> None:
    path = tmp_path / "v.db"
    with TraceStore(path) as s:
        assert [s.next_version("f", "fleet", "f") for _ in range(3)] == [1, 2, 3]
        assert s.next_version("f", "device", "d1") == 1
    with TraceStore(path) as s:
        assert s.next_version("f", "fleet", "f") == 4
        s.raise_version_floor("f", "fleet", "f", 10)
        s.raise_version_floor("f", "fleet", "f", 2)  # never lowers
        assert s.next_version("f", "fleet", "f") == 11
        assert s.current_version("f", "device", "d1") == 1


def test_versions_are_unique_under_threads(tmp_path: Path) -> None:
    with TraceStore(tmp_path / "t.db") as s:
        got: list[int] = []
        lock = threading.Lock()

        def reserve() -> None:
            for _ in range(25):
                v = s.next_version("f", "fleet", "f")
                with lock:
                    got.append(v)

        threads = [threading.Thread(target=reserve) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(got) == list(range(1, 101))


def test_audits_and_acks(store: Store) -> None:
    rec = AuditRecord(auditor="judicial", subject="candidate:x", fleet="f", device="d1",
                      slot="device", verdict="blocked", scores={"gain": 1.0})
    store.add_audit(rec)
    assert store.audits("f", "d1") == [rec]
    ack = AuditRecord(auditor="edge", subject="packet:y", fleet="f", device="d1", slot="device",
                      version=2, verdict="accepted")
    assert store.add_ack(ack) and not store.add_ack(ack)
    store.add_ack(AuditRecord(auditor="edge", subject="packet:y", fleet="f", device="d1",
                              slot="device", version=2, verdict="rolled_back"))
    state = store.device_state("f", "d1", "device")
    assert state == {"accepted_version": 2, "last_version": 2, "last_verdict": "rolled_back"}
    assert [a.verdict for a in store.acks("f", "d1")] == ["accepted", "rolled_back"]


def test_newest_rows_reads_only_recent_chunks(store: Store) -> None:
    for i in range(5):
        store.add_traces(make_batch("f4", "d1", 100.0 * i, n=10, seq=i))
    recent = store.transitions("f4", "d1", newest=15)
    assert len(recent) == 20 and recent.timestamp.min() == 300.0
    assert recent.seq == store.last_chunk_id("f4", "d1")
    assert len(store.transitions("f4", "d1", newest=1000)) == 50


def test_versions_continue_across_stores_and_never_go_back(shared: str) -> None:
    with open_store(shared) as a, open_store(shared) as b:
        assert [a.next_version("f", "fleet", "f") for _ in range(3)] == [1, 2, 3]
        assert b.next_version("f", "fleet", "f") == 4  # one counter, whoever reserves
        b.raise_version_floor("f", "fleet", "f", 10)
        b.raise_version_floor("f", "fleet", "f", 2)  # never lowers
        assert a.next_version("f", "fleet", "f") == 11
        assert a.current_version("f", "fleet", "f") == b.current_version("f", "fleet", "f") == 11
        a.save_learner("f", "device", "d1", 7, b"npz", 2)
        assert b.load_learner("f", "device", "d1") == {"cursor": 7, "adapter": b"npz",
                                                       "rounds": 2}


def test_lease_is_exclusive_renewable_and_fences_versions(shared: str) -> None:
    name = publisher_lease("f")
    with open_store(shared) as a, open_store(shared) as b:
        assert a.lease(name) is None
        assert a.acquire_lease(name, "A", 0.6)
        assert not b.acquire_lease(name, "B", 0.6)  # held and not expired
        assert a.acquire_lease(name, "A", 0.6)  # renewal
        assert a.next_version("f", "fleet", "f", holder="A") == 1
        with pytest.raises(LeaseLost):
            b.next_version("f", "fleet", "f", holder="B")  # fenced: B does not hold it
        time.sleep(0.7)  # A stops renewing (a crash): the lease expires
        with pytest.raises(LeaseLost):
            a.next_version("f", "fleet", "f", holder="A")  # an expired holder cannot publish
        assert b.acquire_lease(name, "B", 5.0)
        lease = a.lease(name)
        assert lease is not None and lease.holder == "B"
        assert b.next_version("f", "fleet", "f", holder="B") == 2  # continues from the store
        assert not a.acquire_lease(name, "A", 5.0)
        b.release_lease(name, "B")  # a clean stop hands over at once
        assert a.acquire_lease(name, "A", 5.0)


_CONTENDER = """
import json, sys, time
from plasma.server.store import LeaseLost, open_store, publisher_lease
store, me, out = open_store(sys.argv[1]), sys.argv[2], []
name, deadline = publisher_lease("f"), time.time() + float(sys.argv[3])
while time.time() < deadline:
    if store.acquire_lease(name, me, 0.3):
        for _ in range(5):  # publish a few versions, then let the other one have a turn
            try:
                out.append([time.time(), store.next_version("f", "fleet", "f", holder=me)])
            except LeaseLost:
                break
        store.release_lease(name, me)
    time.sleep(0.01)
print(json.dumps(out))
"""


@pytest.mark.slow
def test_lease_moves_between_processes_and_versions_stay_monotone(shared: str) -> None:
    open_store(shared).close()  # schema in place before the race
    procs = [subprocess.Popen([sys.executable, "-c", _CONTENDER, shared, who, "1.2"],
                              stdout=subprocess.PIPE, text=True) for who in ("A", "B")]
    results = [__import__("json").loads(p.communicate(timeout=60)[0]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert all(results), "both processes held the lease at some point"
    merged = sorted([*results[0], *results[1]])  # by reservation time
    versions = [v for _, v in merged]
    assert versions == sorted(versions) and len(set(versions)) == len(versions)
    assert versions == list(range(1, len(versions) + 1))  # no version lost or repeated
    with open_store(shared) as s:
        assert s.current_version("f", "fleet", "f") == len(versions)


def test_open_store_refuses_other_urls() -> None:
    with pytest.raises(StoreError, match="postgresql://"):
        open_store("mysql://u@h/db")


def test_server_config_takes_a_store_url_and_an_ingest_group() -> None:
    from plasma.protocol.errors import ConfigError
    from plasma.server.service_config import load_service_config

    base = {"broker": "mqtt://h", "fleet": "f", "key": "k", "model": "m", "env": "Pendulum-v1"}
    cfg = load_service_config({**base, "store": "postgresql://u:pw@db:5432/plasma",
                               "ingest_group": "none", "node": "w1"}, environ={})
    assert cfg.store == "postgresql://u:pw@db:5432/plasma" and cfg.ingest_group is None
    assert cfg.node == "w1"
    cfg = load_service_config(base, environ={"PLASMA_SERVER_INGEST_GROUP": "grp"})
    assert cfg.store == Path("plasma-server.sqlite") and cfg.ingest_group == "grp"
    with pytest.raises(ConfigError, match="postgresql://"):
        load_service_config({**base, "store": "mysql://db/x"}, environ={})
    with pytest.raises(ConfigError):
        load_service_config({**base, "ingest_group": "a/b"}, environ={})
    from plasma.server.store.postgres import redact

    assert redact("postgresql://u:pw@db:5432/x") == "postgresql://u:***@db:5432/x"  # for logs


def test_many_frames_in_one_transaction(store: Store) -> None:
    a, b = make_batch("f5", "d1", 0.0, seq=0), make_batch("f5", "d1", 10.0, seq=1)
    empty = make_batch("f5", "d1", 20.0, n=0, seq=2)
    assert store.add_traces_many([a, empty, b, a]) == [True, False, True, False]
    assert store.count_rows("f5") == 16


def test_a_cursor_reader_misses_no_chunk_of_concurrent_writers(shared: str) -> None:
    """Chunk ids are cursors: with two writers (two connections) a reader that follows
    ``after_id`` must see every chunk, i.e. ids become visible in id order."""
    open_store(shared).close()
    done = threading.Event()

    def write(device: str) -> None:
        with open_store(shared) as s:
            for i in range(120):
                s.add_traces(make_batch("f", device, float(i), n=4, seq=i))

    writers = [threading.Thread(target=write, args=(d,)) for d in ("d1", "d2")]
    seen, cursor = 0, 0
    with open_store(shared) as reader:
        for w in writers:
            w.start()
        while not done.is_set():
            done.wait(0.001) if any(w.is_alive() for w in writers) else done.set()
            batch = reader.transitions("f", after_id=cursor)
            if batch is not None:
                seen, cursor = seen + len(batch), batch.seq
        assert seen == 2 * 120 * 4 == reader.count_rows("f")


def test_published_packets_are_kept_by_version(store: Store) -> None:
    """The signed bytes of a publication are what a device's reported version names."""
    store.record_publication("f", "fleet", "f", 1, "p1", 4, 3, "t", packet=b"one")
    store.record_publication("f", "fleet", "f", 2, "p2", 4, 3, "t", packet=b"two")
    store.record_publication("f", "device", "d1", 1, "p3", 5, 3, "t")  # bytes not kept
    assert store.published_packet("f", "fleet", "f", 1) == b"one"
    assert store.published_packet("f", "fleet", "f", 2) == b"two"
    assert store.published_packet("f", "fleet", "f", 3) is None
    assert store.published_packet("f", "device", "d1", 1) is None
    assert store.published_packet("g", "fleet", "f", 1) is None
    sent = store.published_at("f", "fleet", "f", 2)
    assert sent is not None and abs(sent - time.time()) < 60
    assert store.published_at("f", "device", "d1", 1) is not None  # bytes or not, it went out
    assert store.published_at("f", "fleet", "f", 3) is None
