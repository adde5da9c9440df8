"""An embedded MQTT 3.1.1 broker (amqtt) for the demo, when no broker answers.

Run as its own process (``python -m plasma.server.tools.broker --port N``) so the
broker's event loop never competes with the server's numpy work for the GIL.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import socket
import subprocess
import sys
import time


def broker_config(host: str, port: int) -> dict:
    return {
        "listeners": {"default": {"type": "tcp", "bind": f"{host}:{port}"}},
        "plugins": {
            "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True},
        },
    }


async def _serve(host: str, port: int) -> None:
    from amqtt.broker import Broker

    broker = Broker(broker_config(host, port))
    await broker.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await broker.shutdown()


def answers(host: str, port: int, timeout: float = 0.5) -> bool:
    """True when something accepts TCP connections at host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def start_embedded(host: str, port: int, timeout: float = 15.0) -> subprocess.Popen:
    """Start the embedded broker in a child process and wait until it listens."""
    proc = subprocess.Popen([sys.executable, "-m", "plasma.server.tools.broker",
                             "--host", host, "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace")[-800:] if proc.stderr else ""
            raise RuntimeError(f"embedded broker exited: {err}")
        if answers(host, port, 0.2):
            return proc
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"embedded broker did not listen on {host}:{port} within {timeout:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=1883)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    try:
        asyncio.run(_serve(args.host, args.port))
    except ImportError:
        sys.exit("the embedded broker needs amqtt: pip install 'plasma[demo]'")


if __name__ == "__main__":
    main()
