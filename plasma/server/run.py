"""``plasma-server run``: ingest -> world model -> phantom paths -> distill -> audit -> publish.

Stages live in their own modules; this file only wires them:

- ``produce_candidate``: stages 2-4 for one slot (the phantom-DAgger loop of ``adapt_bench``:
  roll the adapted policy in the model, relabel visited states with the planner, refit LoRA).
- ``AdaptationWorker``: the schedule. A device with at least ``min_new_transitions`` new
  transitions gets a device-slot round; every ``fleet_every`` device rounds (and at least
  ``min_new_transitions`` new rows fleet-wide) a fleet-slot round runs on every device's data.
- ``Server``: bus, store, ingest, publisher and worker; ``run`` blocks until SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import logging
import signal
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from plasma.protocol.bundle import Bundle, BundleError, load_bundle
from plasma.protocol.bus import Bus, MqttBus
from plasma.protocol import Adapter, Provenance, SigningKey, TraceBatch, new_id
from plasma.protocol._cli import add_broker_arguments
from plasma.protocol.errors import ConfigError

from .distill import DistillConfig, LoRADistiller
from .judicial import JudicialAuditor, JudicialConfig, RealData, StateFilter, split_members
from .phantom import PhantomConfig, PhantomPathSimulator, PlannerConfig, blas_threads
from .ingest import Ingest, IngestConfig
from .policy_net import LoRA, MLPPolicy
from .publisher import Publisher, PublisherConfig
from .service_config import BUDGETS, SCALARS, ServiceConfig, load_service_config
from .store import TraceStore
from .tasks import TaskSpec, get_task
from .worldmodel import WorldModel, WorldModelConfig

__all__ = ["Server", "policy_from_bundle", "register", "run_server"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RoundConfig:
    """One adaptation round (stages 2-5) for one slot."""

    model: WorldModelConfig = field(default_factory=lambda: WorldModelConfig(
        ensemble_size=7, hidden=(128, 128), max_epochs=60, patience=5))
    """Ensemble settings; the last ``heldout_members`` members are kept from the planner."""
    heldout_members: int = 2
    """Members the planner never sees: the judicial auditor validates the gain on them."""
    dagger_iters: int = 2
    """Phantom DAgger iterations: roll the adapted policy in the model, relabel, refit."""
    phantom_paths: int = 128
    """Phantom paths per DAgger iteration (start states drawn from the real traces)."""
    phantom_horizon: int = 60
    """Steps per phantom path."""
    label_states: int = 600
    """Visited phantom states relabelled by the planner per iteration."""
    planner: PlannerConfig = field(default_factory=lambda: PlannerConfig(
        candidates=64, horizon=30, iterations=3))
    """MPPI in the world model, centred on the policy's own plan."""
    distill: DistillConfig = field(default_factory=lambda: DistillConfig(rank=4, steps=300,
                                                                        anchor=0.05))
    """LoRA distillation settings."""
    max_transitions: int = 20_000
    """Newest real transitions used per round (older ones are dropped from the fit)."""
    seed: int = 0
    """Seed of model init, phantom paths and distillation."""


def fit_world_model(task: TaskSpec, real: RealData, cfg: RoundConfig) -> WorldModel:
    """Stage 2 on this round's data: a fresh ensemble (the last members are held out later)."""
    model = WorldModel(task.obs_dim, task.act_dim, cfg.model)
    model.fit(real.obs, real.act, real.next_obs, real.rew if cfg.model.learn_reward else None)
    return model


