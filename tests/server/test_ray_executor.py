"""Rounds on a real local Ray (2 CPUs): concurrent device rounds, signing in this process, and a
round whose worker is killed or that times out is retried with its data counted once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from plasma.protocol import SigningKey, TraceBatch
from plasma.protocol.bundle import load_bundle
from plasma.protocol.bus import BrokerConfig, MqttBus
from plasma.protocol.errors import ConfigError
from plasma.server.adapt import adapt_config
from plasma.server.bench.scale import round_pids
from plasma.server.executor import RayExecutor, RoundOutcome
from plasma.server.publisher import Publisher, PublisherConfig
from plasma.server.run import policy_from_bundle
from plasma.server.service_config import load_service_config
from plasma.server.store import TraceStore
from plasma.server.tasks import PENDULUM
from plasma.server.worker import AdaptationWorker, ScheduleConfig
from tests.helpers.bundles import PENDULUM_SMALL, bundle_path


def test_executor_keys_are_configured_and_local_never_imports_ray(tmp_path) -> None:  # type: ignore[no-untyped-def]
    base = {"broker": "mqtt://127.0.0.1:1883", "fleet": "f", "key": "k", "model": "m",
            "env": "Pendulum-v1"}
    assert load_service_config(base, {}).executor == "local"
    cfg = load_service_config({**base, "workers": 3}, {"PLASMA_SERVER_EXECUTOR": "ray",
                                                       "PLASMA_SERVER_RAY_ADDRESS": "auto"})
    assert (cfg.executor, cfg.ray_address, cfg.workers) == ("ray", "auto", 3)
    toml = tmp_path / "server.toml"
    toml.write_text('executor = "ray"\nround_timeout = 30.0\n')
    cfg = load_service_config({**base, "config": str(toml)}, {})
    assert (cfg.executor, cfg.round_timeout) == ("ray", 30.0)
    with pytest.raises(ConfigError):
        load_service_config({**base, "executor": "spark"}, {})
    code = ("import sys; import plasma.server.run, plasma.server.worker, plasma.server.executor;"
            "from plasma.server.executor import make_executor; make_executor('local');"
            "sys.exit('ray' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0



@pytest.fixture(scope="module")
def executor():  # type: ignore[no-untyped-def]
    pytest.importorskip("ray")
    ex = RayExecutor(workers=2, object_store_mb=100)
    yield ex
    ex.close()


def _batch(fleet: str, device: str, seq: int, n: int = 150) -> TraceBatch:
    """Real Pendulum (m=1.6, g=12) transitions from random states and torques."""
    rng = np.random.default_rng(seq + 17 * len(device))
    th = rng.uniform(-np.pi, np.pi, n)
    obs = np.stack([np.cos(th), np.sin(th), rng.uniform(-8, 8, n)], 1).astype(np.float32)
    act = rng.uniform(-2, 2, (n, 1)).astype(np.float32)
    nxt = PENDULUM.sim_step(obs, act, PENDULUM.physics({"m": 1.6, "g": 12.0}))  # type: ignore[misc]
    t = time.time() - 60 + seq * n * 0.02 + np.arange(n) * 0.02
    return TraceBatch(fleet=fleet, device=device, seq=seq, episode=np.zeros(n, np.uint32),
                      step=np.arange(n, dtype=np.uint32), obs=obs, action=act,
                      reward=PENDULUM.reward(obs, act, nxt), next_obs=nxt.astype(np.float32),  # type: ignore[misc]
                      terminated=np.zeros(n, bool), truncated=np.zeros(n, bool),
                      versions={"fleet": np.zeros(n, np.uint32), "device": np.zeros(n, np.uint32)},
                      timestamp=t)


# the small budget, cheaper still: these tests are about where rounds run, not what they learn
_SMALL = adapt_config("small")
_ROUND = replace(_SMALL, dagger_iters=1, expert_paths=4, phantom_paths=32, select_paths=32,
                 distill=replace(_SMALL.distill, steps=100),
                 judicial=replace(_SMALL.judicial, paths=64))


class _Rig:
    """Store, real publisher on a real broker (signing here), worker on the Ray executor."""

    def __init__(self, root: Path, url: str, executor: RayExecutor, devices: list[str],
                 timeout: float = 0.0) -> None:
        self.fleet = "ray" + uuid.uuid4().hex[:6]
        bundle = load_bundle(bundle_path(PENDULUM_SMALL))
        self.key = SigningKey.generate()
        self.store = TraceStore(root / f"{self.fleet}.sqlite")
        for device in devices:
            for seq in range(2):
                self.store.add_traces(_batch(self.fleet, device, seq))
        self.bus = MqttBus(BrokerConfig.from_url(url), client_id=self.fleet)
        self.bus.connect()
        self.publisher = Publisher(self.bus, self.store, self.key, PublisherConfig(
            fleet=self.fleet, base_sha256=bundle.base_sha256, min_interval_s=0.0))
        self.worker = AdaptationWorker(
            self.store, self.publisher, PENDULUM, policy_from_bundle(bundle),
            ScheduleConfig(self.fleet, min_new_transitions=300, check_interval=0.2,
                           round_timeout=timeout), _ROUND, executor)
        self.outcomes: list[RoundOutcome] = []
        accept = self.worker.accept
        self.worker.accept = lambda o: (self.outcomes.append(o), accept(o))[1]  # type: ignore[method-assign]

    def drain(self, limit: float = 40.0) -> None:
        deadline = time.monotonic() + limit
        self.worker.tick(0.2)
        while self.worker.flights and time.monotonic() < deadline:
            self.worker.tick(0.2)
        assert not self.worker.flights, "rounds still in flight"

    def judicial(self, device: str) -> list[dict[str, float]]:
        return [r.scores for r in self.store.audits(self.fleet, device, auditor="judicial")]

    def close(self) -> None:
        self.bus.close()
        self.store.close()


@pytest.mark.broker
@pytest.mark.slow
def test_two_device_rounds_compute_concurrently_and_are_signed_here(
        executor, mosquitto, tmp_path) -> None:  # type: ignore[no-untyped-def]
    rig = _Rig(tmp_path, mosquitto.url, executor, ["d1", "d2"])
    try:
        assert executor.capacity == 2
        results = rig.worker.step()
        assert len(results) == 2 and len(rig.outcomes) == 2
        a, b = rig.outcomes
        assert a.pid != b.pid and a.pid != os.getpid() and b.pid != os.getpid()
        assert a.started < b.finished and b.started < a.finished, "rounds ran one after another"
        rig.publisher.publish_ready()
        approved = {o.result.record.device for o in rig.outcomes if o.result.adapter is not None}
        assert approved and {p.target for p in rig.publisher.sent} == approved  # both, seeded
        for pub in rig.publisher.sent:  # signed here: the workers returned adapters only
            assert pub.slot == "device" and pub.version == 1
        for device in ("d1", "d2"):
            (scores,) = rig.judicial(device)
            assert scores["data_cursor_from"] == 0
            assert scores["data_cursor_to"] == rig.store.last_chunk_id(rig.fleet, device)
            assert rig.worker.cursor[device] == rig.store.last_chunk_id(rig.fleet, device)
    finally:
        rig.close()


@pytest.mark.broker
@pytest.mark.slow
def test_killed_worker_is_retried_and_its_data_counted_once(
        executor, mosquitto, tmp_path) -> None:  # type: ignore[no-untyped-def]
    rig = _Rig(tmp_path, mosquitto.url, executor, ["k1"])
    try:
        rig.worker.tick(0)
        assert list(rig.worker.flights) == ["k1"]
        deadline, pids = time.monotonic() + 20, []
        while not pids and time.monotonic() < deadline:
            time.sleep(0.02)
            pids = round_pids()
        assert pids, "the round never started on a Ray worker"
        os.kill(pids[0], signal.SIGKILL)  # mid-round: this cut-down round lasts well under a second
        rig.drain()
        (outcome,) = rig.outcomes
        assert outcome.pid != pids[0]  # Ray ran it again on another worker process
        last = rig.store.last_chunk_id(rig.fleet, "k1")
        (scores,) = rig.judicial("k1")
        assert (scores["data_cursor_from"], scores["data_cursor_to"]) == (0, last)
        saved = rig.store.load_learner(rig.fleet, "device", "k1")
        assert saved is not None and saved["cursor"] == last and saved["rounds"] == 1
        assert rig.worker.tick(0) == [] and not rig.worker.flights  # nothing due any more
    finally:
        rig.close()


@pytest.mark.broker
@pytest.mark.slow
def test_timed_out_round_is_resubmitted_and_a_stale_outcome_discarded(
        executor, mosquitto, tmp_path) -> None:  # type: ignore[no-untyped-def]
    rig = _Rig(tmp_path, mosquitto.url, executor, ["t1"], timeout=30.0)
    try:
        rig.worker.tick(0)
        flight = rig.worker.flights["t1"]
        first = flight.spec.round_id
        flight.handle.submitted -= 31.0  # as if it had computed 31 s: past its timeout
        rig.worker.tick(0)
        assert rig.worker.retries == 1 and rig.worker.flights["t1"].spec.round_id != first
        rig.drain(60)
        (outcome,) = rig.outcomes
        assert outcome.round_id != first
        stale = RoundOutcome(first, outcome.result, outcome.learner, outcome.simulation_id,
                             outcome.started, outcome.finished, outcome.pid)
        assert rig.worker.accept(stale) is None and rig.worker.discarded == 1
        last = rig.store.last_chunk_id(rig.fleet, "t1")
        (scores,) = rig.judicial("t1")
        assert (scores["data_cursor_from"], scores["data_cursor_to"]) == (0, last)
        assert rig.worker.cursor["t1"] == last and rig.worker.learners["t1"].rounds == 1
    finally:
        rig.close()
