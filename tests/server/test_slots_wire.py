"""Fleet packets land over device adapters and no honest device loses more than noise.

The server's own pieces (``plasma.server.run.Server``: MQTT bus, ingest, versions listener,
publisher, adaptation worker; ``small`` budget) on a real Mosquitto, with two honest devices in
different physics (Pendulum m=1.6 g=12, and g=14). Each device verifies the signed packets it
receives, runs base ⊕ fleet ⊕ device adapter (fp32 merge of the decoded factors), retains its
versions message and sends its real transitions as telemetry, as the edge daemon does.

The worker's rounds are driven in phases (``AdaptationWorker.step``, the schedule swapped
between phases) so that the run is the same every time: a fleet round, then device rounds
fitted on the fleet adapter each device reports; then every device's gravity drifts by +2 (the
fleet slot has work again; rounds read the newest 1,000 transitions) and a fleet round is
judged over the devices' adapters, device rounds follow, and a last fleet round. Every packet
that lands on a device (fleet packets over device adapters, device packets over fleet
adapters) is then evaluated paired, on the same 100 start states in that device's true
physics: the return of what it ran before against what it runs after. The test fails when the
drop is significantly larger than the configured tolerance (``max_device_loss`` of the return
before), one-sided at 5%.
"""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from plasma.protocol import (
    AuditRecord,
    LiveVersions,
    PacketError,
    SigningKey,
    TraceBatch,
    TrustStore,
    decode_packet,
    encode_traces,
    topics,
)
from plasma.protocol.bundle import load_bundle
from plasma.protocol.bus import BrokerConfig, Message, MqttBus
from plasma.protocol.catalog import resolve_bundle
from plasma.server.judicial import JudicialConfig
from plasma.server.policy_net import LoRA, MLPPolicy
from plasma.server.publisher import judicial_topic
from plasma.server.run import Server, policy_from_bundle
from plasma.server.service_config import load_service_config
from plasma.server.tasks import PENDULUM

pytestmark = pytest.mark.broker

BUNDLE = "pendulum-nominal"
PHYSICS = {"d1": {"m": 1.6, "g": 12.0}, "d2": {"g": 14.0}}
LATER = {"d1": {"m": 1.6, "g": 14.0}, "d2": {"g": 16.0}}  # the whole fleet's gravity drifts
T_95 = 1.66  # one-sided 5% critical value of Student's t with 99 degrees of freedom
EVAL_STARTS = 100
STEPS = 200  # Pendulum-v1's episode


def _resets(rng: np.random.Generator, n: int) -> np.ndarray:
    th, thdot = rng.uniform(-np.pi, np.pi, n), rng.uniform(-1.0, 1.0, n)
    return np.stack([np.cos(th), np.sin(th), thdot], 1).astype(np.float32)


def returns(base: MLPPolicy, fleet: LoRA | None, device: LoRA | None, physics: dict[str, float],
            starts: np.ndarray) -> np.ndarray:
    """Real return of base ⊕ fleet ⊕ device over whole episodes from each start state."""
    policy, phys = base.merged(fleet), PENDULUM.physics(physics)
    obs, total = starts.copy(), np.zeros(len(starts))
    for _ in range(STEPS):
        act = np.clip(policy.forward(obs, device), -2.0, 2.0).astype(np.float32)
        nxt = PENDULUM.sim_step(obs, act, phys).astype(np.float32)  # type: ignore[misc]
        total += PENDULUM.reward(obs, act, nxt)  # type: ignore[misc]
        obs = nxt
    return total


@dataclass(frozen=True)
class Landing:
    """A packet that became live on a device; the slots before and after."""

    device: str
    slot: str
    version: int
    before: dict[str, tuple[int, LoRA | None]]
    after: dict[str, tuple[int, LoRA | None]]
    physics: dict[str, float]
    """The device's physics when it landed."""


