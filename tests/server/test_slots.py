"""Slots that fit together (issue 24 item 4): a device runs base ⊕ fleet adapter ⊕ device adapter.

- the fleet round judges its candidate on the pair each device would run (base ⊕ new fleet ⊕ its
  device adapter) against what it runs now, and blocks a pair that is worse;
- the device round adapts base ⊕ the fleet adapter the device reports running (its retained
  versions message, else its newest transition), not the server's newest one;
- an approved fleet adapter does not reset the device learners (the pair was judged);
- reported versions resolve to the weights of the packet published as that version.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

import numpy as np
import pytest

from plasma.protocol import AuditRecord, LiveVersions, SigningKey, TraceBatch, topics
from plasma.protocol.bundle import load_bundle
from plasma.protocol.bus import MemoryBroker, MemoryBus, Message
from plasma.protocol.catalog import resolve_bundle
from plasma.server.adapt import adapt_config
from plasma.server.executor import Handle, RoundSpec
from plasma.server.judicial import DeviceScreen, JudicialConfig, RealData, fleet_decision, judge_devices
from plasma.server.judicial.auditor import Decision
from plasma.server.policy_net import LoRA, MLPPolicy
from plasma.server.publisher import Publisher, PublisherConfig
from plasma.server.run import policy_from_bundle
from plasma.server.slots import Combination, DeviceVersions, UnknownVersion
from plasma.server.store import TraceStore
from plasma.server.tasks import PENDULUM
from plasma.server.worker import AdaptationWorker, ScheduleConfig, to_adapter

FLEET = "f"
_CFG = JudicialConfig(device_paths=32, horizon=80)


def _real(n: int = 400, seed: int = 0, physics: dict[str, float] | None = None) -> RealData:
    rng = np.random.default_rng(seed)
    th = rng.uniform(-np.pi, np.pi, n)
    obs = np.stack([np.cos(th), np.sin(th), rng.uniform(-6, 6, n)], 1).astype(np.float32)
    act = rng.uniform(-2, 2, (n, 1)).astype(np.float32)
    nxt = PENDULUM.sim_step(obs, act, PENDULUM.physics(physics or {}))  # type: ignore[misc]
    return RealData(obs, act, PENDULUM.reward(obs, act, nxt).astype(np.float32),  # type: ignore[misc]
                    nxt.astype(np.float32))


@pytest.fixture(scope="module")
def base() -> MLPPolicy:
    """A policy that swings Pendulum up (the shipped pendulum-nominal bundle)."""
    return policy_from_bundle(load_bundle(resolve_bundle("pendulum-nominal")))


def _lora(base: MLPPolicy, seed: int, size: float) -> LoRA:
    lora = LoRA.init(base, rank=2, seed=seed)
    rng = np.random.default_rng(seed + 100)
    lora.factors = {n: (a, (rng.standard_normal(b.shape) * size).astype(np.float32))
                    for n, (a, b) in lora.factors.items()}
    return lora


def _negated(lora: LoRA) -> LoRA:
    return LoRA({n: (a.copy(), -b) for n, (a, b) in lora.factors.items()}, lora.alpha, lora.rank)


def _blank(decision_adapter: LoRA) -> Decision:
    record = AuditRecord(auditor="judicial", subject="candidate", verdict="published",
                         fleet=FLEET, slot="fleet")
    return Decision("published", decision_adapter, record, None)  # type: ignore[arg-type]


# ------------------------------------------------------------------ the fleet round's judgement


def test_a_device_adapter_fitted_on_fleet_v1_is_judged_with_fleet_v2(base: MLPPolicy) -> None:
    """Fleet v1 was poor for this device and its device adapter undoes it (the device runs
    base ⊕ v1 ⊕ D = base). Candidate v2 is better than v1 alone, so the old judgement (v2
    against v1, no device adapter) passes it; over D it would run base - v1: the pair is judged
    and the candidate blocked, the record naming the pair."""
    v1 = _lora(base, seed=1, size=0.6)
    device = _negated(v1)
    v2 = _lora(base, seed=2, size=0.0)  # delta 0: base alone
    real = {"d1": _real()}
    alone = judge_devices(PENDULUM, base, v2, v1, real, _CFG)
    assert alone["d1"][0] > 0, alone  # v2 alone beats v1 alone: the old check lets it through
    runs = {"d1": Combination(1, v1, 3, device, "versions")}
    pair = judge_devices(PENDULUM, base, v2, v1, real, _CFG, runs)
    gain, current = pair["d1"]
    assert gain < -_CFG.max_device_loss * abs(current), pair
    decision = fleet_decision(_blank(v2), DeviceScreen(kept=("d1",)), pair, _CFG, runs)
    assert decision.adapter is None and decision.verdict == "blocked"
    (reason,) = [r for r in decision.record.reasons if r.code == "fleet_hurts_device"]
    assert "device adapter v3" in reason.message and "fleet v1" in reason.message
    assert decision.record.scores["device_runs_device:d1"] == 3.0
    assert decision.record.scores["device_runs_fleet:d1"] == 1.0


def test_a_device_is_judged_against_the_fleet_adapter_it_runs(base: MLPPolicy) -> None:
    """A device that rolled back to v1 is judged against v1 (what it runs), not against the
    server's newest v2: a candidate equal to what it runs gains exactly nothing."""
    v1, v2 = _lora(base, seed=1, size=0.05), _lora(base, seed=2, size=0.05)
    device = _lora(base, seed=3, size=0.05)
    real = {"d1": _real()}
    runs = {"d1": Combination(1, v1, 2, device, "versions")}
    assert judge_devices(PENDULUM, base, v1, v2, real, _CFG, runs)["d1"][0] == 0.0
    assert judge_devices(PENDULUM, base, v1, v2, real, _CFG)["d1"][0] != 0.0


