"""Benchmarks over a real broker: publish -> device swap latency (e2e) and fleet fan-out.

Devices here are the real edge stack without an environment: ``MqttBus`` + the edge
``AdapterPipeline`` (protocol audit, staged merge, model probes, journal, flip) on a
``PolicyRuntime``, several per worker process, each with its own MQTT session. They run
in child processes (``python -m plasma.server.bench.fleet worker ...``) so the publisher
and the devices do not share a GIL. All timestamps are ``time.time()`` on one machine.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import queue
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import numpy as np

from plasma.edge.audit import AuditContext
from plasma.protocol.bundle import load_bundle
from plasma.protocol.bus import BrokerConfig, Message, MqttBus
from plasma.edge.canary import Canary, CanaryConfig
from plasma.edge.journal import Journal
from plasma.edge.merge import MergeEngine
from plasma.edge.pipeline import AdapterPipeline
from plasma.edge.runtime import PolicyRuntime
from plasma.edge.probes import behaviour_scores, judge_behaviour, probe_observations
from plasma.protocol import (
    Adapter,
    AuditRecord,
    SigningKey,
    TrustStore,
    encode_packet,
    topics,
)
from plasma.protocol.wire import Reason

log = logging.getLogger("plasma.bench")
MODEL_TOPIC_SUFFIX = "model"  # bench-only topic for the full-model push


# ------------------------------------------------------------------ device side (worker)


class BenchDevice:
    """One device: its own MQTT session, auditor, journal and policy runtime."""

    def __init__(self, broker: BrokerConfig, fleet: str, device: str, bundle_dir: Path,
                 trust: TrustStore, state: Path, swap: str = "rebuild") -> None:
        self.fleet, self.device = fleet, device
        bundle = load_bundle(bundle_dir)
        self.runtime = PolicyRuntime(bundle, swap=swap)
        ctx = AuditContext(trust=trust, fleet=fleet, device=device,
                           base_sha256=bundle.base_sha256,
                           layers={n: (i, o) for n, i, o in bundle.layer_specs})
        self.pipeline = AdapterPipeline(self.runtime, MergeEngine(self.runtime), Journal(state),
                                        ctx, Canary(CanaryConfig(enabled=False)), None)
        self.bundle_dir = bundle_dir
        self.trust = trust
        self.model_store = state / "model.int8.onnx"
        self.reload_session = None
        self.bus = MqttBus(broker, client_id=f"bench-{fleet}-{device}"[:64], clean=True)
        self.audit_topic = topics.audit(fleet, device)
        self.jobs: queue.Queue[tuple[str, bytes]] = queue.Queue()

    def start(self) -> None:
        self.bus.connect()
        self.bus.subscribe(topics.fleet_adapter(self.fleet),
                           lambda msg: self._on_packet(msg, "fleet"), qos=1)
        self.bus.subscribe(topics.device_adapter(self.fleet, self.device),
                           lambda msg: self._on_packet(msg, "device"), qos=1)
        model_topic = f"{topics.ROOT}/{self.fleet}/device/{self.device}/{MODEL_TOPIC_SUFFIX}"
        self.bus.subscribe(model_topic, self._on_model, qos=1)

    def _on_packet(self, msg: Message, slot: str) -> None:
        if msg.payload:
            received = time.time()
            outcome = self.pipeline.handle(msg.payload, source=slot)
            done = time.time()
            record = outcome.record.model_copy(update={"scores": {
                **outcome.record.scores, "t_received": received, "t_swap": done,
                "handle_ms": outcome.elapsed_s * 1e3}})
            self.bus.publish(self.audit_topic, record.model_dump_json().encode(), qos=1)

    def _on_model(self, msg: Message) -> None:
        """Full-model push, with the same safety as a packet where it applies: verify the
        Ed25519 signature over the model, persist it durably (write + fdatasync, as the
        journal does for a packet), build a new session from the bytes, run the same behaviour
        probes the auditor runs on a staged adapter (action change against the live policy,
        action bounds, perturbation sensitivity against the shipped base), swap one reference."""
        import onnxruntime as ort

        key_id, signature, model = msg.payload[:16].hex(), msg.payload[16:80], msg.payload[80:]
        ok = self.trust.verify(key_id, signature, model) is True
        if ok:
            _durable_write(self.model_store, model)
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = 1
            session = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
            ok = not self._probe(session)
            if ok:
                self.reload_session = session  # the swap: one reference
        done = time.time()
        record = AuditRecord(auditor="edge", subject="model-push", fleet=self.fleet,
                             device=self.device, verdict="accepted" if ok else "rejected",
                             scores={"t_swap": done})
        self.bus.publish(self.audit_topic, record.model_dump_json().encode(), qos=1)

    def _probe(self, session: Any) -> tuple[Reason, ...]:
        space, th = self.pipeline.space, self.pipeline.thresholds
        rng = np.random.default_rng(0)
        obs = probe_observations(np.zeros((0, len(space.obs_std)), np.float32), th.probe_count,
                                 space.obs_low, space.obs_high, rng)
        scores = behaviour_scores(self.runtime.act_batch,
                                  lambda x: session.run(["action"], {"obs": x})[0],
                                  self.runtime.base_act_batch, obs, space.act_low,
                                  space.act_high, th, space.obs_std, rng)
        return judge_behaviour(scores, th)

    def close(self) -> None:
        self.bus.close()


def _durable_write(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fdatasync(fd)
    finally:
        os.close(fd)


def worker_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="fleet_bench worker")
    p.add_argument("--broker", required=True)
    p.add_argument("--fleet", required=True)
    p.add_argument("--devices", required=True, help="comma-separated ids")
    p.add_argument("--model", required=True)
    p.add_argument("--trust", required=True)
    p.add_argument("--state", required=True)
    p.add_argument("--swap", choices=["rebuild", "inplace"], default="rebuild")
    args = p.parse_args(argv)
    broker = BrokerConfig.from_url(args.broker)
    trust = TrustStore.from_dir(args.trust)
    devices = [BenchDevice(broker, args.fleet, d, Path(args.model), trust,
                           Path(args.state) / d, args.swap) for d in args.devices.split(",")]
    for dev in devices:
        dev.start()
    time.sleep(0.3)  # let SUBACKs land before saying ready
    print("ready", flush=True)
    sys.stdin.read()  # the parent closes stdin to stop us
    for dev in devices:
        dev.close()
    return 0


# ------------------------------------------------------------------ publisher side


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
        chunks = [devices[i::processes] for i in range(processes)]
        for chunk in filter(None, chunks):
            argv = [sys.executable, "-m", "plasma.server.bench.fleet", "worker", "--broker", broker,
                    "--fleet", fleet, "--devices", ",".join(chunk), "--model",
                    str(setup.bundle_dir), "--trust", str(setup.trust_dir), "--state",
                    str(setup.work / "state"), "--swap", swap]
            self.procs.append(subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                               stderr=subprocess.DEVNULL, text=True))
        for proc in self.procs:
            line = proc.stdout.readline()
            if line.strip() != "ready":
                self.stop()
                raise RuntimeError(f"a bench worker failed to start (exit {proc.poll()})")

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None and proc.stdin:
                proc.stdin.close()
        for proc in self.procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()


class _Acks:
    """Collects device audit records from the fleet's audit topics."""

    def __init__(self, bus: MqttBus, fleet: str) -> None:
        self.cond = threading.Condition()
        self.records: list[tuple[str, AuditRecord]] = []
        bus.subscribe(topics.device_filter(fleet, "audit"), self._on, qos=1)

    def _on(self, msg: Message) -> None:
        record = AuditRecord.model_validate_json(msg.payload)
        with self.cond:
            self.records.append((topics.parse(msg.topic).device or "", record))
            self.cond.notify_all()

    def wait(self, count: int, timeout: float) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: len(self.records) >= count, timeout)

    def take(self) -> list[tuple[str, AuditRecord]]:
        with self.cond:
            out, self.records = self.records, []
            return out


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
        topic = topics.device_adapter(fleet, device)
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
            sizes.append(len(data))
        bus.publish(topic, b"", qos=1, retain=True)  # clear the retained bench packet
        full_lat, model_bytes, full_rejected = _full_model_pushes(bus, acks, setup, fleet, device,
                                                   full_model_pushes)
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
            "full_model_pushes": full_model_pushes, "full_model_rejected": full_rejected,
            "full_model_bytes": model_bytes,
            "full_model_p50_ms": full_p50, "full_model_p99_ms": _pct(full_lat, 99),
            "speedup_p50": round(full_p50 / p50, 2) if p50 > 0 else None,
            "bytes_ratio": round(model_bytes / float(np.median(sizes)), 1)}


