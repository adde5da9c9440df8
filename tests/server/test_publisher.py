"""Publisher: priority, replacement, rate limit, versions across restarts, retained, acks."""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path

import pytest

from plasma.protocol import Adapter, AuditRecord, SigningKey, TrustStore, decode_packet, topics
from plasma.protocol.bus import BrokerConfig, MemoryBroker, MemoryBus, Message, MqttBus
from plasma.server.publisher import Publisher, PublisherConfig, judicial_topic
from plasma.server.store import TraceStore
from tests.helpers.adapters import random_adapter

BASE = "ab" * 32
KEY = SigningKey.generate()


def adapter(seed: int = 0) -> Adapter:
    return random_adapter({"l0": (3, 8)}, rank=4, seed=seed, alpha=4.0)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def publisher(store: TraceStore, bus=None, fleet: str = "f", interval: float = 30.0,  # type: ignore[no-untyped-def]
              clock=None) -> Publisher:
    bus = bus or MemoryBus(MemoryBroker())
    if not bus.connected:
        bus.connect()
    return Publisher(bus, store, KEY, PublisherConfig(fleet=fleet, base_sha256=BASE,
                                                      min_interval_s=interval, sync_timeout_s=0.3),
                     clock=clock or FakeClock())


def test_priority_order_and_replacement() -> None:
    pub = publisher(TraceStore())
    pub.submit(adapter(1), "device", "d1", priority=7)
    pub.submit(adapter(2), "device", "d2", priority=2)
    pub.submit(adapter(3), "fleet", priority=5)
    pub.submit(adapter(4), "device", "d1", priority=8)  # replaces the waiting d1 job
    sent = pub.publish_ready()
    assert [(p.target, p.priority) for p in sent] == [("d2", 2), ("f", 5), ("d1", 8)]
    assert [p.version for p in sent] == [1, 1, 1]
    assert pub.pending() == 0


def test_rate_limit_per_target() -> None:
    clock = FakeClock()
    pub = publisher(TraceStore(), clock=clock, interval=30.0)
    pub.submit(adapter(), "device", "d1")
    assert len(pub.publish_ready()) == 1
    pub.submit(adapter(1), "device", "d1")
    pub.submit(adapter(2), "device", "d2")
    assert [p.target for p in pub.publish_ready()] == ["d2"]  # d1 waits for its turn
    clock.now += 31
    assert [(p.target, p.version) for p in pub.publish_ready()] == [("d1", 2)]


def test_versions_survive_restart(tmp_path: Path) -> None:
    path = tmp_path / "plasma.db"
    with TraceStore(path) as store:
        pub = publisher(store, interval=0)
        for i in range(3):
            pub.submit(adapter(i), "fleet")
            pub.publish_ready()
        assert [p.version for p in pub.sent] == [1, 2, 3]
    with TraceStore(path) as store:  # a restarted server
        pub = publisher(store, interval=0)
        pub.submit(adapter(), "fleet")
        assert pub.publish_ready()[0].version == 4
        assert [r["version"] for r in store.publications("f")] == [1, 2, 3, 4]


def test_retained_packets_raise_the_floor_of_a_lost_store() -> None:
    broker = MemoryBroker()
    first = publisher(TraceStore(), bus=MemoryBus(broker), interval=0)
    for i in range(5):
        first.submit(adapter(i), "device", "d1")
        first.publish_ready()
    fresh = publisher(TraceStore(), bus=MemoryBus(broker), interval=0)  # the store file was lost
    fresh.sync_versions_from_broker()
    fresh.submit(adapter(), "device", "d1")
    assert fresh.publish_ready()[0].version == 6


def ack(fleet: str, device: str, version: int, verdict: str = "accepted") -> bytes:
    return AuditRecord(auditor="edge", subject="packet:x", fleet=fleet, device=device,
                       slot="device", version=version, verdict=verdict).model_dump_json().encode()


ACK_CASES = [
    ("accepted", topics.audit("f", "d1"), ack("f", "d1", 1), None),
    ("rolled back", topics.audit("f", "d1"), ack("f", "d1", 1, "rolled_back"), None),
    ("spoofed device", topics.audit("f", "d2"), ack("f", "d1", 1), "identity_mismatch"),
    ("not json", topics.audit("f", "d1"), b"{", "malformed"),
    ("huge", topics.audit("f", "d1"), b" " * 70_000, "too_large"),
    ("not a verdict of the edge", topics.audit("f", "d1"), ack("f", "d1", 1, "published"),
     "not_an_ack"),
]