def produce_candidate(task: TaskSpec, policy: MLPPolicy, model: WorldModel, real: RealData,
                      cfg: RoundConfig, init: LoRA | None = None, keep: StateFilter | None = None
                      ) -> LoRA:
    """Stages 3-4: phantom DAgger from ``init``; ``task`` may carry a penalized reward."""
    rng = np.random.default_rng(cfg.seed)
    sim = PhantomPathSimulator(model, task, PhantomConfig(
        paths=cfg.phantom_paths, horizon=cfg.phantom_horizon, action_noise=0.05,
        with_disagreement=False, seed=cfg.seed))
    distiller = LoRADistiller(policy, cfg.distill)
    lora = init.copy() if init is not None else distiller.init_adapter()
    labels_obs = np.empty((0, task.obs_dim), np.float32)
    labels_act = np.empty((0, task.act_dim), np.float32)
    for _ in range(cfg.dagger_iters):
        roll = sim.rollout(real.obs, policy, lora)
        visited = roll.obs[:, :-1].reshape(-1, task.obs_dim)  # (paths * horizon, obs_dim)
        pick = rng.choice(len(visited), min(cfg.label_states, len(visited)), replace=False)
        extra = real.obs[rng.choice(len(real.obs), cfg.label_states // 4)]
        states = np.concatenate([visited[pick], extra]).astype(np.float32)
        if keep is not None:
            states = states[keep(states)]
            if len(states) < 16:
                log.info("correction: fewer than 16 trusted label states; keeping the adapter")
                break
        plan = sim.plan(states, policy, lora, cfg.planner)
        labels_obs = np.concatenate([labels_obs, states])
        labels_act = np.concatenate([labels_act, plan.actions])
        lora = distiller.fit(labels_obs, labels_act, anchor_states=real.obs, init=lora).adapter
    return lora


@dataclass
class RoundResult:
    """What one slot round produced and decided."""

    verdict: str
    adapter: LoRA | None
    """The adapter to publish (None when blocked)."""
    decision: Any
    """The judicial ``Decision`` (both candidates and both judgements)."""
    record: Any
    """The judicial AuditRecord."""
    transitions: int
    seconds: float


def adaptation_round(task: TaskSpec, policy: MLPPolicy, real: RealData, cfg: RoundConfig,
                     auditor: JudicialAuditor, *, fleet: str, slot: str, device: str | None,
                     reference: LoRA | None = None, subject: str = "candidate",
                     model: WorldModel | None = None) -> RoundResult:
    """Stages 2-5 for one slot: fit, split members, produce, review (with one correction).

    ``task`` is the phantom world's task (its reward is what the planner maximizes); the
    auditor must judge in that same world."""
    t0 = time.perf_counter()
    model = model or fit_world_model(task, real, cfg)
    planning, heldout = split_members(model, cfg.heldout_members)
    candidate = produce_candidate(task, policy, planning, real, cfg, init=reference)

    def redistill(penalized: TaskSpec, keep: StateFilter) -> LoRA:
        return produce_candidate(penalized, policy, planning, real, cfg, init=reference, keep=keep)

    decision = auditor.review(candidate, model=planning, real=real, fleet=fleet,
                              slot=slot, device=device,  # type: ignore[arg-type]
                              reference=reference, heldout=heldout, redistill=redistill,
                              subject=subject)
    return RoundResult(decision.verdict, decision.adapter, decision, decision.record,
                       len(real.obs),
                       time.perf_counter() - t0)


# ---------------------------------------------------------------------------- the schedule


def round_config(budget: str, seed: int = 0, max_transitions: int = 20_000) -> RoundConfig:
    """``default``: the bench-audit-calibrated budget (about a minute per round on two cores);
    ``small``: 5 x 2x64 members (one held out) and a cheaper producer and audit, 2-7 s per round
    (the demo, tests). ``bench audit``'s targets are met on ``default``; ``small`` is weaker
    against model exploitation (below): use it where the world model is fitted honestly.

    ``small`` adapts well on honestly fitted models but, on ``bench audit``'s exploit, its small
    members disagree everywhere, so a corrupted region does not stand out and it can publish an
    exploiting candidate (the devices' canary is then the line of defence); a larger ensemble
    that blocks it is too slow for the demo. Figures: docs/benchmarks.md, "Server round
    budgets".
    """
    if budget == "small":
        return RoundConfig(
            model=WorldModelConfig(ensemble_size=5, hidden=(64, 64), max_epochs=30, patience=4,
                                   seed=seed),
            heldout_members=1, dagger_iters=2, phantom_paths=64, phantom_horizon=40,
            label_states=200, planner=PlannerConfig(candidates=32, horizon=25, iterations=2,
                                                    score_plan=False, seed=seed),
            distill=DistillConfig(rank=4, steps=200, anchor=0.05, seed=seed),
            max_transitions=max_transitions, seed=seed)
    return RoundConfig(model=WorldModelConfig(ensemble_size=7, hidden=(128, 128), max_epochs=40,
                                              patience=5, seed=seed),
                       label_states=300, planner=PlannerConfig(candidates=32, horizon=30,
                                                               iterations=2),
                       distill=DistillConfig(rank=4, steps=200, anchor=0.05, seed=seed),
                       max_transitions=max_transitions, seed=seed)


def judicial_config(budget: str, seed: int = 0) -> JudicialConfig:
    """``small`` halves the audit paths and probes but keeps the 60-step horizon: a 20-step audit
    could not see that a Pendulum swing-up candidate failed to balance (it passed one that lost
    55 in real return)."""
    if budget == "small":
        return JudicialConfig(paths=128, horizon=60, probe_repeats=1, support_points=1000,
                              seed=seed)
    return JudicialConfig(seed=seed)


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
    min_new_transitions: int = 800
    """New real transitions that make a device due a round."""
    fleet_every: int = 0
    """A fleet-slot round after this many device rounds (0 = never)."""
    check_interval: float = 5.0
    """Seconds between looks at the store."""


class AdaptationWorker:
    """Runs due rounds one at a time on its own thread; hands approved adapters to the publisher."""

    def __init__(self, store: TraceStore, publisher: Publisher, task: TaskSpec, base: MLPPolicy,
                 schedule: ScheduleConfig, rounds: RoundConfig, judicial: JudicialConfig) -> None:
        self.store, self.publisher, self.task, self.base = store, publisher, task, base
        self.schedule, self.rounds, self.judicial = schedule, rounds, judicial
        self.cursor: dict[str, int] = {}
        """device -> last chunk id a round used."""
        self.device_adapter: dict[str, LoRA] = {}
        """device -> the device-slot adapter last approved (relative to base + fleet adapter)."""
        self.fleet_adapter: LoRA | None = None
        self.fleet_cursor = 0
        self.verdicts: Counter[str] = Counter()
        self.device_rounds = 0
        self._since_fleet = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

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
                log.exception("adaptation round failed; the next check retries")

    def step(self) -> list[RoundResult]:
        """Run every round that is due now (device rounds first, then the fleet round)."""
        results = []
        for device in self.store.devices(self.schedule.fleet):
            if self._stop.is_set():
                break
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
        batch = self.store.transitions(fleet, device, newest=self.rounds.max_transitions)
        if batch is None:
            raise RuntimeError(f"device {device} has no stored transitions")
        self.cursor[device] = batch.seq  # the newest chunk this round reads
        log.info("device %s: %d new real transitions (%d in all); adapting its device slot",
                 device, new, len(batch))
        policy = self.base.merged(self.fleet_adapter)
        reference = self._reference(device)
        result = self._round(policy, batch, "device", device, reference)
        if result.adapter is not None:
            self.device_adapter[device] = result.adapter
        self.device_rounds += 1
        self._since_fleet += 1
        return result

    def fleet_round(self) -> RoundResult:
        fleet = self.schedule.fleet
        batch = self.store.transitions(fleet, newest=self.rounds.max_transitions)
        self._since_fleet = 0
        if batch is None:
            raise RuntimeError("fleet round with no data")
        log.info("fleet %s: adapting the fleet slot on %d transitions of %d devices", fleet,
                 len(batch), len(self.store.devices(fleet)))
        result = self._round(self.base, batch, "fleet", None, self.fleet_adapter)
        if result.adapter is not None:
            self.fleet_adapter = result.adapter
            self.device_adapter.clear()  # device adapters were relative to the old fleet one
        return result

    def _reference(self, device: str) -> LoRA | None:
        state = self.store.device_state(self.schedule.fleet, device, "device")
        if state["last_verdict"] in ("rejected", "rolled_back"):
            log.warning("device %s %s device adapter v%s; the next one starts from its base",
                        device, state["last_verdict"], state["last_version"])
            self.device_adapter.pop(device, None)
        return self.device_adapter.get(device)

    def _round(self, policy: MLPPolicy, batch: TraceBatch, slot: str, device: str | None,
               reference: LoRA | None) -> RoundResult:
        real = real_data(batch, self.rounds.max_transitions)
        simulation_id = new_id()
        auditor = JudicialAuditor(self.task, policy, self.judicial)
        # 1 BLAS thread: these small matmuls ran 2-50x slower with 2 threads on a busy 2-core
        # machine (phantom.blas_threads); the devices share the cores
        with blas_threads(1):
            result = adaptation_round(self.task, policy, real, self.rounds, auditor,
                                      fleet=self.schedule.fleet, slot=slot, device=device,
                                      reference=reference, subject=f"simulation:{simulation_id}")
        self.verdicts[result.verdict] += 1
        self.publisher.publish_audit(result.record)
        target = device or f"fleet {self.schedule.fleet}"
        if result.adapter is None:
            log.warning("%s: candidate blocked by the judicial audit (%s) after %.0f s; the "
                        "%s slot keeps its current adapter. More varied real data usually helps.",
                        target, ", ".join(r.code for r in result.record.reasons), result.seconds,
                        slot)
            return result
        provenance = Provenance(
            trace_count=len(real.obs), trace_from=float(batch.timestamp.min()),
            trace_to=float(batch.timestamp.max()), simulation_id=simulation_id,
            world_model_version=f"ensemble{self.rounds.model.ensemble_size}-{simulation_id[:8]}",
            note=f"judicial: {result.verdict}")
        self.publisher.submit(to_adapter(result.adapter), slot, device,  # type: ignore[arg-type]
                              priority=4 if slot == "fleet" else 5, provenance=provenance)
        log.info("%s: %s adapter approved (%s, predicted gain %.1f per %d-step path) after %.0f s;"
                 " queued for publication", target, slot, result.verdict,
                 result.record.scores.get("gain", 0.0), self.judicial.horizon, result.seconds)
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
            round_config(cfg.budget, cfg.seed, cfg.max_transitions),
            judicial_config(cfg.budget, cfg.seed))

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
                   help="adapt a device after K new real transitions (default 800)")
    p.add_argument("--fleet-every", dest="fleet_every", type=int, metavar="N",
                   help="a fleet-slot round after every N device rounds (default 0 = never)")
    p.add_argument("--check-interval", dest="check_interval", type=float, metavar="SECONDS",
                   help="how often the store is checked for devices due a round (default 5)")
    p.add_argument("--publish-interval", dest="publish_interval", type=float, metavar="SECONDS",
                   help="at most one packet per target per this many seconds (default 30)")
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
