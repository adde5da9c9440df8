"""``PlasmaAgent``: the whole loop in one process: think, act, learn, evolve.

The agent owns what the fleet service spreads over processes, the same code in each place:
an environment (the "device's" real world), an in-process ``EdgeDevice`` (int8 ONNX policy,
edge audit, journal, merge, canary), a trace store, a judicial auditor of traces, a signing key
and the device's trust store, and one ``Learner`` (the world model, phantom DAgger,
distillation and the judicial review of every candidate: the round ``plasma-server run`` runs).

Heavy numpy work (a learning round, an evaluation) runs in the default executor, so the event
loop keeps serving ``act()`` while a round trains.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from plasma.edge.device import DeviceConfig, EdgeDevice
from plasma.edge.merge import MergeEngine
from plasma.edge.runtime import PolicyRuntime
from plasma.protocol import AuditRecord, PlasmaError, Reason, SigningKey, StateTrace, TraceBatch, TrustStore, WorldState
from plasma.protocol.bundle import Bundle, load_bundle
from plasma.protocol.catalog import resolve_bundle
from plasma.protocol.errors import BundleNotFound, ConfigError

from ..server.adapt import Learner, adapt_config
from ..server.catalog import find_model
from ..server.judicial import RealData
from ..server.phantom import blas_threads
from ..server.policy_net import MLPPolicy
from ..server.run import policy_from_bundle, real_data
from ..server.store import TraceStore
from ..server.tasks import TaskSpec, get_task
from ..server.tools.watch import edge_return
from .packets import LoRADistiller, SignedPacket
from .simulation import NominalModel, PhantomPathSimulator, SimulationResult
from .trace_audit import JudicialAuditor

__all__ = ["AgentError", "LearnResult", "PlasmaAgent"]

log = logging.getLogger(__name__)
MIN_TRANSITIONS = 50
"""A learning round needs at least this many real transitions."""


class AgentError(PlasmaError):
    """A ``PlasmaAgent`` that cannot be built or used as asked (bad env, policy, state_dim)."""

    code = "agent_error"


@dataclass(frozen=True)
class LearnResult:
    """What ``learn()`` did: the judicial verdict, and the packet when one was approved."""

    record: AuditRecord
    """The judicial auditor's record of the candidate (published, corrected or blocked)."""
    packet: SignedPacket | None = None
    """The signed packet (None when the candidate was blocked or distillation is off)."""
    edge_record: AuditRecord | None = None
    """The device's own audit of the packet (accepted or rejected)."""
    transitions: int = 0
    """Real transitions the round learned from."""
    seconds: float = 0.0

    @property
    def merged(self) -> bool:
        """True when the device accepted the packet and runs it now."""
        return self.edge_record is not None and self.edge_record.verdict == "accepted"

    @property
    def target_layers(self) -> tuple[str, ...]:
        """Layers the packet changes (empty when nothing was published)."""
        return self.packet.target_layers if self.packet is not None else ()

    @property
    def verdict(self) -> str:
        return self.record.verdict


