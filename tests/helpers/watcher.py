"""Test helpers: an MQTT client that records a device's audit records, status, versions and
telemetry."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from typing import Any

from plasma.protocol import topics
from plasma.protocol.bus import BrokerConfig, Message, MqttBus


class Watcher:
    """A separate MQTT client recording one device's audit records, status and versions messages
    (and its raw telemetry frames with ``telemetry=True``), with waits on what it has seen."""

    def __init__(self, broker: BrokerConfig | str, fleet: str, device: str,
                 telemetry: bool = False) -> None:
        config = BrokerConfig.from_url(broker) if isinstance(broker, str) else broker
        self.bus = MqttBus(config, clean=True)
        self.audits: list[dict[str, Any]] = []
        self.statuses: list[dict[str, Any]] = []
        self.versions: list[dict[str, Any]] = []
        self.frames: list[bytes] = []
        self.cond = threading.Condition()
        self.bus.connect()
        self.bus.subscribe(topics.audit(fleet, device), self._add(self.audits))
        self.bus.subscribe(topics.status(fleet, device), self._add(self.statuses))
        self.bus.subscribe(topics.versions(fleet, device), self._add(self.versions))
        if telemetry:
            self.bus.subscribe(topics.telemetry(fleet, device), self._raw)

    def _add(self, into: list[dict[str, Any]]) -> Callable[[Message], None]:
        def handler(message: Message) -> None:
            with self.cond:
                into.append(json.loads(message.payload))
                self.cond.notify_all()
        return handler

    def _raw(self, message: Message) -> None:
        with self.cond:
            self.frames.append(message.payload)
            self.cond.notify_all()

    def wait(self, what: Callable[[], Any], timeout: float = 15.0) -> Any:
        """Block until ``what()`` is truthy and return it; AssertionError after ``timeout``."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while not (found := what()):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"timed out; audits={self.audits[-3:]} "
                                         f"statuses={self.statuses[-2:]}")
                self.cond.wait(left)
            return found

    def audit_for(self, start: int, **fields: Any) -> Callable[[], Any]:
        """The first audit record from index ``start`` on whose fields match."""
        return lambda: next((a for a in self.audits[start:]
                             if all(a.get(k) == v for k, v in fields.items())), None)

    next_audit = audit_for

    def status(self, pred: Callable[[dict[str, Any]], bool] = lambda s: True
               ) -> Callable[[], Any]:
        """The latest status message that satisfies ``pred``."""
        return lambda: next((s for s in reversed(self.statuses) if pred(s)), None)

    def live(self, pred: Callable[[dict[str, Any]], bool] = lambda v: True
             ) -> Callable[[], Any]:
        """The latest versions message (``LiveVersions``) that satisfies ``pred``."""
        return lambda: next((v for v in reversed(self.versions) if pred(v)), None)

    def latest(self) -> dict[str, Any]:
        return self.wait(self.status())  # type: ignore[no-any-return]

    def close(self) -> None:
        self.bus.close()


AuditWatcher = Watcher
