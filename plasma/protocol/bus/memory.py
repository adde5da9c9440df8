"""``MemoryBus``: an in-memory broker for unit tests of a single stage (retained messages,
wildcards, synchronous delivery on the publisher's thread). Wire tests use a real Mosquitto."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from .base import Bus, Handler, Message, topic_matches

__all__ = ["MemoryBroker", "MemoryBus"]


@dataclass
class MemoryBroker:
    """In-memory broker for unit tests of a single stage: retained messages and wildcards."""

    retained: dict[str, Message] = field(default_factory=dict)
    buses: list[MemoryBus] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def route(self, message: Message) -> None:
        with self.lock:
            if message.retain:
                if message.payload:
                    self.retained[message.topic] = message
                else:
                    self.retained.pop(message.topic, None)
            buses = list(self.buses)
        for bus in buses:
            bus._deliver(message)


class MemoryBus(Bus):
    """A Bus on a MemoryBroker: synchronous delivery on the publisher's thread."""

    retained_is_synchronous = True

    def __init__(self, broker: MemoryBroker) -> None:
        self.broker = broker
        self._subs: dict[str, Handler] = {}
        self._up = False
        self._connections = 0

    def connect(self, timeout: float = 10.0) -> None:
        with self.broker.lock:
            self.broker.buses.append(self)
        self._up = True
        self._connections += 1

    def close(self) -> None:
        with self.broker.lock:
            if self in self.broker.buses:
                self.broker.buses.remove(self)
        self._up = False

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> None:
        self.broker.route(Message(topic, bytes(payload), retain, qos))

    def subscribe(self, topic_filter: str, handler: Handler, *, qos: int = 1) -> None:
        self._subs[topic_filter] = handler
        with self.broker.lock:
            retained = [m for t, m in self.broker.retained.items()
                        if topic_matches(topic_filter, t)]
        for message in retained:
            handler(message)

    def unsubscribe(self, topic_filter: str) -> None:
        self._subs.pop(topic_filter, None)

    def _deliver(self, message: Message) -> None:
        for topic_filter, handler in list(self._subs.items()):
            if topic_matches(topic_filter, message.topic):
                handler(Message(message.topic, message.payload, False, message.qos))

    @property
    def connected(self) -> bool:
        return self._up

    @property
    def connections(self) -> int:
        return self._connections

    @property
    def protocol(self) -> str:
        return "memory"
