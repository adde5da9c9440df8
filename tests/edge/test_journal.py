"""Edge stage 9a: the state directory survives crashes, damage and full disks."""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
from plasma.edge import journal as jmod
from plasma.edge.audit import AuditContext
from plasma.protocol.bundle import Bundle
from plasma.edge.canary import Canary
from plasma.edge.journal import Journal, JournalError, bench_commit
from plasma.edge.merge import MergeEngine
from plasma.edge.pipeline import AdapterPipeline
from plasma.edge.runtime import PolicyRuntime
from plasma.protocol import (
    Adapter,
    DecodedPacket,
    PacketError,
    SigningKey,
    TrustStore,
    decode_packet,
    encode_packet,
)

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
    records, damage = jmod._scan((root / "journal.log").read_bytes())
    assert damage == []
    return [(r.offset - jmod._HEAD.size, r.end) for r in records]


def rewrite_payload(root: Path, index: int, damage) -> None:
    """Damage the packet bytes of record ``index`` but keep a valid crc: stored bytes that no
    longer verify (what a damaged fleet.pkt was in the old layout)."""
    path = root / "journal.log"
    buf = path.read_bytes()
    start, end = spans(root)[index]
    _, _, _, kind, slot, version = jmod._HEAD.unpack_from(buf, start)
    payload = damage(buf[start + jmod._HEAD.size:end])
    path.write_bytes(buf[:start] + jmod._record(kind, jmod.SLOTS[slot], version, payload)
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
    kinds = [jmod._HEAD.unpack_from((tmp_path / "journal.log").read_bytes(), s)[3]
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


# -- the old layout (versions.json, SLOT.pkt, SLOT.prev.pkt) is imported once ------------------
def old_layout(root: Path, files: dict[str, bytes]) -> Path:
    (root / "quarantine").mkdir(parents=True)
    for name, data in files.items():
        (root / name).write_bytes(data)
    return root


def test_old_layout_is_imported_once(tmp_path: Path) -> None:
    root = old_layout(tmp_path, {
        "versions.json": b'{"fleet": 2, "device": 5}', "fleet.prev.pkt": pkt("fleet", 1),
        "fleet.pkt": pkt("fleet", 2), "device.pkt": pkt("device", 5),
        "quarantine/device.rolled_back.v9": pkt("device", 9)})
    with pytest.raises(JournalError):  # appending before the import would lose it
        Journal(root).commit("fleet", pkt("fleet", 3), 3)
    r = Journal(root).load(verify)
    assert versions(r) == {"fleet": 2, "device": 5} and r.highest == {"fleet": 2, "device": 9}
    assert sorted(p.name for p in root.iterdir()) == ["journal.log", "quarantine"]
    assert len(list((root / "quarantine").glob("*.migrated.*"))) == 4
    # FLOOR fleet, fleet v1, fleet v2, FLOOR device, device v5: v1 was imported as the fallback
    rewrite_payload(root, 2, lambda b: b"")
    again = Journal(root).load(verify)
    assert versions(again) == {"fleet": 1, "device": 5} and again.highest["device"] == 9


@pytest.mark.parametrize("text", ["{not json", '{"fleet": -1}', '{"fleet": "3"}', "[]", ""])
def test_old_damaged_versions_file_is_rebuilt_from_packets(tmp_path: Path, text: str) -> None:
    root = old_layout(tmp_path, {"versions.json": text.encode(), "fleet.pkt": pkt("fleet", 4)})
    r = Journal(root).load(verify)
    assert r.highest["fleet"] == 4 and versions(r) == {"fleet": 4}
    assert any("versions.json" in p for p in r.problems)


def test_old_crash_between_packet_and_versions_write(tmp_path: Path) -> None:
    root = old_layout(tmp_path, {"versions.json": json.dumps({"fleet": 1, "device": 0}).encode(),
                                 "fleet.prev.pkt": pkt("fleet", 1), "fleet.pkt": pkt("fleet", 2)})
    r = Journal(root).load(verify)
    assert r.highest["fleet"] == 2 and versions(r) == {"fleet": 2}


def test_old_crash_after_rotation_before_install(tmp_path: Path) -> None:
    root = old_layout(tmp_path, {"fleet.prev.pkt": pkt("fleet", 1), "fleet.pkt.new": b"half"})
    assert versions(Journal(root).load(verify)) == {"fleet": 1}


def test_old_wrong_slot_file_is_not_imported(tmp_path: Path) -> None:
    root = old_layout(tmp_path, {"fleet.pkt": pkt("device", 3)})
    r = Journal(root).load(verify)
    assert r.packets == {} and r.problems


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
