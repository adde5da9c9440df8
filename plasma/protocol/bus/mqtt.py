"""``MqttBus``: the ``Bus`` over paho-mqtt 2.x.

paho is touched here and nowhere else; its failures become ``BusError`` here.
``MqttBus`` speaks MQTT 5 when the broker does and falls back to 3.1.1 (amqtt, older
brokers); it keeps a persistent session, resubscribes after every reconnect and lets
paho reconnect with exponential backoff.
"""

from __future__ import annotations

import importlib
import logging
import socket
import ssl
import sys
import threading
import types
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .base import BrokerConfig, Bus, BusError, Handler, Message, topic_matches

if TYPE_CHECKING:  # paho itself is imported on first connect
    from paho.mqtt.client import Client, ConnectFlags, DisconnectFlags, MQTTMessage
    from paho.mqtt.properties import Properties
    from paho.mqtt.reasoncodes import ReasonCode

__all__ = ["MqttBus"]

log = logging.getLogger(__name__)
V5_PROBE_S = 1.5
# CONNACK refusals that retrying with another protocol version cannot fix.
_REFUSAL_CODES = {"Not authorized": "not_authorized",
                  "Bad user name or password": "bad_credentials"}


@dataclass
class _Will:
    topic: str
    payload: bytes
    retain: bool = True


