"""Test helpers: a device kit (bundle, server key, trust store, config), ``plasma-edge run`` as a
subprocess and the daemon in process on the in-memory bus; shared by the edge and deploy tests."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from plasma.protocol import Adapter, SigningKey, encode_packet, topics
from plasma.protocol.bus import BrokerConfig

from .adapters import small_adapter
from .bundles import bundle_path
from .watcher import Watcher


@dataclass(frozen=True)
class DeviceKit:
    """A bundle, the server's signing key, a device trust dir holding its public key and an
    edge config file (``plasma-edge run --config``)."""

    root: Path
    bundle: Path
    key: SigningKey
    trust: Path
    config: Path
    base_sha256: str
    sizes: tuple[int, ...]

    def adapter(self, seed: int = 1, scale: float = 0.02, rank: int = 2) -> Adapter:
        """A small random adapter for every layer of the bundle."""
        return small_adapter(self.sizes, seed, scale, rank)

    def packet(self, fleet: str, slot: str, version: int, device: str | None = "dev1",
               **kw: Any) -> bytes:
        """A valid packet signed by the server key (override any encode_packet field); the
        adapter defaults to ``adapter(version)``."""
        fields: dict[str, Any] = dict(key=self.key, fleet=fleet, slot=slot, version=version,
                                      base_sha256=self.base_sha256,
                                      device=device if slot == "device" else None)
        fields.update(kw)
        adapter = fields.pop("adapter", None) or self.adapter(version)
        return encode_packet(adapter, **fields)

    def resign(self, data: bytes, edit: Callable[[dict[str, Any]], None] | None = None, *,
               payload: bytes | None = None, signers: list[SigningKey] | None = None) -> bytes:
        """Re-sign ``data`` after editing its header dict and/or replacing its payload: what a
        holder of the server key (or a compromised signer) could produce."""
        from plasma.protocol.packet import _PREFIX, FORMAT_VERSION, MAGIC, PREFIX_LEN, SIG_ENTRY_LEN

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

    def start(self, broker: BrokerConfig | str, fleet: str, device: str, state: Path,
              log: Path, *extra: str) -> subprocess.Popen[bytes]:
        """``plasma-edge run`` in Pendulum-v1:m=1.6,g=12 as a subprocess; stderr to ``log``."""
        return start_daemon(self, broker, fleet, device, state, log, *extra)

    @staticmethod
    def watcher(broker: BrokerConfig | str, fleet: str, device: str) -> Watcher:
        return Watcher(broker, fleet, device)

    @staticmethod
    def stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM,
             timeout: float = 15) -> int:
        return stop_daemon(proc, sig, timeout)


def make_kit(root: Path, bundle: str, config: str) -> DeviceKit:
    """A kit under ``root`` around the prebuilt bundle ``bundle``, with a fresh server key and
    ``config`` as the edge TOML."""
    key = SigningKey.generate()
    key.save(root / "keys")
    (root / "trust").mkdir()
    shutil.copyfile(root / "keys" / "signing.pub", root / "trust" / "server.pub")
    (root / "edge.toml").write_text(config)
    path = bundle_path(bundle)
    manifest = json.loads((path / "manifest.json").read_text())
    sizes = (manifest["obs_dim"], *(layer["out"] for layer in manifest["layers"]))
    return DeviceKit(root, path, key, root / "trust", root / "edge.toml",
                     manifest["base_sha256"], sizes)


def start_daemon(kit: DeviceKit, broker: BrokerConfig | str, fleet: str, device: str,
                 state: Path, log: Path, *extra: str) -> subprocess.Popen[bytes]:
    """``plasma-edge run`` as a subprocess against ``broker`` (a URL or a config with TLS and
    credentials; the password goes through the environment, not ``ps``)."""
    config = BrokerConfig.from_url(broker) if isinstance(broker, str) else broker
    url = broker if isinstance(broker, str) else \
        f"{'mqtts' if config.tls else 'mqtt'}://{config.host}:{config.port}"
    argv = [sys.executable, "-m", "plasma.edge.cli", "run", "--broker", url, "--fleet", fleet,
            "--device", device, "--model", str(kit.bundle), "--trust", str(kit.trust),
            "--state", str(state), "--env", "Pendulum-v1:m=1.6,g=12",
            "--config", str(kit.config)]
    for flag, value in (("--username", config.username), ("--ca-file", config.ca_file),
                        ("--cert-file", config.cert_file), ("--key-file", config.key_file)):
        if value is not None:
            argv += [flag, value]
    env = dict(os.environ)
    if config.password is not None:
        env["PLASMA_EDGE_PASSWORD"] = config.password
    return subprocess.Popen([*argv, *extra], stdout=subprocess.DEVNULL, stderr=log.open("ab"),
                            env=env)


def stop_daemon(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM,
                timeout: float = 15) -> int:
    """Signal the daemon and return its exit code (killed after ``timeout``)."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait(5)


class InProcess:
    """A Daemon on a MemoryBus, run on a thread (so it installs no signal handlers); fleet
    ``fmem``, device ``dev1``; ``audits`` collects its audit records."""

    def __init__(self, pendulum: DeviceKit, state: Path, env: Any = None,
                 toml: str = "") -> None:
        from plasma.edge.config import load_config
        from plasma.edge.daemon import Daemon
        from plasma.protocol.bus import MemoryBroker, MemoryBus

        config = state.parent / "inproc.toml"
        config.write_text(pendulum.config.read_text() + toml)
        broker = MemoryBroker()
        flags = {"broker": "mqtt://h:1", "env": "Pendulum-v1", "model": str(pendulum.bundle),
                 "trust": str(pendulum.trust), "state": str(state), "config": str(config), "fleet": "fmem",
                 "device": "dev1"}
        self.daemon = Daemon(load_config(flags, {}), bus=MemoryBus(broker), env=env)
        self.audits: list[dict[str, Any]] = []
        self.watcher = MemoryBus(broker)
        self.watcher.connect()
        self.watcher.subscribe(topics.audit("fmem", "dev1"),
                               lambda m: self.audits.append(json.loads(m.payload)))
        self.runner = threading.Thread(target=self.daemon.run)

    def __enter__(self) -> InProcess:
        self.runner.start()
        self.until(lambda: self.daemon.bus.connected and self.daemon.steps > 0)
        return self

    def __exit__(self, *exc: object) -> None:
        self.daemon.stop.set()
        self.runner.join(15)
        assert not self.runner.is_alive()

    def until(self, what: Callable[[], Any], timeout: float = 10.0) -> Any:
        deadline = time.monotonic() + timeout
        while not (found := what()):
            assert time.monotonic() < deadline, self.audits[-3:]
            time.sleep(0.01)
        return found

    def publish(self, topic: str, data: bytes) -> None:
        self.watcher.publish(topic, data)
