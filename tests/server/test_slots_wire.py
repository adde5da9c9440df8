"""Fleet packets land over device adapters and no honest device loses more than noise.

A ``plasma-server run`` (in this process, on a real Mosquitto, ``small`` budget, a fleet round
after every device round) adapts two honest devices in different physics (Pendulum m=1.6 g=12,
and g=14). Each device verifies the signed packets it receives, runs base ⊕ fleet ⊕ device
adapter (fp32 merge of the decoded factors), retains its versions message, and sends its real
transitions as telemetry, as the edge daemon does.

Every fleet packet that lands on a device (over its device adapter, if it runs one) is evaluated
paired, on the same 100 start states in that device's true physics: the return of what it ran
before (old fleet ⊕ its device adapter) against what it runs after (new fleet ⊕ the same device
adapter). The test fails when the drop is significantly larger than the configured tolerance
(``max_device_loss`` of the return before), one-sided at 5% on the paired differences.
"""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass
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
from plasma.server.run import policy_from_bundle, run_server
from plasma.server.service_config import load_service_config
from plasma.server.tasks import PENDULUM

pytestmark = pytest.mark.broker

BUNDLE = "pendulum-nominal"
PHYSICS = {"d1": {"m": 1.3, "g": 11.0}, "d2": {"g": 12.0}}
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


class HonestDevice:
    """Verifies packets, runs base ⊕ fleet ⊕ device, retains its versions, sends telemetry."""

    def __init__(self, url: str, fleet: str, name: str, base: MLPPolicy, trust: TrustStore,
                 seed: int) -> None:
        self.fleet, self.name, self.base, self.trust = fleet, name, base, trust
        self.physics = PENDULUM.physics(PHYSICS[name])
        self.bus = MqttBus(BrokerConfig.from_url(url), client_id=f"honest-{fleet}-{name}",
                           clean=True)
        self.slots: dict[str, tuple[int, LoRA | None]] = {"fleet": (0, None), "device": (0, None)}
        self.landings: list[Landing] = []
        self.lock = threading.Lock()
        self.rng = np.random.default_rng(seed)
        self._changed = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self.bus.connect()
        self.bus.subscribe(topics.fleet_adapter(self.fleet), self._on_packet, qos=1)
        self.bus.subscribe(topics.device_adapter(self.fleet, self.name), self._on_packet, qos=1)
        self._changed.set()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self.bus.close()

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
            self.landings.append(Landing(self.name, h.slot, h.version, before, dict(self.slots)))
        self._changed.set()

    def _run(self) -> None:
        seq, obs = 0, _resets(self.rng, 1)
        step = 0
        while not self._stop.is_set():
            with self.lock:
                (fv, fleet), (dv, device) = self.slots["fleet"], self.slots["device"]
            if self._changed.is_set():
                self._changed.clear()
                live = LiveVersions(fleet=self.fleet, device=self.name,
                                    versions={"fleet": fv, "device": dv})
                self.bus.publish(topics.versions(self.fleet, self.name),
                                 live.model_dump_json().encode(), qos=1, retain=True)
            policy = self.base.merged(fleet)
            rows: dict[str, list[Any]] = {k: [] for k in ("o", "a", "r", "n")}
            for _ in range(50):
                act = np.clip(policy.forward(obs, device) + self.rng.normal(0, 0.3, (1, 1)),
                              -2.0, 2.0).astype(np.float32)
                nxt = PENDULUM.sim_step(obs, act, self.physics).astype(np.float32)  # type: ignore[misc]
                rows["o"].append(obs[0]), rows["a"].append(act[0]), rows["n"].append(nxt[0])
                rows["r"].append(float(PENDULUM.reward(obs, act, nxt)[0]))  # type: ignore[misc]
                step += 1
                obs = nxt if step % STEPS else _resets(self.rng, 1)
            n = 50
            self.bus.publish(topics.telemetry(self.fleet, self.name), encode_traces(TraceBatch(
                fleet=self.fleet, device=self.name, episode=np.zeros(n, np.uint32),
                step=np.arange(seq * n, (seq + 1) * n, dtype=np.uint32),
                obs=np.array(rows["o"]), action=np.array(rows["a"]),
                reward=np.array(rows["r"], np.float32), next_obs=np.array(rows["n"]),
                terminated=np.zeros(n, bool), truncated=np.zeros(n, bool),
                versions={"fleet": np.full(n, fv, np.uint32), "device": np.full(n, dv, np.uint32)},
                timestamp=time.time() - 0.02 * np.arange(n)[::-1], seq=seq)))
            seq += 1
            self._stop.wait(0.1)


