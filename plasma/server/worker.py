"""``AdaptationWorker``: which rounds are due, where they compute, and what is kept of them.

A device with at least ``min_new_transitions`` new transitions gets a device-slot round; every
``fleet_every`` device rounds a fleet-slot round runs on every device's data. Rounds compute on
an ``Executor`` (``plasma.server.executor``): up to its capacity at once, at most one per target
(device rounds of different devices run concurrently; a fleet round runs alone, since device
adapters are relative to the fleet one).

Slots that fit together (``plasma.server.slots``): a device round adapts base ⊕ the fleet
adapter *that device reports running* (its retained versions message, else its newest
transition's versions), from the device adapter it reports running; a fleet round judges its
candidate on every kept device as base ⊕ candidate ⊕ that device's adapter against what the
device runs, and is blocked if any such pair is worse beyond ``max_device_loss``. An approved
fleet adapter therefore leaves the device learners as they are: their adapters were judged with
it. A device whose reported version this server's store does not hold gets no round (the
worker does not guess what it runs); its data stay due.

Exactly-once data accounting: a round's data cursor (the last chunk id it read) and the learner
it returns are kept, and its adapter and audit record handed to the publisher (which signs in
this process), only when the outcome's round id is the one in flight for its target. A round
that raised, died past its retries or timed out leaves the cursor where it was, so the same data
are used by the retry; a stale outcome (a cancelled attempt) is discarded. Cursor and adapter
are persisted in the store after every accepted round (a restart resumes). The audit record
carries the chunk range it consumed (``scores["data_cursor_from"/"data_cursor_to"]``) and the
newest transition's timestamp (``scores["data_to"]``) and the round's CPU and wall seconds
(``round_cpu_s``, ``round_wall_s``), so anyone on the judicial topic can
check that no data were lost or counted twice.
"""

from __future__ import annotations

import io
import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass, replace

import numpy as np

from plasma.protocol import Adapter, Provenance, TraceBatch, TrustStore, new_id

from .adapt import AdaptConfig, Learner, RoundResult
from .executor import Executor, Handle, LocalExecutor, RoundOutcome, RoundSpec
from .judicial import RealData
from .policy_net import LoRA, MLPPolicy
from .publisher import Publisher
from .slots import Combination, DeviceSlots, DeviceVersions, UnknownVersion
from .store import TraceStore
from .tasks import TaskSpec

__all__ = ["AdaptationWorker", "ScheduleConfig", "real_data", "to_adapter"]

log = logging.getLogger(__name__)


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
    round_timeout: float = 0.0
    """A round in flight longer than this is cancelled and submitted again, each retry with
    twice the time (0 = never; the local executor computes inline and is never timed out)."""
    fleet_landing_timeout: float = 600.0
    """Seconds a device round waits for the newest fleet packet to land on the device before it
    is fitted on what the device reports anyway (0 = no limit; ``DeviceSlots.fleet_in_flight``)."""


@dataclass
class _Flight:
    """A round in flight: what it read, so the accepted outcome can advance the cursor."""

    slot: str
    target: str
    spec: RoundSpec
    handle: Handle
    cursor_from: int
    cursor_to: int
    trace_from: float
    trace_to: float
    new: int
    attempt: int = 0


