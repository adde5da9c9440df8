"""Server bench: the device side of ``bench e2e|fleet``, a worker process running several real edge stacks.

Each ``BenchDevice`` is the real edge stack without an environment: ``MqttBus`` + the edge
``AdapterPipeline`` (protocol audit, staged merge, model probes, journal, flip) on a
``PolicyRuntime``, with its own MQTT session. ``plasma.server.bench.fleet`` starts this module
as ``python -m plasma.server.bench.device_worker --broker URL ...``, prints ``ready`` once
subscribed and stops when its stdin closes.

The devices of one worker process hand their packets to one handler thread (``Handler``) instead
of running the pipeline in their own network threads: a real device has its process to itself,
and 250 devices running the pipeline at once in one process measured the GIL, not the devices
(1,000 devices in 4 processes: no device finished within 30 s and the busy processes missed
their MQTT keepalives; with one handler per process every packet is handled in turn).
"""

from __future__ import annotations

import argparse
import logging
import os
import queue
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from plasma.edge.audit import AuditContext
from plasma.edge.canary import Canary, CanaryConfig
from plasma.edge.journal import Journal
from plasma.edge.merge import MergeEngine
from plasma.edge.pipeline import AdapterPipeline, StageClock
from plasma.edge.probes import behaviour_scores, judge_behaviour, probe_observations
from plasma.edge.runtime import PolicyRuntime
from plasma.protocol import AuditRecord, TrustStore, topics
from plasma.protocol.bundle import load_bundle
from plasma.protocol.bus import BrokerConfig, Message, MqttBus
from plasma.protocol.wire import Reason

__all__ = ["BenchDevice", "Handler", "model_topic", "rss_bytes", "worker_main"]

MODEL_TOPIC_SUFFIX = "model"  # bench-only topic for the full-model push


def model_topic(fleet: str, device: str) -> str:
    """The bench-only topic a device takes full-model pushes on."""
    return f"{topics.ROOT}/{fleet}/device/{device}/{MODEL_TOPIC_SUFFIX}"


class Handler:
    """A few threads that run the devices' packet handling; one device always on one thread
    (its packets in arrival order). Several threads overlap the journal's fdatasync waits
    (~4-8 ms each on this machine) with the next device's numpy and onnxruntime work."""

    def __init__(self, threads: int = 4) -> None:
        self._queues: list[queue.Queue[Callable[[], None] | None]] = []
        self._threads = []
        for i in range(threads):
            q: queue.Queue[Callable[[], None] | None] = queue.Queue()
            t = threading.Thread(target=self._run, args=(q,), name=f"bench-handler-{i}",
                                 daemon=True)
            t.start()
            self._queues.append(q)
            self._threads.append(t)
        self._next = 0

    def lane(self) -> queue.Queue[Callable[[], None] | None]:
        """The queue a new device hands its work to (round robin)."""
        q = self._queues[self._next % len(self._queues)]
        self._next += 1
        return q

    @staticmethod
    def _run(q: queue.Queue[Callable[[], None] | None]) -> None:
        while (job := q.get()) is not None:
            try:
                job()
            except Exception:  # noqa: BLE001 - one device's failure must not stop the others
                logging.getLogger(__name__).exception("bench device: handling failed")

    def close(self) -> None:
        for q in self._queues:
            q.put(None)
        for t in self._threads:
            t.join(10)


