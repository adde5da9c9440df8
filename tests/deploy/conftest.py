"""A real Mosquitto running the SHIPPED deploy/mosquitto/mosquitto.conf, provisioned by the
shipped deploy/scripts/provision.py, on free loopback ports in a temp directory."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from plasma.protocol.bus import BrokerConfig, MqttBus
from tests.helpers.bundles import PENDULUM
from tests.helpers.daemon import DeviceKit, make_kit
from tests.helpers.ports import free_port

REPO = Path(__file__).resolve().parents[2]
PROVISION = REPO / "deploy" / "scripts" / "provision.py"
SHIPPED_CONF = REPO / "deploy" / "mosquitto" / "mosquitto.conf"


def provision(*args: str) -> dict:
    done = subprocess.run([sys.executable, str(PROVISION), *args], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@dataclass
class PlasmaBroker:
    pki: Path
    tls_port: int
    local_port: int
    process: subprocess.Popen
    log: Path
    command: list[str]

    def creds(self, user: str) -> Path:
        return self.pki / "clients" / user

    def password(self, user: str) -> str:
        return (self.creds(user) / "password").read_text().strip()

    def config(self, user: str | None, *, password: str | None = None, cert: bool = True,
               tls: bool = True, port: int | None = None, protocol: str = "auto",
               creds_of: str | None = None) -> BrokerConfig:
        """Broker settings as a device or server would have them, with knobs to break them."""
        creds = self.creds(creds_of or user or "plasma-server")
        return BrokerConfig(
            host="localhost", port=port or (self.tls_port if tls else self.local_port),
            tls=tls, username=user,
            password=password if password is not None else (self.password(user) if user
                                                               else None),
            ca_file=str(creds / "ca.crt") if tls else None,
            cert_file=str(creds / "client.crt") if tls and cert else None,
            key_file=str(creds / "client.key") if tls and cert else None,
            protocol=protocol)

    def restart(self) -> None:
        """Clean stop (persistence is written) and start again on the same ports."""
        self.process.terminate()
        self.process.wait(10)
        self.process = subprocess.Popen(self.command, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE, cwd=self.pki.parent)
        _wait_listening(self.process, (self.tls_port, self.local_port), self.log)

    def reload(self) -> None:
        """SIGHUP: Mosquitto re-reads the password file and the ACL."""
        self.process.send_signal(signal.SIGHUP)
        time.sleep(0.3)


def _wait_listening(proc: subprocess.Popen, ports: tuple[int, ...], log: Path) -> None:
    deadline = time.monotonic() + 10
    pending = list(ports)
    while pending and time.monotonic() < deadline:
        if proc.poll() is not None:
            text = log.read_text() if log.exists() else ""
            raise RuntimeError(f"mosquitto exited: {proc.stderr.read().decode()[-500:]} "
                               f"{text[-500:]}")
        try:
            with socket.create_connection(("127.0.0.1", pending[0]), timeout=0.2):
                pending.pop(0)
        except OSError:
            time.sleep(0.05)
    if pending:
        proc.kill()
        raise RuntimeError("mosquitto did not start listening within 10 s")


@pytest.fixture(scope="module")
def plasma_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PlasmaBroker]:
    """Fleet fa: devices d1, d2, revoked; fleet fb: device d1 (same device id, other fleet).
    Two server workers (plasma-server, plasma-server-2) and a read-only admin (ops)."""
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not Path(binary).exists():
        pytest.fail("Mosquitto is not installed: run `apt-get install mosquitto`")
    root = tmp_path_factory.mktemp("plasma-broker")
    pki = root / "pki"
    provision("provision", "--out", str(pki), "--fleet", "fa", "--device", "d1", "--device",
              "d2", "--device", "revoked", "--server", "plasma-server", "--server",
              "plasma-server-2", "--admin", "ops")
    provision("provision", "--out", str(pki), "--fleet", "fb", "--device", "d1")
    tls_port, local_port = free_port(), free_port()
    log = root / "mosquitto.log"
    conf = root / "mosquitto.conf"
    extra = ["--user", "root"] if os.geteuid() == 0 else []
    (root / "data").mkdir()
    provision("render-conf", "--conf", str(SHIPPED_CONF), "--broker-dir", str(pki / "broker"),
              "--data-dir", str(root / "data"), "--tls-port", str(tls_port), "--local-port",
              str(local_port), "--log-file", str(log), "--out", str(conf), *extra)
    command = [binary, "-c", str(conf)]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=root)
    _wait_listening(proc, (tls_port, local_port), log)
    broker = PlasmaBroker(pki, tls_port, local_port, proc, log, command)
    yield broker
    broker.process.terminate()
    try:
        broker.process.wait(5)
    except subprocess.TimeoutExpired:
        broker.process.kill()
        broker.process.wait(5)


@pytest.fixture(scope="session")
def run_provision() -> Callable[..., dict]:
    """deploy/scripts/provision.py as a subprocess; returns its JSON summary."""
    return provision


@pytest.fixture
def connect(plasma_broker: PlasmaBroker) -> Iterator[Callable[..., MqttBus]]:
    """connect(user, **config_knobs, client_id=None) -> a connected MqttBus, closed after."""
    buses: list[MqttBus] = []

    def make(user: str | None, *, client_id: str | None = None, timeout: float = 5.0,
             **knobs: object) -> MqttBus:
        bus = MqttBus(plasma_broker.config(user, **knobs), client_id=client_id, clean=True)
        buses.append(bus)
        bus.connect(timeout=timeout)
        return bus

    yield make
    for bus in buses:
        bus.close()


# ---------------------------------------------------------------- edge daemons (attack/fault suites)
# Shared by tests/deploy/test_attacks.py and tests/deploy/test_faults.py through the `edge_kit`
# fixture; the kit itself (packets, re-signing, daemon start-up, watcher) is tests.helpers.daemon.
@pytest.fixture(scope="session")
def edge_kit(tmp_path_factory: pytest.TempPathFactory) -> DeviceKit:
    """The prebuilt Pendulum-v1 bundle (random MLP 3-32-32-1), a server key and a trust store;
    the daemon runs at 100 Hz and reports its status every 0.5 s."""
    return make_kit(tmp_path_factory.mktemp("edge-kit"), PENDULUM,
                    "rate_hz = 100\nstatus_interval = 0.5\n"
                    "[canary]\nenabled = false\n[telemetry]\nflush_s = 0.5\n")
