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

REPO = Path(__file__).resolve().parents[2]
PROVISION = REPO / "deploy" / "scripts" / "provision.py"
SHIPPED_CONF = REPO / "deploy" / "mosquitto" / "mosquitto.conf"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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
# fixture (with --import-mode=importlib a sibling helper module is not importable).
EDGE_SIZES = [3, 32, 32, 1]


class AuditWatcher:
    """One MQTT client recording a device's audit records and status messages, with waits."""

    def __init__(self, config: BrokerConfig, fleet: str, device: str) -> None:
        import threading

        from plasma.protocol import topics

        self.bus = MqttBus(config, clean=True)
        self.audits: list[dict] = []
        self.statuses: list[dict] = []
        self.cond = threading.Condition()
        self.bus.connect()
        self.bus.subscribe(topics.audit(fleet, device), self._add(self.audits))
        self.bus.subscribe(topics.status(fleet, device), self._add(self.statuses))

    def _add(self, into: list[dict]) -> Callable:
        def handler(message) -> None:  # type: ignore[no-untyped-def]
            with self.cond:
                into.append(json.loads(message.payload))
                self.cond.notify_all()
        return handler

    def wait(self, what: Callable[[], object], timeout: float = 15.0) -> object:
        deadline = time.monotonic() + timeout
        with self.cond:
            while not (found := what()):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"timed out; audits={self.audits[-3:]} "
                                         f"statuses={self.statuses[-2:]}")
                self.cond.wait(left)
            return found

    def next_audit(self, start: int, **fields: object) -> Callable[[], object]:
        return lambda: next((a for a in self.audits[start:]
                             if all(a.get(k) == v for k, v in fields.items())), None)

    def status(self, pred: Callable[[dict], bool] = lambda s: True) -> Callable[[], object]:
        return lambda: next((s for s in reversed(self.statuses) if pred(s)), None)

    def latest(self) -> dict:
        return self.wait(self.status())  # type: ignore[return-value]

    def close(self) -> None:
        self.bus.close()


@dataclass
class EdgeKit:
    """A Pendulum bundle (random MLP 3-32-32-1), the server's signing key and a device trust dir."""

    root: Path
    bundle: Path
    key: object  # SigningKey
    trust: Path
    base_sha256: str

    def adapter(self, seed: int = 1, scale: float = 0.02, rank: int = 2):  # -> Adapter
        import numpy as np

        from plasma.protocol import Adapter

        rng = np.random.default_rng(seed)
        sizes = EDGE_SIZES
        layers = {f"l{k}": (rng.normal(0, scale, (rank, i)).astype(np.float32),
                            rng.normal(0, scale, (o, rank)).astype(np.float32))
                  for k, (i, o) in enumerate(zip(sizes[:-1], sizes[1:]))}
        return Adapter(alpha=2.0, rank=rank, layers=layers)

    def packet(self, fleet: str, slot: str, version: int, device: str | None = None,
               **kw: object) -> bytes:
        """A valid packet signed by the server key (override any encode_packet field)."""
        from plasma.protocol import encode_packet

        fields: dict = dict(key=self.key, fleet=fleet, slot=slot, version=version,
                            base_sha256=self.base_sha256,
                            device=device if slot == "device" else None)
        fields.update(kw)
        adapter = fields.pop("adapter", None) or self.adapter(version)
        return encode_packet(adapter, **fields)

    def resign(self, data: bytes, edit: Callable[[dict], None] | None = None, *,
               payload: bytes | None = None, signers: list | None = None) -> bytes:
        """Re-sign ``data`` after editing its header dict and/or replacing its payload: what a
        holder of the server key (or a compromised signer) could produce."""
        import hashlib

        from plasma.protocol.packet import (_PREFIX, FORMAT_VERSION, MAGIC, PREFIX_LEN,
                                            SIG_ENTRY_LEN)

        header_len = _PREFIX.unpack_from(data)[3]
        header = json.loads(data[PREFIX_LEN:PREFIX_LEN + header_len])
        count = data[PREFIX_LEN + header_len]
        old_payload = data[PREFIX_LEN + header_len + 1 + count * SIG_ENTRY_LEN:]
        payload = old_payload if payload is None else payload
        header["payload_len"] = len(payload)
        header["payload_sha256"] = hashlib.sha256(payload).hexdigest()
        if edit is not None:
            edit(header)
        raw = json.dumps(header, separators=(",", ":")).encode()
        prefix = _PREFIX.pack(MAGIC, FORMAT_VERSION, 0, len(raw), len(payload),
                              hashlib.sha256(payload).digest())
        signed = prefix + raw
        keys = signers if signers is not None else [self.key]
        entries = [bytes.fromhex(k.key_id) + k.sign(signed) for k in keys]
        return signed + bytes([len(entries)]) + b"".join(entries) + payload

    def start(self, config: BrokerConfig, fleet: str, device: str, state: Path, log: Path,
              *extra: str) -> subprocess.Popen:
        """``plasma-edge run`` as a subprocess (Pendulum-v1, 100 Hz, status every 0.5 s)."""
        scheme = "mqtts" if config.tls else "mqtt"
        argv = [sys.executable, "-m", "plasma.edge.cli", "run",
                "--broker", f"{scheme}://{config.host}:{config.port}", "--fleet", fleet,
                "--device", device, "--model", str(self.bundle), "--trust", str(self.trust),
                "--state", str(state), "--env", "Pendulum-v1:m=1.6,g=12",
                "--config", str(self.root / "edge.toml"), "--rate-hz", "100",
                "--status-interval", "0.5"]
        for flag, value in (("--username", config.username), ("--ca-file", config.ca_file),
                            ("--cert-file", config.cert_file), ("--key-file", config.key_file)):
            if value is not None:
                argv += [flag, value]
        env = dict(os.environ)
        if config.password is not None:
            env["PLASMA_EDGE_PASSWORD"] = config.password  # not in `ps`
        return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=log.open("ab"), env=env)

    @staticmethod
    def watcher(config: BrokerConfig, fleet: str, device: str) -> AuditWatcher:
        return AuditWatcher(config, fleet, device)

    @staticmethod
    def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 15) -> int:
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                return proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
        return proc.wait(5)


@pytest.fixture(scope="session")
def edge_kit(tmp_path_factory: pytest.TempPathFactory) -> EdgeKit:
    """A Pendulum-v1 bundle exported by the real exporter, a server key and a trust store."""
    import numpy as np

    from plasma.protocol import SigningKey
    from plasma.server.export import export_bundle, random_mlp_layers

    root = tmp_path_factory.mktemp("edge-kit")
    bundle = export_bundle(
        root / "bundle", random_mlp_layers(EDGE_SIZES, 0), obs_mean=np.zeros(3),
        obs_std=np.array([1.0, 1.0, 4.0]), act_low=np.array([-2.0]), act_high=np.array([2.0]),
        hidden_activation="tanh", obs_low=np.array([-1.0, -1.0, -8.0]),
        obs_high=np.array([1.0, 1.0, 8.0]), env_id="Pendulum-v1")
    key = SigningKey.generate()
    key.save(root / "keys")
    (root / "trust").mkdir()
    shutil.copyfile(root / "keys" / "signing.pub", root / "trust" / "server.pub")
    (root / "edge.toml").write_text("[canary]\nenabled = false\n[telemetry]\nflush_s = 0.5\n")
    manifest = json.loads((bundle / "manifest.json").read_text())
    return EdgeKit(root, bundle, key, root / "trust", manifest["base_sha256"])