class PlasmaAgent:
    """An agent that adapts its int8 policy to its real world from its own traces."""

    def __init__(self, env: Any = "Pendulum-v1", policy: str | Path | Bundle | None = None, *,
                 state_dim: int | None = None, simulation_horizon: int = 10,
                 num_simulations: int = 5, enable_auditing: bool = True,
                 enable_distillation: bool = True, steps_per_round: int = 200,
                 budget: str = "default", explore_noise: float = 0.1, seed: int = 0,
                 state_dir: str | Path | None = None, fleet: str = "local",
                 device: str = "agent") -> None:
        self.env, self.env_id, self.physics = _make_env(env)
        self.task = _task(self.env_id, self.env)
        if state_dim is not None and state_dim != self.task.obs_dim:
            raise AgentError(f"state_dim={state_dim} but {self.env_id} observations have "
                             f"{self.task.obs_dim} dimensions", code="state_dim_mismatch")
        self.bundle = _bundle(policy, self.env_id)
        if self.bundle.manifest.obs_dim != self.task.obs_dim or \
                self.bundle.manifest.act_dim != self.task.act_dim:
            raise AgentError(f"the policy maps {self.bundle.manifest.obs_dim} -> "
                             f"{self.bundle.manifest.act_dim}, {self.env_id} needs "
                             f"{self.task.obs_dim} -> {self.task.act_dim}", code="policy_mismatch")
        self.policy: MLPPolicy = policy_from_bundle(self.bundle)
        self.fleet, self.device_id = fleet, device
        self.horizon, self.num_simulations = simulation_horizon, num_simulations
        self.enable_auditing, self.enable_distillation = enable_auditing, enable_distillation
        self.steps_per_round, self.explore_noise, self.seed = steps_per_round, explore_noise, seed
        self._own_dir = state_dir is None
        self.state_dir = Path(state_dir) if state_dir else Path(tempfile.mkdtemp(prefix="plasma-"))
        self.key = SigningKey.generate()
        self.trust = TrustStore([self.key.public_key])
        self.device = EdgeDevice(self.bundle, self.trust, self.state_dir / "device",
                                 DeviceConfig(fleet=fleet, device=device))
        self.store = TraceStore(str(self.state_dir / "traces.sqlite"))
        self.learner = Learner(self.task, adapt_config(budget, seed))
        self.trace_auditor = JudicialAuditor(self.task)
        self.distiller = LoRADistiller(self.policy, self.key, self.bundle.base_sha256,
                                       fleet=fleet, device=device, seed=seed)
        self.rng = np.random.default_rng(seed)
        self.traces: list[StateTrace] = []
        """Every real step taken (what ``act`` returned)."""
        self.records: list[AuditRecord] = []
        """Judicial, edge and trace records, in order."""
        self._pending: list[StateTrace] = []
        self._obs: np.ndarray | None = None
        self._episode = self._step = 0
        self._learned_at = 0
        self._background: asyncio.Task[None] | None = None

    # -- the loop -----------------------------------------------------------------------------

    def initialize_state(self, seed: int | None = None) -> WorldState:
        """Reset the environment; the real state the next ``think`` and ``act`` start from."""
        obs, _ = self.env.reset(seed=self.seed if seed is None else seed)
        self._obs = np.asarray(obs, np.float32)
        self._step = 0
        return self.state

    @property
    def state(self) -> WorldState:
        """The current real state."""
        if self._obs is None:
            raise AgentError("call initialize_state() first", code="no_state")
        return WorldState(fleet=self.fleet, device=self.device_id,
                          obs=tuple(float(x) for x in self._obs), episode=self._episode,
                          step=self._step, timestamp=time.time())

    async def think(self) -> SimulationResult:
        """Phantom paths in the current world model from the current real state."""
        state = self.state
        model = await asyncio.get_running_loop().run_in_executor(None, self._model)
        sim = PhantomPathSimulator(model, self.task, self.policy, horizon=self.horizon,
                                   num_simulations=self.num_simulations,
                                   seed=int(self.rng.integers(2**31)))
        return sim.pre_emptive_rollout(state, self.learner.adapter)

    async def act(self, simulation: SimulationResult | None = None) -> StateTrace:
        """One real step of the active int8 policy (with the exploration noise, which the trace
        records as the action taken). ``simulation`` is accepted for the seed's signature: the
        device acts on its own policy, phantom paths only teach it through ``learn``."""
        if self._obs is None:
            self.initialize_state()
        assert self._obs is not None
        obs = self._obs
        action = self.device.act(obs)
        if self.explore_noise > 0:
            half = 0.5 * (self.task.act_high - self.task.act_low)
            action = np.clip(action + self.explore_noise * half *
                             self.rng.standard_normal(action.shape), self.task.act_low,
                             self.task.act_high).astype(np.float32)
        nxt, reward, term, trunc, _ = self.env.step(action)
        nxt = np.asarray(nxt, np.float32)
        f, d = self.device.versions
        trace = StateTrace(fleet=self.fleet, device=self.device_id, episode=self._episode,
                           step=self._step, obs=tuple(map(float, obs)),
                           action=tuple(map(float, action)), reward=float(reward),
                           next_obs=tuple(map(float, nxt)), terminated=bool(term),
                           truncated=bool(trunc), fleet_version=f, device_version=d,
                           timestamp=time.time())
        self.traces.append(trace)
        self._keep(trace)
        rollback = self.device.observe(obs, float(reward))
        if rollback is not None:
            self.records.append(_pydantic(rollback.record))
            self.learner.reset_adapter()
            log.warning("canary rolled back: %s", rollback.describe())
        self._step += 1
        if term or trunc:
            self._episode += 1
            self.initialize_state(seed=int(self.rng.integers(2**31)))
        else:
            self._obs = nxt
        return trace

    async def learn(self, simulation: SimulationResult | None = None) -> LearnResult:
        """One learning round on every trace so far: fit the world model, distil a candidate,
        judge it; when approved, sign it and merge it after the device's own audit."""
        self._flush()
        real = self._real_data()
        if real is None or len(real.obs) < MIN_TRANSITIONS:
            record = AuditRecord(auditor="judicial", subject="learn", fleet=self.fleet,
                                 device=self.device_id, verdict="blocked", reasons=(Reason(
                                     code="too_few_transitions", check="data",
                                     message=f"{0 if real is None else len(real.obs)} real "
                                             f"transitions, a round needs {MIN_TRANSITIONS}"),))
            self.records.append(record)
            return LearnResult(record)
        self._learned_at = len(self.traces)
        loop = asyncio.get_running_loop()
        t0 = time.perf_counter()
        result = await loop.run_in_executor(None, self._round, real)
        record = _pydantic(result.record)
        self.records.append(record)
        if result.adapter is None or not self.enable_distillation:
            return LearnResult(record, transitions=len(real.obs),
                               seconds=time.perf_counter() - t0)
        packet = self.distiller.sign(result.adapter,
                                     self.store.next_version(self.fleet, "device", self.device_id))
        self.store.record_publication(self.fleet, "device", self.device_id, packet.version,
                                      packet.header.packet_id, 5, len(packet.data),
                                      topic="in-process")
        edge = self.distiller.inject_to_edge_agent(packet, self.device)
        assert edge is not None
        self.records.append(edge)
        if edge.verdict != "accepted":
            self.learner.reset_adapter()
        return LearnResult(record, packet, edge, len(real.obs), time.perf_counter() - t0)

    async def evolve(self, steps: int = 10) -> list[StateTrace]:
        """``steps`` rounds of: act ``steps_per_round`` real steps, learn (merge when approved).
        Returns the traces of those steps."""
        out: list[StateTrace] = []
        for _ in range(steps):
            for _ in range(self.steps_per_round):
                out.append(await self.act())
            result = await self.learn()
            log.info("evolve: %d real steps, round %s", len(self.traces), result.verdict)
        return out

    def start(self) -> asyncio.Task[None]:
        """Learn in the background (an asyncio task) whenever ``steps_per_round`` new real
        steps have been taken, while the caller keeps acting; ``stop()`` ends it."""
        if self._background is None or self._background.done():
            self._background = asyncio.get_running_loop().create_task(self._learn_forever())
        return self._background

    async def stop(self) -> None:
        """Stop background learning (a round in progress finishes first)."""
        task, self._background = self._background, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass

    async def evaluate(self, episodes: int = 10) -> float:
        """Noise-free real return of the active policy: mean over fixed-seed episodes of the
        agent's own environment physics, on a copy of the device's int8 runtime."""
        adapters = self.device.active_adapters()
        return await asyncio.get_running_loop().run_in_executor(
            None, self._evaluate, adapters, episodes)

    def close(self) -> None:
        """Release the store (and the state directory when the agent made it)."""
        self.store.close()
        if self._own_dir:
            shutil.rmtree(self.state_dir, ignore_errors=True)

    # -- internals ----------------------------------------------------------------------------

    def _keep(self, trace: StateTrace) -> None:
        if not self.enable_auditing:
            self._pending.append(trace)
            return
        record = self.trace_auditor.audit_state_trace(trace)
        if record.verdict != "accepted":
            self.records.append(record)
        kept = self.trace_auditor.apply_correction(record, trace)
        if kept is not None:
            self._pending.append(kept)
        if len(self._pending) >= 200:
            self._flush()

    def _flush(self) -> None:
        if self._pending:
            self.store.add_traces(TraceBatch.from_traces(self._pending))
            self._pending = []

    def _real_data(self) -> RealData | None:
        cap = self.learner.cfg.max_transitions
        batch = self.store.transitions(self.fleet, self.device_id, newest=cap)
        return None if batch is None else real_data(batch, cap)

    def _round(self, real: RealData) -> Any:
        # one BLAS thread, as plasma-server run's worker: these matmuls are small, and two
        # threads fighting the caller's own work for two cores made rounds 3-6x slower
        with blas_threads(1):
            return self.learner.round(self.policy, real, fleet=self.fleet, slot="device",
                                      device=self.device_id)

    def _model(self) -> Any:
        """The learner's world model, fitted now if no round has run yet."""
        if self.learner.model is not None:
            return self.learner.model
        self._flush()
        real = self._real_data()
        from ..server.adapt import fit_model

        if real is None or len(real.obs) < MIN_TRANSITIONS:
            return NominalModel(self.task)  # no data yet: what the base policy was trained in
        return fit_model(self.task, real, self.learner.cfg)

    def _evaluate(self, adapters: Mapping[str, Any], episodes: int) -> float:
        return edge_return(MergeEngine(PolicyRuntime(self.bundle)), adapters, self.env_id,
                           self.physics, episodes)

    async def _learn_forever(self) -> None:
        while True:
            if len(self.traces) - self._learned_at >= self.steps_per_round:
                await self.learn()
            else:
                await asyncio.sleep(0.05)