class _SimModel:
    """A one-member 'world model' that is the nominal simulator (for a task without one)."""

    members = [0]

    def step_member(self, member: int, obs: np.ndarray, act: np.ndarray) -> np.ndarray:
        return PENDULUM.sim_step(obs, act, PENDULUM.physics({}))  # type: ignore[misc,no-any-return]


def test_without_a_simulator_the_pair_is_judged_in_the_round_model(base: MLPPolicy) -> None:
    """No per-device physics to identify: the pair is judged in the round's own model rather
    than left unjudged."""
    task = replace(PENDULUM, sim_step=None, identify=None)
    v1 = _lora(base, seed=1, size=0.6)
    runs = {"d1": Combination(1, v1, 3, _negated(v1), "versions")}
    real = {"d1": _real()}
    v2 = _lora(base, seed=2, size=0.0)
    assert judge_devices(task, base, v2, v1, real, _CFG) == {}
    gain, current = judge_devices(task, base, v2, v1, real, _CFG, runs, _SimModel())["d1"]
    assert gain < -_CFG.max_device_loss * abs(current)


# ------------------------------------------------------------------ the worker


class _Capture:
    """An executor that keeps the specs and never finishes a round."""

    capacity = 4

    def __init__(self) -> None:
        self.specs: list[RoundSpec] = []

    def submit(self, spec: RoundSpec) -> Handle:
        self.specs.append(spec)
        return Handle(spec.round_id)

    def wait(self, handles: list[Handle], timeout: float) -> list[Handle]:
        return []

    def outcome(self, handle: Handle) -> Any:
        raise AssertionError("no outcome")

    def cancel(self, handle: Handle) -> None:
        pass

    def close(self) -> None:
        pass


def _batch(device: str, seq: int, fleet_v: int, device_v: int, n: int = 300) -> TraceBatch:
    real = _real(n, seed=seq + 7 * len(device), physics={"m": 1.6, "g": 12.0})
    return TraceBatch(fleet=FLEET, device=device, seq=seq, episode=np.zeros(n, np.uint32),
                      step=np.arange(n, dtype=np.uint32), obs=real.obs, action=real.act,
                      reward=real.rew, next_obs=real.next_obs, terminated=np.zeros(n, bool),
                      truncated=np.zeros(n, bool),
                      versions={"fleet": np.full(n, fleet_v, np.uint32),
                                "device": np.full(n, device_v, np.uint32)},
                      timestamp=time.time() - 60 + seq * n * 0.02 + np.arange(n) * 0.02)


@pytest.fixture()
def rig(base: MLPPolicy):  # type: ignore[no-untyped-def]
    """Store, publisher (memory bus) and a worker on the capturing executor; fleet v1 and v2 and
    device adapter v1 of d1 published (their signed bytes in the store)."""
    bundle = load_bundle(resolve_bundle("pendulum-nominal"))
    store = TraceStore(":memory:")
    bus = MemoryBus(MemoryBroker())
    bus.connect()
    publisher = Publisher(bus, store, SigningKey.generate(), PublisherConfig(
        fleet=FLEET, base_sha256=bundle.base_sha256, dtype="fp32", min_interval_s=0.0))
    live = DeviceVersions(FLEET)
    live.start(bus)
    capture = _Capture()
    worker = AdaptationWorker(store, publisher, PENDULUM, base,
                              ScheduleConfig(FLEET, min_new_transitions=200, fleet_every=0),
                              adapt_config("small"), capture, live=live)  # type: ignore[arg-type]
    fleet = [_lora(base, seed=10 + v, size=0.05) for v in (1, 2)]
    dev = _lora(base, seed=20, size=0.05)
    for lora in fleet:
        publisher.submit(to_adapter(lora), "fleet")
        publisher.publish_ready()
    publisher.submit(to_adapter(dev), "device", "d1")
    publisher.publish_ready()
    worker._was_leader = True  # (a first tick would otherwise reload the learners from the store)
    worker.fleet_learner = worker._learner("fleet", FLEET)
    worker.fleet_learner.adapter = fleet[1]  # the server's newest: v2
    yield {"store": store, "bus": bus, "worker": worker, "capture": capture, "fleet": fleet,
           "dev": dev, "base": base}
    store.close()


