"""Where adaptation rounds compute: in the server process (``local``) or on a Ray cluster (``ray``).

One seam for the outside system. A round is a pure function, ``run_round(RoundSpec) ->
RoundOutcome``: the slot's ``Learner`` (model, labels, accepted adapter), the policy to adapt and
the round's real data in; the judicial result and the learner after the round out. Nothing in it
touches the store, the bus or the signing key, so it can run in another process on another
machine; the ``AdaptationWorker`` accepts an outcome (advances the data cursor, keeps the new
learner, hands the adapter to the publisher, which signs) only when its round id is the one in
flight for that target, so a late or repeated outcome is discarded.

- ``LocalExecutor``: runs the round inline on the caller's thread, on the learner itself (the
  behaviour of a single-process server; capacity 1; no timeout).
- ``RayExecutor``: each round is a Ray task (``num_cpus=1``); its spec travels through Ray's
  object store (``ray.put``). Ray retries a task whose worker process died (``max_retries``);
  a round past its timeout is cancelled (its worker is killed) and the ``AdaptationWorker``
  submits it again. ``ray`` is imported only here, only when this executor is built.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from plasma.protocol import new_id
from plasma.protocol.errors import ConfigError

from .adapt import Learner, RoundResult
from .judicial import JudicialAuditor, RealData
from .phantom import blas_threads
from .policy_net import MLPPolicy
from .slots import Combination

__all__ = ["EXECUTORS", "Executor", "Handle", "LocalExecutor", "RayExecutor", "RoundOutcome",
           "RoundSpec", "make_executor", "run_round"]

log = logging.getLogger(__name__)

EXECUTORS = ("local", "ray")


@dataclass(frozen=True)
class RoundSpec:
    """Everything one round needs (picklable: it is shipped to a Ray worker as one object)."""

    round_id: str
    """Unique per submission: a retry after a timeout gets a new one."""
    fleet: str
    slot: str
    """``device`` or ``fleet``."""
    device: str | None
    """The device of a device-slot round (None for the fleet slot)."""
    learner: Learner
    policy: MLPPolicy
    """The policy the adapter is relative to (base, or base + fleet adapter)."""
    real: RealData
    devices: dict[str, RealData] | None = None
    """A fleet round: each contributing device's own data (the judicial fleet screen fits and
    judges every device on its own; ``real`` is their pool)."""
    running: dict[str, Combination] | None = None
    """A fleet round: what each device reports it runs (``plasma.server.slots``): the candidate
    is judged on each as base ⊕ candidate ⊕ its device adapter."""


@dataclass
class RoundOutcome:
    """What a worker returns: the result (adapter, audit record) and the learner after it."""

    round_id: str
    result: RoundResult
    learner: Learner
    simulation_id: str
    started: float
    """Wall-clock start and end of the computation (epoch seconds), and the worker's pid."""
    finished: float
    pid: int


def run_round(spec: RoundSpec) -> RoundOutcome:
    """One round, start to judicial verdict (no store, bus or key: safe to run anywhere).

    BLAS is held to one thread inside: these small matmuls ran 2-50x slower with two threads on
    a busy two-core machine (``phantom.blas_threads``), and a worker shares its cores."""
    started = time.time()
    simulation_id = new_id()
    learner = spec.learner
    auditor = JudicialAuditor(learner.task, spec.policy, learner.cfg.judicial)
    with blas_threads(1):
        result = learner.round(spec.policy, spec.real, fleet=spec.fleet, slot=spec.slot,
                               device=spec.device, subject=f"simulation:{simulation_id}",
                               auditor=auditor, devices=spec.devices, running=spec.running)
    return RoundOutcome(spec.round_id, result, learner, simulation_id, started, time.time(),
                        os.getpid())


@dataclass
class Handle:
    """A submitted round."""

    round_id: str
    submitted: float = field(default_factory=time.monotonic)
    ref: Any = None
    """The executor's own token (a Ray ObjectRef; the outcome or error for local)."""
    error: BaseException | None = None


class Executor(Protocol):
    """The seam: submit a round, learn which are done, take an outcome, cancel."""

    capacity: int
    """Rounds that can compute at the same time."""

    def submit(self, spec: RoundSpec) -> Handle: ...

    def wait(self, handles: list[Handle], timeout: float) -> list[Handle]:
        """The finished ones among ``handles`` (waits up to ``timeout`` for at least one)."""
        ...

    def outcome(self, handle: Handle) -> RoundOutcome:
        """The round's outcome; raises what the round raised."""
        ...

    def cancel(self, handle: Handle) -> None: ...

    def close(self) -> None: ...