def _full_model_pushes(bus: MqttBus, acks: _Acks, setup: _Setup, fleet: str, device: str,
                       n: int) -> tuple[list[float], int, int]:
    model = (setup.bundle_dir / "model.int8.onnx").read_bytes()
    payload = bytes.fromhex(setup.key.key_id) + setup.key.sign(model) + model
    topic = f"{topics.ROOT}/{fleet}/device/{device}/{MODEL_TOPIC_SUFFIX}"
    lat, rejected = [], 0
    for _ in range(n):
        t0 = time.time()
        bus.publish(topic, payload, qos=1)
        if not acks.wait(1, 20.0):
            raise RuntimeError("no acknowledgement for a full-model push within 20 s")
        (_, record), = acks.take()
        rejected += record.verdict != "accepted"
        lat.append((record.scores["t_swap"] - t0) * 1e3)
    return lat, len(payload), rejected


def bench_fleet(broker: str, devices: int = 200, processes: int = 4, rank: int = 4,
                model: str | None = None, timeout: float = 30.0, swap: str = "rebuild"
                ) -> dict[str, Any]:
    """One fleet packet to N devices: seconds until all N report it active."""
    setup = _setup(model)
    fleet = f"fleet{os.getpid()}"
    ids = [f"dev-{i}" for i in range(devices)]
    t_start = time.monotonic()
    workers = _Workers(setup, broker, fleet, ids, processes, swap)
    startup_s = time.monotonic() - t_start
    bus = MqttBus(BrokerConfig.from_url(broker), clean=True)
    try:
        bus.connect()
        acks = _Acks(bus, fleet)
        time.sleep(0.5)
        data = encode_packet(_random_adapter(setup.layers, rank, np.random.default_rng(1)),
                             key=setup.key, fleet=fleet, slot="fleet", version=1,
                             base_sha256=setup.base_sha256)
        t0 = time.time()
        bus.publish(topics.fleet_adapter(fleet), data, qos=1, retain=True)
        acks.wait(devices, timeout)
        records = acks.take()
        bus.publish(topics.fleet_adapter(fleet), b"", qos=1, retain=True)
    finally:
        workers.stop()
        bus.close()
        shutil.rmtree(setup.work, ignore_errors=True)
    accepted = {d: r.scores["t_swap"] - t0 for d, r in records if r.verdict == "accepted"}
    rejected = sum(r.verdict != "accepted" for _, r in records)
    seen = {d for d, _ in records}
    return {"devices": devices, "processes": processes, "swap": swap, "packet_bytes": len(data),
            "all_active_s": round(max(accepted.values()), 3)
            if len(accepted) == devices else None,
            "p50_active_s": round(float(np.median(list(accepted.values()))), 3) if accepted
            else None,
            "accepted": len(accepted), "rejected": rejected, "missed": devices - len(seen),
            "startup_s": round(startup_s, 1)}


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        sys.exit(worker_main(sys.argv[2:]))
    sys.exit("usage: python -m plasma.server.bench.fleet worker ... (use plasma-server bench)")
