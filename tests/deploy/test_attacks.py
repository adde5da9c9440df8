"""docs/design.md section 5, attack by attack, against a running ``plasma-edge run``.

The broker is the SHIPPED Mosquitto config (TLS, passwords, ACL; tests/deploy/conftest.py). The
device is ``fa.d1``; the attacker holds the server identity (devices may not write adapter
topics at all: tests/deploy/test_broker_access.py), i.e. it can put any bytes on the device's
adapter topics, and for the "re-signed" cases it even holds the server key. For every attack
the daemon must reject with the exact reason code, publish that record on its audit topic (read
here with the read-only ``ops`` identity), keep acting (status ``steps`` increases) and keep its
adapters (active versions unchanged). One daemon serves the whole module: no case changes state.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from plasma.protocol import Adapter, SigningKey, topics
from plasma.protocol.bus import MqttBus
from plasma.protocol.packet import DEFAULT_MAX_PACKET_BYTES, PREFIX_LEN

pytestmark = [pytest.mark.broker, pytest.mark.slow]

FLEET, DEVICE = "fa", "d1"
BASE = 5  # versions of the adapters the device runs before the attacks
GOOD = 1000  # the good packet after the attacks


class Target:
    """The running daemon, the ops watcher and the server-identity publisher."""

    def __init__(self, kit: Any, watcher: Any, server: MqttBus, state: Path, log: Path) -> None:
        self.kit, self.w, self.server, self.state, self.log = kit, watcher, server, state, log
        self.live: dict[str, bytes] = {}

    def topic(self, kind: str) -> str:
        return topics.fleet_adapter(FLEET) if kind == "fleet" \
            else topics.device_adapter(FLEET, DEVICE)

    def send(self, kind: str, data: bytes, retain: bool = False) -> tuple[dict, dict]:
        """Publish on the fleet or device adapter topic; the audit record and a later status."""
        steps = self.w.latest()["steps"]
        start = len(self.w.audits)
        self.server.publish(self.topic(kind), data, qos=1, retain=retain)
        record = self.w.wait(self.w.next_audit(start))
        status = self.w.wait(self.w.status(lambda s: s["steps"] > steps))
        return record, status


@pytest.fixture(scope="module")
def target(plasma_broker: Any, edge_kit: Any, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[Target]:
    root = tmp_path_factory.mktemp("attacked")
    w = edge_kit.watcher(plasma_broker.config("ops"), FLEET, DEVICE)
    server = MqttBus(plasma_broker.config("plasma-server"), clean=True)
    server.connect()
    proc = edge_kit.start(plasma_broker.config("fa.d1"), FLEET, DEVICE, root / "state",
                          root / "daemon.log")
    t = Target(edge_kit, w, server, root / "state", root / "daemon.log")
    try:
        w.wait(w.status(lambda s: s["state"] == "online" and s["steps"] > 0), timeout=30)
        for kind in ("fleet", "device"):
            data = edge_kit.packet(FLEET, kind, BASE, device=DEVICE)
            record, _ = t.send(kind, data, retain=True)
            assert record["verdict"] == "accepted", record
            t.live[kind] = data
        w.wait(w.status(lambda s: (s["fleet_version"], s["device_version"]) == (BASE, BASE)))
        yield t
    finally:
        code = edge_kit.stop(proc)
        w.close()
        server.close()
        assert code == 0, t.log.read_text()[-3000:]


# -- the attacks: (id, topic, bytes builder, the exact reason code) ---------------------------
def _with_prefix(data: bytes, **fields: int) -> bytes:
    """Rewrite format/flags in the 48-byte prefix (the signature then no longer matters)."""
    fmt, flags = struct.unpack_from("<HH", data, 4)
    return data[:4] + struct.pack("<HH", fields.get("fmt", fmt), fields.get("flags", flags)) \
        + data[8:]


def _tamper_header(data: bytes) -> bytes:
    """One signed header byte changed (the version digit: still valid JSON)."""
    at = data.index(b'"version":') + len(b'"version":')
    return data[:at] + (b"9" if data[at:at + 1] != b"9" else b"8") + data[at + 1:]


def _flip_last(data: bytes) -> bytes:
    return data[:-1] + bytes([data[-1] ^ 0x01])


def _no_signature(data: bytes) -> bytes:
    header_len = struct.unpack_from("<I", data, 8)[0]
    sig_at = PREFIX_LEN + header_len
    count = data[sig_at]
    return data[:sig_at] + b"\x00" + data[sig_at + 1 + count * 80:]


def _bad_signature_bytes(data: bytes) -> bytes:
    header_len = struct.unpack_from("<I", data, 8)[0]
    at = PREFIX_LEN + header_len + 1 + 16 + 10  # inside the first signature
    return data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1:]


def _fp16_payload(kit: Any, value: float, version: int) -> bytes:
    """An fp16 packet whose factor bytes hold ``value``, re-signed with a matching digest."""
    good = kit.packet(FLEET, "device", version, device=DEVICE, dtype="fp16")
    n = sum(2 * (i + o) for i, o in zip([3, 32, 32], [32, 32, 1]))  # rank 2, per layer in+out
    bad = np.full(n, value, dtype="<f2")
    bad[1::2] = 0.01
    return kit.resign(good, payload=bad.tobytes())


def _int8_scales(kit: Any, scale: float, version: int) -> bytes:
    """An int8 packet whose row scales are all ``scale`` (the int8 rows stay), re-signed."""
    good = kit.packet(FLEET, "device", version, device=DEVICE)
    payload_len = struct.unpack_from("<I", good, 12)[0]
    payload = good[-payload_len:]
    n_scales = 2 * 2 * 3  # rank 2 x (A, B) x 3 layers
    scales = np.full(n_scales, scale, dtype="<f4").tobytes()
    return kit.resign(good, payload=scales + payload[len(scales):])


def _edit(kit: Any, version: int, change: Callable[[dict], None], kind: str = "device") -> bytes:
    return kit.resign(kit.packet(FLEET, kind, version, device=DEVICE), change)


def _set(**fields: Any) -> Callable[[dict], None]:
    return lambda header: header.update(fields)


def _wrong_shapes(kit: Any, version: int) -> bytes:
    adapter = Adapter(alpha=1.0, rank=1, layers={
        "l0": (np.ones((1, 5), np.float32) * 0.01, np.ones((32, 1), np.float32) * 0.01)})
    return kit.packet(FLEET, "device", version, device=DEVICE, adapter=adapter)


def _layer(kit: Any, version: int, name: str) -> bytes:
    adapter = Adapter(alpha=1.0, rank=1, layers={
        name: (np.ones((1, 3), np.float32) * 0.01, np.ones((32, 1), np.float32) * 0.01)})
    return kit.packet(FLEET, "device", version, device=DEVICE, adapter=adapter)


Builder = Callable[[Any, Target, int], bytes]
# v: a fresh version per case (a packet refused by the model audit burns its version)
CASES: list[tuple[str, str, Builder, str]] = [
    # arbitrary packet
    ("garbage", "device", lambda k, t, v: b"garbage bytes, not a Plasma packet", "bad_magic"),
    ("short_magic", "fleet", lambda k, t, v: b"PL", "truncated"),
    ("future_format", "device",
     lambda k, t, v: _with_prefix(k.packet(FLEET, "device", v, device=DEVICE), fmt=2),
     "unsupported_format"),
    ("truncated", "device", lambda k, t, v: k.packet(FLEET, "device", v, device=DEVICE)[:-1],
     "truncated"),
    ("trailing_bytes", "device",
     lambda k, t, v: k.packet(FLEET, "device", v, device=DEVICE) + b"\x00", "bad_length"),
    ("no_signature", "device",
     lambda k, t, v: _no_signature(k.packet(FLEET, "device", v, device=DEVICE)),
     "signature_missing"),
    ("unknown_key", "device",
     lambda k, t, v: k.packet(FLEET, "device", v, device=DEVICE, key=SigningKey.generate()),
     "unknown_key"),
    ("tampered_header", "fleet", lambda k, t, v: _tamper_header(k.packet(FLEET, "fleet", v)),
     "bad_signature"),
    ("corrupt_signature", "device",
     lambda k, t, v: _bad_signature_bytes(k.packet(FLEET, "device", v, device=DEVICE)),
     "bad_signature"),
    ("tampered_payload", "device",
     lambda k, t, v: _flip_last(k.packet(FLEET, "device", v, device=DEVICE)), "digest_mismatch"),
    ("duplicated_signature", "device",
     lambda k, t, v: k.resign(k.packet(FLEET, "device", v, device=DEVICE), signers=[k.key, k.key]),
     "signature_duplicate"),
    ("trusted_plus_unknown_but_names_unknown", "device",
     lambda k, t, v: _names_other_key(k, v), "bad_header"),
    # rollback and replay
    ("rollback_fleet", "fleet", lambda k, t, v: k.packet(FLEET, "fleet", BASE - 2), "rollback_version"),
    ("rollback_device", "device", lambda k, t, v: k.packet(FLEET, "device", 1, device=DEVICE),
     "rollback_version"),
    ("replay_new_bytes", "device", lambda k, t, v: k.packet(FLEET, "device", BASE, device=DEVICE),
     "replayed_version"),
    ("replay_fleet_new_bytes", "fleet", lambda k, t, v: k.packet(FLEET, "fleet", BASE),
     "replayed_version"),
    ("replay_live_bytes", "device", lambda k, t, v: t.live["device"], "already_active"),
    # freeze
    ("expired", "device",
     lambda k, t, v: k.packet(FLEET, "device", v, device=DEVICE, created_at=time.time() - 1000,
                           expires_in=500), "expired"),
    ("from_the_future", "fleet",
     lambda k, t, v: k.packet(FLEET, "fleet", v, created_at=time.time() + 3600), "not_yet_valid"),
    # mix-and-match
    ("wrong_base_model", "device",
     lambda k, t, v: k.packet(FLEET, "device", v, device=DEVICE, base_sha256="ab" * 32),
     "wrong_base_model"),
    ("wrong_fleet_on_fleet_topic", "fleet", lambda k, t, v: k.packet("fb", "fleet", v),
     "wrong_fleet"),
    ("wrong_fleet_same_device_id", "device",
     lambda k, t, v: k.packet("fb", "device", v, device=DEVICE), "wrong_fleet"),
    ("wrong_device", "device", lambda k, t, v: k.packet(FLEET, "device", v, device="d2"),
     "wrong_device"),
    ("wrong_device_on_fleet_topic", "fleet",
     lambda k, t, v: k.packet(FLEET, "device", v, device="d2"), "wrong_slot"),
    # endless data: above the daemon's cap, below the broker's 1 MiB max_packet_size
    ("over_the_cap", "device", lambda k, t, v: b"PLSM" + bytes(DEFAULT_MAX_PACKET_BYTES - 3),
     "too_large"),
    ("just_under_broker_limit", "fleet",
     lambda k, t, v: b"PLSM" + np.random.default_rng(0).bytes((1 << 20) - 2048), "too_large"),
    # malformed or hostile payloads
    ("nan_fp16_resigned", "device", lambda k, t, v: _fp16_payload(k, float("nan"), v), "non_finite"),
    ("inf_fp16_resigned", "device", lambda k, t, v: _fp16_payload(k, float("inf"), v), "non_finite"),
    ("nan_int8_scales_resigned", "device", lambda k, t, v: _int8_scales(k, float("nan"), v),
     "non_finite"),
    ("negative_int8_scales_resigned", "device", lambda k, t, v: _int8_scales(k, -1.0, v),
     "non_finite"),
    ("overflowing_int8_scales_resigned", "device", lambda k, t, v: _int8_scales(k, 1e36, v),
     "non_finite"),
    ("huge_norm", "device",
     lambda k, t, v: k.packet(FLEET, "device", v, device=DEVICE, adapter=k.adapter(v, scale=3.0)),
     "delta_too_large"),
    ("huge_but_finite_scales", "device", lambda k, t, v: _int8_scales(k, 1e3, v), "delta_too_large"),
    ("wrong_shape", "device", lambda k, t, v: _wrong_shapes(k, v), "shape_mismatch"),
    ("unknown_layer", "device", lambda k, t, v: _layer(k, v, "l9"), "unknown_layer"),
    ("rank_too_high", "device",
     lambda k, t, v: k.packet(FLEET, "device", v, device=DEVICE, adapter=k.adapter(v, rank=17)),
     "rank_too_high"),
    ("payload_shorter_than_layers_resigned", "device",
     lambda k, t, v: k.resign(k.packet(FLEET, "device", v, device=DEVICE), payload=b"\x00" * 10),
     "bad_payload"),
    ("header_not_a_packet_resigned", "device",
     lambda k, t, v: _edit(k, v, _set(rank=-1)), "bad_header"),
    ("header_unknown_field_resigned", "device",
     lambda k, t, v: _edit(k, v, _set(path="/etc/passwd")), "bad_header"),
    ("nan_alpha_resigned", "device",
     lambda k, t, v: k.resign(k.packet(FLEET, "device", v, device=DEVICE), _nan_alpha),
     "bad_header"),
    # path traversal: ids outside [A-Za-z0-9_-]{1,64} never get past decode
    ("device_dotdot", "device", lambda k, t, v: _edit(k, v, _set(device="../x")), "bad_header"),
    ("fleet_dotdot", "fleet", lambda k, t, v: _edit(k, v, _set(fleet="../../etc"), "fleet"),
     "bad_header"),
    ("device_slash", "device", lambda k, t, v: _edit(k, v, _set(device="d1/../../x")),
     "bad_header"),
    ("device_too_long", "device", lambda k, t, v: _edit(k, v, _set(device="d" * 65)), "bad_header"),
    ("packet_id_dotdot", "device", lambda k, t, v: _edit(k, v, _set(packet_id="../../x" + "0" * 25)),
     "bad_header"),
    ("layer_name_path", "device", lambda k, t, v: _layer(k, v, "../../journal.log"),
     "unknown_layer"),
]


def _names_other_key(kit: Any, version: int) -> bytes:
    """Signed by the trusted key, but the header claims another key id."""
    other = SigningKey.generate()
    return kit.resign(kit.packet(FLEET, "device", version, device=DEVICE),
                      _set(key_id=other.key_id))


def _nan_alpha(header: dict) -> None:
    header["alpha"] = float("nan")  # json.dumps writes NaN: not JSON, pydantic refuses it


@pytest.mark.parametrize("version, kind, build, code",
                         [(100 + i, *c[1:]) for i, c in enumerate(CASES)],
                         ids=[c[0] for c in CASES])
def test_attack_is_rejected_reported_and_harmless(target: Target, edge_kit: Any, version: int,
                                                  kind: str, build: Builder, code: str) -> None:
    record, status = target.send(kind, build(edge_kit, target, version))
    assert record["verdict"] == "rejected", record
    assert record["reasons"][0]["code"] == code, record
    assert (record["fleet"], record["device"], record["auditor"]) == (FLEET, DEVICE, "edge")
    assert status["state"] == "online"  # still acting: steps went up after the record
    assert (status["fleet_version"], status["device_version"]) == (BASE, BASE), status


def test_no_file_outside_the_fixed_state_layout(target: Target) -> None:
    """After every path-traversal attempt the state dir holds the journal and nothing else."""
    names = {p.name for p in target.state.iterdir()}
    assert names <= {"journal.log", "quarantine"}, names
    if "quarantine" in names:
        assert list((target.state / "quarantine").iterdir()) == []
    assert not (target.state.parent / "x").exists() and not (target.state / "x").exists()


def test_device_still_takes_a_good_packet_after_the_attacks(target: Target,
                                                            edge_kit: Any) -> None:
    # above every version the attacks burnt (a packet the model audit refuses burns its version)
    record, _ = target.send("device", edge_kit.packet(FLEET, "device", GOOD, device=DEVICE))
    assert record["verdict"] == "accepted", record
    status = target.w.wait(target.w.status(lambda s: s["device_version"] == GOOD))
    assert status["fleet_version"] == BASE
    assert "Traceback" not in target.log.read_text()  # nothing crashed inside the daemon


# A device-slot packet on the fleet topic: judged for the topic it came on.
def test_device_packet_on_the_fleet_topic_is_wrong_slot(target: Target, edge_kit: Any) -> None:
    record, status = target.send("fleet", edge_kit.packet(FLEET, "device", GOOD + 1,
                                                          device=DEVICE))
    assert record["verdict"] == "rejected" and record["reasons"][0]["code"] == "wrong_slot", \
        record
    assert status["device_version"] == GOOD
