"""Benchmarks over a real broker: publish -> device swap latency (e2e) and fleet fan-out.

Devices here are the real edge stack without an environment: ``MqttBus`` + the edge
``AdapterPipeline`` (protocol audit, staged merge, model probes, journal, flip) on a
``PolicyRuntime``, several per worker process, each with its own MQTT session. They run
in child processes (``python -m plasma.server.bench.device_worker ...``) so the publisher
and the devices do not share a GIL. All timestamps are ``time.time()`` on one machine.
This module is the publisher side; the devices are in ``device_worker``.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from plasma.protocol import Adapter, AuditRecord, SigningKey, encode_packet, topics
from plasma.protocol.bundle import load_bundle
from plasma.protocol.bus import BrokerConfig, Message, MqttBus
from plasma.protocol.errors import ServiceError

from .device_worker import model_topic, rss_bytes
from .link import ThrottledLink

__all__ = ["ThrottledLink", "bench_e2e", "bench_fleet"]

log = logging.getLogger("plasma.bench")


@dataclass
class _Setup:
    work: Path
    key: SigningKey
    trust_dir: Path
    bundle_dir: Path
    base_sha256: str
    layers: list[tuple[str, int, int]]


def _setup(model: str | None) -> _Setup:
    work = Path(tempfile.mkdtemp(prefix="plasma-bench-"))
    key = SigningKey.generate()
    key.save(work / "keys")
    trust = work / "trust"
    trust.mkdir()
    shutil.copyfile(work / "keys" / "signing.pub", trust / "server.pub")
    if model is None:
        from ..export import export_bundle, random_mlp_layers

        layers = random_mlp_layers([64, 256, 256, 256, 8], seed=0)
        bundle_dir = export_bundle(work / "model", layers, obs_mean=np.zeros(64), obs_std=np.ones(64),
                                   act_low=-np.ones(8), act_high=np.ones(8))
    else:
        bundle_dir = Path(model)
    bundle = load_bundle(bundle_dir)
    return _Setup(work, key, trust, bundle_dir, bundle.base_sha256, bundle.layer_specs)


def _random_adapter(layers: list[tuple[str, int, int]], rank: int, rng: np.random.Generator,
                    scale: float = 0.01) -> Adapter:
    return Adapter(alpha=float(rank), rank=rank, layers={
        name: (rng.normal(0, scale, (rank, n_in)).astype(np.float32),
               rng.normal(0, scale, (n_out, rank)).astype(np.float32))
        for name, n_in, n_out in layers})


class _Workers:
    def __init__(self, setup: _Setup, broker: str, fleet: str, devices: list[str],
                 processes: int, swap: str = "rebuild") -> None:
        self.procs = []
        self.logs: list[Path] = []
        chunks = [devices[i::processes] for i in range(processes)]
        for chunk in filter(None, chunks):
            log_path = setup.work / f"worker-{len(self.procs)}.log"
            self.logs.append(log_path)
            argv = [sys.executable, "-m", "plasma.server.bench.device_worker", "--broker", broker,
                    "--fleet", fleet, "--devices", ",".join(chunk), "--model",
                    str(setup.bundle_dir), "--trust", str(setup.trust_dir), "--state",
                    str(setup.work / "state"), "--swap", swap]
            with log_path.open("wb") as log_file:  # the child keeps its own descriptor
                self.procs.append(subprocess.Popen(argv, stdin=subprocess.PIPE,
                                                   stdout=subprocess.PIPE, stderr=log_file,
                                                   text=True))
        for proc, log_path in zip(self.procs, self.logs, strict=True):
            line = proc.stdout.readline()
            if line.strip() != "ready":
                self.stop()
                tail = log_path.read_text(errors="replace").strip().splitlines()[-1:]
                raise ServiceError(f"a bench worker failed to start (exit {proc.poll()}): "
                                   f"{tail[0] if tail else 'no output'}")

    def rss(self) -> list[int]:
        """Resident bytes of each worker process (asked over its stdin)."""
        out = []
        for proc in self.procs:
            if proc.stdin and proc.stdout:
                proc.stdin.write("rss\n")
                proc.stdin.flush()
                out.append(int(proc.stdout.readline().strip() or 0))
        return out

    def cpu_s(self) -> float:
        """CPU seconds (user + system) the worker processes used so far."""
        return sum(cpu_seconds(p.pid) for p in self.procs)

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None and proc.stdin:
                proc.stdin.close()
        for proc in self.procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()


_PROBE = "bench:subscription-probe"


class _Acks:
    """Collects device audit records from the fleet's audit topics."""

    def __init__(self, bus: MqttBus, fleet: str) -> None:
        self.cond = threading.Condition()
        self.records: list[tuple[str, AuditRecord]] = []
        self.subscribed = threading.Event()
        bus.subscribe(topics.device_filter(fleet, "audit"), self._on, qos=1)

    def _on(self, msg: Message) -> None:
        record = AuditRecord.model_validate_json(msg.payload)
        if record.subject == _PROBE:  # ours, never a device's answer
            self.subscribed.set()
            return
        with self.cond:
            self.records.append((topics.parse(msg.topic).device or "", record))
            self.cond.notify_all()

    def until_subscribed(self, bus: MqttBus, fleet: str, timeout: float = 20.0) -> None:
        """Acks published before the broker has our subscription are lost (QoS 1, not
        retained): send a probe record to ourselves until one comes back."""
        probe = AuditRecord(auditor="edge", subject=_PROBE, fleet=fleet, device="bench-probe",
                            verdict="accepted").model_dump_json().encode()
        deadline = time.monotonic() + timeout
        while not self.subscribed.wait(0.2):
            if time.monotonic() > deadline:
                raise ServiceError(f"the bench's ack subscription was not active after "
                                   f"{timeout:.0f} s")
            bus.publish(topics.audit(fleet, "bench-probe"), probe, qos=1)

    def wait(self, count: int, timeout: float) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: len(self.records) >= count, timeout)

    def take(self) -> list[tuple[str, AuditRecord]]:
        with self.cond:
            out, self.records = self.records, []
            return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (Linux ``/proc``), 0 where unknown."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _pct(values: list[float], q: float) -> float:
    return round(float(np.percentile(values, q)), 3) if values else float("nan")