@pytest.mark.parametrize("name,topic,payload,code", ACK_CASES, ids=[c[0] for c in ACK_CASES])
def test_ack_table(name: str, topic: str, payload: bytes, code: str | None) -> None:
    store = TraceStore()
    pub = publisher(store)
    assert pub.handle_ack(Message(topic, payload)) == code
    assert len(store.acks("f")) == (1 if code is None else 0)


@pytest.mark.broker
def test_retained_packet_and_acks_over_mosquitto(mosquitto, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    fleet = "pub" + uuid.uuid4().hex[:8]
    store = TraceStore(tmp_path / "s.db")
    server = MqttBus(BrokerConfig.from_url(mosquitto.url), clean=True)
    pub = publisher(store, bus=server, fleet=fleet, interval=0)
    pub.start()
    try:
        pub.submit(adapter(), "device", "d1", priority=1)
        pub.submit(adapter(), "fleet")
        deadline = time.monotonic() + 10
        while len(pub.sent) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(pub.sent) == 2
        # a device that connects later still gets the retained packets
        got: dict[str, bytes] = {}
        arrived = threading.Event()
        device = MqttBus(BrokerConfig.from_url(mosquitto.url), clean=True)
        device.connect()

        def on_packet(message: Message) -> None:
            got[message.topic] = message.payload
            if len(got) == 2:
                arrived.set()

        device.subscribe(topics.device_adapter(fleet, "d1"), on_packet)
        device.subscribe(topics.fleet_adapter(fleet), on_packet)
        assert arrived.wait(10)
        header = decode_packet(got[topics.device_adapter(fleet, "d1")],
                               TrustStore([KEY.public_key])).header
        assert (header.slot, header.device, header.version) == ("device", "d1", 1)
        device.publish(topics.audit(fleet, "d1"), ack(fleet, "d1", 1))
        deadline = time.monotonic() + 10
        while not store.acks(fleet) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert store.device_state(fleet, "d1", "device")["accepted_version"] == 1
        device.close()
    finally:
        pub.stop()
        server.close()
    # a restarted publisher against the same broker but a new store keeps counting upwards
    with TraceStore(tmp_path / "new.db") as fresh:
        bus = MqttBus(BrokerConfig.from_url(mosquitto.url), clean=True)
        pub2 = publisher(fresh, bus=bus, fleet=fleet, interval=0)
        try:
            assert pub2.sync_versions_from_broker() == 2
            pub2.submit(adapter(), "device", "d1")
            assert pub2.publish_ready()[0].version == 2
        finally:
            bus.close()
    store.close()


def test_judicial_records_are_stored_and_published() -> None:
    broker = MemoryBroker()
    store = TraceStore()
    pub = publisher(store, bus=MemoryBus(broker))
    seen: list[Message] = []
    watcher = MemoryBus(broker)
    watcher.connect()
    watcher.subscribe(judicial_topic("f"), seen.append)
    record = AuditRecord(auditor="judicial", subject="candidate:1", fleet="f", verdict="blocked")
    pub.publish_audit(record)
    assert store.audits("f") == [record]
    assert AuditRecord.model_validate_json(seen[0].payload) == record


def test_one_publisher_holds_the_lease_and_the_next_continues_its_versions(tmp_path: Path) -> None:
    """Two publishers of one fleet over one store file: only the lease holder publishes; when it
    stops (or its lease lapses) the other takes over and its versions continue upward."""
    broker = MemoryBroker()
    packets: list[int] = []
    watcher = MemoryBus(broker)
    watcher.connect()
    trust = TrustStore([KEY.public_key])
    watcher.subscribe(topics.device_adapter("f", "d1"),
                      lambda m: packets.append(decode_packet(m.payload, trust).header.version))

    def make(holder: str) -> Publisher:
        bus = MemoryBus(broker)
        bus.connect()
        return Publisher(bus, TraceStore(tmp_path / "shared.db"), KEY, PublisherConfig(
            fleet="f", base_sha256=BASE, min_interval_s=0, lease_holder=holder,
            lease_ttl_s=0.6))

    a, b = make("a"), make("b")
    a.start(sync_versions=False)
    b.start(sync_versions=False)
    try:
        assert a.is_leader and not b.is_leader
        for i in range(3):
            a.submit(adapter(i), "device", "d1")
            b.submit(adapter(i), "device", "d1")  # b's round waits: no lease
            time.sleep(0.05)
        assert _until(lambda: len(packets) >= 1) and not b.sent
        a.stop()  # a clean stop releases the lease: b takes it at its next renewal
        assert _until(lambda: b.is_leader and b.sent)
        assert [p.version for p in b.sent] == [max(p.version for p in a.sent) + 1]
        assert packets == sorted(packets) and len(set(packets)) == len(packets)
    finally:
        a.stop()
        b.stop()


def _until(pred, timeout: float = 5.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.02)
    return bool(pred())
