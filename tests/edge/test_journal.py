"""Edge stage 9a: the state directory survives crashes, damage and full disks."""

from __future__ import annotations

import errno
import os
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest

from plasma.edge import journal as jmod
from plasma.edge import journal_record as rec
from plasma.edge.audit import AuditContext
from plasma.edge.bench.journal import bench_commit
from plasma.edge.canary import Canary
from plasma.edge.journal import Journal, JournalError
from plasma.edge.merge import MergeEngine
from plasma.edge.pipeline import AdapterPipeline
from plasma.edge.runtime import PolicyRuntime
from plasma.protocol import (
    SLOTS,
    Adapter,
    DecodedPacket,
    PacketError,
    SigningKey,
    TrustStore,
    decode_packet,
    encode_packet,
)
from plasma.protocol.bundle import Bundle

KEY = SigningKey.generate()
TRUST = TrustStore([KEY.public_key])
BASE = "cd" * 32


def pkt(slot: str, version: int) -> bytes:
    rng = np.random.default_rng(version)
    adapter = Adapter(alpha=1.0, rank=1, layers={"l0": (rng.normal(size=(1, 4)),
                                                       rng.normal(size=(3, 1)))})
    return encode_packet(adapter, key=KEY, fleet="f1", slot=slot,  # type: ignore[arg-type]
                         device="d1" if slot == "device" else None, version=version,
                         base_sha256=BASE)


def verify(data: bytes) -> DecodedPacket | str:
    try:
        return decode_packet(data, TRUST)
    except PacketError as exc:
        return f"{exc.code}: {exc}"


def versions(restored: object) -> dict[str, int]:
    return {slot: p.header.version for slot, p in restored.packets.items()}  # type: ignore[attr-defined]


def spans(root: Path) -> list[tuple[int, int]]:
    """(start, end) of every valid record of the log, in order."""
    records, damage = rec.scan((root / "journal.log").read_bytes())
    assert damage == []
    return [(r.offset - rec.HEAD.size, r.end) for r in records]


def rewrite_payload(root: Path, index: int, damage) -> None:
    """Damage the packet bytes of record ``index`` but keep a valid crc: stored bytes that no
    longer verify."""
    path = root / "journal.log"
    buf = path.read_bytes()
    start, end = spans(root)[index]
    _, _, _, kind, slot, version = rec.HEAD.unpack_from(buf, start)
    payload = damage(buf[start + rec.HEAD.size:end])
    path.write_bytes(buf[:start] + rec.encode_record(kind, SLOTS[slot], version, payload)
                     + buf[end:])


def test_commit_and_reload(tmp_path: Path) -> None:
    j = Journal(tmp_path)
    j.commit("fleet", pkt("fleet", 1), 1)
    second = pkt("fleet", 2)
    j.commit("fleet", second, 2)
    j.commit("device", pkt("device", 5), 5)
    r = Journal(tmp_path).load(verify)
    assert versions(r) == {"fleet": 2, "device": 5} and r.problems == ()
    assert r.highest == {"fleet": 2, "device": 5}
    assert r.raw["fleet"] == second  # the very bytes that were verified, re-verified
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["journal.log", "quarantine"]
    assert stat.S_IMODE((tmp_path / "journal.log").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "quarantine").stat().st_mode) == 0o700


def test_commit_is_one_write_and_one_datasync(tmp_path: Path, monkeypatch) -> None:
    j = Journal(tmp_path)
    j.commit("fleet", pkt("fleet", 1), 1)  # the first one also creates the log
    calls: list[str] = []
    for name in ("write", "fdatasync", "fsync", "replace", "rename", "open"):
        real = getattr(os, name)
        monkeypatch.setattr(os, name, lambda *a, _n=name, _r=real, **k: (calls.append(_n),
                                                                          _r(*a, **k))[1])
    j.commit("fleet", pkt("fleet", 2), 2)
    j.mark_bad("fleet", 2)
    assert calls == ["write", "fdatasync"] * 2