def bench_e2e(broker: str, packets: int = 200, rank: int = 4, model: str | None = None,
              full_model_pushes: int = 50, swap: str = "rebuild",
              link_kbps: float | None = None) -> dict[str, Any]:
    """Publish -> swap-complete latency for adapter packets and for whole-model pushes.

    ``link_kbps``: the device reaches the broker through a ``ThrottledLink`` of that many kbit/s.
    """
    link = ThrottledLink(broker, link_kbps) if link_kbps else None
    setup = _setup(model)
    fleet, device = f"bench{os.getpid()}", "dev-0"
    try:
        workers = _Workers(setup, link.url if link else broker, fleet, [device], 1, swap)
    except BaseException:
        if link:
            link.close()
        raise
    bus = MqttBus(BrokerConfig.from_url(broker), clean=True)
    try:
        bus.connect()
        acks = _Acks(bus, fleet)
        time.sleep(0.3)
        rng = np.random.default_rng(0)
        lat, transit, sizes, handle, rejected = [], [], [], [], 0
        stages: dict[str, list[float]] = {}
        topic = topics.device_adapter(fleet, device)
        pusher = _ModelPusher(bus, acks, setup, fleet, device)
        for version in range(1, packets + 1):
            data = encode_packet(_random_adapter(setup.layers, rank, rng), key=setup.key,
                                 fleet=fleet, slot="device", device=device, version=version,
                                 base_sha256=setup.base_sha256)
            t0 = time.time()
            bus.publish(topic, data, qos=1, retain=True)
            if not acks.wait(1, 10.0):
                raise RuntimeError(f"no acknowledgement for packet v{version} within 10 s")
            (_, record), = acks.take()
            rejected += record.verdict != "accepted"
            lat.append((record.scores["t_swap"] - t0) * 1e3)
            transit.append((record.scores["t_received"] - t0) * 1e3)
            handle.append(record.scores.get("handle_ms", float("nan")))
            _collect_stages(stages, record.scores)
            sizes.append(len(data))
        bus.publish(topic, b"", qos=1, retain=True)  # clear the retained bench packet
        # The pushes after the packets, not between them: a push right after a packet met the
        # device still building that packet's prepacked session (~1 ms more per push, measured).
        for _ in range(full_model_pushes):
            pusher.push()
        full_lat, model_bytes = pusher.lat, len(pusher.payload)
        full_rejected, full_stages = pusher.rejected, pusher.stages
    finally:
        workers.stop()
        bus.close()
        if link:
            link.close()
        shutil.rmtree(setup.work, ignore_errors=True)
    p50, full_p50 = _pct(lat, 50), _pct(full_lat, 50)
    return {"packets": packets, "rejected": rejected, "rank": rank, "swap": swap,
            "link_kbps": link_kbps,
            "packet_bytes": int(np.median(sizes)), "p50_ms": p50, "p99_ms": _pct(lat, 99),
            "transit_p50_ms": _pct(transit, 50), "device_handle_p50_ms": _pct(handle, 50),
            "device_stages_p50_ms": {k: _pct(v, 50) for k, v in stages.items()},
            "full_model_stages_p50_ms": {k: _pct(v, 50) for k, v in full_stages.items()},
            "full_model_pushes": full_model_pushes, "full_model_rejected": full_rejected,
            "full_model_bytes": model_bytes,
            "full_model_p50_ms": full_p50, "full_model_p99_ms": _pct(full_lat, 99),
            "speedup_p50": round(full_p50 / p50, 2) if p50 > 0 else None,
            "bytes_ratio": round(model_bytes / float(np.median(sizes)), 1)}


def _collect_stages(stages: dict[str, list[float]], scores: dict[str, float]) -> None:
    """Append a device record's ``stage_ms.*`` scores (where its handling time went)."""
    for key, value in scores.items():
        if key.startswith("stage_ms."):
            stages.setdefault(key.removeprefix("stage_ms."), []).append(value)


