"""Faults around real ``plasma-edge run`` daemons and a real Mosquitto (tracker issue 7, item 4).

(a) the broker restarts while packets are in flight, then the server restarts (same store, then a
    lost store); (b) a device offline during several publishes, with and without a broker restart
    in between; (c) ``kill -9`` of the daemon during merges, ten times in a row; (d) a full state
    filesystem (a tiny tmpfs: needs root's mount; root ignores chmod, so a read-only dir cannot be
    simulated honestly). A flood of malformed telemetry is covered by
    tests/server/test_ingest_wire.py::test_good_frames_flow_through_a_hostile_flood.

What the product does on a broker restart (checked in (a)): the server's ``Publisher`` does not
re-publish anything itself; a publish made while the broker is away is queued by paho
(``max_queued_messages_set(0)``) and sent on paho's reconnect. Packets published BEFORE the restart
live on only if the broker persists retained messages: the test fixture runs ``persistence
false`` (they vanish), the SHIPPED config ``persistence true`` (they survive a clean restart:
tests/deploy/test_broker_access.py::test_retained_adapters_survive_a_broker_restart, and (b) here).
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from plasma.edge.journal import Journal
from plasma.protocol import TrustStore, decode_packet, topics
from plasma.protocol.bus import BrokerConfig, MqttBus
from plasma.server.publisher import Publisher, PublisherConfig
from plasma.server.store import TraceStore

pytestmark = [pytest.mark.broker, pytest.mark.slow]
DEVICE = "d1"


class Device:
    """One daemon slot: start/kill/stop a ``plasma-edge run`` on a state dir, and its watcher."""

    def __init__(self, kit: Any, url: str, fleet: str, root: Path) -> None:
        self.kit, self.fleet, self.root = kit, fleet, root
        self.config = BrokerConfig.from_url(url)
        self.state, self.log = root / "state", root / "daemon.log"
        self.w = kit.watcher(self.config, fleet, DEVICE)
        self.proc: subprocess.Popen | None = None
        self.server: MqttBus | None = None

    def start(self) -> dict:
        """Start and wait for the first online status of THIS process."""
        with self.w.cond:
            self.w.statuses.clear()
        self.proc = self.kit.start(self.config, self.fleet, DEVICE, self.state, self.log)
        return self.w.wait(self.w.status(lambda s: s["state"] == "online"), timeout=30)

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self.w.wait(self.w.status(lambda s: s["state"] == "offline"))  # the will

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            assert self.kit.stop(self.proc) == 0, self.log.read_text()[-3000:]

    def publish(self, slot: str, data: bytes, retain: bool = True, settle: float = 0.05) -> None:
        """From one long-lived connection; ``settle`` leaves time for the PUBACK."""
        topic = topics.fleet_adapter(self.fleet) if slot == "fleet" \
            else topics.device_adapter(self.fleet, DEVICE)
        if self.server is None:
            self.server = MqttBus(self.config, clean=True)
            self.server.connect()
        self.server.publish(topic, data, qos=1, retain=retain)
        time.sleep(settle)

    def accepted(self) -> list[int]:
        with self.w.cond:
            return [a["version"] for a in self.w.audits if a["verdict"] == "accepted"]

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self.w.close()
        if self.server is not None:
            self.server.close()


@pytest.fixture
def device_factory(edge_kit: Any, tmp_path: Path) -> Iterator[Any]:
    made: list[Device] = []

    def make(url: str, fleet: str) -> Device:
        d = Device(edge_kit, url, fleet, tmp_path / f"dev{len(made)}")
        d.root.mkdir()
        made.append(d)
        return d

    yield make
    for d in made:
        d.close()


def _publisher(kit: Any, url: str, fleet: str, db: Path) -> tuple[Publisher, MqttBus, TraceStore]:
    bus = MqttBus(BrokerConfig.from_url(url), clean=True)
    bus.connect()
    store = TraceStore(db)
    pub = Publisher(bus, store, kit.key, PublisherConfig(
        fleet=fleet, base_sha256=kit.base_sha256, min_interval_s=0.0, sync_timeout_s=0.5))
    pub.start()
    return pub, bus, store


def _wait(pred: Any, timeout: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out: {what}"
        time.sleep(0.02)


# -- (a) + (e) ------------------------------------------------------------------------------------
def test_broker_restart_mid_publish_then_server_restart(fresh_mosquitto: Any, edge_kit: Any,
                                                        device_factory: Any, tmp_path: Path
                                                        ) -> None:
    fleet = "frestart"
    dev = device_factory(fresh_mosquitto.url, fleet)
    dev.start()
    pub, bus, store = _publisher(edge_kit, fresh_mosquitto.url, fleet, tmp_path / "server.db")
    try:
        for i in range(1, 4):
            pub.submit(edge_kit.adapter(i), "device", DEVICE)
            _wait(lambda n=i: len(pub.sent) == n, what=f"publication {i}")
        dev.w.wait(dev.w.status(lambda s: s["device_version"] == 3))
        fresh_mosquitto.stop()  # v4..v6 are published into paho's queue while it is away
        for i in range(4, 7):
            pub.submit(edge_kit.adapter(i), "device", DEVICE)
            _wait(lambda n=i: len(pub.sent) == n, what=f"publication {i} (broker down)")
        time.sleep(0.5)
        fresh_mosquitto.start()
        status = dev.w.wait(dev.w.status(lambda s: s["device_version"] == 6), timeout=45)
        assert status["state"] == "online"
        assert [p.version for p in pub.sent] == [1, 2, 3, 4, 5, 6]
    finally:
        pub.stop()
        bus.close()
        store.close()
    accepted = dev.accepted()
    assert accepted == sorted(set(accepted)) and accepted[-1] == 6, accepted  # never backwards

    # (e) the server restarts on the same store: the next version is 7 and the device takes it
    pub, bus, store = _publisher(edge_kit, fresh_mosquitto.url, fleet, tmp_path / "server.db")
    try:
        pub.submit(edge_kit.adapter(7), "device", DEVICE)
        _wait(lambda: len(pub.sent) == 1)
        assert pub.sent[0].version == 7
        dev.w.wait(dev.w.status(lambda s: s["device_version"] == 7))
    finally:
        pub.stop()
        bus.close()
        store.close()
    # ... and on a LOST store: the floor comes from the retained packet, the device takes v8
    pub, bus, store = _publisher(edge_kit, fresh_mosquitto.url, fleet, tmp_path / "lost.db")
    try:
        pub.submit(edge_kit.adapter(8), "device", DEVICE)
        _wait(lambda: len(pub.sent) == 1)
        assert pub.sent[0].version == 8
        dev.w.wait(dev.w.status(lambda s: s["device_version"] == 8))
    finally:
        pub.stop()
        bus.close()
        store.close()
    assert [a for a in dev.w.audits if a["verdict"] != "accepted"
            and a["reasons"][0]["code"] != "already_active"] == []
    dev.stop()


# -- (b) ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("broker_restart", [False, True], ids=["plain", "broker_restart_persisted"])
def test_offline_device_converges_to_the_latest(fresh_mosquitto: Any, edge_kit: Any,
                                                device_factory: Any, tmp_path: Path,
                                                broker_restart: bool) -> None:
    if broker_restart:  # as shipped: retained messages and sessions persisted on a clean stop
        fresh_mosquitto.stop()
        conf = fresh_mosquitto.config
        (tmp_path / "db").mkdir()
        conf.write_text(conf.read_text().replace(
            "persistence false", f"persistence true\npersistence_location {tmp_path / 'db'}/\n"
            + ("user root" if os.geteuid() == 0 else "")))  # else it drops to `mosquitto`
        fresh_mosquitto.start()
    fleet = "foffline"
    dev = device_factory(fresh_mosquitto.url, fleet)
    dev.start()
    dev.publish("device", edge_kit.packet(fleet, "device", 1, device=DEVICE))
    dev.w.wait(dev.w.status(lambda s: s["device_version"] == 1))
    dev.stop()
    for version in (2, 3, 4):
        dev.publish("device", edge_kit.packet(fleet, "device", version, device=DEVICE))
    dev.publish("fleet", edge_kit.packet(fleet, "fleet", 9))
    if broker_restart:
        fresh_mosquitto.stop()  # SIGTERM: Mosquitto writes its persistence file
        fresh_mosquitto.start()
        _wait(lambda: dev.w.bus.connected, 20, "the watcher reconnects (paho backoff)")
    status = dev.start()
    if (status["fleet_version"], status["device_version"]) != (9, 4):
        status = dev.w.wait(dev.w.status(lambda s: (s["fleet_version"], s["device_version"])
                                         == (9, 4)), timeout=30)
    accepted = [a["version"] for a in dev.w.audits
                if a["verdict"] == "accepted" and a["slot"] == "device"]
    assert accepted == sorted(set(accepted)) and accepted[-1] == 4, accepted
    dev.stop()


# -- (c) ------------------------------------------------------------------------------------------
BAD = {3, 6, 9}  # huge-norm packets: refused by the model audit AFTER journal.begin


def _journal_says(kit: Any, state: Path, scratch: Path) -> tuple[int, int]:
    """(device version a restart must run, highest device version) from a COPY of the journal,
    re-verified like the daemon does (our oracle knows which versions the model audit refuses)."""
    shutil.rmtree(scratch, ignore_errors=True)
    if not state.exists():
        return 0, 0
    shutil.copytree(state, scratch)
    trust = TrustStore.from_dir(kit.trust)

    def verify(data: bytes) -> Any:
        packet = decode_packet(data, trust)
        return "refused by the model audit" if packet.header.version in BAD else packet

    restored = Journal(scratch).load(verify)
    live = restored.packets.get("device")
    return (live.header.version if live else 0), restored.highest.get("device", 0)


def test_kill9_during_merges_never_goes_backwards(mosquitto: Any, edge_kit: Any,
                                                  device_factory: Any, tmp_path: Path) -> None:
    fleet, rng = "fkill9", random.Random(7)
    dev = device_factory(mosquitto.url, fleet)
    seen_live: list[int] = []
    expected, highest = 0, 0
    status = dev.start()
    for version in range(1, 11):
        adapter = edge_kit.adapter(version, scale=3.0 if version in BAD else 0.02)
        dev.publish("device", edge_kit.packet(fleet, "device", version, device=DEVICE,
                                              adapter=adapter), settle=0.0)
        time.sleep(rng.uniform(0.0, 0.012))  # an accept takes ~4-8 ms here: kill inside it
        seen_live += [s["device_version"] for s in list(dev.w.statuses) if s["state"] == "online"]
        dev.kill9()
        now_expected, now_highest = _journal_says(edge_kit, dev.state, tmp_path / "copy")
        assert now_expected >= expected and now_highest >= highest  # versions never go back
        assert now_expected not in BAD
        expected, highest = now_expected, now_highest
        # a restart runs what the journal accepted, or this cycle's retained packet (re-delivered
        # and accepted after the restart): never a refused version, never an older one
        status = dev.start()
        assert status["device_version"] in (expected, version) and \
            status["device_version"] not in BAD, (version, status, expected)
    # the last retained packet (v10, good) ends up live; nothing refused was ever live
    dev.w.wait(dev.w.status(lambda s: s["state"] == "online" and s["device_version"] == 10))
    seen_live += [s["device_version"] for s in list(dev.w.statuses) if s["state"] == "online"]
    assert not BAD & set(seen_live) and seen_live == sorted(seen_live), seen_live
    assert "Traceback" not in dev.log.read_text()
    dev.stop()


# -- (d) ------------------------------------------------------------------------------------------
@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs (root only: `mount`); the honest way to get ENOSPC as root."""
    point = tmp_path / "tiny"
    point.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(point)]
    if os.geteuid() != 0 or subprocess.run(mount, capture_output=True, check=False).returncode:
        pytest.skip("needs root and mount(8) for a tiny tmpfs; tests/edge/test_journal.py "
                    "covers ENOSPC/EROFS with injected OSErrors")
    try:
        yield point
    finally:
        subprocess.run(["umount", "-l", str(point)], capture_output=True, check=False)