def test_crash_at_every_byte_of_the_last_record_gives_the_previous_state(
        tmp_path: Path) -> None:
    j = Journal(tmp_path / "full")
    j.commit("device", pkt("device", 5), 5)
    j.commit("fleet", pkt("fleet", 1), 1)
    j.commit("fleet", pkt("fleet", 2), 2)
    j.mark_bad("fleet", 2)  # the last record: a 22-byte ROLLBACK
    j.commit("fleet", pkt("fleet", 3), 3)  # the last record: an ACCEPT
    full = (tmp_path / "full" / "journal.log").read_bytes()
    (before_rb, _), (start, end) = spans(tmp_path / "full")[-2], spans(tmp_path / "full")[-1]
    cases = [(cut, {"fleet": 2, "device": 5}, 2) for cut in range(before_rb, start)] + \
            [(cut, {"fleet": 1, "device": 5}, 2) for cut in range(start, end)]
    for cut, state, highest in cases:
        root = tmp_path / f"cut{cut}"
        root.mkdir()
        (root / "journal.log").write_bytes(full[:cut])
        r = Journal(root).load(verify)
        assert versions(r) == state, cut
        assert r.highest == {"fleet": highest, "device": 5}, cut
        assert bool(r.problems) == (cut not in (before_rb, start)), cut
        assert (root / "journal.log").stat().st_size in (before_rb, start)  # tail cut off
    root = tmp_path / f"cut{end - 1}"  # a later append after the cut is readable
    Journal(root).load(verify)
    j = Journal(root)
    j.load(verify)
    j.commit("fleet", pkt("fleet", 4), 4)
    r = Journal(root).load(verify)
    assert versions(r) == {"fleet": 4, "device": 5} and r.problems == ()


