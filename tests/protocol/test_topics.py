"""MQTT topics: builders, parse round trip, id grammar, wildcard and shared filters."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from plasma.protocol import TopicError, topics
from plasma.protocol.topics import Topic

BAD_IDS = ["", "a/b", "/", "+", "#", "a+", "a#", "x" * 65, "dév", "Ω", "😀", "a b", "a\n",
           "a\x00", "$SYS", "a.b", "..", "a\\b", "\u00a0"]
IDS = st.text(alphabet="ABCxyz0129_-", min_size=1, max_size=64)


@pytest.mark.parametrize(("build", "args", "expected"), [
    (topics.fleet_adapter, ("f1",), "plasma/v1/f1/adapter/fleet"),
    (topics.device_adapter, ("f1", "d7"), "plasma/v1/f1/device/d7/adapter"),
    (topics.telemetry, ("f1", "d7"), "plasma/v1/f1/device/d7/telemetry"),
    (topics.status, ("f1", "d7"), "plasma/v1/f1/device/d7/status"),
    (topics.versions, ("f1", "d7"), "plasma/v1/f1/device/d7/versions"),
    (topics.audit, ("f1", "d7"), "plasma/v1/f1/device/d7/audit"),
])
def test_builders(build: Callable[..., str], args: tuple[str, ...], expected: str) -> None:
    assert build(*args) == expected


@pytest.mark.parametrize(("topic", "kind", "fleet", "device"), [
    ("plasma/v1/f1/adapter/fleet", "fleet_adapter", "f1", None),
    ("plasma/v1/f1/device/d7/adapter", "device_adapter", "f1", "d7"),
    ("plasma/v1/f1/device/d7/telemetry", "telemetry", "f1", "d7"),
    ("plasma/v1/f1/device/d7/status", "status", "f1", "d7"),
    ("plasma/v1/f1/device/d7/versions", "versions", "f1", "d7"),
    ("plasma/v1/f1/device/d7/audit", "audit", "f1", "d7"),
])
def test_parse(topic: str, kind: str, fleet: str, device: str | None) -> None:
    parsed = topics.parse(topic)
    assert parsed == Topic(kind, fleet, device)  # type: ignore[arg-type]
    assert str(parsed) == topic


@settings(max_examples=200, deadline=None)
@given(fleet=IDS, device=IDS,
       build=st.sampled_from([topics.device_adapter, topics.telemetry, topics.status,
                              topics.versions, topics.audit]))
def test_parse_round_trip(fleet: str, device: str, build: Callable[[str, str], str]) -> None:
    topic = build(fleet, device)
    parsed = topics.parse(topic)
    assert (parsed.fleet, parsed.device) == (fleet, device) and str(parsed) == topic
    fleet_topic = topics.fleet_adapter(fleet)
    assert topics.parse(fleet_topic) == Topic("fleet_adapter", fleet)


@pytest.mark.parametrize("bad", BAD_IDS)
def test_bad_ids_are_refused_by_every_builder(bad: str) -> None:
    for call in (lambda: topics.fleet_adapter(bad), lambda: topics.device_adapter(bad, "d"),
                 lambda: topics.device_adapter("f", bad), lambda: topics.telemetry(bad, "d"),
                 lambda: topics.telemetry("f", bad), lambda: topics.status("f", bad),
                 lambda: topics.versions(bad, "d"), lambda: topics.versions("f", bad),
                 lambda: topics.audit(bad, "d"), lambda: topics.audit("f", bad),
                 lambda: topics.validate_id(bad)):
        with pytest.raises(TopicError):
            call()


@pytest.mark.parametrize("bad", [None, 7, b"f1"])
def test_non_string_ids_are_refused(bad: object) -> None:
    with pytest.raises(TopicError):
        topics.validate_id(bad)  # type: ignore[arg-type]
    with pytest.raises(TopicError):
        topics.telemetry("f", bad)  # type: ignore[arg-type]


def test_topic_error_is_a_value_error_with_a_code() -> None:
    with pytest.raises(ValueError) as info:
        topics.telemetry("a/b", "d")
    assert info.value.code == "bad_topic"  # type: ignore[attr-defined]


def test_topic_values_are_checked_when_built() -> None:
    with pytest.raises(TopicError):
        Topic("fleet_adapter", "f", "d")  # the fleet topic has no device
    with pytest.raises(TopicError):
        Topic("telemetry", "f")  # device topics need one
    with pytest.raises(TopicError):
        Topic("status", "f", "")


@pytest.mark.parametrize("topic", [
    "", "plasma", "plasma/v1", "plasma/v1/f1", "plasma/v2/f1/adapter/fleet",
    "plasma/v1/f1/adapter/device", "plasma/v1/f1/adapter/fleet/", "/plasma/v1/f1/adapter/fleet",
    "plasma/v1/f1/device/d7", "plasma/v1/f1/device/d7/secrets", "plasma/v1/f1/device/d7/adapter/x",
    "plasma/v1/f1/devices/d7/status", "plasma/v1/+/adapter/fleet", "plasma/v1/#",
    "plasma/v1/f1/device/+/telemetry", "plasma/v1/f1/device/#/status",
    "plasma/v1//device/d7/status", "plasma/v1/f1/device//status",
    "plasma/v1/f1/device/dév/status", "PLASMA/v1/f1/adapter/fleet",
    "$share/g/plasma/v1/f1/device/d7/telemetry",
])
def test_parse_refuses_anything_else(topic: str) -> None:
    with pytest.raises(TopicError):
        topics.parse(topic)


@pytest.mark.parametrize(("fleet", "kind", "group", "expected"), [
    ("f1", "telemetry", None, "plasma/v1/f1/device/+/telemetry"),
    ("f1", "status", None, "plasma/v1/f1/device/+/status"),
    ("f1", "versions", None, "plasma/v1/f1/device/+/versions"),
    ("+", "audit", None, "plasma/v1/+/device/+/audit"),
    ("f1", "telemetry", "workers", "$share/workers/plasma/v1/f1/device/+/telemetry"),
    ("+", "telemetry", "w-1", "$share/w-1/plasma/v1/+/device/+/telemetry"),
])
def test_device_filter(fleet: str, kind: str, group: str | None, expected: str) -> None:
    assert topics.device_filter(fleet, kind, share_group=group) == expected  # type: ignore


@pytest.mark.parametrize(("fleet", "group"), [
    ("#", None), ("a/b", None), ("", None), ("f1", "a/b"), ("f1", "+"), ("f1", ""),
    ("f1", "#"), ("f1", "x" * 65),
])
def test_device_filter_refuses_bad_ids(fleet: str, group: str | None) -> None:
    with pytest.raises(TopicError):
        topics.device_filter(fleet, "telemetry", share_group=group)
