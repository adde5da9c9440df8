"""``plasma-server run``: ingest -> world model -> phantom paths -> distill -> audit -> publish.

Stages live in their own modules; this file only wires them:

- the round itself (stages 2-5) is ``plasma.server.adapt``: one ``Learner`` per device (and one
  for the fleet slot) keeps the warm-started model, the aggregated labels and the last accepted
  adapter between rounds.
- ``AdaptationWorker``: the schedule. A device with at least ``min_new_transitions`` new
  transitions gets a device-slot round; every ``fleet_every`` device rounds a fleet-slot round
  runs on every device's data. Each target's data cursor and accepted adapter are persisted in
  the store after every completed round (a restart resumes; a round that raised leaves the
  cursor where it was, so its data are used by the retry).
- ``Server``: bus, store, ingest, publisher and worker; ``run`` blocks until SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import io
import logging
import signal
import socket
import threading
from collections import Counter
from dataclasses import dataclass

import numpy as np

from plasma.protocol import Adapter, Provenance, SigningKey, TraceBatch, new_id
from plasma.protocol._cli import add_broker_arguments
from plasma.protocol.bundle import Bundle, BundleError, load_bundle
from plasma.protocol.bus import Bus, MqttBus
from plasma.protocol.errors import ConfigError

from .adapt import AdaptConfig, Learner, RoundResult, adapt_config
from .ingest import Ingest, IngestConfig
from .judicial import JudicialAuditor, RealData
from .phantom import blas_threads
from .policy_net import LoRA, MLPPolicy
from .publisher import Publisher, PublisherConfig
from .service_config import BUDGETS, SCALARS, ServiceConfig, load_service_config
from .store import TraceStore
from .tasks import TaskSpec, get_task

__all__ = ["Server", "policy_from_bundle", "register", "run_server"]

log = logging.getLogger(__name__)


def round_config(budget: str, seed: int = 0, max_transitions: int = 20_000) -> AdaptConfig:
    """The round's budget by name (``plasma.server.adapt.adapt_config``)."""
    return adapt_config(budget, seed, max_transitions)


def to_adapter(lora: LoRA) -> Adapter:
    return Adapter(alpha=lora.alpha, rank=lora.rank, layers=lora.factors)


def real_data(batch: TraceBatch, max_rows: int) -> RealData:
    """The newest ``max_rows`` transitions of a stored batch as RealData."""
    sl = slice(max(0, len(batch) - max_rows), len(batch))
    return RealData(np.asarray(batch.obs[sl], np.float32), np.asarray(batch.action[sl], np.float32),
                    np.asarray(batch.reward[sl], np.float32),
                    np.asarray(batch.next_obs[sl], np.float32))


@dataclass(frozen=True)
class ScheduleConfig:
    """When rounds run (the ``ServiceConfig`` fields the worker needs)."""

    fleet: str
    """Fleet whose devices are adapted."""
    min_new_transitions: int = 200
    """New real transitions that make a device due a round."""
    fleet_every: int = 0
    """A fleet-slot round after this many device rounds (0 = never)."""
    check_interval: float = 1.0
    """Seconds between looks at the store."""


