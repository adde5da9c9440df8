"""The shipped broker config enforces docs/design.md section 4 against real clients.

Mosquitto drops an unauthorized PUBLISH without telling an MQTT 3.1.1 client (an MQTT 5
client gets a PUBACK with reason 0x87), and its acl_file never refuses a SUBSCRIBE: it
filters at delivery.  So every check here watches the RECEIVING side.  To avoid sleeping
"long enough", each forbidden publish is followed by an allowed canary from the same
connection; once the canary arrives, anything the broker let through would have arrived too
(one connection, QoS 1, in order), and a short grace period covers the rest.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest

from plasma.protocol import topics
from plasma.protocol.bus import BusError, Message, MqttBus

pytestmark = pytest.mark.broker
GRACE_S = 0.3


class Inbox:
    """Messages a subscriber received, with a wait."""

    def __init__(self) -> None:
        self.messages: list[Message] = []
        self._cond = threading.Condition()

    def __call__(self, message: Message) -> None:
        with self._cond:
            self.messages.append(message)
            self._cond.notify_all()

    def wait_for(self, payload: bytes, timeout: float = 5.0) -> None:
        with self._cond:
            ok = self._cond.wait_for(lambda: any(m.payload == payload for m in self.messages),
                                     timeout)
        assert ok, f"{payload!r} never arrived; got {self.payloads()}"
        time.sleep(GRACE_S)

    def payloads(self) -> list[bytes]:
        with self._cond:
            return [m.payload for m in self.messages]

    def topics(self) -> set[str]:
        with self._cond:
            return {m.topic for m in self.messages}


ALL_ADAPTERS = ("plasma/v1/+/adapter/fleet", "plasma/v1/+/device/+/adapter")
ALL_DEVICE_TOPICS = ("plasma/v1/+/device/+/telemetry", "plasma/v1/+/device/+/status",
                     "plasma/v1/+/device/+/versions", "plasma/v1/+/device/+/audit")


def watch(bus: MqttBus, filters: tuple[str, ...]) -> Inbox:
    inbox = Inbox()
    for topic_filter in filters:
        bus.subscribe(topic_filter, inbox)
    time.sleep(0.2)  # SUBACK
    return inbox


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_device_cannot_write_any_adapter_topic(connect: Callable[..., MqttBus],
                                               protocol: str) -> None:
    ops = connect("ops")  # read-only admin: sees every adapter and device topic
    spy = watch(ops, ALL_ADAPTERS + ALL_DEVICE_TOPICS)
    fleet_mate = connect("fa.d2")
    mate_inbox = watch(fleet_mate, ("#",))
    attacker = connect("fa.d1", protocol=protocol)
    assert attacker.protocol == protocol
    targets = [topics.fleet_adapter("fa"), topics.device_adapter("fa", "d1"),
               topics.device_adapter("fa", "d2"), topics.fleet_adapter("fb"),
               topics.device_adapter("fb", "d1")]
    for topic in targets:
        for retain in (False, True):
            attacker.publish(topic, b"forged-" + protocol.encode(), qos=1, retain=retain)
    canary = f"canary-{protocol}".encode()
    attacker.publish(topics.telemetry("fa", "d1"), canary, qos=1)
    spy.wait_for(canary)
    assert [p for p in spy.payloads() if p.startswith(b"forged")] == []
    assert [p for p in mate_inbox.payloads() if p.startswith(b"forged")] == []
    late = watch(connect("ops"), ALL_ADAPTERS)  # nothing was retained either
    assert late.payloads() == []


def test_device_cannot_write_another_devices_topics(connect: Callable[..., MqttBus]) -> None:
    server = connect("plasma-server")
    inbox = watch(server, (topics.device_filter("+", "telemetry", share_group="plasma-ingest"),
                           "plasma/v1/+/device/+/status", "plasma/v1/+/device/+/versions",
                           "plasma/v1/+/device/+/audit"))
    attacker = connect("fa.d1")
    for fleet, device in (("fa", "d2"), ("fb", "d1")):
        for topic in (topics.telemetry(fleet, device), topics.status(fleet, device),
                      topics.versions(fleet, device), topics.audit(fleet, device)):
            attacker.publish(topic, b"spoofed", qos=1)
    for topic in ("plasma/v1/fa/device/d1", "plasma/v1/fa/anything", "plasma/v2/x",
                  "$SYS/broker/x"):
        attacker.publish(topic, b"spoofed", qos=1)
    attacker.publish(topics.versions("fa", "d1"), b"canary-own-versions", qos=1, retain=True)
    attacker.publish(topics.status("fa", "d1"), b"canary-own-status", qos=1)
    inbox.wait_for(b"canary-own-versions")  # a device retains its own versions (issue 23)
    inbox.wait_for(b"canary-own-status")
    assert b"spoofed" not in inbox.payloads()


def test_device_reads_only_its_own_adapters(connect: Callable[..., MqttBus]) -> None:
    server = connect("plasma-server")
    retained = {topics.device_adapter("fa", "d2"): b"d2-adapter",
                topics.fleet_adapter("fb"): b"fb-fleet-adapter",
                topics.device_adapter("fb", "d1"): b"fb-d1-adapter",  # same device id
                topics.device_adapter("fa", "d1"): b"fa-d1-adapter",
                topics.fleet_adapter("fa"): b"fa-fleet-adapter"}
    for topic, payload in retained.items():
        server.publish(topic, payload, qos=1, retain=True)
    time.sleep(0.3)
    device = connect("fa.d1")  # subscribes after the fact: retained delivery is filtered too
    inbox = watch(device, ("#", "plasma/v1/+/device/+/adapter", "plasma/v1/+/adapter/fleet",
                           "$SYS/#"))
    neighbour = connect("fa.d2")
    neighbour.publish(topics.telemetry("fa", "d2"), b"d2-telemetry", qos=1)
    neighbour.publish(topics.status("fa", "d2"), b"d2-status", qos=1, retain=True)
    server.publish(topics.fleet_adapter("fa"), b"fa-fleet-live", qos=1, retain=True)
    inbox.wait_for(b"fa-fleet-live")
    # overlapping filters deliver copies: compare sets
    assert set(inbox.payloads()) == {b"fa-d1-adapter", b"fa-fleet-adapter", b"fa-fleet-live"}
    assert all(m.retain for m in inbox.messages if m.payload != b"fa-fleet-live")
    assert inbox.topics() == {topics.device_adapter("fa", "d1"), topics.fleet_adapter("fa")}


def test_server_telemetry_through_shared_subscription(connect: Callable[..., MqttBus]) -> None:
    """Two server workers split the telemetry of the fleet; none is lost or doubled."""
    share = topics.device_filter("+", "telemetry", share_group="plasma-ingest")
    workers = [connect("plasma-server"), connect("plasma-server-2")]
    inboxes = [watch(w, (share,)) for w in workers]
    device = connect("fb.d1")
    sent = [f"frame-{i}".encode() for i in range(40)]
    for payload in sent:
        device.publish(topics.telemetry("fb", "d1"), payload, qos=1)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and sum(len(i.payloads()) for i in inboxes) < len(sent):
        time.sleep(0.05)
    time.sleep(GRACE_S)
    got = [p for i in inboxes for p in i.payloads()]
    assert sorted(got) == sorted(sent)  # each frame exactly once across the group
    assert all(i.payloads() for i in inboxes), "the share group did not split the load"


@pytest.mark.parametrize("case", ["no_password", "wrong_password", "other_device_password",
                                  "unknown_user", "no_client_cert", "plain_to_tls_port",
                                  "anonymous_on_loopback", "wrong_password_on_loopback"])
def test_connection_refused(plasma_broker, connect: Callable[..., MqttBus], case: str) -> None:
    knobs = {
        "no_password": dict(user="fa.d1", password=""),
        "wrong_password": dict(user="fa.d1", password="not-the-password"),
        "other_device_password": dict(user="fa.d1", password=plasma_broker.password("fa.d2")),
        "unknown_user": dict(user="fa.nobody", password="x", creds_of="fa.d1"),
        "no_client_cert": dict(user="fa.d1", cert=False),
        "plain_to_tls_port": dict(user="fa.d1", tls=False, port=plasma_broker.tls_port),
        "anonymous_on_loopback": dict(user=None, tls=False),
        "wrong_password_on_loopback": dict(user="fa.d1", tls=False, password="nope"),
    }[case]
    user = knobs.pop("user")
    with pytest.raises(BusError):
        connect(user, timeout=2.0, **knobs)


def test_loopback_listener_applies_the_same_acl(connect: Callable[..., MqttBus]) -> None:
    ops = connect("ops")
    spy = watch(ops, ALL_ADAPTERS + ALL_DEVICE_TOPICS)
    local = connect("fa.d1", tls=False)
    local.publish(topics.fleet_adapter("fa"), b"forged-local", qos=1)
    local.publish(topics.telemetry("fa", "d1"), b"canary-local", qos=1)
    spy.wait_for(b"canary-local")
    assert b"forged-local" not in spy.payloads()


def test_client_id_takeover_is_impossible(connect: Callable[..., MqttBus]) -> None:
    """use_username_as_clientid: reusing the server's client id does not knock it off."""
    server = connect("plasma-server", client_id="plasma-server")
    inbox = watch(server, (topics.device_filter("+", "telemetry"),))
    intruder = connect("fa.d1", client_id="plasma-server")
    intruder.publish(topics.telemetry("fa", "d1"), b"after-takeover-attempt", qos=1)
    inbox.wait_for(b"after-takeover-attempt")
    assert server.connected


