"""A local broker for the demo and the live bench: Mosquitto when installed, else amqtt.

The embedded MQTT 3.1.1 broker (amqtt) runs as its own process (``python -m
plasma.server.tools.broker --port N``) so its event loop never competes with the server's numpy
work for the GIL.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["answers", "free_port", "mosquitto_binary", "start_embedded", "start_local",
           "start_mosquitto"]


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


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def mosquitto_binary() -> str | None:
    """The Mosquitto executable, or None when it is not installed."""
    return shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if Path(p).exists()), None)


def start_mosquitto(host: str, port: int, workdir: Path, timeout: float = 10.0,
                    max_connections: int | None = None) -> subprocess.Popen:
    """Mosquitto on ``host:port`` (anonymous, no persistence, Nagle off) with its config and log
    in ``workdir``; raises RuntimeError when it does not listen within ``timeout``.

    ``max_connections``: Mosquitto needs a file descriptor per client; the soft limit
    (``ulimit -n``) of the child is raised towards the hard limit to fit, and a limit that
    cannot fit is an error here rather than clients refused later."""
    binary = mosquitto_binary()
    if binary is None:
        raise RuntimeError("Mosquitto is not installed (apt-get install mosquitto)")
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "mosquitto.conf"
    config.write_text(f"listener {port} {host}\nallow_anonymous true\npersistence false\n"
                      "set_tcp_nodelay true\nmax_queued_messages 10000\n"
                      f"max_connections {max_connections or -1}\n")
    log_file = (workdir / "mosquitto.log").open("ab")
    preexec = None
    if max_connections is not None:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        need = max_connections + 64  # listeners, log, persistence
        if hard != resource.RLIM_INFINITY and hard < need:
            raise RuntimeError(f"{max_connections} MQTT connections need {need} file descriptors; "
                               f"the hard limit is {hard} (raise it: ulimit -Hn / LimitNOFILE)")
        if soft != resource.RLIM_INFINITY and soft < need:
            def preexec() -> None:
                resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
    proc = subprocess.Popen([binary, "-c", str(config)], stdout=log_file, stderr=subprocess.STDOUT,
                            preexec_fn=preexec)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mosquitto exited with {proc.returncode}: see {workdir}/mosquitto.log")
        if answers(host, port, 0.2):
            return proc
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"mosquitto did not listen on {host}:{port} within {timeout:.0f} s")


def start_local(workdir: Path, host: str = "127.0.0.1") -> tuple[str, subprocess.Popen, str]:
    """A fresh broker on a free loopback port: (URL, process, "mosquitto" or "amqtt")."""
    port = free_port(host)
    if mosquitto_binary() is not None:
        return f"mqtt://{host}:{port}", start_mosquitto(host, port, workdir), "mosquitto"
    return f"mqtt://{host}:{port}", start_embedded(host, port), "amqtt"


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
