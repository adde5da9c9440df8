"""Edge process: assembles the stages into ``plasma-edge run`` (control loop, bus, packet worker).

Threads (all daemon threads except main)::

    main        set-up, signal handling, orderly shutdown
    control     env.reset/step with act(obs) at --rate-hz; telemetry rows, canary, probe ring.
                Never touches the network or a merge: it only reads one reference per step.
    paho        MqttBus network thread: packets -> size cap -> bounded queue (never blocks)
    worker      packets and canary verdicts from the queue: AdapterPipeline, audit records,
                retained versions at every change, retained status every --status-interval s
    connect     first connection with backoff (a broker down at start does not stop acting);
                later reconnects are paho's
    telemetry   frames every N rows / T seconds
"""

from __future__ import annotations

import hashlib
import logging
import queue
import signal
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, Literal

import numpy as np

from plasma.protocol import SLOT_KINDS, TrustStore, topics
from plasma.protocol.bundle import load_bundle
from plasma.protocol.bus import Bus, BusError, Message, MqttBus
from plasma.protocol.catalog import MODELS_ENV, resolve_bundle
from plasma.protocol.errors import BundleNotFound, ServiceError
from plasma.protocol.wire import AuditRecord, LiveVersions, Reason, Status

from .audit import AuditContext, record_for
from .canary import Canary
from .config import DaemonConfig
from .envs import Env, make_env
from .journal import Journal
from .merge import MergeEngine
from .metrics import EdgeMetrics
from .pipeline import AdapterPipeline, Outcome
from .probes import ObservationRing
from .runtime import PolicyRuntime
from .telemetry import TelemetryBuffer

__all__ = ["Daemon", "run"]

log = logging.getLogger("plasma.edge")
_STOP = object()
MAX_ENV_FAILURES = 10
SHUTDOWN_CONNECT_WAIT_S = 3.0
IDLE_SLICE_S = 0.05  # longest uninterrupted sleep of the control loop (stop latency)


