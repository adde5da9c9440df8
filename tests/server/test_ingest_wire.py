"""Ingest: reason codes as a table (memory bus), then good frames through a hostile flood."""

from __future__ import annotations

import struct
import time
import uuid

import numpy as np
import pytest

from plasma.protocol import TraceBatch, encode_traces, topics
from plasma.protocol.bus import BrokerConfig, MemoryBroker, MemoryBus, Message, MqttBus
from plasma.server.ingest import Ingest, IngestConfig
from plasma.server.store import TraceStore


def batch(fleet: str, device: str, n: int = 16, seq: int = 0, obs_dim: int = 3,
          t0: float | None = None) -> TraceBatch:
    rng = np.random.default_rng(seq)
    t0 = time.time() if t0 is None else t0
    return TraceBatch(
        fleet=fleet, device=device, episode=np.zeros(n, np.uint32),
        step=np.arange(n, dtype=np.uint32),
        obs=rng.standard_normal((n, obs_dim)).astype(np.float32),
        action=rng.standard_normal((n, 1)).astype(np.float32),
        reward=rng.standard_normal(n).astype(np.float32),
        next_obs=rng.standard_normal((n, obs_dim)).astype(np.float32),
        terminated=np.zeros(n, bool), truncated=np.zeros(n, bool),
        versions={"fleet": np.zeros(n, np.uint32), "device": np.zeros(n, np.uint32)},
        timestamp=t0 + 0.05 * np.arange(n), seq=seq)


def frame(fleet: str = "f", device: str = "d1", **kw: object) -> bytes:
    return encode_traces(batch(fleet, device, **kw))  # type: ignore[arg-type]


def non_finite_frame() -> bytes:
    data = bytearray(frame())
    header_len = struct.unpack_from("<I", data, 8)[0]
    obs_at = 16 + header_len + 16 * 4 * 2  # after episode and step columns
    struct.pack_into("<f", data, obs_at, float("nan"))
    return bytes(data)


TELEMETRY = topics.telemetry("f", "d1")
CASES = [
    ("good", TELEMETRY, frame(), None),
    ("garbage", TELEMETRY, b"\x00" * 40, "bad_magic"),
    ("short", TELEMETRY, b"PLST", "truncated"),
    ("truncated body", TELEMETRY, frame()[:-3], "bad_length"),
    ("nan", TELEMETRY, non_finite_frame(), "non_finite"),
    ("another device's rows", TELEMETRY, frame(device="d2"), "identity_mismatch"),
    ("another fleet's rows", TELEMETRY, frame(fleet="g"), "identity_mismatch"),
    ("not telemetry", topics.status("f", "d1"), frame(), "bad_topic"),
    ("not plasma", "x/y", frame(), "bad_topic"),
    ("wrong dims", TELEMETRY, frame(obs_dim=4), "wrong_dims"),
    ("future", TELEMETRY, frame(t0=time.time() + 10 * 86400), "future_timestamp"),
    ("too large", TELEMETRY, frame(n=5000), "too_large"),
]


@pytest.mark.parametrize("name,topic,payload,code", CASES, ids=[c[0] for c in CASES])
def test_reason_codes(name: str, topic: str, payload: bytes, code: str | None) -> None:
    store = TraceStore()
    ingest = Ingest(MemoryBus(MemoryBroker()), store,
                    IngestConfig(fleet="f", dims=(3, 1), max_frame_bytes=100_000))
    assert ingest.handle(Message(topic, payload)) == code
    assert (store.count_rows("f") > 0) == (code is None)
    if code is not None:
        assert ingest.refused[code] == 1


def test_duplicate_frame_is_counted_not_stored_twice() -> None:
    store = TraceStore()
    ingest = Ingest(MemoryBus(MemoryBroker()), store, IngestConfig(fleet="f"))
    data = frame(seq=7)
    assert ingest.handle(Message(TELEMETRY, data)) is None
    assert ingest.handle(Message(TELEMETRY, data)) is None
    assert (ingest.frames, ingest.duplicates, store.count_rows("f")) == (1, 1, 16)


def _wait(pred, timeout: float = 15.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.02)
    return pred()