def _make_env(env: Any) -> tuple[Any, str, dict[str, float]]:
    """(environment, Gymnasium id, physics overrides) from a string or a gymnasium.Env."""
    if isinstance(env, str):
        from plasma.edge.envs import make_env, parse_env

        try:
            spec = parse_env(env)
            if spec.kind != "gym":
                raise AgentError(f"env {env!r}: give a Gymnasium id (with physics overrides) "
                                 "or a gymnasium.Env", code="bad_env")
            made = make_env(env)
        except PlasmaError as exc:
            raise AgentError(f"env {env!r}: {exc}", code="bad_env") from None
        _check_box(made, env)
        return made, spec.target, dict(spec.physics)
    spec_id = getattr(getattr(env, "spec", None), "id", None)
    if spec_id is None or not hasattr(env, "step"):
        raise AgentError("env must be a Gymnasium id such as 'Pendulum-v1:m=1.6,g=12' or a "
                         "gymnasium.Env made with gymnasium.make", code="bad_env")
    _check_box(env, spec_id)
    physics = get_task(spec_id).default_physics if spec_id in _tasks() else {}
    base = env.unwrapped
    overrides = {k: float(getattr(base, k)) for k in physics
                 if hasattr(base, k) and float(getattr(base, k)) != physics[k]}
    return env, spec_id, overrides