class HonestDevice:
    """Verifies packets, runs base ⊕ fleet ⊕ device, retains its versions, sends telemetry."""

    def __init__(self, url: str, fleet: str, name: str, base: MLPPolicy, trust: TrustStore,
                 seed: int) -> None:
        self.fleet, self.name, self.base, self.trust = fleet, name, base, trust
        self.params = PHYSICS[name]
        self.physics = PENDULUM.physics(self.params)
        self.bus = MqttBus(BrokerConfig.from_url(url), client_id=f"honest-{fleet}-{name}",
                           clean=True)
        self.slots: dict[str, tuple[int, LoRA | None]] = {"fleet": (0, None), "device": (0, None)}
        self.landings: list[Landing] = []
        self.lock = threading.Lock()
        self.rng = np.random.default_rng(seed)
        self.obs = _resets(self.rng, 1)
        self.seq = self.step = 0

    def start(self) -> None:
        self.bus.connect()
        self.bus.subscribe(topics.fleet_adapter(self.fleet), self._on_packet, qos=1)
        self.bus.subscribe(topics.device_adapter(self.fleet, self.name), self._on_packet, qos=1)
        self.report()

    def _on_packet(self, message: Message) -> None:
        try:
            packet = decode_packet(message.payload, self.trust)
        except PacketError:
            return
        h = packet.header
        with self.lock:
            if h.version <= self.slots[h.slot][0]:
                return  # a retained copy or a replay
            a = packet.adapter
            lora = LoRA({n: (np.array(x), np.array(y)) for n, (x, y) in a.layers.items()},
                        float(a.alpha), int(a.rank)) if a.layers else None
            before = dict(self.slots)
            self.slots[h.slot] = (h.version, lora)
            self.landings.append(Landing(self.name, h.slot, h.version, before, dict(self.slots),
                                         self.params))

    def drift(self, params: dict[str, float]) -> None:
        self.params, self.physics = params, PENDULUM.physics(params)

    def versions(self) -> dict[str, int]:
        with self.lock:
            return {slot: v for slot, (v, _) in self.slots.items()}

    def report(self) -> None:
        """Retain the versions it runs (``LiveVersions``), as the daemon does at every change."""
        live = LiveVersions(fleet=self.fleet, device=self.name, versions=self.versions())
        self.bus.publish(topics.versions(self.fleet, self.name), live.model_dump_json().encode(),
                         qos=1, retain=True)

    def drive(self, frames: int, rows: int = 50) -> None:
        """``frames`` telemetry frames of real control (policy action + N(0, 0.3) exploration)."""
        with self.lock:
            (fv, fleet), (dv, device) = self.slots["fleet"], self.slots["device"]
        policy = self.base.merged(fleet)
        for _ in range(frames):
            o, a, r, nx = [], [], [], []
            for _ in range(rows):
                act = np.clip(policy.forward(self.obs, device) + self.rng.normal(0, 0.3, (1, 1)),
                              -2.0, 2.0).astype(np.float32)
                nxt = PENDULUM.sim_step(self.obs, act, self.physics).astype(np.float32)  # type: ignore[misc]
                o.append(self.obs[0]), a.append(act[0]), nx.append(nxt[0])
                r.append(float(PENDULUM.reward(self.obs, act, nxt)[0]))  # type: ignore[misc]
                self.step += 1
                self.obs = nxt if self.step % STEPS else _resets(self.rng, 1)
            self.bus.publish(topics.telemetry(self.fleet, self.name), encode_traces(TraceBatch(
                fleet=self.fleet, device=self.name, episode=np.zeros(rows, np.uint32),
                step=np.arange(self.seq * rows, (self.seq + 1) * rows, dtype=np.uint32),
                obs=np.array(o), action=np.array(a), reward=np.array(r, np.float32),
                next_obs=np.array(nx), terminated=np.zeros(rows, bool),
                truncated=np.zeros(rows, bool),
                versions={"fleet": np.full(rows, fv, np.uint32),
                          "device": np.full(rows, dv, np.uint32)},
                timestamp=time.time() - 0.02 * np.arange(rows)[::-1], seq=self.seq)), qos=1)
            self.seq += 1


def paired_drop(before: np.ndarray, after: np.ndarray, tolerance: float) -> tuple[float, float]:
    """(mean of after - before, t statistic of H0 'drop <= tolerance'); significant harm when
    t < -T_95."""
    diff = after - before
    se = float(diff.std(ddof=1) / np.sqrt(len(diff))) + 1e-9
    return float(diff.mean()), float((diff.mean() + tolerance) / se)


def _until(condition: Any, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.05)


