"""``plasma-server run`` on a tiny budget: telemetry in, judicial record and packet out; SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from plasma.protocol import (
    AuditRecord,
    SigningKey,
    TraceBatch,
    TrustStore,
    decode_packet,
    encode_traces,
    topics,
)
from plasma.protocol.bus import BrokerConfig, MqttBus
from plasma.protocol.errors import ConfigError
from plasma.server.publisher import judicial_topic
from plasma.server.run import run_server
from plasma.server.service_config import load_service_config
from plasma.server.tasks import PENDULUM
from tests.helpers.bundles import PENDULUM_SMALL, bundle_path

pytestmark = pytest.mark.broker


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A server key and the prebuilt random-MLP Pendulum bundle (3-16-16-1)."""
    root = tmp_path_factory.mktemp("run")
    SigningKey.generate().save(root / "keys")
    return {"root": root, "keys": root / "keys", "bundle": bundle_path(PENDULUM_SMALL)}


def frames(fleet: str, device: str, n_frames: int, rows: int = 50) -> list[bytes]:
    """Real Pendulum (m=1.6, g=12) transitions under random torques."""
    rng = np.random.default_rng(1)
    physics = PENDULUM.physics({"m": 1.6, "g": 12.0})
    th = rng.uniform(-np.pi, np.pi)
    obs = np.array([[np.cos(th), np.sin(th), 0.0]], np.float32)
    out, t = [], time.time()
    for f in range(n_frames):
        o, a, r, nx = [], [], [], []
        for _ in range(rows):
            act = rng.uniform(-2, 2, (1, 1)).astype(np.float32)
            nxt = PENDULUM.sim_step(obs, act, physics).astype(np.float32)
            o.append(obs[0]), a.append(act[0]), nx.append(nxt[0])
            r.append(float(PENDULUM.reward(obs, act, nxt)[0]))
            obs = nxt
        n = rows
        out.append(encode_traces(TraceBatch(
            fleet=fleet, device=device, episode=np.zeros(n, np.uint32),
            step=np.arange(f * n, (f + 1) * n, dtype=np.uint32), obs=np.array(o),
            action=np.array(a),
            reward=np.array(r, np.float32), next_obs=np.array(nx), terminated=np.zeros(n, bool),
            truncated=np.zeros(n, bool), versions={"fleet": np.zeros(n, np.uint32),
                                                    "device": np.zeros(n, np.uint32)},
            timestamp=t + 0.05 * np.arange(f * n, (f + 1) * n),
            seq=f)))
    return out


def flags(setup: dict[str, Path], url: str, fleet: str) -> dict[str, object]:
    return {"broker": url, "fleet": fleet, "key": str(setup["keys"]), "model": str(setup["bundle"]),
            "store": str(setup["root"] / f"{fleet}.sqlite"), "env": "Pendulum-v1",
            "min_new_transitions": 300, "check_interval": 0.2, "publish_interval": 0.0,
            "budget": "small"}


def test_config_precedence_and_errors(tmp_path: Path) -> None:
    (tmp_path / "s.toml").write_text(
        'fleet = "fromfile"\nmin_new_transitions = 50\nbudget = "small"\n')
    cfg = load_service_config({"config": str(tmp_path / "s.toml"), "broker": "mqtts://h:8884",
                               "key": "k", "model": "m", "env": "Pendulum-v1:m=1.6",
                               "min_new_transitions": 70},
                              environ={"PLASMA_SERVER_FLEET": "fromenv",
                                       "PLASMA_SERVER_PASSWORD": "s3cret"})
    assert (cfg.fleet, cfg.min_new_transitions, cfg.budget) == ("fromenv", 70, "small")
    assert cfg.broker.tls and cfg.broker.port == 8884 and cfg.broker.password == "s3cret"
    assert cfg.task_id == "Pendulum-v1"
    with pytest.raises(ConfigError, match="--key"):
        load_service_config({"broker": "mqtt://h", "fleet": "f", "model": "m", "env": "e"},
                            environ={})
    with pytest.raises(ConfigError, match="fleet"):
        load_service_config({"broker": "mqtt://h", "fleet": "no/slash", "key": "k", "model": "m",
                             "env": "e"}, environ={})


def test_run_adapts_a_device_end_to_end(setup, mosquitto) -> None:  # type: ignore[no-untyped-def]
    fleet = "run" + uuid.uuid4().hex[:8]
    cfg = load_service_config(flags(setup, mosquitto.url, fleet), environ={})
    stop = threading.Event()
    server = threading.Thread(target=run_server, args=(cfg, stop, 1.0), daemon=True)
    server.start()
    device = MqttBus(BrokerConfig.from_url(mosquitto.url), clean=True)
    device.connect()
    records: list[AuditRecord] = []
    packets: list[bytes] = []
    device.subscribe(judicial_topic(fleet),
                     lambda m: records.append(AuditRecord.model_validate_json(m.payload)))
    device.subscribe(topics.device_adapter(fleet, "d1"), lambda m: packets.append(m.payload))
    try:
        time.sleep(2.0)  # the server connects and subscribes
        for data in frames(fleet, "d1", 8):
            device.publish(topics.telemetry(fleet, "d1"), data)
        deadline = time.monotonic() + 90
        while not records and time.monotonic() < deadline:
            time.sleep(0.1)
        assert records, "no judicial record within 90 s"
        record = records[0]
        assert record.auditor == "judicial" and record.device == "d1" and record.slot == "device"
        assert record.subject.startswith("simulation:")
        if record.verdict in ("published", "corrected"):
            while not packets and time.monotonic() < deadline:
                time.sleep(0.1)
            header = decode_packet(packets[0], TrustStore.from_dir(setup["keys"])).header
            assert (header.fleet, header.device, header.version) == (fleet, "d1", 1)
            assert header.provenance.trace_count >= 300
            assert header.provenance.simulation_id == record.subject.split(":", 1)[1]
        else:
            assert record.verdict == "blocked" and record.reasons
    finally:
        stop.set()
        server.join(20)
        device.close()
    assert not server.is_alive()


def test_sigterm_stops_cleanly(setup, mosquitto) -> None:  # type: ignore[no-untyped-def]
    fleet = "sig" + uuid.uuid4().hex[:8]
    args = [f"--{k.replace('_', '-')}={v}" for k, v in flags(setup, mosquitto.url, fleet).items()]
    code = ("import argparse, logging, sys\n"
            "from plasma.server.run import register\n"
            "logging.basicConfig(level=logging.INFO)\n"
            "p = argparse.ArgumentParser(); sub = p.add_subparsers(); register(sub)\n"
            "a = p.parse_args(sys.argv[1:]); sys.exit(a.handler(a))\n")
    proc = subprocess.Popen([sys.executable, "-c", code, "run", *args], stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.monotonic() + 30
        lines = []
        while time.monotonic() < deadline:
            line = proc.stderr.readline()  # type: ignore[union-attr]
            lines.append(line)
            if "plasma-server: fleet" in line:
                break
        assert any("a device is adapted after 300 new transitions" in ln for ln in lines), lines
        proc.send_signal(signal.SIGTERM)
        rest = proc.communicate(timeout=20)[1]
        assert proc.returncode == 0, rest
        assert "stopping:" in rest
    finally:
        if proc.poll() is None:
            proc.kill()