class AdaptationWorker:
    """Submits due rounds to the executor on its own thread; accepts their outcomes.

    One ``Learner`` per device (device slot) and one for the fleet slot; their cursors and
    accepted adapters are loaded from the store on first use and saved after every round."""

    def __init__(self, store: TraceStore, publisher: Publisher, task: TaskSpec, base: MLPPolicy,
                 schedule: ScheduleConfig, rounds: AdaptConfig,
                 executor: Executor | None = None, live: DeviceVersions | None = None) -> None:
        """``live``: the devices' reported versions (``Server`` subscribes it to the bus);
        without it the versions of each device's newest stored transition are its word."""
        self.store, self.publisher, self.task, self.base = store, publisher, task, base
        self.slots = DeviceSlots(store, schedule.fleet, TrustStore([publisher.key.public_key]),
                                 publisher.waiting, live,
                                 landing_timeout=schedule.fleet_landing_timeout)
        """What each device runs, by its own report (``plasma.server.slots``)."""
        self._notes: dict[str, str] = {}
        self.schedule, self.rounds = schedule, rounds
        self.executor: Executor = executor if executor is not None else LocalExecutor()
        self.learners: dict[str, Learner] = {}
        """device -> its learner (model, labels, accepted adapter relative to base + fleet)."""
        self.cursor: dict[str, int] = {}
        """device -> last chunk id an accepted round used (persisted)."""
        self.fleet_learner: Learner | None = None
        self.fleet_cursor = 0
        self.flights: dict[str, _Flight] = {}
        """target (device id, or the fleet id for the fleet slot) -> its round in flight."""
        self.verdicts: Counter[str] = Counter()
        self.device_rounds = 0
        self.retries = 0
        """Rounds submitted again after a timeout or a failure."""
        self.discarded = 0
        """Outcomes of rounds no longer in flight (late or repeated)."""
        self.cpu_seconds: list[float] = []
        """CPU seconds of each accepted round."""
        self._since_fleet = 0
        self._was_leader = False
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
        for flight in self.flights.values():
            self.executor.cancel(flight.handle)
        self.flights.clear()
        self.executor.close()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick(self.schedule.check_interval)
            except Exception:  # noqa: BLE001 - a failed round must not end adaptation; logged
                log.exception("adaptation round failed; its data stay due and the next check "
                              "retries")
                self._stop.wait(self.schedule.check_interval)

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
        """Run every round that is due now and wait for all of them (device rounds first, then
        the fleet round); raises the first failure after the others finished."""
        results: list[RoundResult] = []
        errors: list[BaseException] = []
        while True:
            submitted = self._submit_due(results, errors)
            if not self.flights and not submitted:
                break
            while self.flights and not self._stop.is_set():
                self._collect(self.schedule.check_interval or 0.5, results, errors)
            if self._stop.is_set() or not self._fleet_due():
                break
        if errors:
            raise errors[0]
        return results

    def tick(self, wait: float = 0.0) -> list[RoundResult]:
        """Accept what finished (waiting up to ``wait`` seconds), retry what timed out, submit
        what is due: the thread's loop. Raises the first failed round's error."""
        results: list[RoundResult] = []
        errors: list[BaseException] = []
        if self.flights:
            self._collect(wait, results, errors)
        if self._may_adapt():
            self._submit_due(results, errors)
        if not self.flights:
            self._stop.wait(wait)
        if errors:
            raise errors[0]
        return results

    def _may_adapt(self) -> bool:
        """Rounds run only in the server whose publisher holds the fleet's lease (several servers
        of one fleet share the store and ingest; one adapts and publishes). A server that gains
        the lease drops what it cached of learners and cursors and reloads them from the store,
        where the previous holder saved them after every accepted round."""
        leader = self.publisher.is_leader
        if leader and not self._was_leader and not self.flights:
            self.learners.clear()
            self.cursor.clear()
            self.fleet_learner, self.fleet_cursor = None, 0
        self._was_leader = leader
        return leader

    def _fleet_due(self) -> bool:
        every = self.schedule.fleet_every
        return bool(every) and self._since_fleet >= every

    def _submit_due(self, results: list[RoundResult], errors: list[BaseException]) -> int:
        """Submit due rounds up to the executor's capacity; returns how many were submitted.
        A due fleet round waits for the device rounds in flight and holds back new ones."""
        fleet = self.schedule.fleet
        submitted = 0
        if fleet in self.flights:
            return 0
        if not self._fleet_due():
            for device in self.store.devices(fleet):
                if self._stop.is_set() or self._fleet_due():
                    break
                if device in self.flights:
                    continue
                while len(self.flights) >= self.executor.capacity and not self._stop.is_set():
                    self._collect(self.schedule.check_interval or 0.5, results, errors)
                self._learner("device", device)
                new = self.store.count_rows(fleet, device, after_id=self.cursor.get(device, 0))
                if new >= self.schedule.min_new_transitions:
                    submitted += self._submit_device(device, new)
        if self._fleet_due() and not self.flights and not self._stop.is_set():
            submitted += self._submit_fleet()
        return submitted

    def _submit_device(self, device: str, new: int) -> int:
        learner = self._learner("device", device)
        batch = self.store.transitions(self.schedule.fleet, device,
                                       newest=self.rounds.max_transitions)
        if batch is None:
            raise RuntimeError(f"device {device} has no stored transitions")
        try:
            runs = self.running(device, batch)
        except UnknownVersion as exc:
            self._note(device, f"device {device}: no round ({exc}); its data stay due")
            return 0
        if (why := self.slots.fleet_in_flight(device, runs)) is not None:
            self._note(device, f"device {device}: its round waits until {why}")
            return 0
        self._note(device, None)
        log.info("device %s: %d new real transitions (%d in all); adapting its device slot on "
                 "%s (%s)", device, new, len(batch), runs.describe(), runs.source)
        self._align(device, learner, runs)
        self._submit("device", device, learner, runs.policy(self.base), batch,
                     self.cursor.get(device, 0), new)
        return 1

    def running(self, device: str, batch: TraceBatch | None) -> Combination:
        """What ``device`` runs, by its own report (``plasma.server.slots``); the server's
        accepted adapters when it reports nothing. Raises ``UnknownVersion``."""
        learner = self.learners.get(device)
        return self.slots.running(device, batch, Combination(
            0, self.fleet_adapter, 0, learner.adapter if learner is not None else None, "server"))

    def _note(self, target: str, message: str | None) -> None:
        """Log why a target's round does not run, once per change (None: it runs)."""
        if message is not None and self._notes.get(target) != message:
            log.warning("%s", message)
        if message is None:
            self._notes.pop(target, None)
        else:
            self._notes[target] = message

    def _align(self, device: str, learner: Learner, runs: Combination) -> None:
        """The device round starts from the device adapter the device runs
        (``DeviceSlots.start_from``; labels dropped when that is not the learner's own)."""
        if runs.source == "server":
            self._check_device(device, learner)
            return
        start, other = self.slots.start_from(device, runs, learner.adapter)
        if other:
            learner.reset_adapter()
        learner.adapter = start

    def _fleet_batch(self) -> TraceBatch | None:
        """The fleet round's data: the newest transitions of every device, pooled."""
        return self.store.transitions(self.schedule.fleet, newest=self.rounds.max_transitions)

    def _submit_fleet(self) -> int:
        fleet = self.schedule.fleet
        learner = self._learner("fleet", fleet)
        batch = self._fleet_batch()
        self._since_fleet = 0
        if batch is None:
            raise RuntimeError("fleet round with no data")
        log.info("fleet %s: adapting the fleet slot on %d transitions of %d devices", fleet,
                 len(batch), len(self.store.devices(fleet)))
        batches = {d: b for d in self.store.devices(fleet)
                   if (b := self.store.transitions(fleet, d, newest=self.rounds.max_transitions))}
        try:  # the pairs each device may run are judged: what it runs now, by its own report,
            # and the device adapter on its way to it
            running = {d: self.slots.with_next_device(d, self.running(d, b),
                                                      self._learner("device", d).adapter)
                       for d, b in batches.items()}
        except UnknownVersion as exc:
            self._note(f"fleet:{fleet}", f"fleet {fleet}: no round ({exc}); the fleet slot is "
                       "adapted again after the next device rounds")
            return 0
        self._note(f"fleet:{fleet}", None)
        per_device = {d: real_data(b, self.rounds.max_transitions) for d, b in batches.items()}
        self._submit("fleet", fleet, learner, self.base, batch, self.fleet_cursor, len(batch),
                     devices=per_device, running=running)
        return 1

    def _submit(self, slot: str, target: str, learner: Learner, policy: MLPPolicy,
                batch: TraceBatch, cursor_from: int, new: int, attempt: int = 0,
                devices: dict[str, RealData] | None = None,
                running: dict[str, Combination] | None = None) -> None:
        spec = RoundSpec(new_id(), self.schedule.fleet, slot, target if slot == "device" else None,
                         learner, policy, real_data(batch, self.rounds.max_transitions), devices,
                         running)
        self.flights[target] = _Flight(slot, target, spec, self.executor.submit(spec), cursor_from,
                                       batch.seq, float(batch.timestamp.min()),
                                       float(batch.timestamp.max()), new, attempt)

    def _collect(self, wait: float, results: list[RoundResult],
                 errors: list[BaseException]) -> None:
        """Accept the finished rounds (waiting up to ``wait`` s for one); resubmit timed-out ones."""
        by_id = {f.handle.round_id: f for f in self.flights.values()}
        done = self.executor.wait([f.handle for f in by_id.values()], wait)
        for handle in done:
            flight = by_id[handle.round_id]
            try:
                outcome = self.executor.outcome(handle)
            except Exception as exc:  # noqa: BLE001 - the data stay due; the caller logs it
                self.flights.pop(flight.target, None)
                errors.append(exc)
                continue
            result = self.accept(outcome)
            if result is not None:
                results.append(result)
        self._expire()

    def _expire(self) -> None:
        """Cancel rounds past their timeout and submit them again with a new round id (the same
        data: the cursor has not moved); each attempt gets twice the time of the last."""
        limit = self.schedule.round_timeout
        if not limit:
            return
        now = time.monotonic()
        for flight in list(self.flights.values()):
            if now - flight.handle.submitted <= limit * 2 ** flight.attempt:
                continue
            log.warning("%s %s: round %s timed out after %.0f s; cancelled and submitted again",
                        flight.slot, flight.target, flight.spec.round_id[:8],
                        now - flight.handle.submitted)
            self.executor.cancel(flight.handle)
            self.retries += 1
            spec = replace(flight.spec, round_id=new_id())
            flight.spec, flight.handle, flight.attempt = spec, self.executor.submit(spec), \
                flight.attempt + 1

    def accept(self, outcome: RoundOutcome) -> RoundResult | None:
        """Keep an outcome if its round is the one in flight for its target; None if stale."""
        flight = next((f for f in self.flights.values()
                       if f.spec.round_id == outcome.round_id), None)
        if flight is None:
            self.discarded += 1
            log.warning("round %s: outcome of a round no longer in flight; discarded",
                        outcome.round_id[:8])
            return None
        del self.flights[flight.target]
        learner, result = outcome.learner, outcome.result
        if flight.slot == "device":
            self.learners[flight.target] = learner
            self.cursor[flight.target] = flight.cursor_to
            self._save("device", flight.target, learner, flight.cursor_to)
            self.device_rounds += 1
            self._since_fleet += 1
        else:
            # the device learners keep their adapters: the round judged the candidate with each
            # device's adapter (a pair worse than what the device runs blocked it)
            self.fleet_learner, self.fleet_cursor = learner, flight.cursor_to
            self._save("fleet", flight.target, learner, flight.cursor_to)
        self._publish(flight, outcome)
        return result

    def _check_device(self, device: str, learner: Learner) -> None:
        """A device that refused or rolled back its adapter runs its base again: so does the
        learner (its model stays)."""
        state = self.store.device_state(self.schedule.fleet, device, "device")
        if learner.adapter is not None and state["last_verdict"] in ("rejected", "rolled_back"):
            log.warning("device %s %s device adapter v%s; the next one starts from its base",
                        device, state["last_verdict"], state["last_version"])
            learner.reset_adapter()

    def _publish(self, flight: _Flight, outcome: RoundOutcome) -> None:
        """The audit record (with the data range it consumed) and an approved adapter go to the
        publisher, which signs here: the key never leaves this process."""
        result, slot = outcome.result, flight.slot
        device = flight.spec.device
        result.record = result.record.model_copy(update={"scores": {
            **result.record.scores, "data_cursor_from": float(flight.cursor_from),
            "data_cursor_to": float(flight.cursor_to), "data_to": flight.trace_to,
            "round_cpu_s": result.cpu_seconds, "round_wall_s": result.seconds}})
        self.verdicts[result.verdict] += 1
        self.cpu_seconds.append(result.cpu_seconds)
        self.publisher.publish_audit(result.record)
        target = device or f"fleet {self.schedule.fleet}"
        if result.adapter is None:
            log.warning("%s: candidate blocked by the judicial audit (%s) after %.1f s; the "
                        "%s slot keeps its current adapter", target,
                        ", ".join(r.code for r in result.record.reasons), result.seconds, slot)
            return
        sim = outcome.simulation_id
        provenance = Provenance(
            trace_count=result.transitions, trace_from=flight.trace_from,
            trace_to=flight.trace_to, simulation_id=sim,
            world_model_version=f"{result.model_kind}-{sim[:8]}", note=f"judicial: {result.verdict}")
        self.publisher.submit(to_adapter(result.adapter), slot, device,
                              priority=4 if slot == "fleet" else 5, provenance=provenance)
        log.info("%s: %s adapter approved (%s, predicted gain %.1f) after %.1f s; queued for "
                 "publication", target, slot, result.verdict,
                 result.record.scores.get("gain", 0.0), result.seconds)