class AdaptationWorker:
    """Runs due rounds one at a time on its own thread; hands approved adapters to the publisher.

    One ``Learner`` per device (device slot) and one for the fleet slot; their cursors and
    accepted adapters are loaded from the store on first use and saved after every round."""

    def __init__(self, store: TraceStore, publisher: Publisher, task: TaskSpec, base: MLPPolicy,
                 schedule: ScheduleConfig, rounds: AdaptConfig) -> None:
        self.store, self.publisher, self.task, self.base = store, publisher, task, base
        self.schedule, self.rounds = schedule, rounds
        self.learners: dict[str, Learner] = {}
        """device -> its learner (model, labels, accepted adapter relative to base + fleet)."""
        self.cursor: dict[str, int] = {}
        """device -> last chunk id a completed round used (persisted)."""
        self.fleet_learner: Learner | None = None
        self.fleet_cursor = 0
        self.verdicts: Counter[str] = Counter()
        self.device_rounds = 0
        self.cpu_seconds: list[float] = []
        """CPU seconds of each completed round."""
        self._since_fleet = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def fleet_adapter(self) -> LoRA | None:
        return self.fleet_learner.adapter if self.fleet_learner is not None else None

    @property
    def device_adapter(self) -> dict[str, LoRA]:
        """device -> the device-slot adapter last approved."""
        return {d: lr.adapter for d, lr in self.learners.items() if lr.adapter is not None}

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="plasma-adapt", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("a round is still computing; it is abandoned (nothing was published)")

    def _loop(self) -> None:
        while not self._stop.wait(self.schedule.check_interval):
            try:
                self.step()
            except Exception:  # noqa: BLE001 - a failed round must not end adaptation; logged
                log.exception("adaptation round failed; its data stay due and the next check "
                              "retries")

    # ------------------------------------------------------------------ persisted state
    def _learner(self, slot: str, target: str) -> Learner:
        if slot == "fleet":
            if self.fleet_learner is None:
                self.fleet_learner, self.fleet_cursor = self._load("fleet", target)
            return self.fleet_learner
        if target not in self.learners:
            self.learners[target], self.cursor[target] = self._load("device", target)
        return self.learners[target]

    def _load(self, slot: str, target: str) -> tuple[Learner, int]:
        saved = self.store.load_learner(self.schedule.fleet, slot, target)
        adapter = None
        if saved and saved["adapter"]:
            adapter = LoRA.load_npz(io.BytesIO(saved["adapter"]))  # type: ignore[arg-type]
        learner = Learner(self.task, self.rounds, adapter)
        if saved:
            learner.rounds = int(saved["rounds"])  # type: ignore[call-overload]
            log.info("%s %s: resuming after chunk %s with %s", slot, target, saved["cursor"],
                     "its accepted adapter" if adapter is not None else "the base policy")
        return learner, int(saved["cursor"]) if saved else 0  # type: ignore[call-overload]

    def _save(self, slot: str, target: str, learner: Learner, cursor: int) -> None:
        blob = learner.adapter.to_npz_bytes() if learner.adapter is not None else None
        self.store.save_learner(self.schedule.fleet, slot, target, cursor, blob, learner.rounds)

    # ------------------------------------------------------------------ the schedule
    def step(self) -> list[RoundResult]:
        """Run every round that is due now (device rounds first, then the fleet round)."""
        results = []
        for device in self.store.devices(self.schedule.fleet):
            if self._stop.is_set():
                break
            self._learner("device", device)
            new = self.store.count_rows(self.schedule.fleet, device,
                                        after_id=self.cursor.get(device, 0))
            if new >= self.schedule.min_new_transitions:
                results.append(self.device_round(device, new))
        every = self.schedule.fleet_every
        if every and self._since_fleet >= every and not self._stop.is_set():
            results.append(self.fleet_round())
        return results

    def device_round(self, device: str, new: int) -> RoundResult:
        fleet = self.schedule.fleet
        learner = self._learner("device", device)
        batch = self.store.transitions(fleet, device, newest=self.rounds.max_transitions)
        if batch is None:
            raise RuntimeError(f"device {device} has no stored transitions")
        log.info("device %s: %d new real transitions (%d in all); adapting its device slot",
                 device, new, len(batch))
        self._check_device(device, learner)
        policy = self.base.merged(self.fleet_adapter)
        result = self._round(learner, policy, batch, "device", device)
        self.cursor[device] = batch.seq  # only after a completed round: a failed one retries
        self._save("device", device, learner, batch.seq)
        self.device_rounds += 1
        self._since_fleet += 1
        return result

    def fleet_round(self) -> RoundResult:
        fleet = self.schedule.fleet
        learner = self._learner("fleet", fleet)
        batch = self.store.transitions(fleet, newest=self.rounds.max_transitions)
        self._since_fleet = 0
        if batch is None:
            raise RuntimeError("fleet round with no data")
        log.info("fleet %s: adapting the fleet slot on %d transitions of %d devices", fleet,
                 len(batch), len(self.store.devices(fleet)))
        before = learner.adapter
        per_device = {d: real_data(b, self.rounds.max_transitions) for d in self.store.devices(fleet)
                      if (b := self.store.transitions(fleet, d, newest=self.rounds.max_transitions))}
        result = self._round(learner, self.base, batch, "fleet", None, per_device)
        self._save("fleet", fleet, learner, batch.seq)
        if learner.adapter is not before:  # device adapters were relative to the old fleet one
            for device, lr in self.learners.items():
                lr.reset_adapter()
                self._save("device", device, lr, self.cursor.get(device, 0))
        return result

    def _check_device(self, device: str, learner: Learner) -> None:
        """A device that refused or rolled back its adapter runs its base again: so does the
        learner (its model stays)."""
        state = self.store.device_state(self.schedule.fleet, device, "device")
        if learner.adapter is not None and state["last_verdict"] in ("rejected", "rolled_back"):
            log.warning("device %s %s device adapter v%s; the next one starts from its base",
                        device, state["last_verdict"], state["last_version"])
            learner.reset_adapter()

    def _round(self, learner: Learner, policy: MLPPolicy, batch: TraceBatch, slot: str,
               device: str | None, devices: dict[str, RealData] | None = None) -> RoundResult:
        real = real_data(batch, self.rounds.max_transitions)
        simulation_id = new_id()
        reference = learner.adapter
        auditor = JudicialAuditor(self.task, policy, self.rounds.judicial)
        # 1 BLAS thread: these small matmuls ran 2-50x slower with 2 threads on a busy 2-core
        # machine (phantom.blas_threads); the devices share the cores
        with blas_threads(1):
            result = learner.round(policy, real, fleet=self.schedule.fleet, slot=slot,
                                   device=device, subject=f"simulation:{simulation_id}",
                                   auditor=auditor, devices=devices)
        self.verdicts[result.verdict] += 1
        self.cpu_seconds.append(result.cpu_seconds)
        self.publisher.publish_audit(result.record)
        target = device or f"fleet {self.schedule.fleet}"
        if result.adapter is None:
            log.warning("%s: candidate blocked by the judicial audit (%s) after %.1f s; the "
                        "%s slot keeps its current adapter", target,
                        ", ".join(r.code for r in result.record.reasons), result.seconds, slot)
            return result
        provenance = Provenance(
            trace_count=len(real.obs), trace_from=float(batch.timestamp.min()),
            trace_to=float(batch.timestamp.max()), simulation_id=simulation_id,
            world_model_version=f"{result.model_kind}-{simulation_id[:8]}",
            note=f"judicial: {result.verdict}")
        self.publisher.submit(to_adapter(result.adapter), slot, device,  # type: ignore[arg-type]
                              priority=4 if slot == "fleet" else 5, provenance=provenance)
        log.info("%s: %s adapter approved (%s, predicted gain %.1f, reference %s) after %.1f s;"
                 " queued for publication", target, slot, result.verdict,
                 result.record.scores.get("gain", 0.0),
                 "its last adapter" if reference is not None else "base", result.seconds)
        return result


