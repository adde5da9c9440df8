"""Edge stage 9a: the state directory survives crashes, damage and full disks."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import numpy as np
import pytest

from plasma.edge.audit import AuditContext
from plasma.edge.bundle import Bundle
from plasma.edge.canary import Canary
from plasma.edge.journal import Journal, JournalError
from plasma.edge.merge import MergeEngine
from plasma.edge.pipeline import AdapterPipeline
from plasma.edge.policy import PolicyRuntime
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
    assert names == ["device.pkt", "fleet.pkt", "fleet.prev.pkt", "quarantine", "versions.json"]


@pytest.mark.parametrize("damage", [
    lambda b: b[: len(b) // 2],  # truncated by a crash or a bad sector
    lambda b: b[:-1] + bytes([b[-1] ^ 1]),  # one flipped payload bit: digest mismatch
    lambda b: b"",  # empty
    lambda b: b"\x00" * 5_000_000,  # huge garbage
])
def test_damaged_current_falls_back_to_previous(tmp_path: Path, damage) -> None:
    j = Journal(tmp_path)
    j.commit("fleet", pkt("fleet", 1), 1)
    j.commit("fleet", pkt("fleet", 2), 2)
    path = tmp_path / "fleet.pkt"
    path.write_bytes(damage(path.read_bytes()))
    r = Journal(tmp_path).load(verify)
    assert versions(r) == {"fleet": 1}
    assert r.highest["fleet"] == 2  # versions never go backwards
    assert any("fleet.pkt" in p for p in r.problems)
    assert list((tmp_path / "quarantine").iterdir())


def test_both_damaged_runs_base_but_keeps_versions(tmp_path: Path) -> None:
    j = Journal(tmp_path)
    j.commit("device", pkt("device", 1), 1)
    j.commit("device", pkt("device", 2), 2)
    for name in ("device.pkt", "device.prev.pkt"):
        (tmp_path / name).write_bytes(b"PLSM broken")
    r = Journal(tmp_path).load(verify)
    assert r.packets == {} and r.highest["device"] == 2


@pytest.mark.parametrize("text", ["{not json", '{"fleet": -1}', '{"fleet": "3"}', "[]", ""])
def test_damaged_versions_file_is_rebuilt_from_packets(tmp_path: Path, text: str) -> None:
    j = Journal(tmp_path)
    j.commit("fleet", pkt("fleet", 4), 4)
    (tmp_path / "versions.json").write_text(text)
    r = Journal(tmp_path).load(verify)
    assert r.highest["fleet"] == 4 and versions(r) == {"fleet": 4}
    assert any("versions.json" in p for p in r.problems)


def test_crash_between_packet_and_versions_write(tmp_path: Path) -> None:
    j = Journal(tmp_path)
    j.commit("fleet", pkt("fleet", 1), 1)
    j.commit("fleet", pkt("fleet", 2), 2)
    (tmp_path / "versions.json").write_text(json.dumps({"fleet": 1, "device": 0}))
    r = Journal(tmp_path).load(verify)
    assert r.highest["fleet"] == 2 and versions(r) == {"fleet": 2}


def test_crash_after_rotation_before_install(tmp_path: Path) -> None:
    j = Journal(tmp_path)
    j.commit("fleet", pkt("fleet", 1), 1)
    os.replace(tmp_path / "fleet.pkt", tmp_path / "fleet.prev.pkt")  # the new file never landed
    (tmp_path / "fleet.pkt.new").write_bytes(b"half")
    assert versions(Journal(tmp_path).load(verify)) == {"fleet": 1}


def test_mark_bad_restores_previous_and_keeps_highest(tmp_path: Path) -> None:
    j = Journal(tmp_path)
    j.commit("device", pkt("device", 1), 1)
    j.commit("device", pkt("device", 2), 2)
    j.mark_bad("device", 2)
    r = Journal(tmp_path).load(verify)
    assert versions(r) == {"device": 1} and r.highest["device"] == 2
    (tmp_path / "versions.json").unlink()  # even without it, the quarantined v2 still counts
    assert Journal(tmp_path).load(verify).highest["device"] == 2


def test_wrong_slot_file_is_quarantined(tmp_path: Path) -> None:
    (tmp_path / "fleet.pkt").write_bytes(pkt("device", 3))
    r = Journal(tmp_path).load(verify)
    assert r.packets == {} and r.problems


def test_disk_full_is_a_typed_error_and_leaves_state(tmp_path: Path, monkeypatch) -> None:
    j = Journal(tmp_path)
    j.commit("fleet", pkt("fleet", 1), 1)

    def full(fd: int, data: bytes) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(JournalError) as info:
        j.commit("fleet", pkt("fleet", 2), 2)
    assert info.value.code == "state_write_failed" and "disk full" in str(info.value)
    monkeypatch.undo()
    assert j.highest()["fleet"] == 1
    assert versions(Journal(tmp_path).load(verify)) == {"fleet": 1}
    assert not list(tmp_path.glob("*.tmp"))


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
