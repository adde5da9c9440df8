"""MQTT topics (docs/design.md section 4): frozen values that refuse bad ids when built.

::

    plasma/v1/{fleet}/adapter/fleet                 retained, QoS 1, server -> devices
    plasma/v1/{fleet}/device/{device}/adapter       retained, QoS 1, server -> one device
    plasma/v1/{fleet}/device/{device}/telemetry     QoS 1, device -> server
    plasma/v1/{fleet}/device/{device}/status        retained, QoS 1; online / offline (last will)
    plasma/v1/{fleet}/device/{device}/versions      retained, QoS 1, the versions live on the device
    plasma/v1/{fleet}/device/{device}/audit         QoS 1, accept / reject / rollback records
    plasma/v1/{fleet}/server/audit                  QoS 1, the server's judicial audit records
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from .errors import TopicError

__all__ = ["audit", "device_adapter", "device_filter", "fleet_adapter", "parse", "ROOT",
           "server_audit", "status", "telemetry", "Topic", "TopicKind", "validate_id", "versions"]

ROOT = "plasma/v1"
_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
TopicKind = Literal["fleet_adapter", "device_adapter", "telemetry", "status", "versions", "audit"]
_DEVICE_KINDS: dict[str, TopicKind] = {"adapter": "device_adapter", "telemetry": "telemetry",
                                       "status": "status", "versions": "versions",
                                       "audit": "audit"}


def validate_id(value: str, what: str = "id") -> str:
    """Return ``value`` if it matches ``[A-Za-z0-9_-]{1,64}``, else raise TopicError."""
    if not isinstance(value, str) or not _ID.fullmatch(value):
        raise TopicError(f"{what} {value!r} must match [A-Za-z0-9_-]{{1,64}}")
    return value


@dataclass(frozen=True)
class Topic:
    kind: TopicKind
    fleet: str
    device: str | None = None

    def __post_init__(self) -> None:
        validate_id(self.fleet, "fleet")
        if self.kind == "fleet_adapter":
            if self.device is not None:
                raise TopicError("the fleet adapter topic has no device")
        else:
            validate_id(self.device or "", "device")

    def __str__(self) -> str:
        if self.kind == "fleet_adapter":
            return f"{ROOT}/{self.fleet}/adapter/fleet"
        suffix = "adapter" if self.kind == "device_adapter" else self.kind
        return f"{ROOT}/{self.fleet}/device/{self.device}/{suffix}"


def fleet_adapter(fleet: str) -> str:
    return str(Topic("fleet_adapter", fleet))


def device_adapter(fleet: str, device: str) -> str:
    return str(Topic("device_adapter", fleet, device))


def telemetry(fleet: str, device: str) -> str:
    return str(Topic("telemetry", fleet, device))


def status(fleet: str, device: str) -> str:
    return str(Topic("status", fleet, device))


def versions(fleet: str, device: str) -> str:
    """Where a device retains the versions it runs (``LiveVersions``); unlike its status, the
    last will does not overwrite it."""
    return str(Topic("versions", fleet, device))


def audit(fleet: str, device: str) -> str:
    return str(Topic("audit", fleet, device))


def server_audit(fleet: str) -> str:
    """Where the server publishes its judicial AuditRecords (one topic per fleet)."""
    return f"{ROOT}/{validate_id(fleet, 'fleet')}/server/audit"


def device_filter(fleet: str, kind: Literal["telemetry", "status", "versions", "audit"],
                  share_group: str | None = None) -> str:
    """Wildcard filter over all devices of a fleet (``fleet="+"`` for all fleets).

    With ``share_group`` it becomes an MQTT 5 shared subscription, so several server
    workers split the load.
    """
    if fleet != "+":
        validate_id(fleet, "fleet")
    base = f"{ROOT}/{fleet}/device/+/{kind}"
    if share_group is not None:
        return f"$share/{validate_id(share_group, 'share group')}/{base}"
    return base


def parse(topic: str) -> Topic:
    """The Topic a concrete topic string names; raises TopicError on anything else."""
    parts = topic.split("/")
    if len(parts) == 5 and "/".join(parts[:2]) == ROOT and parts[3:] == ["adapter", "fleet"]:
        return Topic("fleet_adapter", parts[2])
    if len(parts) == 6 and "/".join(parts[:2]) == ROOT and parts[3] == "device" \
            and parts[5] in _DEVICE_KINDS:
        return Topic(_DEVICE_KINDS[parts[5]], parts[2], parts[4])
    raise TopicError(f"not a Plasma topic: {topic!r}")