class MqttBus(Bus):
    """paho-mqtt 2.x client with CallbackAPIVersion.VERSION2."""

    def __init__(self, config: BrokerConfig, client_id: str | None = None,
                 will: tuple[str, bytes] | None = None, clean: bool = False,
                 max_payload: int = 1 << 20) -> None:
        self.config = config
        self.client_id = client_id or f"plasma-{uuid.uuid4().hex[:12]}"
        self._will = _Will(*will) if will else None
        self._clean = clean
        self._subs: dict[str, tuple[int, Handler]] = {}
        self._lock = threading.Lock()
        self._connected = threading.Event()
        self._settled = threading.Event()  # CONNACK or a refusal/close during a connect attempt
        self._refused: str | None = None
        self._refused_code = "connect_failed"
        self._client: Client | None = None
        self._connections = 0
        self._protocol = "5"
        self.max_payload = max_payload
        self.dropped_oversize = 0

    # ---- lifecycle
    def connect(self, timeout: float = 10.0) -> None:
        """Connect (MQTT 5 first, then 3.1.1); raises BusError if neither answers."""
        errors: list[str] = []
        protocols = ("5", "3.1.1") if self.config.protocol == "auto" else (self.config.protocol,)
        for protocol in protocols:
            # amqtt (3.1.1 only) never answers an MQTT 5 CONNECT that carries properties:
            # measured, it hangs until the timeout, so the MQTT 5 probe is kept short.
            probe = min(timeout, V5_PROBE_S) if len(protocols) > 1 and protocol == "5" \
                else timeout
            try:
                self._connect_once(protocol, probe)
                log.info("connected to %s:%d over MQTT %s", self.config.host, self.config.port,
                         protocol)
                return
            except BusError as exc:
                errors.append(f"MQTT {protocol}: {exc}")
                if exc.code in ("not_authorized", "bad_credentials"):
                    break
        raise BusError(f"cannot connect to {self.config.host}:{self.config.port} "
                       f"({'; '.join(errors)})", code="connect_failed")

    def _connect_once(self, protocol: str, timeout: float) -> None:
        from paho.mqtt.enums import MQTTErrorCode

        self._teardown()
        self._protocol = protocol
        self._connected.clear()
        self._settled.clear()
        self._refused, self._refused_code = None, "connect_failed"
        try:
            # tls_set reads the CA, certificate and key files here: a missing or bad file
            # is an OSError / ssl.SSLError that must become a BusError like any other.
            client = self._make_client(protocol)
            if protocol == "5":
                from paho.mqtt.packettypes import PacketTypes
                from paho.mqtt.properties import Properties

                props = Properties(PacketTypes.CONNECT)
                props.SessionExpiryInterval = self.config.session_expiry_s
                rc = client.connect(self.config.host, self.config.port, self.config.keepalive,
                                    clean_start=self._clean, properties=props)
            else:
                rc = client.connect(self.config.host, self.config.port, self.config.keepalive)
        except (OSError, ssl.SSLError, ValueError) as exc:
            raise BusError(str(exc) or type(exc).__name__, code="connect_failed") from None
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise BusError(f"connect returned {rc}", code="connect_failed")
        self._client = client
        client.loop_start()
        # A 3.1.1-only broker (amqtt) refuses or drops an MQTT 5 CONNECT: settle at once.
        self._settled.wait(timeout)
        if not self._connected.is_set():
            self._teardown()
            raise BusError(self._refused or "no CONNACK", code=self._refused_code)

    def _make_client(self, protocol: str) -> Client:
        defer_import("urllib.request")  # before paho's own import of it (see defer_import)
        import paho.mqtt.client as paho
        from paho.mqtt.enums import CallbackAPIVersion

        if protocol == "5":
            client = paho.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id,
                                 protocol=paho.MQTTv5)
        else:
            client = paho.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id,
                                 protocol=paho.MQTTv311, clean_session=self._clean)
        if self.config.username is not None:
            client.username_pw_set(self.config.username, self.config.password)
        if self.config.tls:
            client.tls_set(ca_certs=self.config.ca_file, certfile=self.config.cert_file,
                           keyfile=self.config.key_file)
        if self._will is not None:
            client.will_set(self._will.topic, self._will.payload, qos=1, retain=self._will.retain)
        client.reconnect_delay_set(min_delay=1, max_delay=30)
        client.max_queued_messages_set(0)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_connect_fail = self._on_connect_fail
        client.on_socket_open = self._on_socket_open
        client.on_message = self._on_message
        client.on_publish = _on_publish  # a PUBACK arrived: ACK it at once (see _quickack)
        return client

    def close(self) -> None:
        self._teardown()

    def _teardown(self) -> None:
        client, self._client = self._client, None
        self._connected.clear()  # before disconnect: a requested disconnect is not news
        if client is not None:
            try:
                client.disconnect()
            finally:
                client.loop_stop()
        self._connected.clear()

    # ---- paho callbacks (bus thread)
    def _on_connect(self, client: Client, userdata: Any, flags: ConnectFlags, reason_code: ReasonCode,
                    properties: Properties | None) -> None:
        if reason_code.is_failure:
            self._refused = f"broker refused the connection: {reason_code}"
            self._refused_code = _REFUSAL_CODES.get(str(reason_code), "connect_failed")
            log.debug("%s", self._refused)
            self._settled.set()
            return
        with self._lock:
            subs = list(self._subs.items())
        for topic_filter, (qos, _) in subs:  # a persistent session may keep them; be sure
            client.subscribe(topic_filter, qos=qos)
        self._connections += 1
        self._connected.set()
        self._settled.set()

    @staticmethod
    def _on_socket_open(client: Client, userdata: Any, sock: object) -> None:
        """TCP_NODELAY: paho leaves Nagle on, and a PUBACK followed by a PUBLISH then waits for
        the peer's delayed ACK: measured 40 ms per packet in ``bench e2e`` (0.1 ms without)."""
        _set_tcp_option(sock, "TCP_NODELAY")

    def _on_connect_fail(self, client: Client, userdata: Any) -> None:
        if not self._settled.is_set():  # e.g. a TLS port that drops a plain connection
            self._refused = "the connection failed before CONNACK"
            self._settled.set()

    def _on_disconnect(self, client: Client, userdata: Any, flags: DisconnectFlags, reason_code: ReasonCode,
                       properties: Properties | None) -> None:
        if not self._settled.is_set():
            self._refused = f"connection closed before CONNACK ({reason_code})"
            self._settled.set()
        if self._connected.is_set():
            log.warning("disconnected from broker (%s); paho reconnects with backoff",
                        reason_code)
        self._connected.clear()

    def _on_message(self, client: Client, userdata: Any, msg: MQTTMessage) -> None:
        _quickack(client)
        if len(msg.payload) > self.max_payload:
            self.dropped_oversize += 1
            log.warning("dropped a %d-byte message on %s (cap %d)", len(msg.payload), msg.topic,
                        self.max_payload)
            return
        message = Message(msg.topic, bytes(msg.payload), bool(msg.retain), int(msg.qos))
        with self._lock:
            handlers = [h for f, (_, h) in self._subs.items() if topic_matches(f, msg.topic)]
        for handler in handlers:
            try:
                handler(message)
            except Exception:  # a handler bug must not kill the network thread
                log.exception("handler for %s failed", msg.topic)

    # ---- operations
    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> None:
        client = self._client
        if client is None:
            raise BusError("publish on a closed bus", code="not_connected")
        info = client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc not in (0, 4):  # 4 = no connection: paho queues it for the reconnect
            raise BusError(f"publish to {topic} failed: rc={info.rc}", code="publish_failed")

    def subscribe(self, topic_filter: str, handler: Handler, *, qos: int = 1) -> None:
        with self._lock:
            self._subs[topic_filter] = (qos, handler)
        client = self._client
        if client is not None and self._connected.is_set():
            client.subscribe(topic_filter, qos=qos)

    def unsubscribe(self, topic_filter: str) -> None:
        with self._lock:
            known = self._subs.pop(topic_filter, None) is not None
        client = self._client
        if known and client is not None and self._connected.is_set():
            client.unsubscribe(topic_filter)

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def connections(self) -> int:
        return self._connections

    @property
    def protocol(self) -> str:
        return self._protocol


