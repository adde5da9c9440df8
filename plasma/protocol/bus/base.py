"""The broker seam: what Plasma needs from a broker (``Bus``), its message and its config.

Implementations: ``MqttBus`` (paho-mqtt, the only module that touches paho) and ``MemoryBus``
(an in-memory broker for unit tests of one stage). A new transport is one ``Bus`` subclass.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import unquote, urlsplit

from ..errors import BusError

__all__ = ["Bus", "BusError", "BrokerConfig", "Handler", "Message", "topic_matches"]


@dataclass(frozen=True)
class Message:
    topic: str
    payload: bytes
    retain: bool = False
    qos: int = 0


@dataclass(frozen=True)
class BrokerConfig:
    """Where and how to connect; parsed once from flags or a config file."""

    host: str = "127.0.0.1"
    port: int = 1883
    tls: bool = False
    username: str | None = None
    password: str | None = None
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    keepalive: int = 30
    session_expiry_s: int = 24 * 3600
    """How long the broker keeps a disconnected client's session (MQTT 5)."""
    protocol: str = "auto"
    """"5", "3.1.1" or "auto" (try MQTT 5 briefly, then 3.1.1)."""

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> BrokerConfig:
        """``mqtt://HOST:PORT`` or ``mqtts://HOST:PORT`` (user:password@ allowed); ``kwargs``
        (fields by name, None ones skipped) override what the URL says."""
        parts = urlsplit(url)
        if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
            raise BusError(f"broker URL {url!r} must look like mqtt://HOST:PORT or "
                           "mqtts://HOST:PORT", code="bad_broker_url")
        tls = parts.scheme == "mqtts"
        try:
            port = parts.port or (8883 if tls else 1883)
        except ValueError:
            raise BusError(f"broker URL {url!r} has a bad port", code="bad_broker_url") from None
        config = cls(host=parts.hostname, port=port, tls=tls,
                     username=unquote(parts.username) if parts.username else None,
                     password=unquote(parts.password) if parts.password else None)
        return replace(config, **{k: v for k, v in kwargs.items() if v is not None})


Handler = Callable[[Message], None]


class Bus(abc.ABC):
    """What the rest of Plasma needs from a broker. Handlers run on the bus thread."""

    retained_is_synchronous: bool = False
    """True when ``subscribe`` hands over matching retained messages before it returns (the
    in-memory bus); over a network they arrive later and a caller that needs them waits."""

    @abc.abstractmethod
    def connect(self, timeout: float = 10.0) -> None:
        """Connect; raises ``BusError`` when the broker cannot be reached or refuses."""

    @abc.abstractmethod
    def close(self) -> None:
        """Disconnect; idempotent."""

    @abc.abstractmethod
    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> None:
        """Send one message (queued while disconnected where the transport can)."""

    @abc.abstractmethod
    def subscribe(self, topic_filter: str, handler: Handler, *, qos: int = 1) -> None:
        """Call ``handler`` for every message matching ``topic_filter`` (kept across reconnects)."""

    @abc.abstractmethod
    def unsubscribe(self, topic_filter: str) -> None:
        """Stop delivering ``topic_filter``; unknown filters are ignored."""

    @property
    @abc.abstractmethod
    def connected(self) -> bool:
        """True while the broker session is up."""

    @property
    def connections(self) -> int:
        """Connections made so far, reconnects included (0 before the first). A client whose
        retained messages must outlive a broker that forgot them (no persistence) compares it
        to re-send them once per connection."""
        return 0

    @property
    @abc.abstractmethod
    def protocol(self) -> str:
        """The wire protocol once connected ("5", "3.1.1", "memory"...), for logs and metrics."""


def topic_matches(topic_filter: str, topic: str) -> bool:
    """MQTT wildcard matching (``+`` one level, ``#`` the rest; ``$share/G/`` stripped)."""
    if topic_filter.startswith("$share/"):
        topic_filter = topic_filter.split("/", 2)[2]
    f_parts, t_parts = topic_filter.split("/"), topic.split("/")
    for i, part in enumerate(f_parts):
        if part == "#":
            return True
        if i >= len(t_parts) or (part != "+" and part != t_parts[i]):
            return False
    return len(f_parts) == len(t_parts)