# ---------------------------------------------------------------------------- the process


def policy_from_bundle(bundle: Bundle) -> MLPPolicy:
    """The base policy the devices run, from its bundle's fp32 master weights."""
    m = bundle.manifest
    if m.hidden_activation != "tanh":
        raise BundleError(f"{bundle.root}: hidden activation {m.hidden_activation!r}; the server's "
                          "policy math is tanh only", code="bad_model")
    return MLPPolicy([(np.asarray(w), np.asarray(b)) for w, b in bundle.layers()],
                     obs_mean=np.asarray(m.obs_mean), obs_std=np.asarray(m.obs_std),
                     act_low=np.asarray(m.act_low), act_high=np.asarray(m.act_high))


class _Collector:
    """Prometheus view of the stages' counters (read at scrape time; stages stay metric-free)."""

    def __init__(self, server: Server) -> None:
        self.server = server

    def collect(self):  # type: ignore[no-untyped-def]
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        stats = self.server.ingest.stats()
        rows = CounterMetricFamily("plasma_server_ingest_rows", "Real transitions stored")
        rows.add_metric([], stats["rows"])
        refused = CounterMetricFamily("plasma_server_ingest_refused",
                                      "Telemetry frames refused, by reason", labels=["reason"])
        for reason, n in dict(stats["refused"]).items():  # type: ignore[call-overload]
            refused.add_metric([reason], n)
        rounds = CounterMetricFamily("plasma_server_rounds", "Adaptation rounds, by verdict",
                                     labels=["verdict"])
        for verdict, n in self.server.worker.verdicts.items():
            rounds.add_metric([verdict], n)
        packets = CounterMetricFamily("plasma_server_packets", "Packets published")
        packets.add_metric([], len(self.server.publisher.sent))
        pending = GaugeMetricFamily("plasma_server_packets_pending", "Packets waiting to publish")
        pending.add_metric([], self.server.publisher.pending())
        acks = CounterMetricFamily("plasma_server_acks", "Device acknowledgements stored")
        acks.add_metric([], self.server.publisher.acks)
        return [rows, refused, rounds, packets, pending, acks]