class _Deferred(types.ModuleType):
    """Stands in ``sys.modules`` for a module not imported yet; the first attribute looked up
    on it imports the real module (which then replaces it) and answers from that."""

    def __getattr__(self, attr: str) -> Any:
        if sys.modules.get(self.__name__) is self:  # no lock: a racing thread imports too, and
            sys.modules.pop(self.__name__, None)  # the import system's module lock serialises
        real = importlib.import_module(self.__name__)  # also sets the parent's attribute
        return getattr(real, attr)


_DEFER_LOCK = threading.Lock()


def defer_import(name: str) -> None:
    """Let ``import NAME`` succeed without loading NAME until something uses it.

    paho-mqtt imports ``urllib.request`` at module level for one call: reading proxy settings
    from the environment, which it does only when PySocks is installed (``Client._get_proxy``).
    ``urllib.request`` pulls in ``http.client`` and the ``email`` package: 1.8 MiB of a
    device's 80 MiB resident memory (``plasma-edge bench rss``) for a call the device never
    makes. With a ``_Deferred`` placeholder in ``sys.modules``, paho's ``import`` finds it and
    the real module is imported on first use, by paho or by anyone else, exactly as before
    (any attribute not set on the placeholder counts as a use, ``__file__`` included: a scan of
    ``sys.modules`` such as ``inspect.getmodule`` imports it). A no-op when NAME is already
    imported.
    """
    if name in sys.modules:
        return
    parent, _, child = name.rpartition(".")
    with _DEFER_LOCK:
        if name in sys.modules:
            return
        placeholder = _Deferred(name)
        sys.modules[name] = placeholder
        if parent:
            setattr(importlib.import_module(parent), child, placeholder)


def _on_publish(client: Client, userdata: Any, mid: int, reason_code: ReasonCode,
                properties: Properties) -> None:
    _quickack(client)


def _quickack(client: Client) -> None:
    """ACK what was just read at once: setting TCP_QUICKACK sends a pending delayed ACK now
    (Linux re-arms delayed ACKs by itself, hence once per received PUBLISH and PUBACK). A broker
    that leaves Nagle on (Mosquitto's default: no ``set_tcp_nodelay``) holds its next small
    write to us until our ACK of its last one arrives, up to 40 ms."""
    _set_tcp_option(client.socket(), "TCP_QUICKACK")


def _set_tcp_option(sock: object, name: str) -> None:
    """Set the TCP option ``socket.<name>`` on ``sock`` if it is a real socket; else nothing:
    no socket yet, a websocket wrapper, a unix socket or a platform without the option."""
    try:
        if isinstance(sock, socket.socket):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), 1)
    except (OSError, AttributeError):
        pass