def _same_policy(a: MLPPolicy, b: MLPPolicy) -> bool:
    return all(np.allclose(wa, wb, atol=1e-6) for (wa, _), (wb, _) in zip(a.layers, b.layers))


def _rolled_back(store: TraceStore, device: str, slot: str, version: int) -> None:
    store.add_ack(AuditRecord(auditor="edge", subject="packet:x", verdict="rolled_back",
                              fleet=FLEET, device=device, slot=slot, version=version))


def test_device_round_adapts_the_fleet_adapter_the_device_runs_not_the_newest(rig) -> None:  # type: ignore[no-untyped-def]
    """d1's telemetry says it runs fleet v1 (it rolled v2 back) with device v1: its round adapts
    base ⊕ v1, starting from device v1; the server's newest fleet adapter (v2) is not used."""
    rig["store"].add_traces(_batch("d1", 0, fleet_v=1, device_v=1))
    _rolled_back(rig["store"], "d1", "fleet", 2)
    rig["worker"].tick(0.0)
    (spec,) = rig["capture"].specs
    base, (v1, v2) = rig["base"], rig["fleet"]
    assert spec.slot == "device" and spec.device == "d1"
    assert _same_policy(spec.policy, base.merged(v1))
    assert not _same_policy(spec.policy, base.merged(v2))
    start = spec.learner.adapter
    assert start is not None and all(np.allclose(start.factors[n][1], rig["dev"].factors[n][1])
                                     for n in start.factors)


def test_a_device_round_waits_for_the_fleet_packet_on_its_way(rig) -> None:  # type: ignore[no-untyped-def]
    """d1 reports fleet v1 and has not answered v2: v2 may still land, so a device adapter
    fitted on v1 now would land over v2 unjudged. The round waits; after the rollback it runs."""
    rig["store"].add_traces(_batch("d1", 0, fleet_v=1, device_v=1))
    rig["worker"].tick(0.0)
    assert rig["capture"].specs == [] and rig["worker"].cursor["d1"] == 0
    _rolled_back(rig["store"], "d1", "fleet", 2)
    rig["worker"].tick(0.0)
    (spec,) = rig["capture"].specs
    assert _same_policy(spec.policy, rig["base"].merged(rig["fleet"][0]))


def test_a_device_that_never_answers_a_fleet_packet_is_not_waited_for_forever(rig) -> None:  # type: ignore[no-untyped-def]
    """d1 reports fleet v1 and never acks, refuses or reports v2: once v2 went out longer ago
    than ``landing_timeout``, its round runs on what it reports (base ⊕ v1), with a warning."""
    rig["store"].add_traces(_batch("d1", 0, fleet_v=1, device_v=1))
    slots = rig["worker"].slots
    sent = rig["store"].published_at(FLEET, "fleet", FLEET, 2)
    assert sent is not None and rig["store"].published_at(FLEET, "fleet", FLEET, 9) is None
    slots.landing_timeout, slots.clock = 600.0, lambda: sent + 599.0
    rig["worker"].tick(0.0)
    assert rig["capture"].specs == []  # still within the timeout: it waits
    slots.clock = lambda: sent + 601.0
    rig["worker"].tick(0.0)
    (spec,) = rig["capture"].specs
    assert _same_policy(spec.policy, rig["base"].merged(rig["fleet"][0]))


def test_the_landing_timeout_is_a_server_option() -> None:
    from plasma.protocol.errors import ConfigError
    from plasma.server.service_config import load_service_config

    base = {"broker": "mqtt://h", "fleet": "f", "key": "k", "model": "m", "env": "Pendulum-v1"}
    assert load_service_config(base, environ={}).fleet_landing_timeout == 600.0
    cfg = load_service_config(base, environ={"PLASMA_SERVER_FLEET_LANDING_TIMEOUT": "0"})
    assert cfg.fleet_landing_timeout == 0.0
    with pytest.raises(ConfigError, match="fleet_landing_timeout"):
        load_service_config({**base, "fleet_landing_timeout": -1.0}, environ={})