class Server:
    """Bus, store, ingest, publisher and adaptation worker of one fleet."""

    def __init__(self, cfg: ServiceConfig, bus: Bus | None = None) -> None:
        """``bus``: the broker seam (default: an ``MqttBus`` on ``cfg.broker``)."""
        self.cfg = cfg
        key = SigningKey.load(cfg.key)
        try:
            bundle = load_bundle(cfg.model)
        except BundleError as exc:
            raise BundleError(f"--model {cfg.model}: {exc}", code=exc.code) from None
        self.base = policy_from_bundle(bundle)
        try:
            self.task = get_task(cfg.task_id)
        except KeyError as exc:
            raise ConfigError(str(exc.args[0])) from None
        if (bundle.manifest.obs_dim, bundle.manifest.act_dim) != (self.task.obs_dim,
                                                                  self.task.act_dim):
            raise ConfigError(f"--model has dims {bundle.manifest.obs_dim}/"
                              f"{bundle.manifest.act_dim}, {cfg.task_id} has "
                              f"{self.task.obs_dim}/{self.task.act_dim}")
        self.store = TraceStore(cfg.store)
        client_id = f"plasma-server-{cfg.fleet}-{socket.gethostname()}"
        self.bus = bus if bus is not None else MqttBus(cfg.broker, client_id=client_id)
        self.ingest = Ingest(self.bus, self.store, IngestConfig(
            fleet=cfg.fleet, dims=(self.task.obs_dim, self.task.act_dim)))
        self.publisher = Publisher(self.bus, self.store, key, PublisherConfig(
            fleet=cfg.fleet, base_sha256=bundle.base_sha256, dtype=cfg.dtype,
            expires_in_s=cfg.expires_in, min_interval_s=cfg.publish_interval))
        self.worker = AdaptationWorker(
            self.store, self.publisher, self.task, self.base,
            ScheduleConfig(cfg.fleet, cfg.min_new_transitions, cfg.fleet_every,
                           cfg.check_interval),
            round_config(cfg.budget, cfg.seed, cfg.max_transitions))

    def start(self) -> None:
        self.bus.connect()
        self.ingest.start()
        self.publisher.start()
        self.worker.start()
        if self.cfg.metrics_port is not None:
            from prometheus_client import CollectorRegistry, start_http_server

            registry = CollectorRegistry()
            registry.register(_Collector(self))  # type: ignore[arg-type]
            start_http_server(self.cfg.metrics_port, registry=registry)

    def stop(self) -> None:
        self.worker.stop()
        self.publisher.stop()
        self.ingest.stop()
        self.bus.close()
        self.store.close()

    def summary(self) -> str:
        s = self.ingest.stats()
        refused = sum(dict(s["refused"]).values())  # type: ignore[call-overload]
        return (f"{s['rows']} transitions stored from {len(self.store.devices(self.cfg.fleet))} "
                f"device(s), {refused} frames refused, {self.worker.device_rounds} device rounds "
                f"({dict(self.worker.verdicts) or 'none yet'}), {len(self.publisher.sent)} packets "
                f"published, {self.publisher.acks} device acks")


