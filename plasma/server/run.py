"""``plasma-server run``: ingest -> world model -> phantom paths -> distill -> audit -> publish.

Stages live in their own modules; this file only wires them:

- the round itself (stages 2-5) is ``plasma.server.adapt``: one ``Learner`` per device (and one
  for the fleet slot) keeps the warm-started model, the aggregated labels and the last accepted
  adapter between rounds.
- ``AdaptationWorker`` (``plasma.server.worker``): the schedule, and the data cursor of each
  target, advanced only when a round's outcome is accepted.
- ``Executor`` (``plasma.server.executor``): where rounds compute, ``--executor local`` (in this
  process, one at a time) or ``ray`` (Ray tasks on a cluster, several at a time).
- ``DeviceVersions`` (``plasma.server.slots``): what each device reports it runs, from its
  retained versions topic; rounds are fitted and judged on that combination.
- ``Server``: bus, store, ingest, publisher and worker; ``run`` blocks until SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import threading

import numpy as np

from plasma.protocol import SigningKey, new_id
from plasma.protocol._cli import add_broker_arguments, add_models_dir_argument
from plasma.protocol.bundle import Bundle, BundleError, load_bundle
from plasma.protocol.bus import Bus, MqttBus
from plasma.protocol.catalog import resolve_bundle
from plasma.protocol.errors import BundleNotFound, ConfigError

from .adapt import AdaptConfig, adapt_config
from .executor import EXECUTORS, make_executor
from .ingest import Ingest, IngestConfig
from .policy_net import MLPPolicy
from .publisher import Publisher, PublisherConfig
from .service_config import BUDGETS, SCALARS, ServiceConfig, load_service_config
from .slots import DeviceVersions
from .store import Store, open_store
from .tasks import get_task, load_task_modules
from .worker import AdaptationWorker, ScheduleConfig
from .worker import real_data as real_data  # where plasma.agent and older callers import them
from .worker import to_adapter as to_adapter

__all__ = ["Server", "policy_from_bundle", "register", "run_server"]

log = logging.getLogger(__name__)


def round_config(budget: str, seed: int = 0, max_transitions: int = 20_000) -> AdaptConfig:
    """The round's budget by name (``plasma.server.adapt.adapt_config``)."""
    return adapt_config(budget, seed, max_transitions)


# ---------------------------------------------------------------------------- the process


def policy_from_bundle(bundle: Bundle) -> MLPPolicy:
    """The base policy the devices run, from its bundle's fp32 master weights."""
    m = bundle.manifest
    return MLPPolicy([(np.asarray(w), np.asarray(b)) for w, b in bundle.layers()],
                     obs_mean=np.asarray(m.obs_mean), obs_std=np.asarray(m.obs_std),
                     act_low=np.asarray(m.act_low), act_high=np.asarray(m.act_high),
                     hidden_activation=m.hidden_activation, activation_alpha=m.activation_alpha,
                     output_activation=m.output_activation)


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
            self.model = resolve_bundle(cfg.model, cfg.models_dir)
            bundle = load_bundle(self.model)
        except BundleNotFound as exc:
            raise BundleNotFound(f"--model: {exc}; give a bundle directory or one of those names "
                                 "(--models-dir DIR adds a directory of bundles)") from None
        except BundleError as exc:
            raise BundleError(f"--model {cfg.model}: {exc}", code=exc.code) from None
        self.base = policy_from_bundle(bundle)
        try:
            load_task_modules(cfg.tasks)
            self.task = get_task(cfg.task_id)
        except KeyError as exc:
            raise ConfigError(str(exc.args[0])) from None
        if (bundle.manifest.obs_dim, bundle.manifest.act_dim) != (self.task.obs_dim,
                                                                  self.task.act_dim):
            raise ConfigError(f"--model has dims {bundle.manifest.obs_dim}/"
                              f"{bundle.manifest.act_dim}, {cfg.task_id} has "
                              f"{self.task.obs_dim}/{self.task.act_dim}")
        self.store: Store = open_store(cfg.store)
        node = cfg.node or socket.gethostname()
        client_id = f"plasma-server-{cfg.fleet}-{node}"
        self.bus = bus if bus is not None else MqttBus(cfg.broker, client_id=client_id)
        self.ingest = Ingest(self.bus, self.store, IngestConfig(
            fleet=cfg.fleet, dims=(self.task.obs_dim, self.task.act_dim),
            share_group=cfg.ingest_group))
        self.publisher = Publisher(self.bus, self.store, key, PublisherConfig(
            fleet=cfg.fleet, base_sha256=bundle.base_sha256, dtype=cfg.dtype,
            expires_in_s=cfg.expires_in, min_interval_s=cfg.publish_interval,
            lease_holder=f"{node}:{os.getpid()}:{new_id()[:8]}"))
        self.live = DeviceVersions(cfg.fleet)
        """What each device reports it runs (its retained versions message)."""
        self.worker = AdaptationWorker(
            self.store, self.publisher, self.task, self.base,
            ScheduleConfig(cfg.fleet, cfg.min_new_transitions, cfg.fleet_every,
                           cfg.check_interval, cfg.round_timeout, cfg.fleet_landing_timeout),
            round_config(cfg.budget, cfg.seed, cfg.max_transitions),
            make_executor(cfg.executor, cfg.ray_address, cfg.workers), live=self.live)

    def start(self) -> None:
        self.bus.connect()
        self.live.start(self.bus)
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
                f"published, {self.publisher.acks} device acks, "
                f"{'publishing' if self.publisher.is_leader else 'standby (no publisher lease)'}")


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
             server.bus.protocol, server.model, server.store.url, cfg.min_new_transitions)
    try:
        while not stop.wait(report_every_s):
            log.info("progress: %s", server.summary())
    finally:
        log.info("stopping: %s", server.summary())
        server.stop()
    return 0