class Daemon:
    def __init__(self, cfg: DaemonConfig, bus: Bus | None = None, env: Env | None = None) -> None:
        self.cfg = cfg
        self.steps = 0
        self.bundle = load_bundle(_bundle_dir(cfg.model))
        self.runtime = PolicyRuntime(self.bundle)
        m = self.bundle.manifest
        self.ring = ObservationRing(1024, m.obs_dim)
        self.canary = Canary(cfg.canary)
        ctx = AuditContext(trust=TrustStore.from_dir(cfg.trust), fleet=cfg.fleet,
                           device=cfg.device, base_sha256=self.bundle.base_sha256,
                           layers={n: (i, o) for n, i, o in self.bundle.layer_specs},
                           max_rank=cfg.max_rank, max_bytes=cfg.max_packet_bytes)
        self.pipeline = AdapterPipeline(self.runtime, MergeEngine(self.runtime),
                                        Journal(cfg.state), ctx, self.canary, self.ring, cfg.audit,
                                        defer_upgrade=True)  # woken in _run_job once reported
        self.notes = self.pipeline.restore()
        self.env = env if env is not None else make_env(cfg.env, cfg.wrapper)
        self.metrics = EdgeMetrics(enabled=cfg.metrics_port is not None)
        self.started_at = time.time()
        self._status_topic = topics.status(cfg.fleet, cfg.device)
        self._versions_topic = topics.versions(cfg.fleet, cfg.device)
        self._live: dict[str, int] = dict(self.pipeline.slot_versions)
        self._live_since, self._live_steps = self.started_at, 0  # when they last changed
        self._live_sent: tuple[tuple[tuple[str, int], ...], int] | None = None  # (versions, conn.)
        self.bus = bus if bus is not None else MqttBus(
            cfg.broker, client_id=_client_id(cfg.fleet, cfg.device),
            will=(self._status_topic, self._will()), max_payload=16 << 20)
        self.telemetry = TelemetryBuffer(
            cfg.fleet, cfg.device, m.obs_dim, m.act_dim,
            publish=lambda frame: self.bus.publish(topics.telemetry(cfg.fleet, cfg.device), frame),
            connected=lambda: self.bus.connected, cfg=cfg.telemetry)
        # Packets and canary verdicts share one queue; verdicts are never dropped, packets beyond
        # queue_size waiting are rejected (queue_full) before anything is read from them.
        self.jobs: queue.Queue[Any] = queue.Queue()
        self._packet_slots = threading.BoundedSemaphore(cfg.queue_size)
        self.stop = threading.Event()
        self.failed = False
        self._rng = np.random.default_rng(cfg.seed)
        m_low, m_high = np.asarray(m.act_low, np.float32), np.asarray(m.act_high, np.float32)
        self._act_bounds = (m_low, m_high)
        self._noise_std = np.float32(cfg.explore_noise) * 0.5 * (m_high - m_low)  # (act_dim,)
        self._latency = np.zeros(4096, np.float64)  # ring of act() seconds for the p50 log line
        self._unsent: deque[AuditRecord] = deque(maxlen=64)  # records waiting for the broker
        self._report_lock = threading.Lock()

    # -- lifecycle ----------------------------------------------------------------------------
    def run(self) -> int:
        """Run until SIGTERM/SIGINT or the step/episode budget; 0 on a clean stop."""
        for note in self.notes:
            log.error("state: %s", note)
        live = ", ".join(f"{slot} adapter v{v}" for slot, v in self.pipeline.slot_versions.items())
        log.info("policy %s ready (base %s...), %s", self.bundle.root, self.bundle.base_sha256[:12],
                 live)
        if self.cfg.wrapper:
            log.info("env %s inside the device-side wrapper %s", self.cfg.env, self.cfg.wrapper)
        if self.cfg.metrics_port is not None:
            try:
                self.metrics.serve(self.cfg.metrics_port)
            except OSError as exc:
                raise ServiceError(f"cannot serve metrics on port {self.cfg.metrics_port}: "
                                   f"{exc.strerror or exc}") from None
        for kind in SLOT_KINDS:
            self.bus.subscribe(kind.topic(self.cfg.fleet, self.cfg.device),
                               self._on_packet(kind.name), qos=1)
        threads = [threading.Thread(target=fn, name=f"plasma-{fn.__name__.strip('_')}",
                                    daemon=True)
                   for fn in (self._connect, self._work, self._control)]
        self._install_signals()
        self.telemetry.start()
        for t in threads:
            t.start()
        while not self.stop.wait(0.5):
            pass
        self._shutdown(threads)
        return 1 if self.failed else 0

    def _install_signals(self) -> None:
        def handler(signum: int, frame: object) -> None:
            log.info("received %s: stopping", signal.Signals(signum).name)
            self.stop.set()

        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, handler)
            signal.signal(signal.SIGINT, handler)

    def _shutdown(self, threads: list[threading.Thread]) -> None:
        threads[2].join(5)  # control: no more rows after this
        deadline = time.monotonic() + SHUTDOWN_CONNECT_WAIT_S
        while not self.bus.connected and threads[0].is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)  # a short run may end before the first CONNACK: let rows go out
        left = self.telemetry.close()
        self.jobs.put(_STOP)
        threads[1].join(10)
        with self._report_lock:
            self._sync_versions()
        self._publish(self._status_topic, self._status("offline"), retain=True)
        lat = self._latency[:min(self.steps, len(self._latency))]
        if len(lat):
            log.info("stopped after %d steps; act p50 %.1f us, p99 %.1f us; %d telemetry rows "
                     "sent, %d dropped", self.steps, np.percentile(lat, 50) * 1e6,
                     np.percentile(lat, 99) * 1e6, self.telemetry.sent_rows,
                     self.telemetry.dropped_rows + left)
        time.sleep(0.2)  # let paho write the last QoS 1 messages before DISCONNECT
        self.bus.close()

    def _connect(self) -> None:
        delay = 0.5
        while True:  # also after stop: the shutdown waits a little for a first connection
            try:
                self.bus.connect(timeout=5.0)
                return
            except BusError as exc:
                if self.stop.is_set():
                    return
                log.warning("broker unreachable (%s); retrying in %.0f s, still acting", exc, delay)
                self.stop.wait(delay)
                delay = min(delay * 2, 30.0)

    # -- control thread -----------------------------------------------------------------------
    def _control(self) -> None:
        try:
            with self.runtime.attach_control_loop():  # session rebuilds after a merge run here, in idle time
                self._control_loop()
        except Exception:  # last line of defence: report and stop cleanly (exit 1)
            log.exception("control loop crashed")
            self.failed = True
        finally:
            self.stop.set()

    def _control_loop(self) -> None:
        cfg = self.cfg
        period = 1.0 / cfg.rate_hz if cfg.rate_hz else 0.0
        obs = self._reset(cfg.seed)
        episode = step = failures = 0
        next_tick = time.perf_counter()
        while obs is not None and not self.stop.is_set():
            try:
                nxt, done = self._step(episode, step, obs)
                failures = 0
            except Exception:  # a broken world must not kill the daemon; reset it
                failures += 1
                log.exception("control step failed (%d in a row)", failures)
                if failures >= MAX_ENV_FAILURES:
                    self.failed = True
                    return
                obs = self._reset(None)
                continue
            step += 1
            if done:
                episode, step = episode + 1, 0
                budget_left = cfg.episodes is None or episode < cfg.episodes
                obs = self._reset(None) if budget_left else None
            else:
                obs = nxt
            if cfg.max_steps is not None and self.steps >= cfg.max_steps:
                obs = None
            if period:  # fixed-rate ticks; after a stall, resume without a burst of catch-up steps
                next_tick = max(next_tick + period, time.perf_counter() - period)
                self._idle_until(next_tick)
            else:
                self.runtime.maintain()  # a pending session build (~1 ms), else a no-op
        if obs is None:
            log.info("control loop finished its budget (%d steps, %d episodes)", self.steps,
                     episode)

    def _idle_until(self, deadline: float) -> None:
        """Sleep to ``deadline`` (perf_counter s), doing requested session builds at once.

        A build started just before the deadline delays that tick by at most its length (~1 ms).
        The wait is cut into slices of at most IDLE_SLICE_S so a stop is noticed without its own wake-up.
        """
        while not self.stop.is_set():
            left = deadline - time.perf_counter()
            if left <= 0:
                return
            self.runtime.idle(min(left, IDLE_SLICE_S))

    def _step(self, episode: int, step: int, obs: np.ndarray) -> tuple[np.ndarray, bool]:
        """One control step: act, env.step, record. Returns (next obs, episode over)."""
        t0 = time.perf_counter()
        action = self.runtime.act(obs).copy()  # act() returns a view of its output buffer
        dt = time.perf_counter() - t0
        if self.cfg.explore_noise > 0:  # the applied action is what telemetry records
            noise = self._noise_std * self._rng.standard_normal(action.shape).astype(np.float32)
            action = np.clip(action + noise, *self._act_bounds).astype(np.float32)
        nxt, reward, term, trunc, _ = self.env.step(action)
        nxt = np.asarray(nxt, np.float32)
        self._record_step(episode, step, obs, action, float(reward), nxt, bool(term), bool(trunc),
                          dt)
        return nxt, bool(term or trunc)

    def _reset(self, seed: int | None) -> np.ndarray | None:
        try:
            obs, _ = self.env.reset(seed=seed)
        except Exception:  # reported; the loop stops cleanly instead of crashing
            log.exception("env.reset failed")
            self.failed = True
            return None
        return np.asarray(obs, np.float32)

    def _record_step(self, episode: int, step: int, obs: np.ndarray, action: np.ndarray,
                     reward: float, nxt: np.ndarray, term: bool, trunc: bool, dt: float) -> None:
        self._latency[self.steps % len(self._latency)] = dt
        self.metrics.act_latency.observe(dt)
        self.metrics.steps.inc()
        self.telemetry.add(episode, step, obs, action, reward, nxt, term, trunc,
                           self.pipeline.versions)
        self.ring.push(obs)
        self.steps += 1
        verdict = self.canary.push(reward)
        if verdict is not None:
            self._enqueue(("canary", verdict))

    # -- bus thread ---------------------------------------------------------------------------
    def _on_packet(self, kind: str) -> Any:
        def handle(message: Message) -> None:
            if not message.payload:  # an empty retained message clears the topic: not a packet
                return
            if not self._packet_slots.acquire(blocking=False):
                reason = Reason(code="queue_full", check="receive",
                                message=f"{self.cfg.queue_size} packets already wait; dropped one")
                self._report(Outcome(record_for(None, self.pipeline.ctx, "rejected", (reason,)),
                                     source=kind))
            elif len(message.payload) > self.cfg.max_packet_bytes:  # the cap, before anything
                self._enqueue(("too_large", len(message.payload), kind))
            else:
                self._enqueue(("packet", message.payload, kind, time.perf_counter()))
        return handle

    def _enqueue(self, job: tuple[Any, ...]) -> None:
        self.jobs.put_nowait(job)  # unbounded queue; packets are bounded by _packet_slots

    # -- worker thread ------------------------------------------------------------------------
    def _work(self) -> None:
        last_status = 0.0
        while True:
            try:
                job = self.jobs.get(timeout=max(0.05, self.cfg.status_interval / 2))
            except queue.Empty:
                job = None
            if job is _STOP:
                return
            if job is not None:
                self._run_job(job)
            now = time.monotonic()
            if now - last_status >= self.cfg.status_interval and self.bus.connected:
                last_status = now
                try:
                    with self._report_lock:
                        self._tick()
                except Exception:  # a status bug must not stop packet handling
                    log.exception("status update failed")

    def _run_job(self, job: tuple[Any, ...]) -> None:
        try:
            outcome = self._dispatch(job)
        except Exception as exc:  # top-level catch: a daemon bug becomes a record
            log.exception("packet worker failed on a %s job", job[0])
            reason = Reason(code="internal_error", check="worker", message=repr(exc)[:1000])
            outcome = Outcome(record_for(None, self.pipeline.ctx, "rejected", (reason,)))
        finally:
            if job[0] != "canary":
                self._packet_slots.release()
        if outcome is None:
            return
        try:
            self._report(outcome)
        except Exception:  # the verdict stands; only its report was lost
            log.exception("could not report: %s", outcome.describe())
        finally:  # an accepted side's prepacked build, after the report (defer_upgrade)
            self.runtime.request_upgrade()

    def _dispatch(self, job: tuple[Any, ...]) -> Outcome | None:
        if job[0] == "packet":
            return self.pipeline.handle(job[1], source=job[2], received_at=job[3])
        if job[0] == "too_large":
            reason = Reason(code="too_large", check="receive",
                            message=f"packet is {job[1]} bytes, the cap is "
                                    f"{self.cfg.max_packet_bytes}")
            return Outcome(record_for(None, self.pipeline.ctx, "rejected", (reason,)),
                           size=job[1], source=job[2])
        outcome = self.pipeline.on_canary(job[1])
        if outcome is not None:
            self.metrics.rollbacks.inc()
        return outcome

    def _report(self, outcome: Outcome) -> None:
        """Log, count and publish one outcome (worker thread; bus thread for queue_full)."""
        with self._report_lock:
            self._report_locked(outcome)

    def _report_locked(self, outcome: Outcome) -> None:
        record = outcome.record
        routine = record.verdict == "accepted" or (record.reasons and
                                                   record.reasons[0].code == "already_active")
        log.log(logging.INFO if routine else logging.WARNING, "%s", outcome.describe())
        self.metrics.packet(record.verdict, record.reasons[0].code if record.reasons else "")
        if record.verdict == "accepted":
            self.metrics.accept_latency.observe(outcome.elapsed_s)
        self._sync_versions()  # before the record: whoever saw an accept finds its versions retained
        self._unsent.append(record)
        self._flush_records()
        self._tick()

    def _flush_records(self) -> None:
        topic = topics.audit(self.cfg.fleet, self.cfg.device)
        while self._unsent and self.bus.connected:
            if not self._publish(topic, self._unsent[0].model_dump_json().encode()):
                return
            self._unsent.popleft()

    def _tick(self) -> None:
        """Versions, status, gauges and any audit records held while the broker was away."""
        self._sync_versions()
        self._flush_records()
        for slot, version in self.pipeline.slot_versions.items():
            self.metrics.active_version.labels(slot=slot).set(version)
        rolling = self.canary.rolling_mean()
        if rolling is not None:
            self.metrics.rolling_reward.set(rolling)
        self.metrics.telemetry_dropped.set(self.telemetry.dropped_rows)
        self._publish(self._status_topic, self._status("online"), retain=True)

    def _status(self, state: Literal["online", "offline"]) -> bytes:
        """The status the daemon publishes itself (online; offline at a clean stop): versions
        included, they are current when it is sent."""
        versions = dict(self.pipeline.slot_versions)
        return Status(fleet=self.cfg.fleet, device=self.cfg.device, state=state,
                      base_sha256=self.bundle.base_sha256, versions=versions,
                      fleet_version=versions["fleet"], device_version=versions["device"],
                      steps=self.steps, rolling_reward=self.canary.rolling_mean(),
                      since=self.started_at).model_dump_json().encode()

    def _will(self) -> bytes:
        """The last will: offline, and when this run started. It is fixed when the client is
        made (MQTT cannot change a will without reconnecting), so it names no versions, no
        steps and no death time: it would name what the device had at start. What the device
        ran is on its retained versions topic, which the will does not touch."""
        return Status(fleet=self.cfg.fleet, device=self.cfg.device, state="offline",
                      base_sha256=self.bundle.base_sha256, since=self.started_at,
                      timestamp=self.started_at).model_dump_json().encode()

    def _sync_versions(self) -> None:
        """Retain the live versions (``LiveVersions``) when they changed since the last send, and
        once per broker connection (a broker without persistence forgets retained messages).
        Callers hold ``_report_lock``."""
        live = dict(self.pipeline.slot_versions)
        if live != self._live:
            self._live, self._live_since, self._live_steps = live, time.time(), self.steps
        sent = (tuple(live.items()), self.bus.connections)
        if sent == self._live_sent:
            return
        payload = LiveVersions(fleet=self.cfg.fleet, device=self.cfg.device,
                               base_sha256=self.bundle.base_sha256, versions=live,
                               steps=self._live_steps, since=self.started_at,
                               timestamp=self._live_since
                               ).model_dump_json().encode()
        if self._publish(self._versions_topic, payload, retain=True):
            self._live_sent = sent

    def _publish(self, topic: str, payload: bytes, retain: bool = False) -> bool:
        try:
            self.bus.publish(topic, payload, qos=1, retain=retain)
            return True
        except BusError as exc:
            log.debug("not published to %s: %s", topic, exc)
            return False


def _client_id(fleet: str, device: str) -> str:
    """Stable per device (a persistent session), unique even when long ids would be cut."""
    plain = f"plasma-edge-{fleet}-{device}"
    if len(plain) <= 64:
        return plain
    return "plasma-edge-" + hashlib.sha256(f"{fleet}/{device}".encode()).hexdigest()[:40]


def _bundle_dir(model: Path) -> Path:
    """``--model``: a bundle directory, or a bundle's name (shipped, or in ``PLASMA_MODELS``)."""
    try:
        return resolve_bundle(model)
    except BundleNotFound as exc:
        raise BundleNotFound(f"--model: {exc}; give a bundle directory or one of those names "
                             f"({MODELS_ENV} adds directories of bundles)") from None


def run(cfg: DaemonConfig) -> int:
    return Daemon(cfg).run()