def paired_drop(before: np.ndarray, after: np.ndarray, tolerance: float) -> tuple[float, float]:
    """(mean of after - before, t statistic of H0 'drop <= tolerance'); significant harm when
    t < -T_95."""
    diff = after - before
    se = float(diff.std(ddof=1) / np.sqrt(len(diff))) + 1e-9
    return float(diff.mean()), float((diff.mean() + tolerance) / se)


@pytest.mark.slow  # 15-50 s: until a fleet packet lands over a device adapter
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
        "min_new_transitions": 400, "fleet_every": 1, "check_interval": 0.2,
        "publish_interval": 0.0, "budget": "small"}, environ={})
    records: list[AuditRecord] = []
    watcher = MqttBus(BrokerConfig.from_url(mosquitto.url), clean=True)
    watcher.connect()
    watcher.subscribe(judicial_topic(fleet),
                      lambda m: records.append(AuditRecord.model_validate_json(m.payload)))
    stop = threading.Event()
    server = threading.Thread(target=run_server, args=(cfg, stop, 5.0), daemon=True)
    server.start()
    devices = [HonestDevice(mosquitto.url, fleet, name, base, trust, seed=i)
               for i, name in enumerate(PHYSICS)]
    try:
        time.sleep(1.5)  # the server connects and subscribes
        for d in devices:
            d.start()
        deadline = time.monotonic() + 45

        def fleet_over_device() -> list[Landing]:
            return [ld for d in devices for ld in d.landings
                    if ld.slot == "fleet" and ld.before["device"][0] > 0]

        while time.monotonic() < deadline and not fleet_over_device():
            time.sleep(0.5)
    finally:
        for d in devices:
            d.stop()
        stop.set()
        server.join(30)
        watcher.close()
    assert not server.is_alive()
    landings = [ld for d in devices for ld in d.landings]
    fleet_landings = [ld for ld in landings if ld.slot == "fleet"]
    other = {"fleet": "device", "device": "fleet"}
    composed = [ld for ld in landings if ld.before[other[ld.slot]][0] > 0]
    fleet_records = [r for r in records if r.slot == "fleet"]
    print(f"\n{len(records)} judicial records ({len(fleet_records)} fleet: "
          f"{[r.verdict for r in fleet_records]}); landings: "
          f"{[(ld.device, ld.slot, ld.version) for ld in landings]}")
    judged = [r for r in fleet_records if any(k.startswith("device_runs_device:") for k in r.scores)]
    assert judged and all(f"device_runs_fleet:{d}" in r.scores for r in judged for d in PHYSICS
                          if f"device_gain:{d}" in r.scores), "fleet rounds must judge the pairs"
    assert fleet_landings, "no fleet packet landed within 45 s"
    assert composed, "no packet landed over an adapter in the other slot within 45 s"
    tol_share = JudicialConfig().max_device_loss
    starts = _resets(np.random.default_rng(1234), EVAL_STARTS)
    for ld in landings:
        phys = PHYSICS[ld.device]
        before = returns(base, ld.before["fleet"][1], ld.before["device"][1], phys, starts)
        after = returns(base, ld.after["fleet"][1], ld.after["device"][1], phys, starts)
        tolerance = tol_share * abs(float(before.mean()))
        mean, t = paired_drop(before, after, tolerance)
        print(f"{ld.device}: {ld.slot} v{ld.version} lands on fleet v{ld.before['fleet'][0]} + "
              f"device v{ld.before['device'][0]}: return {before.mean():.1f} -> "
              f"{after.mean():.1f} (paired mean {mean:+.1f}, tolerance {tolerance:.1f}, t {t:+.2f})")
        if ld.slot == "fleet":
            assert t >= -T_95, (f"{ld.device}: fleet v{ld.version} lowered its return by "
                                f"{-mean:.1f}, significantly more than {tolerance:.1f}")


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