def _run(args: argparse.Namespace) -> int:
    flags = {name: getattr(args, name, None) for name in (*SCALARS, "config")}
    if args.models_dir:  # repeated flags -> one os.pathsep-separated value, as in the environment
        flags["models_dir"] = os.pathsep.join(args.models_dir)
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
    p.add_argument("--model", metavar="BUNDLE", help="the base policy bundle devices run: a "
                   "directory or a bundle's name (plasma-server models list)")
    add_models_dir_argument(p)
    p.add_argument("--store", metavar="PATH|URL", help="SQLite trace store (default "
                   "plasma-server.sqlite) or postgresql://USER@HOST:PORT/DB (password: PGPASSWORD)")
    p.add_argument("--ingest-group", dest="ingest_group", metavar="NAME", help="MQTT 5 shared "
                   "subscription group the fleet's servers split telemetry in (default "
                   "plasma-ingest; none = every server gets every frame)")
    p.add_argument("--node", metavar="NAME", help="this server's name among the fleet's servers "
                   "(MQTT client id; default the host name)")
    p.add_argument("--env", metavar="ENV", help="task of the devices' world, e.g. Pendulum-v1")
    p.add_argument("--tasks", metavar="MODULE[,MODULE]", help="Python modules to import first that "
                   "register tasks (register_task), for an --env Plasma does not ship")
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
    p.add_argument("--executor", choices=EXECUTORS, help="where rounds compute: local (this "
                   "process, default) or ray (Ray tasks; pip install 'plasma[cluster]')")
    p.add_argument("--ray-address", dest="ray_address", metavar="ADDR", help="Ray cluster to "
                   "join, e.g. ray://head:10001 or auto (default: start a local Ray)")
    p.add_argument("--workers", type=int, metavar="N", help="with ray: rounds in flight (and the "
                   "CPUs of a local Ray); default 0 = one per CPU of the cluster")
    p.add_argument("--round-timeout", dest="round_timeout", type=float, metavar="SECONDS",
                   help="with ray: cancel and resubmit a round computing longer (default 600)")
    p.add_argument("--fleet-landing-timeout", dest="fleet_landing_timeout", type=float,
                   metavar="SECONDS", help="a device round waits at most this long for a fleet "
                   "packet to land on the device, then fits what it reports (default 600; 0 = "
                   "no limit)")
    p.set_defaults(handler=_run)