class LocalExecutor:
    """The round runs inline in ``submit`` (the single-process server's behaviour)."""

    capacity = 1

    def submit(self, spec: RoundSpec) -> Handle:
        handle = Handle(spec.round_id)
        try:
            handle.ref = run_round(spec)
        except Exception as exc:  # noqa: BLE001 - handed back by outcome(), like a remote error
            handle.error = exc
        return handle

    def wait(self, handles: list[Handle], timeout: float) -> list[Handle]:
        return list(handles)

    def outcome(self, handle: Handle) -> RoundOutcome:
        if handle.error is not None:
            raise handle.error
        return handle.ref  # type: ignore[no-any-return]

    def cancel(self, handle: Handle) -> None:
        pass

    def close(self) -> None:
        pass


class RayExecutor:
    """Rounds as Ray tasks on the cluster at ``address``, or on a new local Ray started here
    (``address="local"``: never a Ray another process started on this host).

    ``workers``: rounds in flight (0 = one per CPU of the cluster); for a local Ray also its CPU
    count. ``max_retries``: Ray's resubmissions of a task whose worker process died."""

    def __init__(self, address: str | None = None, workers: int = 0, max_retries: int = 3,
                 object_store_mb: int = 200) -> None:
        try:
            import ray
        except ImportError:
            raise ConfigError("--executor ray needs Ray: pip install 'plasma[cluster]'") from None
        self.ray = ray
        self._owns = not ray.is_initialized()
        if self._owns:
            if address:
                ray.init(address=address, log_to_driver=False)
            else:
                # Ray nices its workers (15) by default: on a host the server shares with ingest
                # and devices, rounds would then starve; the local executor runs them at 0 too
                os.environ.setdefault("RAY_worker_niceness", "0")
                ray.init(address="local", num_cpus=workers or os.cpu_count(),
                         include_dashboard=False,
                         object_store_memory=object_store_mb * 2**20, log_to_driver=False)
        cpus = int(ray.cluster_resources().get("CPU", 1))  # type: ignore[no-untyped-call]
        self.capacity = workers or max(1, cpus)
        self._task = ray.remote(num_cpus=1, max_retries=max_retries,
                                retry_exceptions=False)(run_round)
        # one task per slot first, so that the first rounds do not pay the workers' imports
        warm = ray.remote(num_cpus=1)(_warm)
        ray.get([warm.remote() for _ in range(self.capacity)])
        log.info("ray executor: %s, %d CPU(s), up to %d rounds in flight",
                 address or "local Ray", cpus, self.capacity)

    def submit(self, spec: RoundSpec) -> Handle:
        ref = self.ray.put(spec)  # learner, policy and data through the object store
        return Handle(spec.round_id, ref=self._task.remote(ref))

    def wait(self, handles: list[Handle], timeout: float) -> list[Handle]:
        if not handles:
            return []
        by_ref = {h.ref: h for h in handles}
        done, _ = self.ray.wait(list(by_ref), num_returns=1, timeout=timeout)
        if done:  # and whatever else is ready now
            done, _ = self.ray.wait(list(by_ref), num_returns=len(by_ref), timeout=0)
        return [by_ref[r] for r in done]

    def outcome(self, handle: Handle) -> RoundOutcome:
        return self.ray.get(handle.ref)  # type: ignore[no-any-return]

    def cancel(self, handle: Handle) -> None:
        """Stop the round: its worker process is killed (cancelled tasks are not retried)."""
        self.ray.cancel(handle.ref, force=True)

    def close(self) -> None:
        if self._owns and self.ray.is_initialized():
            self.ray.shutdown()


def _warm() -> int:
    """Runs in a Ray worker: importing this module imports the round's code; the pause keeps
    the other warm-up tasks off this worker."""
    time.sleep(0.5)
    return os.getpid()


def make_executor(kind: str, address: str | None = None, workers: int = 0) -> Executor:
    """The executor ``plasma-server run --executor`` names."""
    if kind == "local":
        return LocalExecutor()
    if kind == "ray":
        return RayExecutor(address, workers)
    raise ConfigError(f"executor must be one of {', '.join(EXECUTORS)}")