def test_full_state_filesystem_rejects_and_keeps_running(mosquitto: Any, edge_kit: Any,
                                                         device_factory: Any,
                                                         tiny_fs: Path) -> None:
    fleet = "ffull"
    dev = device_factory(mosquitto.url, fleet)
    dev.state = tiny_fs / "state"
    dev.start()
    dev.publish("device", edge_kit.packet(fleet, "device", 1, device=DEVICE), retain=False)
    dev.w.wait(dev.w.status(lambda s: s["device_version"] == 1))
    filler = tiny_fs / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:  # fill every free block
        while os.write(fd, b"\0" * 4096):
            pass
    except OSError:
        pass
    finally:
        os.close(fd)
    steps = dev.w.latest()["steps"]
    start = len(dev.w.audits)
    big = edge_kit.adapter(2, rank=16)  # fp32: 8 KiB of factors, needs new blocks
    dev.publish("device", edge_kit.packet(fleet, "device", 2, device=DEVICE, adapter=big,
                                          dtype="fp32"), retain=False)
    record = dev.w.wait(dev.w.next_audit(start))
    assert record["verdict"] == "rejected" and \
        record["reasons"][0]["code"] == "state_write_failed", record
    status = dev.w.wait(dev.w.status(lambda s: s["steps"] > steps))
    assert status["device_version"] == 1  # kept the adapter it runs
    filler.unlink()
    dev.publish("device", edge_kit.packet(fleet, "device", 3, device=DEVICE, adapter=big,
                                          dtype="fp32"), retain=False)
    dev.w.wait(dev.w.status(lambda s: s["device_version"] == 3))
    dev.stop()
    restart = dev.start()  # what was persisted after the disk came back is what runs
    assert restart["device_version"] == 3
    dev.stop()
