"""Server bench: a bandwidth-limited TCP relay, standing for a device's constrained link to the broker."""

from __future__ import annotations

import socket
import threading
import time
from urllib.parse import urlsplit, urlunsplit

__all__ = ["ThrottledLink"]


class ThrottledLink:
    """A TCP relay in front of the broker that carries at most ``kbps`` kbit/s each way.

    The devices connect through it, the publisher does not: it stands for a device's own
    constrained link (cellular, LoRa gateways, a shared site uplink), where an adapter's bytes
    matter. Each direction is a token bucket with a 16 KB burst, paced by sleeping; one relay
    thread per direction per connection. Plain ``mqtt://`` only (TLS would need the broker's
    name on the relay's address).
    """

    BURST = 16 * 1024

    def __init__(self, broker_url: str, kbps: float) -> None:
        parts = urlsplit(broker_url)
        if parts.scheme != "mqtt" or not parts.hostname:
            raise ValueError(f"--link-kbps needs an mqtt:// broker URL, got {broker_url!r}")
        if not kbps > 0:
            raise ValueError(f"--link-kbps must be positive, got {kbps}")
        self.upstream = (parts.hostname, parts.port or 1883)
        self.rate = kbps * 1000 / 8  # bytes per second
        self._server = socket.create_server(("127.0.0.1", 0))
        port = self._server.getsockname()[1]
        userinfo = parts.netloc.rpartition("@")[0]  # credentials, if any, go through unchanged
        here = f"{userinfo}@127.0.0.1:{port}" if userinfo else f"127.0.0.1:{port}"
        self.url = urlunsplit(("mqtt", here, parts.path, parts.query, ""))
        self._closed = threading.Event()
        threading.Thread(target=self._accept, name="link-accept", daemon=True).start()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                down, _ = self._server.accept()
            except OSError:
                return
            try:
                up = socket.create_connection(self.upstream, timeout=10)
            except OSError:
                down.close()
                continue
            up.settimeout(None)
            for sock in (up, down):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for src, dst in ((down, up), (up, down)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        tokens, last = float(self.BURST), time.monotonic()
        try:
            while True:
                chunk = src.recv(4096)
                if not chunk:
                    break
                view = memoryview(chunk)
                while view:
                    now = time.monotonic()
                    tokens = min(self.BURST, tokens + (now - last) * self.rate)
                    last = now
                    if tokens < 1:
                        time.sleep(min((len(view) - tokens) / self.rate, 0.05))
                        continue
                    n = min(len(view), int(tokens))
                    dst.sendall(view[:n])
                    tokens -= n
                    view = view[n:]
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self._closed.set()
        self._server.close()
