"""Watching a live fleet from the broker: what each device runs, and how well it really does.

``FleetWatcher`` subscribes to a fleet's status, versions, audit, adapter and telemetry topics.
It keeps, per device, whether it is online, the versions active on it (from the device's own
online status and retained versions message, so a canary rollback counts; a last will names no
versions and changes none), its real step count, the verdicts of its packets and the returns of
its (noisy, exploring) episodes. At the start and at every activation it evaluates the policy
active on that device noise-free: the base bundle plus the accepted adapters, merged and run
int8 through the edge runtime, on fixed-seed episodes of the device's physics, outside the
device (which keeps exploring), inside the device's wrapper when it has one (``plasma-edge run
--wrapper``): the evaluation must see the world the device acts in. ``bench live`` and the demo
both read it.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from plasma.edge.merge import MergeEngine
from plasma.edge.runtime import PolicyRuntime
from plasma.protocol import (
    SLOTS,
    AuditRecord,
    ConfigError,
    LiveVersions,
    PacketError,
    PlasmaError,
    Status,
    TrustStore,
    decode_packet,
    decode_traces,
    topics,
)
from plasma.protocol.bundle import Bundle
from plasma.protocol.bus import Bus, Message

from ..basepolicy import EVAL_SEED0, evaluate
from ..tasks import resolve_physics

__all__ = ["DeviceWatch", "Evaluation", "FleetWatcher", "edge_return", "parse_physics"]

log = logging.getLogger(__name__)
_PACKET_WAIT_S = 5.0  # a status can name a version before its retained packet reaches us


def parse_physics(text: str, env_id: str = "Pendulum-v1") -> dict[str, float]:
    """``"m=1.6,g=12"`` -> ``{"m": 1.6, "g": 12.0}`` (empty text: nominal physics); relative
    values (``body_mass.pole=*3``) resolved against ``env_id``'s nominal physics, as the device
    resolves them against its env. ConfigError on malformed text or a name the task lacks."""
    try:
        return resolve_physics(env_id, text)
    except KeyError as exc:  # an unregistered env
        raise ConfigError(str(exc.args[0])) from None


@dataclass(frozen=True)
class Evaluation:
    """One noise-free evaluation of the policy active on a device."""

    steps: int
    """The device's real steps when the activation was reported."""
    versions: Mapping[str, int]
    """Active version per slot (0: none)."""
    mean_return: float
    """Mean return over the fixed-seed episodes."""
    t: float
    """Seconds since the watcher started."""


@dataclass
class DeviceWatch:
    """What the watcher knows about one device."""

    device: str
    physics_text: str
    env_id: str = "Pendulum-v1"
    versions: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SLOTS, 0))
    """Active version per slot, as the device last reported it (kept while it is offline)."""
    online: bool | None = None
    """The state of its latest status (None: none seen yet)."""
    since: float | None = None
    """When the device's current (or last) run started, from its online status."""
    steps: int = 0
    evaluations: list[Evaluation] = field(default_factory=list)
    verdicts: Counter[str] = field(default_factory=Counter)
    accepted_bytes: list[int] = field(default_factory=list)
    first_packet_steps: int | None = None
    episode_returns: list[tuple[float, float]] = field(default_factory=list)
    """(t, return) of the device's own episodes, exploration noise included."""
    _episode: int = -1
    _acc: float = 0.0

    @property
    def physics(self) -> dict[str, float]:
        return parse_physics(self.physics_text, self.env_id)

    def add_rows(self, t: float, episode: np.ndarray, reward: np.ndarray, done: np.ndarray) -> None:
        for ep, r, d in zip(episode.tolist(), reward.tolist(), done.tolist()):
            if ep != self._episode:
                self._episode, self._acc = ep, 0.0
            self._acc += r
            if d:
                self.episode_returns.append((t, self._acc))
                self._episode, self._acc = -1, 0.0