def test_the_versions_message_outranks_telemetry(rig) -> None:  # type: ignore[no-untyped-def]
    """The retained versions message is the device's word (telemetry lags it): fleet v2 there."""
    rig["store"].add_traces(_batch("d1", 0, fleet_v=1, device_v=1))
    msg = LiveVersions(fleet=FLEET, device="d1", versions={"fleet": 2, "device": 0})
    rig["bus"].publish(topics.versions(FLEET, "d1"), msg.model_dump_json().encode(), retain=True)
    rig["worker"].tick(0.0)
    (spec,) = rig["capture"].specs
    assert _same_policy(spec.policy, rig["base"].merged(rig["fleet"][1]))
    assert spec.learner.adapter is None  # it runs no device adapter: the round starts from none


def test_a_versions_message_for_another_device_is_refused() -> None:
    live = DeviceVersions(FLEET)
    msg = LiveVersions(fleet=FLEET, device="d2", versions={"fleet": 2, "device": 0})
    code = live.handle(Message(topics.versions(FLEET, "d1"), msg.model_dump_json().encode()))
    assert code == "identity_mismatch" and live.get("d1") is None and live.get("d2") is None


def test_fleet_round_is_judged_on_each_device_with_its_adapter(rig) -> None:  # type: ignore[no-untyped-def]
    """The fleet round's spec carries, per device, the combination it reports running."""
    rig["store"].add_traces(_batch("d1", 0, fleet_v=1, device_v=1))
    rig["store"].add_traces(_batch("d2", 0, fleet_v=2, device_v=0))
    worker = rig["worker"]
    worker._since_fleet, worker.schedule = 1, ScheduleConfig(FLEET, 10**9, fleet_every=1)
    worker.tick(0.0)
    (spec,) = rig["capture"].specs
    assert spec.slot == "fleet" and spec.running is not None
    d1, d2 = spec.running["d1"], spec.running["d2"]
    assert (d1.fleet_version, d1.device_version, d2.fleet_version, d2.device_version) == \
        (1, 1, 2, 0)
    assert d1.device is not None and d2.device is None
    assert d1.next_device is None and d2.next_device is None  # nothing on its way


def test_fleet_round_judges_the_device_adapter_on_its_way_too(rig) -> None:  # type: ignore[no-untyped-def]
    """The server accepted a new device adapter for d1 that d1 does not run yet: the fleet
    candidate is judged with it as well (it may be live when the fleet packet lands)."""
    rig["store"].add_traces(_batch("d1", 0, fleet_v=2, device_v=1))
    worker = rig["worker"]
    newer = _lora(rig["base"], seed=30, size=0.05)
    worker._learner("device", "d1").adapter = newer
    worker.publisher.submit(to_adapter(newer), "device", "d1")  # queued, not yet out
    worker._since_fleet, worker.schedule = 1, ScheduleConfig(FLEET, 10**9, fleet_every=1)
    worker.tick(0.0)
    (spec,) = rig["capture"].specs
    assert spec.running is not None and spec.running["d1"].next_device is newer


def test_an_unknown_version_gets_no_round(rig) -> None:  # type: ignore[no-untyped-def]
    """A device reporting a fleet version the store holds no packet of: no round, data due."""
    rig["store"].add_traces(_batch("d1", 0, fleet_v=7, device_v=0))
    with pytest.raises(UnknownVersion):
        rig["worker"].running("d1", rig["store"].transitions(FLEET, "d1"))
    rig["worker"].tick(0.0)
    assert rig["capture"].specs == [] and rig["worker"].cursor["d1"] == 0


def test_an_approved_fleet_adapter_keeps_the_device_adapters(rig) -> None:  # type: ignore[no-untyped-def]
    """The fleet round judged its candidate with each device's adapter, so accepting it leaves
    the device learners' adapters (what the devices keep running) in place."""
    from plasma.server.adapt import RoundResult
    from plasma.server.executor import RoundOutcome

    rig["store"].add_traces(_batch("d1", 0, fleet_v=2, device_v=1))
    worker = rig["worker"]
    learner = worker._learner("device", "d1")
    learner.adapter = rig["dev"]
    worker._since_fleet, worker.schedule = 1, ScheduleConfig(FLEET, 10**9, fleet_every=1)
    worker.tick(0.0)
    (spec,) = rig["capture"].specs
    candidate = _lora(rig["base"], seed=40, size=0.05)
    record = AuditRecord(auditor="judicial", subject="candidate", verdict="published",
                         fleet=FLEET, slot="fleet")
    result = RoundResult("published", candidate, _blank(candidate), record, 600, 1.0)
    spec.learner.adapter = candidate  # what Learner.round does with an approved candidate
    worker.accept(RoundOutcome(spec.round_id, result, spec.learner, "sim", 0.0, 1.0, 0))
    assert worker.fleet_adapter is candidate
    assert worker.learners["d1"].adapter is rig["dev"]
    assert rig["worker"].publisher.waiting("fleet")