def rss_bytes(pid: int | None = None) -> int:
    """Resident memory of a process (Linux ``/proc``), 0 where unknown."""
    try:
        with open(f"/proc/{pid or 'self'}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class BenchDevice:
    """One device: its own MQTT session, auditor, journal and policy runtime."""

    def __init__(self, broker: BrokerConfig, fleet: str, device: str, bundle_dir: Path,
                 trust: TrustStore, state: Path, swap: str = "rebuild",
                 handler: Handler | None = None) -> None:
        self.fleet, self.device = fleet, device
        self.jobs = (handler or Handler(1)).lane()
        bundle = load_bundle(bundle_dir)
        self.runtime = PolicyRuntime(bundle, swap=swap)
        ctx = AuditContext(trust=trust, fleet=fleet, device=device,
                           base_sha256=bundle.base_sha256,
                           layers={n: (i, o) for n, i, o in bundle.layer_specs})
        self.pipeline = AdapterPipeline(self.runtime, MergeEngine(self.runtime), Journal(state),
                                        ctx, Canary(CanaryConfig(enabled=False)), None,
                                        defer_upgrade=True)  # as the daemon: woken once reported
        self.pipeline.restore()  # what a device does at boot (the journal's versions)
        self.bundle_dir = bundle_dir
        self.trust = trust
        self.model_store = state / "model.int8.onnx"
        self.reload_session = None
        self.bus = MqttBus(broker, client_id=f"bench-{fleet}-{device}"[:64], clean=True)
        self.audit_topic = topics.audit(fleet, device)

    def start(self) -> None:
        self.bus.connect()
        self.bus.subscribe(topics.fleet_adapter(self.fleet),
                           lambda msg: self._on_packet(msg, "fleet"), qos=1)
        self.bus.subscribe(topics.device_adapter(self.fleet, self.device),
                           lambda msg: self._on_packet(msg, "device"), qos=1)
        self.bus.subscribe(model_topic(self.fleet, self.device),
                           lambda msg: self.jobs.put(lambda: self._on_model(msg)), qos=1)

    def _on_packet(self, msg: Message, slot: str) -> None:
        if msg.payload:
            received = time.time()
            self.jobs.put(lambda: self._handle(msg, slot, received))

    def _handle(self, msg: Message, slot: str, received: float) -> None:
        outcome = self.pipeline.handle(msg.payload, source=slot)
        done = time.time()
        record = outcome.record.model_copy(update={"scores": {
            **outcome.record.scores, "t_received": received, "t_swap": done,
            "handle_ms": outcome.elapsed_s * 1e3,
            **{f"stage_ms.{k}": v for k, v in outcome.stages_ms.items()}}})
        self.bus.publish(self.audit_topic, record.model_dump_json().encode(), qos=1)
        self.runtime.request_upgrade()

    def _on_model(self, msg: Message) -> None:
        """Full-model push, with the same safety as a packet where it applies: verify the
        Ed25519 signature over the model, persist it durably (write + fdatasync, as the
        journal does for a packet), build a new session from the bytes, run the same behaviour
        probes the auditor runs on a staged adapter (action change against the live policy,
        action bounds, perturbation sensitivity against the shipped base), swap one reference."""
        import onnxruntime as ort

        clock = StageClock()
        key_id, signature, model = msg.payload[:16].hex(), msg.payload[16:80], msg.payload[80:]
        ok = self.trust.verify(key_id, signature, model) is True
        clock.mark("verify")
        if ok:
            _durable_write(self.model_store, model)
            clock.mark("write_sync")
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = 1
            session = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
            clock.mark("build")
            ok = not self._probe(session)
            clock.mark("probes")
            if ok:
                self.reload_session = session  # the swap: one reference
        done = time.time()
        record = AuditRecord(auditor="edge", subject="model-push", fleet=self.fleet,
                             device=self.device, verdict="accepted" if ok else "rejected",
                             scores={"t_swap": done,
                                     **{f"stage_ms.{k}": v for k, v in clock.ms.items()}})
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
    p = argparse.ArgumentParser(prog="python -m plasma.server.bench.device_worker")
    p.add_argument("--broker", required=True)
    p.add_argument("--fleet", required=True)
    p.add_argument("--devices", required=True, help="comma-separated ids")
    p.add_argument("--model", required=True)
    p.add_argument("--trust", required=True)
    p.add_argument("--state", required=True)
    p.add_argument("--swap", choices=["rebuild", "inplace"], default="rebuild")
    p.add_argument("--threads", type=int, default=4, help="packet-handling threads")
    args = p.parse_args(argv)
    broker = BrokerConfig.from_url(args.broker)
    trust = TrustStore.from_dir(args.trust)
    handler = Handler(args.threads)
    devices = [BenchDevice(broker, args.fleet, d, Path(args.model), trust,
                           Path(args.state) / d, args.swap, handler)
               for d in args.devices.split(",")]
    for dev in devices:
        dev.start()
    time.sleep(0.3)  # let SUBACKs land before saying ready
    print("ready", flush=True)
    for line in sys.stdin:  # "rss" -> our resident bytes; EOF (the parent closes stdin) -> stop
        if line.strip() == "rss":
            print(rss_bytes(), flush=True)
    for dev in devices:
        dev.close()
    handler.close()
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    sys.exit(worker_main(sys.argv[1:]))