@pytest.mark.parametrize("damage", [
    lambda b: b[: len(b) // 2],  # truncated by a crash or a bad sector
    lambda b: b[:-1] + bytes([b[-1] ^ 1]),  # one flipped payload bit: digest mismatch
    lambda b: b"",  # empty
    lambda b: b"\x00" * 300_000,  # garbage above the packet cap
])
def test_damaged_current_falls_back_to_previous(tmp_path: Path, damage) -> None:
    j = Journal(tmp_path)
    j.commit("fleet", pkt("fleet", 1), 1)
    j.commit("fleet", pkt("fleet", 2), 2)
    rewrite_payload(tmp_path, -1, damage)
    r = Journal(tmp_path).load(verify)
    assert versions(r) == {"fleet": 1}
    assert r.highest["fleet"] == 2  # versions never go backwards
    assert any("fleet packet v2" in p for p in r.problems)
    assert list((tmp_path / "quarantine").iterdir())
    again = Journal(tmp_path).load(verify)  # withdrawn once, not judged at every restart
    assert versions(again) == {"fleet": 1} and again.highest["fleet"] == 2
    assert again.problems == ()


def test_corrupt_record_in_the_middle_keeps_the_later_ones(tmp_path: Path) -> None:
    j = Journal(tmp_path)
    j.commit("fleet", pkt("fleet", 1), 1)
    j.commit("fleet", pkt("fleet", 2), 2)
    j.commit("device", pkt("device", 5), 5)
    path = tmp_path / "journal.log"
    buf = bytearray(path.read_bytes())
    buf[30] ^= 0xFF  # inside the first record: its crc no longer matches
    path.write_bytes(bytes(buf))
    r = Journal(tmp_path).load(verify)
    assert versions(r) == {"fleet": 2, "device": 5} and r.highest == {"fleet": 2, "device": 5}
    assert any("damaged span" in p for p in r.problems)
    assert [p.name.split(".")[:2] for p in (tmp_path / "quarantine").iterdir()] == \
        [["journal", "damaged"]]
    assert Journal(tmp_path).load(verify).problems == ()  # rewritten without the damage


def test_both_damaged_runs_base_but_keeps_versions(tmp_path: Path) -> None:
    j = Journal(tmp_path)
    j.commit("device", pkt("device", 1), 1)
    j.commit("device", pkt("device", 2), 2)
    for index in (0, 1):
        rewrite_payload(tmp_path, index, lambda b: b"PLSM broken")
    r = Journal(tmp_path).load(verify)
    assert r.packets == {} and r.highest["device"] == 2


def test_mark_bad_restores_previous_and_keeps_highest(tmp_path: Path) -> None:
    j = Journal(tmp_path)
    j.commit("device", pkt("device", 1), 1)
    j.commit("device", pkt("device", 2), 2)
    j.mark_bad("device", 2)
    assert j.highest()["device"] == 2
    r = Journal(tmp_path).load(verify)
    assert versions(r) == {"device": 1} and r.highest["device"] == 2


def test_compaction_bounds_the_log_and_keeps_what_load_needs(tmp_path: Path,
                                                             monkeypatch) -> None:
    monkeypatch.setattr(jmod, "COMPACT_BYTES", 4096)
    j = Journal(tmp_path)
    j.commit("device", pkt("device", 7), 7)
    for version in range(1, 40):
        j.commit("fleet", pkt("fleet", version), version)
        assert (tmp_path / "journal.log").stat().st_size < 2 * 4096 + 2000
    j.mark_bad("fleet", 39)
    j.commit("device", pkt("device", 8), 8)  # compacts first: the rolled-back v39 is gone
    r = Journal(tmp_path).load(verify)
    assert versions(r) == {"fleet": 38, "device": 8} and r.problems == ()
    assert r.highest == {"fleet": 39, "device": 8}  # the rolled-back version still counts
    kinds = [rec.HEAD.unpack_from((tmp_path / "journal.log").read_bytes(), s)[3]
             for s, _ in spans(tmp_path)]
    assert len(kinds) <= 8 and not list(tmp_path.glob("*.tmp"))
    rewrite_payload(tmp_path, -1, lambda b: b[:10])  # the fallback survived compaction
    assert versions(Journal(tmp_path).load(verify)) == {"fleet": 38, "device": 7}


def test_load_compacts_a_long_log(tmp_path: Path, monkeypatch) -> None:
    j = Journal(tmp_path)
    for version in range(1, 30):
        j.commit("fleet", pkt("fleet", version), version)
    monkeypatch.setattr(jmod, "COMPACT_RECORDS", 10)
    r = Journal(tmp_path).load(verify)
    assert versions(r) == {"fleet": 29} and r.highest["fleet"] == 29
    assert len(spans(tmp_path)) == 3  # FLOOR, v28, v29


def test_wrong_slot_record_is_withdrawn(tmp_path: Path) -> None:
    Journal(tmp_path).commit("fleet", pkt("device", 3), 3)
    r = Journal(tmp_path).load(verify)
    assert r.packets == {} and r.problems and r.highest["fleet"] == 3


# -- failures -----------------------------------------------------------------------------------
def test_disk_full_is_a_typed_error_and_leaves_state(tmp_path: Path, monkeypatch) -> None:
    j = Journal(tmp_path)
    j.commit("fleet", pkt("fleet", 1), 1)
    size = (tmp_path / "journal.log").stat().st_size
    real_write = os.write
    calls = []

    def full(fd: int, data: bytes) -> int:  # half the record lands, then the disk is full
        calls.append(len(data))
        if len(calls) == 1:
            return real_write(fd, bytes(data[: len(data) // 2]))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(JournalError) as info:
        j.commit("fleet", pkt("fleet", 2), 2)
    assert info.value.code == "state_write_failed" and "disk full" in str(info.value)
    monkeypatch.undo()
    assert (tmp_path / "journal.log").stat().st_size == size  # the half record was cut back
    assert j.highest()["fleet"] == 1
    j.commit("fleet", pkt("fleet", 3), 3)
    r = Journal(tmp_path).load(verify)
    assert versions(r) == {"fleet": 3} and r.problems == ()
    assert not list(tmp_path.glob("*.tmp"))


def test_failed_datasync_is_typed_and_cut_back(tmp_path: Path, monkeypatch) -> None:
    j = Journal(tmp_path)
    j.commit("fleet", pkt("fleet", 1), 1)
    size = (tmp_path / "journal.log").stat().st_size
    monkeypatch.setattr(os, "fdatasync", lambda fd: (_ for _ in ()).throw(
        OSError(errno.EIO, "Input/output error")))
    with pytest.raises(JournalError):
        j.commit("fleet", pkt("fleet", 2), 2)
    monkeypatch.undo()
    assert (tmp_path / "journal.log").stat().st_size == size
    assert versions(Journal(tmp_path).load(verify)) == {"fleet": 1}


def test_vanished_state_dir_is_a_typed_error(tmp_path: Path) -> None:
    j = Journal(tmp_path / "state")
    j.commit("fleet", pkt("fleet", 1), 1)
    shutil.rmtree(tmp_path / "state")  # the open log is now an unlinked file
    with pytest.raises(JournalError, match="removed"):
        j.commit("fleet", pkt("fleet", 2), 2)
    with pytest.raises(JournalError):
        j.commit("fleet", pkt("fleet", 2), 2)
    (tmp_path / "state").mkdir()  # recreated empty: the versions seen in this run still hold
    j.commit("device", pkt("device", 1), 1)
    assert Journal(tmp_path / "state").load(verify).highest == {"fleet": 1, "device": 1}


def test_unreadable_log_loads_empty_and_refuses_commits(tmp_path: Path) -> None:
    (tmp_path / "journal.log").mkdir()  # reading it fails (a directory), like an I/O error
    r = Journal(tmp_path).load(verify)
    assert r.packets == {} and r.problems
    with pytest.raises(JournalError):
        Journal(tmp_path).commit("fleet", pkt("fleet", 1), 1)


def test_bench_commit_reports_percentiles(tmp_path: Path) -> None:
    figures = bench_commit(tmp_path, 5, size=1000)
    assert set(figures) == {"commit_p50_ms", "commit_p99_ms"}
    assert 0 < figures["commit_p50_ms"] <= figures["commit_p99_ms"]


def test_unusable_state_dir_is_a_typed_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(JournalError):
        Journal(tmp_path / "file" / "state")


def test_pipeline_rejects_with_state_write_failed_and_keeps_adapter(
        bundle: Bundle, tmp_path: Path, monkeypatch) -> None:
    key = SigningKey.generate()
    runtime = PolicyRuntime(bundle)
    ctx = AuditContext(trust=TrustStore([key.public_key]), fleet="f1", device="d1",
                       base_sha256=bundle.base_sha256,
                       layers={n: (i, o) for n, i, o in bundle.layer_specs})
    pipeline = AdapterPipeline(runtime, MergeEngine(runtime), Journal(tmp_path), ctx, Canary(),
                               None)
    name, n_in, n_out = bundle.layer_specs[1]
    rng = np.random.default_rng(0)
    adapter = Adapter(alpha=1.0, rank=2, layers={name: (0.01 * rng.normal(size=(2, n_in)),
                                                        0.01 * rng.normal(size=(n_out, 2)))})

    def packet(version: int) -> bytes:
        return encode_packet(adapter, key=key, fleet="f1", slot="fleet", version=version,
                             base_sha256=bundle.base_sha256)

    assert pipeline.handle(packet(1)).record.verdict == "accepted"
    x = np.zeros((1, bundle.manifest.obs_dim), np.float32)
    live = runtime.act_batch(x)
    monkeypatch.setattr(os, "write", lambda fd, data: (_ for _ in ()).throw(
        OSError(errno.EROFS, "Read-only file system")))
    outcome = pipeline.handle(packet(2))
    assert outcome.record.verdict == "rejected"
    assert outcome.record.reasons[0].code == "state_write_failed"
    assert "read-only" in outcome.describe()
    assert pipeline.versions == (1, 0)
    np.testing.assert_array_equal(runtime.act_batch(x), live)


# -- today's logs stay readable: the slot byte is the slot kind's code ----------------------------
def _todays_record(kind: int, slot_byte: int, version: int, payload: bytes) -> bytes:
    """A record exactly as the journal wrote it before slot kinds became a table."""
    import struct
    import zlib
    crc = zlib.crc32(payload, zlib.crc32(struct.pack("<IBBQ", len(payload), kind, slot_byte,
                                                      version)))
    return struct.pack("<IIIBBQ", 0x314A4C50, len(payload), crc, kind, slot_byte,
                       version) + payload


def test_todays_log_bytes_load_unchanged(tmp_path: Path) -> None:
    log = (_todays_record(3, 0, 4, b"") + _todays_record(1, 0, 4, pkt("fleet", 4))
           + _todays_record(1, 1, 7, pkt("device", 7)) + _todays_record(2, 1, 7, b"")
           + _todays_record(3, 1, 9, b""))
    (tmp_path / "journal.log").write_bytes(log)
    r = Journal(tmp_path).load(verify)
    assert versions(r) == {"fleet": 4} and r.highest == {"fleet": 4, "device": 9}
    assert r.problems == ()


def test_records_encode_as_today(tmp_path: Path) -> None:
    assert rec.encode_record(rec.ACCEPT, "device", 7, b"xy") == _todays_record(1, 1, 7, b"xy")
    assert rec.encode_record(rec.FLOOR, "fleet", 3) == _todays_record(3, 0, 3, b"")


def test_unknown_slot_byte_is_damage(tmp_path: Path) -> None:
    good = _todays_record(1, 0, 1, pkt("fleet", 1))
    (tmp_path / "journal.log").write_bytes(good + _todays_record(1, 9, 2, b"zz"))
    r = Journal(tmp_path).load(verify)
    assert versions(r) == {"fleet": 1} and r.highest == {"fleet": 1, "device": 0}
    assert any("slot 9" in p for p in r.problems)
