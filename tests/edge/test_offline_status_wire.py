"""Issue 23: while a device is down, what the broker retains for it must not lie about what it runs.

``plasma-edge run`` as a subprocess against a real Mosquitto accepts signed packets and is killed
with SIGKILL; an independent paho client (MQTT 3.1.1, then 5), which shares no code with Plasma's
bus, then reads the retained status (the broker's last will by then) and the retained versions
message. The will is composed once, at start: had it carried versions, it would name the ones the
device had when it started, not the ones it accepted since (the bug this file pins down).
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from plasma.protocol import LiveVersions, Status, topics, wire
from plasma.protocol.bus import BrokerConfig, MqttBus
from tests.helpers.daemon import DeviceKit, start_daemon
from tests.helpers.watcher import Watcher

pytestmark = [pytest.mark.broker, pytest.mark.slow]
DEVICE = "dev1"


def read_retained(url: str, wanted: list[str], protocol: str, timeout: float = 5.0
                  ) -> dict[str, Any]:
    """The retained payload (JSON) of each topic in ``wanted``, read by a fresh paho client."""
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    config = BrokerConfig.from_url(url)
    got: dict[str, Any] = {}
    done = threading.Event()

    def on_connect(client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        for topic in wanted:
            client.subscribe(topic, qos=1)

    def on_message(client: Any, userdata: Any, msg: Any) -> None:
        if msg.retain:
            got[msg.topic] = json.loads(msg.payload)
        if set(got) >= set(wanted):
            done.set()

    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"reader-{uuid.uuid4().hex[:8]}",
                         protocol=paho.MQTTv311 if protocol == "3.1.1" else paho.MQTTv5)
    client.on_connect, client.on_message = on_connect, on_message
    client.connect(config.host, config.port, 30)
    client.loop_start()
    try:
        done.wait(timeout)  # retained messages follow the SUBACK at once
    finally:
        client.disconnect()
        client.loop_stop()
    return got


def publish(url: str, topic: str, data: bytes, retain: bool = False) -> None:
    bus = MqttBus(BrokerConfig.from_url(url), clean=True)
    bus.connect()
    bus.publish(topic, data, qos=1, retain=retain)
    time.sleep(0.1)
    bus.close()


def test_after_kill9_the_retained_status_names_no_stale_versions(
        mosquitto: Any, pendulum: DeviceKit, tmp_path: Path, request: Any) -> None:
    fleet, url = f"fcrash{abs(hash(request.node.name)) % 10**6}", mosquitto.url
    status_topic, versions_topic = topics.status(fleet, DEVICE), topics.versions(fleet, DEVICE)
    w = Watcher(url, fleet, DEVICE)
    accepted = {"fleet": 0, "device": 0}
    # run 1 starts from nothing; run 2 restarts on the same state (the journal restores fleet v3
    # and device v7, which a will composed at start would name) and accepts device v8 on top
    runs = [[("fleet", 3), ("device", 7)], [("device", 8)]]
    proc = None
    try:
        for run, packets in enumerate(runs):
            with w.cond:
                w.statuses.clear()
            proc = start_daemon(pendulum, url, fleet, DEVICE, tmp_path / "state",
                                tmp_path / "daemon.log")
            online = w.wait(w.status(lambda s: s["state"] == "online"), timeout=30)
            assert online["device_version"] == accepted["device"], online
            if run:  # the restored versions, published at start
                w.wait(w.live(lambda v: v["versions"] == accepted))
            start = len(w.audits)
            for slot, version in packets:
                topic = topics.fleet_adapter(fleet) if slot == "fleet" \
                    else topics.device_adapter(fleet, DEVICE)
                publish(url, topic, pendulum.packet(fleet, slot, version, device=DEVICE),
                        retain=slot == "fleet")
                record = w.wait(w.audit_for(start, slot=slot, version=version))
                assert record["verdict"] == "accepted", record
                accepted[slot] = version
            proc.kill()  # SIGKILL: the daemon says nothing more; the broker sends its last will
            proc.wait(5)
            w.wait(w.status(lambda s: s["state"] == "offline"))

            for protocol in ("3.1.1", "5"):
                retained = read_retained(url, [status_topic, versions_topic], protocol)
                status = Status.model_validate(retained[status_topic])
                assert status.state == "offline", (run, protocol, retained)
                stale = {slot: v for slot, v in status.slot_versions().items()
                         if v < accepted.get(slot, 0)}
                assert not stale, f"run {run}: the retained status names {stale}, older than " \
                                  f"the accepted {accepted}: {retained[status_topic]}"
                assert wire.Status.model_validate_json(json.dumps(retained[status_topic])) \
                    .slot_versions() == status.slot_versions()
                assert versions_topic in retained, (run, protocol, retained)
                live = LiveVersions.model_validate(retained[versions_topic])
                assert live.slot_versions() == accepted, (run, protocol, retained)
                assert (live.fleet, live.device) == (fleet, DEVICE)
                assert live.base_sha256 == pendulum.base_sha256
                assert live.since == status.since is not None  # both of the run just killed
                assert live.steps is not None  # the run's steps when they became live
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(5)
        w.close()
    assert "Traceback" not in (tmp_path / "daemon.log").read_text()