def run_server(cfg: ServiceConfig, stop: threading.Event | None = None,
               report_every_s: float = 60.0) -> int:
    """Run until SIGTERM / SIGINT (or ``stop`` is set); returns the exit code."""
    stop = stop or threading.Event()
    server = Server(cfg)
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    server.start()
    log.info("plasma-server: fleet %s on %s:%d (MQTT %s), base %s, store %s; a device is adapted "
             "after %d new transitions", cfg.fleet, cfg.broker.host, cfg.broker.port,
             server.bus.protocol, cfg.model, cfg.store, cfg.min_new_transitions)
    try:
        while not stop.wait(report_every_s):
            log.info("progress: %s", server.summary())
    finally:
        log.info("stopping: %s", server.summary())
        server.stop()
    return 0


def _run(args: argparse.Namespace) -> int:
    flags = {name: getattr(args, name, None) for name in (*SCALARS, "config")}
    return run_server(load_service_config(flags))


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``plasma-server run`` to the CLI's subcommands."""
    p = sub.add_parser("run", help="run the server: ingest, adapt, audit and publish for a fleet",
                       description="Every option may also come from PLASMA_SERVER_<NAME> or "
                       "a --config TOML file (flag > environment > file > default).")
    p.add_argument("--config", metavar="FILE", help="TOML file with the option names as keys")
    add_broker_arguments(p, "PLASMA_SERVER_")
    p.add_argument("--fleet")
    p.add_argument("--key", metavar="DIR", help="signing key directory (signing.key, mode 0600)")
    p.add_argument("--model", metavar="BUNDLE_DIR", help="the base policy bundle devices run")
    p.add_argument("--store", metavar="PATH", help="SQLite trace store (default "
                   "plasma-server.sqlite)")
    p.add_argument("--env", metavar="ENV", help="task of the devices' world, e.g. Pendulum-v1")
    p.add_argument("--min-new-transitions", dest="min_new_transitions", type=int, metavar="K",
                   help="adapt a device after K new real transitions (default 200)")
    p.add_argument("--fleet-every", dest="fleet_every", type=int, metavar="N",
                   help="a fleet-slot round after every N device rounds (default 0 = never)")
    p.add_argument("--check-interval", dest="check_interval", type=float, metavar="SECONDS",
                   help="how often the store is checked for devices due a round (default 1)")
    p.add_argument("--publish-interval", dest="publish_interval", type=float, metavar="SECONDS",
                   help="at most one packet per target per this many seconds (default 5)")
    p.add_argument("--max-transitions", dest="max_transitions", type=int, metavar="N",
                   help="newest real transitions used per round (default 20000)")
    p.add_argument("--budget", choices=BUDGETS, help="compute per round (default: default)")
    p.add_argument("--dtype", choices=["int8", "fp16", "fp32"], help="adapter wire encoding")
    p.add_argument("--expires-in", dest="expires_in", type=float, metavar="SECONDS",
                   help="packet validity (default one week)")
    p.add_argument("--metrics-port", dest="metrics_port", type=int, metavar="PORT",
                   help="serve Prometheus /metrics on this port")
    p.add_argument("--seed", type=int)
    p.set_defaults(handler=_run)