def _check_box(env: Any, name: str) -> None:
    from gymnasium.spaces import Box

    for what in ("action_space", "observation_space"):
        if not isinstance(getattr(env, what, None), Box):
            raise AgentError(f"env {name!r}: its {what} is "
                             f"{type(getattr(env, what, None)).__name__}, Plasma needs a Box",
                             code="bad_env")


def _tasks() -> set[str]:
    from ..server.tasks import TASKS

    return set(TASKS)


def _task(env_id: str, env: Any) -> TaskSpec:
    try:
        return get_task(env_id)
    except KeyError:
        raise AgentError(f"{env_id} is not a registered task (known: {sorted(_tasks())})",
                         code="unknown_task") from None


_POLICY_HINT = ("pass policy= a bundle directory, a Bundle or the name of a bundle "
                "(plasma.protocol.catalog.list_bundles()), or add a directory of bundles to "
                "PLASMA_MODELS; plasma.server.basepolicy.train_base makes one")


def _bundle(policy: str | Path | Bundle | None, env_id: str) -> Bundle:
    if isinstance(policy, Bundle):
        return policy
    try:
        path = resolve_bundle(policy) if policy is not None else find_model(env_id, {})
        return load_bundle(path)
    except BundleNotFound as exc:
        raise AgentError(f"{exc}: {_POLICY_HINT}", code="no_policy") from None
    except ConfigError as exc:  # PLASMA_MODELS names a directory that is not there
        raise AgentError(str(exc), code="bad_policy") from None
    except PlasmaError as exc:
        raise AgentError(f"policy {policy}: {exc}", code="bad_policy") from None
    except ValueError as exc:  # a bundle error that is not (yet) a PlasmaError
        raise AgentError(f"policy {policy}: {exc}", code="bad_policy") from None


def _pydantic(record: Any) -> AuditRecord:
    """The contract's AuditRecord for a wire (msgspec) record."""
    if isinstance(record, AuditRecord):
        return record
    return AuditRecord.model_validate_json(record.model_dump_json())