def test_oversize_publish_is_dropped(connect: Callable[..., MqttBus]) -> None:
    """max_packet_size 1 MiB: a bigger frame never reaches the server."""
    server = connect("plasma-server")
    inbox = watch(server, (topics.device_filter("+", "telemetry"),))
    device = connect("fa.d2")
    device.publish(topics.telemetry("fa", "d2"), b"x" * (1024 * 1024 + 1), qos=1)
    sender = connect("fb.d1")
    sender.publish(topics.telemetry("fb", "d1"), b"y" * (900 * 1024), qos=1)  # under the cap
    inbox.wait_for(b"y" * (900 * 1024))
    assert all(len(p) < 1024 * 1024 for p in inbox.payloads())


def test_revoked_device_is_locked_out(plasma_broker, connect: Callable[..., MqttBus],
                                     run_provision: Callable[..., dict]) -> None:
    """provision.py --remove, then SIGHUP: no new connection, and a connection that was
    already open loses every ACL right at once (Mosquitto checks the ACL per message)."""
    password = plasma_broker.password("fa.revoked")
    held = connect("fa.revoked")
    server = connect("plasma-server")
    inbox = watch(server, (topics.device_filter("+", "telemetry"),))
    run_provision("provision", "--out", str(plasma_broker.pki), "--fleet", "fa", "--device",
                  "revoked", "--remove")
    assert not plasma_broker.creds("fa.revoked").exists()
    plasma_broker.reload()
    held.publish(topics.telemetry("fa", "revoked"), b"from-revoked", qos=1)
    connect("fa.d1").publish(topics.telemetry("fa", "d1"), b"canary-after-revoke", qos=1)
    inbox.wait_for(b"canary-after-revoke")
    assert b"from-revoked" not in inbox.payloads()
    with pytest.raises(BusError):
        connect("fa.revoked", password=password, cert=False, tls=False, timeout=2.0)


def test_retained_adapters_survive_a_broker_restart(plasma_broker,
                                                    connect: Callable[..., MqttBus]) -> None:
    """persistence true: a device that comes back after a broker restart still finds its
    adapters (runs last in this module: it restarts the shared broker)."""
    server = connect("plasma-server")
    server.publish(topics.device_adapter("fb", "d1"), b"persisted-adapter", qos=1, retain=True)
    time.sleep(0.3)
    server.close()
    plasma_broker.restart()
    device = connect("fb.d1")
    inbox = watch(device, (topics.device_adapter("fb", "d1"),))
    inbox.wait_for(b"persisted-adapter")