@pytest.mark.broker
def test_good_frames_flow_through_a_hostile_flood(mosquitto, tmp_path) -> None:  # type: ignore[no-untyped-def]
    fleet = "ingest" + uuid.uuid4().hex[:8]
    store = TraceStore(tmp_path / "s.db")
    server = MqttBus(BrokerConfig.from_url(mosquitto.url), clean=True)
    server.connect()
    ingest = Ingest(server, store, IngestConfig(fleet=fleet, dims=(3, 1)))
    ingest.start()
    assert ingest.topic_filter.startswith("$share/plasma-ingest/")  # Mosquitto speaks MQTT 5
    device = MqttBus(BrokerConfig.from_url(mosquitto.url), clean=True)
    device.connect()
    time.sleep(0.2)  # the subscription is in place
    try:
        good, bad = 40, 2000
        for i in range(bad):
            t = topics.telemetry(fleet, f"d{i % 3}")
            payload = b"\xff" * (i % 64) if i % 2 else frame(fleet, "intruder", seq=i)
            device.publish(t, payload, qos=0)
            if i % (bad // good) == 0:
                device.publish(topics.telemetry(fleet, "d1"), frame(fleet, "d1", seq=i), qos=1)
        assert _wait(lambda: store.count_rows(fleet, "d1") == good * 16)
        assert _wait(lambda: sum(ingest.refused.values()) >= 0.9 * bad)
        refused = ingest.refused
        assert refused["identity_mismatch"] > 0 and refused.get("queue_full", 0) == 0
        assert refused["bad_magic"] + refused["truncated"] > 0
        assert store.devices(fleet) == ["d1"]
    finally:
        device.close()
        ingest.stop()
        server.close()
        store.close()


@pytest.mark.broker
@pytest.mark.slow
def test_two_servers_split_telemetry_through_a_shared_subscription(mosquitto, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Two ``plasma-server run`` servers (nodes a and b) in one ingest group, one shared store
    file: each frame is stored once, by one of them, and none is lost; one of them publishes."""
    from plasma.protocol import SigningKey
    from plasma.server.run import Server
    from plasma.server.service_config import load_service_config
    from tests.helpers.bundles import PENDULUM_SMALL, bundle_path

    fleet, group = "share" + uuid.uuid4().hex[:8], "g" + uuid.uuid4().hex[:6]
    SigningKey.generate().save(tmp_path / "keys")
    servers = [Server(load_service_config({
        "broker": mosquitto.url, "fleet": fleet, "key": str(tmp_path / "keys"),
        "model": str(bundle_path(PENDULUM_SMALL)), "store": str(tmp_path / "shared.sqlite"),
        "env": "Pendulum-v1", "min_new_transitions": 10**9, "ingest_group": group,
        "node": node}, environ={})) for node in ("a", "b")]
    device = MqttBus(BrokerConfig.from_url(mosquitto.url), clean=True)
    try:
        for server in servers:
            server.start()
        assert all(s.ingest.topic_filter.startswith(f"$share/{group}/") for s in servers)
        device.connect()
        time.sleep(0.3)  # both subscriptions are in place
        n_devices, n_frames = 10, 30
        for seq in range(n_frames):
            for d in range(n_devices):
                device.publish(topics.telemetry(fleet, f"d{d}"), frame(fleet, f"d{d}", seq=seq),
                               qos=1)
        total = n_devices * n_frames
        store = servers[0].store
        assert _wait(lambda: store.count_rows(fleet) == total * 16, timeout=20)
        assert all(s.ingest.drain() for s in servers)
        shares = [s.ingest.stats() for s in servers]
        assert [s["frames"] for s in shares] != [total, 0] and all(s["frames"] for s in shares)
        assert sum(s["frames"] for s in shares) == total  # disjoint: nobody stored a frame twice
        assert all(s["duplicates"] == 0 and not s["refused"] for s in shares)
        assert len(store.devices(fleet)) == n_devices
        assert sorted(s.publisher.is_leader for s in servers) == [False, True]
    finally:
        device.close()
        for server in servers:
            server.stop()