class FleetWatcher:
    """Tracks a fleet's devices over ``bus`` and evaluates each activation in a worker thread."""

    def __init__(self, bus: Bus, fleet: str, devices: Mapping[str, str], bundle: Bundle,
                 trust: TrustStore, env_id: str, eval_episodes: int = 10,
                 wrapper: str | None = None) -> None:
        self.fleet, self.bundle, self.trust = fleet, bundle, trust
        self.env_id, self.eval_episodes, self.wrapper = env_id, eval_episodes, wrapper
        self.t0 = time.monotonic()
        self.tracks = {dev: DeviceWatch(dev, text, env_id) for dev, text in devices.items()}
        self.lock = threading.Lock()
        self.server_records: list[AuditRecord] = []
        self._packets: dict[tuple[str, str, int], Any] = {}  # (slot, target, version) -> Adapter
        self._sizes: dict[tuple[str, str, int], int] = {}  # same key -> packet bytes
        self._jobs: queue.Queue[tuple[str, dict[str, int], int] | None] = queue.Queue()
        self._engines: dict[str, MergeEngine] = {}
        self._worker = threading.Thread(target=self._evaluate_loop, name="watch-eval", daemon=True)
        self._worker.start()
        for dev in devices:  # the base policy, before any packet
            self._jobs.put((dev, {"fleet": 0, "device": 0}, 0))
        bus.subscribe(topics.device_filter(fleet, "status"), self._on_status)
        bus.subscribe(topics.device_filter(fleet, "versions"), self._on_versions)
        bus.subscribe(topics.device_filter(fleet, "audit"), self._on_audit)
        bus.subscribe(topics.device_filter(fleet, "telemetry"), self._on_telemetry)
        bus.subscribe(topics.server_audit(fleet), self._on_server_audit)
        bus.subscribe(topics.fleet_adapter(fleet), self._on_packet)
        bus.subscribe(f"{topics.ROOT}/{fleet}/device/+/adapter", self._on_packet)

    # -- bus thread -------------------------------------------------------------------------

    def _on_packet(self, msg: Message) -> None:
        try:
            packet = decode_packet(msg.payload, self.trust)
        except PacketError as exc:
            log.debug("watch: undecodable packet on %s: %s", msg.topic, exc)
            return
        h = packet.header
        with self.lock:
            self._packets[(h.slot, h.target, h.version)] = packet.adapter
            self._sizes[(h.slot, h.target, h.version)] = packet.size

    def _on_status(self, msg: Message) -> None:
        """Online or offline. An online status names the live versions; an offline one (a last
        will) may name none, and older wills named the versions at start: never read there."""
        try:
            status = Status.model_validate_json(msg.payload)
        except ValueError:
            return
        with self.lock:
            track = self.tracks.get(status.device)
            if track is None:
                return
            track.online = status.state == "online"
            if not track.online:
                return
            track.since = status.since
            track.steps = max(track.steps, status.steps or 0)
            steps = track.steps
        versions = status.slot_versions()
        if versions:
            self._activated(status.device, versions, steps)

    def _on_versions(self, msg: Message) -> None:
        """The retained versions message, sent at each change: read while the device is online
        and from its current run (a retained one of an earlier run is no news)."""
        try:
            live = LiveVersions.model_validate_json(msg.payload)
        except ValueError:
            return
        with self.lock:
            track = self.tracks.get(live.device)
            if track is None or not track.online or \
                    (track.since is not None and live.since != track.since):
                return
            if live.steps is not None:  # the steps when they became live, not the last status's
                track.steps = max(track.steps, live.steps)
            steps = track.steps if live.steps is None else live.steps
        self._activated(live.device, live.slot_versions(), steps)

    def _activated(self, device: str, versions: dict[str, int], steps: int) -> None:
        """Record the versions a device reports and queue an evaluation if they changed."""
        with self.lock:
            track = self.tracks[device]
            versions = {**track.versions, **versions}
            if versions == track.versions:
                return
            track.versions = versions
            if track.first_packet_steps is None and any(versions.values()):
                track.first_packet_steps = steps
        self._jobs.put((device, dict(versions), steps))

    def _on_audit(self, msg: Message) -> None:
        try:
            record = AuditRecord.model_validate_json(msg.payload)
        except ValueError:
            return
        with self.lock:
            track = self.tracks.get(record.device or "")
            if track is None:
                return
            track.verdicts[record.verdict] += 1
            if record.verdict == "accepted" and record.slot and record.version:
                target = self.fleet if record.slot == "fleet" else track.device
                size = self._sizes.get((record.slot, target, record.version))
                if size is not None:
                    track.accepted_bytes.append(size)

    def _on_server_audit(self, msg: Message) -> None:
        try:
            record = AuditRecord.model_validate_json(msg.payload)
        except ValueError:
            return
        with self.lock:
            self.server_records.append(record)

    def _on_telemetry(self, msg: Message) -> None:
        try:
            batch = decode_traces(msg.payload)
        except PlasmaError:
            return
        with self.lock:
            track = self.tracks.get(batch.device)
            if track is not None:
                track.add_rows(time.monotonic() - self.t0, batch.episode, batch.reward,
                               batch.terminated | batch.truncated)

    # -- evaluation thread ------------------------------------------------------------------

    def _evaluate_loop(self) -> None:
        while (job := self._jobs.get()) is not None:
            device, versions, steps = job
            try:
                mean = self._evaluate(device, versions)
            except Exception:  # a failed evaluation is logged, the watch goes on
                log.exception("watch: evaluating %s at %s failed", device, versions)
                continue
            finally:
                self._jobs.task_done()
            evaluation = Evaluation(steps, versions, mean, time.monotonic() - self.t0)
            with self.lock:
                self.tracks[device].evaluations.append(evaluation)
            log.info("eval %s at %d real steps, versions %s: return %.1f", device, steps,
                     versions, mean)

    def _adapters(self, device: str, versions: Mapping[str, int]) -> dict[str, Any]:
        wanted = {slot: (slot, self.fleet if slot == "fleet" else device, v)
                  for slot, v in versions.items() if v}
        deadline = time.monotonic() + _PACKET_WAIT_S
        while True:
            with self.lock:
                found = {slot: self._packets.get(key) for slot, key in wanted.items()}
            if all(a is not None for a in found.values()) or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        missing = [slot for slot, a in found.items() if a is None]
        if missing:
            raise LookupError(f"no packet seen for {device} slot(s) {missing} at {dict(versions)}")
        return {"fleet": found.get("fleet"), "device": found.get("device")}

    def _evaluate(self, device: str, versions: Mapping[str, int]) -> float:
        engine = self._engines.get(device)
        if engine is None:
            engine = self._engines[device] = MergeEngine(PolicyRuntime(self.bundle))
        return edge_return(engine, self._adapters(device, versions), self.env_id,
                           self.tracks[device].physics, self.eval_episodes, self.wrapper)

    def drain(self, timeout: float = 60.0) -> None:
        """Wait until every queued evaluation is done (or ``timeout``)."""
        deadline = time.monotonic() + timeout
        while self._jobs.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.1)

    def close(self) -> None:
        self._jobs.put(None)
        self._worker.join(timeout=10)


def edge_return(engine: MergeEngine, adapters: Mapping[str, Any], env_id: str,
                physics: Mapping[str, float], episodes: int, wrapper: str | None = None) -> float:
    """Noise-free mean return of the base plus ``adapters`` (slot -> Adapter or None) merged into
    ``engine``'s int8 runtime, on fixed-seed episodes; row by row, as the device acts (dynamic
    int8 scales depend on the batch), inside the device-side ``wrapper`` if given. ``engine`` must
    not be a live device's."""
    engine.restore(adapters)
    act = engine.runtime.act

    def batch_of_ones(obs: np.ndarray) -> np.ndarray:
        return np.stack([np.array(act(row)) for row in obs.astype(np.float32)])

    return float(evaluate(batch_of_ones, env_id, physics, episodes, EVAL_SEED0, wrapper)["mean"])