@pytest.mark.slow  # ~35 s: seven rounds and the paired evaluations
def test_fleet_packets_never_drop_an_honest_device_by_more_than_noise(mosquitto, tmp_path: Path
                                                                      ) -> None:  # type: ignore[no-untyped-def]
    fleet = "slots" + uuid.uuid4().hex[:6]
    key = SigningKey.generate()
    key.save(tmp_path / "keys")
    trust = TrustStore([key.public_key])
    base = policy_from_bundle(load_bundle(resolve_bundle(BUNDLE)))
    cfg = load_service_config({
        "broker": mosquitto.url, "fleet": fleet, "key": str(tmp_path / "keys"), "model": BUNDLE,
        "store": str(tmp_path / "server.sqlite"), "env": "Pendulum-v1",
        "min_new_transitions": 400, "max_transitions": 1000, "check_interval": 0.2,
        "publish_interval": 0.0,
        "budget": "small"}, environ={})
    records: list[AuditRecord] = []
    server = Server(cfg)
    server.bus.connect()
    server.bus.subscribe(judicial_topic(fleet),
                         lambda m: records.append(AuditRecord.model_validate_json(m.payload)))
    server.live.start(server.bus)
    server.ingest.start()
    server.publisher.start()
    worker, store = server.worker, server.store
    devices = [HonestDevice(mosquitto.url, fleet, name, base, trust, seed=i)
               for i, name in enumerate(PHYSICS)]

    def drive(frames: int) -> None:
        for d in devices:
            want = store.count_rows(fleet, d.name) + frames * 50
            d.drive(frames)
            _until(lambda d=d, want=want: store.count_rows(fleet, d.name) >= want,  # type: ignore[misc]
                   f"{d.name}'s telemetry is stored")

    def landed() -> None:
        """Every published packet live on its devices, and their reports seen by the server."""
        def want(d: HonestDevice) -> dict[str, int]:
            sent = list(server.publisher.sent)
            return {"fleet": max([p.version for p in sent if p.slot == "fleet"], default=0),
                    "device": max([p.version for p in sent if p.slot == "device"
                                   and p.target == d.name], default=0)}

        _until(lambda: server.publisher.pending() == 0
               and all(d.versions() == want(d) for d in devices), "every packet is live")
        for d in devices:
            d.report()
            _until(lambda d=d: server.live.get(d.name) == d.versions(),  # type: ignore[misc]
                   f"the server sees what {d.name} runs")

    def rounds(slot: str) -> None:
        """Run the due rounds of one slot only."""
        if slot == "fleet":
            worker.schedule = replace(worker.schedule, min_new_transitions=10**9, fleet_every=1)
            worker._since_fleet = 1
        else:
            worker.schedule = replace(worker.schedule, min_new_transitions=400, fleet_every=0)
        worker.step()
        landed()

    try:
        for d in devices:
            d.start()
        _until(lambda: all(server.live.get(d.name) is not None for d in devices),
               "the server has every device's versions")
        drive(12)
        for slot in ("fleet", "device"):  # the fleet adapter, then the devices' own on top
            rounds(slot)
            drive(16)
        for d in devices:  # every device's gravity drifts: the fleet slot has work again
            d.drift(LATER[d.name])
        drive(20)  # the rounds read the newest 1,000 transitions: the drifted physics only
        for slot in ("fleet", "device", "fleet"):
            rounds(slot)
            drive(20)
    finally:
        server.stop()
        for d in devices:
            d.bus.close()
    landings = [ld for d in devices for ld in d.landings]
    fleet_records = [r for r in records if r.slot == "fleet"]
    print(f"\n{len(records)} judicial records ({len(fleet_records)} fleet: "
          f"{[r.verdict for r in fleet_records]}); landings: "
          f"{[(ld.device, ld.slot, ld.version) for ld in landings]}")
    judged = [r for r in fleet_records if any(k.startswith("device_runs_device:") for k in r.scores)]
    assert judged, "fleet rounds must judge the devices' pairs"
    tol_share = JudicialConfig().max_device_loss
    starts = _resets(np.random.default_rng(1234), EVAL_STARTS)
    for ld in landings:
        phys = ld.physics
        before = returns(base, ld.before["fleet"][1], ld.before["device"][1], phys, starts)
        after = returns(base, ld.after["fleet"][1], ld.after["device"][1], phys, starts)
        tolerance = tol_share * abs(float(before.mean()))
        mean, t = paired_drop(before, after, tolerance)
        print(f"{ld.device}: {ld.slot} v{ld.version} lands on fleet v{ld.before['fleet'][0]} + "
              f"device v{ld.before['device'][0]}: return {before.mean():.1f} -> "
              f"{after.mean():.1f} (paired mean {mean:+.1f}, tolerance {tolerance:.1f}, t {t:+.2f})")
        assert t >= -T_95, (f"{ld.device}: {ld.slot} v{ld.version} lowered its return by "
                            f"{-mean:.1f}, significantly more than {tolerance:.1f}")
    over = [ld for ld in landings if ld.slot == "fleet" and ld.before["device"][0] > 0]
    assert over, "no fleet packet landed over a device adapter"


def test_the_paired_bound_catches_a_harmful_fleet_packet() -> None:
    """The wire test's bound is not toothless: a fleet adapter that undoes the base policy
    (over the same device adapter) is a significant drop; the same combination is not."""
    base = policy_from_bundle(load_bundle(resolve_bundle(BUNDLE)))
    rng = np.random.default_rng(5)
    harm = LoRA({n: (rng.standard_normal((2, w.shape[1])).astype(np.float32),
                     (rng.standard_normal((w.shape[0], 2)) * 0.5).astype(np.float32))
                 for n, (w, _) in zip(base.names, base.layers)}, 2.0, 2)
    device = LoRA({n: (a, b * 0.05) for n, (a, b) in harm.factors.items()}, 2.0, 2)
    starts = _resets(np.random.default_rng(1234), EVAL_STARTS)
    before = returns(base, None, device, PHYSICS["d1"], starts)
    after = returns(base, harm, device, PHYSICS["d1"], starts)
    tolerance = JudicialConfig().max_device_loss * abs(float(before.mean()))
    assert paired_drop(before, after, tolerance)[1] < -T_95
    assert paired_drop(before, before.copy(), tolerance)[1] >= -T_95
