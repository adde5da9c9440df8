"""Slot kinds are one table: names, journal codes, target rule, topics and merge order."""

from __future__ import annotations

from typing import Any, get_args

import msgspec
import pytest

from plasma.protocol import SLOT_KINDS, SLOTS, Slot, slot_kind, slot_topic, topics, wire
from plasma.protocol._limits import header_inconsistency
from plasma.protocol.slots import slot_by_code


def test_names_types_and_order_come_from_the_table() -> None:
    assert SLOTS == tuple(k.name for k in SLOT_KINDS) == ("fleet", "device")
    assert get_args(Slot) == SLOTS  # pydantic and msgspec validate against the table
    assert msgspec.json.decode(b'"device"', type=Slot) == "device"
    with pytest.raises(msgspec.ValidationError):
        msgspec.json.decode(b'"cloud"', type=Slot)


def test_codes_are_todays_journal_bytes_and_unique() -> None:
    assert [(k.name, k.code) for k in SLOT_KINDS] == [("fleet", 0), ("device", 1)]
    assert len({k.code for k in SLOT_KINDS}) == len(SLOT_KINDS)
    assert slot_by_code(1) is slot_kind("device") and slot_by_code(7) is None
    with pytest.raises(KeyError):
        slot_kind("cloud")


def test_topics_and_target_rule() -> None:
    assert slot_topic("f1", "fleet") == topics.fleet_adapter("f1")
    assert slot_topic("f1", "device", "d1") == topics.device_adapter("f1", "d1")
    assert not slot_kind("fleet").per_device and slot_kind("device").per_device
    assert header_inconsistency("device", None, 0.0, 1.0, []) is not None
    assert header_inconsistency("fleet", "d1", 0.0, 1.0, []) is not None
    assert header_inconsistency("device", "d1", 0.0, 1.0, []) is None


def test_status_carries_a_version_per_slot_and_reads_todays_statuses() -> None:
    status = wire.Status(fleet="f", device="d", state="online", versions={"fleet": 3, "device": 0})
    again = wire.Status.model_validate_json(status.model_dump_json())
    assert again.slot_versions() == {"fleet": 3, "device": 0}
    today = b'{"fleet": "f", "device": "d", "state": "online", "fleet_version": 2, ' \
            b'"device_version": 5}'
    assert wire.Status.model_validate_json(today).slot_versions() == {"fleet": 2, "device": 5}
    from plasma.protocol import messages
    assert messages.Status.model_validate_json(today).slot_versions() == {"fleet": 2, "device": 5}
    with pytest.raises(ValueError):
        wire.Status.model_validate_json(b'{"fleet": "f", "device": "d", "state": "online", '
                                        b'"versions": {"cloud": 1}}')


OLD_WILL = (b'{"schema_version":1,"fleet":"f","device":"d","state":"offline","base_sha256":null,'
            b'"versions":{"fleet":0,"device":0},"fleet_version":0,"device_version":0,"steps":0,'
            b'"rolling_reward":null,"timestamp":5.0}')
"""A last will as daemons wrote it before issue 23: the versions the device had at start."""


@pytest.mark.parametrize("side", ["wire", "messages"])
def test_a_will_names_no_versions_and_older_statuses_still_parse(side: str) -> None:
    from plasma.protocol import messages

    module: Any = wire if side == "wire" else messages
    will = wire.Status(fleet="f", device="d", state="offline", since=5.0, timestamp=5.0)
    parsed = module.Status.model_validate_json(will.model_dump_json())
    assert parsed.slot_versions() == {} and parsed.steps is None and parsed.since == 5.0
    old = module.Status.model_validate_json(OLD_WILL)
    assert old.slot_versions() == {"fleet": 0, "device": 0} and old.since is None
    live = module.LiveVersions.model_validate_json(
        b'{"fleet":"f","device":"d","versions":{"device":4},"since":5.0,"timestamp":6.0}')
    assert live.slot_versions() == {"fleet": 0, "device": 4}