class _ModelPusher:
    """Whole signed int8 model pushes to one bench device, one at a time."""

    def __init__(self, bus: MqttBus, acks: _Acks, setup: _Setup, fleet: str, device: str) -> None:
        self.bus, self.acks = bus, acks
        model = (setup.bundle_dir / "model.int8.onnx").read_bytes()
        self.payload = bytes.fromhex(setup.key.key_id) + setup.key.sign(model) + model
        self.topic = model_topic(fleet, device)
        self.lat: list[float] = []
        self.rejected = 0
        self.stages: dict[str, list[float]] = {}

    def push(self) -> None:
        t0 = time.time()
        self.bus.publish(self.topic, self.payload, qos=1)
        if not self.acks.wait(1, 20.0):
            raise RuntimeError("no acknowledgement for a full-model push within 20 s")
        (_, record), = self.acks.take()
        self.rejected += record.verdict != "accepted"
        self.lat.append((record.scores["t_swap"] - t0) * 1e3)
        _collect_stages(self.stages, record.scores)


def bench_fleet(broker: str | None, devices: int = 200, processes: int = 4, rank: int = 4,
                model: str | None = None, timeout: float = 30.0, swap: str = "rebuild"
                ) -> dict[str, Any]:
    """One fleet packet to N devices: seconds until all N report it active, and the resident
    memory of the device processes (RSS, once every device runs the new adapter).

    ``broker`` None: a Mosquitto of the bench's own (``tools.broker.start_mosquitto``: its
    ``max_connections`` and file-descriptor limit sized for ``devices``)."""
    local, broker_dir = None, Path()
    if broker is None:
        from ..tools.broker import free_port, start_mosquitto

        port = free_port()
        broker_dir = Path(tempfile.mkdtemp(prefix="plasma-mosq-"))
        local = start_mosquitto("127.0.0.1", port, broker_dir, max_connections=devices + 64)
        broker = f"mqtt://127.0.0.1:{port}"
    setup = _setup(model)
    fleet = f"fleet{os.getpid()}"
    ids = [f"dev-{i}" for i in range(devices)]
    t_start = time.monotonic()
    rss: list[int] = []
    cpu: tuple[float, float | None] = (0.0, None)
    try:
        workers = _Workers(setup, broker, fleet, ids, processes, swap)
    except BaseException:
        shutil.rmtree(setup.work, ignore_errors=True)
        if local is not None:
            local.terminate()
            shutil.rmtree(broker_dir, ignore_errors=True)
        raise
    startup_s = time.monotonic() - t_start
    log.info("bench fleet: %d devices in %d processes ready after %.1f s", devices,
             len(workers.procs), startup_s)
    bus = MqttBus(BrokerConfig.from_url(broker), clean=True)
    try:
        bus.connect()
        acks = _Acks(bus, fleet)
        acks.until_subscribed(bus, fleet)
        data = encode_packet(_random_adapter(setup.layers, rank, np.random.default_rng(1)),
                             key=setup.key, fleet=fleet, slot="fleet", version=1,
                             base_sha256=setup.base_sha256)
        cpu0 = (workers.cpu_s(), cpu_seconds(local.pid) if local else 0.0)
        t0 = time.time()
        bus.publish(topics.fleet_adapter(fleet), data, qos=1, retain=True)
        acks.wait(devices, timeout)
        records = acks.take()
        cpu = (workers.cpu_s() - cpu0[0],
               cpu_seconds(local.pid) - cpu0[1] if local else None)
        log.info("bench fleet: %d of %d devices answered after %.1f s", len(records), devices,
                 time.time() - t0)
        bus.publish(topics.fleet_adapter(fleet), b"", qos=1, retain=True)
        rss = workers.rss()
    finally:
        workers.stop()
        bus.close()
        shutil.rmtree(setup.work, ignore_errors=True)
        if local is not None:
            local.terminate()
            local.wait(10)
            shutil.rmtree(broker_dir, ignore_errors=True)
    accepted = {d: r.scores["t_swap"] - t0 for d, r in records if r.verdict == "accepted"}
    rejected = sum(r.verdict != "accepted" for _, r in records)
    seen = {d for d, _ in records}
    return {"devices": devices, "processes": processes, "swap": swap, "packet_bytes": len(data),
            "all_active_s": round(max(accepted.values()), 3)
            if len(accepted) == devices else None,
            "p50_active_s": round(float(np.median(list(accepted.values()))), 3) if accepted
            else None,
            "accepted": len(accepted), "rejected": rejected, "missed": devices - len(seen),
            "startup_s": round(startup_s, 1),
            "device_rss_mb": round(sum(rss) / 2**20, 1),
            "device_rss_mb_per_device": round(sum(rss) / 2**20 / devices, 2),
            "worker_rss_mb": [round(r / 2**20, 1) for r in rss],
            "bench_rss_mb": round(rss_bytes() / 2**20, 1),
            "device_cpu_ms_per_device": round(cpu[0] * 1e3 / devices, 2),
            "broker_cpu_ms_per_device": round(cpu[1] * 1e3 / devices, 3)
            if cpu[1] is not None else None}
