"""The adaptation module: physics identification, the round on a physics prior, persisted cursors,
and a short adaptation that must close at least half the real gap."""

from __future__ import annotations

import numpy as np
import pytest

from plasma.protocol import SigningKey, TraceBatch
from plasma.server.adapt import Learner, adapt_config
from plasma.server.judicial import RealData, split_members
from plasma.server.policy_net import MLPPolicy
from plasma.server.run import AdaptationWorker, ScheduleConfig
from plasma.server.store import TraceStore
from plasma.server.sysid import PhysicsModel, SysIdConfig, identify
from plasma.server.tasks import MOUNTAINCAR, PENDULUM


def _pendulum_data(physics: dict[str, float], n: int, seed: int = 0) -> RealData:
    rng = np.random.default_rng(seed)
    th = rng.uniform(-np.pi, np.pi, n)
    obs = np.stack([np.cos(th), np.sin(th), rng.uniform(-8, 8, n)], 1).astype(np.float32)
    act = rng.uniform(-2, 2, (n, 1)).astype(np.float32)
    nxt = PENDULUM.sim_step(obs, act, PENDULUM.physics(physics))  # type: ignore[misc]
    return RealData(obs, act, PENDULUM.reward(obs, act, nxt), nxt)  # type: ignore[misc]


@pytest.mark.parametrize("physics", [{"m": 1.6, "g": 12.0}, {"g": 14.0}, {"l": 1.3},
                                     {"m": 2.0, "g": 8.0}])
def test_identify_recovers_pendulum_dynamics(physics: dict[str, float]) -> None:
    real = _pendulum_data(physics, 300)
    model = identify(PENDULUM, real.obs, real.act, real.next_obs)
    est, true = model.physics, PENDULUM.physics(physics)
    # g, m and l enter only as 3g/(2l) and 3/(m l^2): those (and dt) are what the data pin down
    for f in (lambda p: 1.5 * p["g"] / p["l"], lambda p: 3 / (p["m"] * p["l"] ** 2),
              lambda p: p["dt"]):
        assert f(est) == pytest.approx(f(true), rel=0.01)
    fresh = _pendulum_data(physics, 500, seed=1)  # and it predicts transitions it never saw
    err = np.abs(model.step_mean(fresh.obs, fresh.act) - fresh.next_obs).max()
    assert err < 1e-3


def test_identify_mountaincar_power() -> None:
    rng = np.random.default_rng(0)
    obs = np.stack([rng.uniform(-1.2, 0.5, 400), rng.uniform(-0.07, 0.07, 400)], 1)
    act = rng.uniform(-1, 1, (400, 1))
    true = MOUNTAINCAR.physics({"power": 0.0011})
    nxt = MOUNTAINCAR.sim_step(obs, act, true)  # type: ignore[misc]
    model = identify(MOUNTAINCAR, obs, act, nxt)
    assert model.physics["power"] == pytest.approx(0.0011, rel=0.02)


def test_physics_model_serves_the_auditor() -> None:
    real = _pendulum_data({"m": 1.6, "g": 12.0}, 400)
    model = PhysicsModel(PENDULUM, SysIdConfig(members=5))
    model.fit(real.obs, real.act, real.next_obs)
    planning, heldout = split_members(model, 2)  # type: ignore[arg-type]
    assert len(planning.members) == 3 and heldout is not None and len(heldout.members) == 2
    assert planning.step_member(2, real.obs, real.act).shape == real.obs.shape
    mean, var = model.predict(real.obs, real.act)
    assert mean.shape == (5, 400, 3) and np.all(var == 0)
    dis = model.disagreement(real.obs, real.act)
    assert dis.shape == (400,) and np.all(np.isfinite(dis)) and dis.max() < 1e-2
    policy = MLPPolicy.init(3, 1, (16, 16), obs_mean=PENDULUM.obs_mean, obs_std=PENDULUM.obs_std,
                            act_low=PENDULUM.act_low, act_high=PENDULUM.act_high)
    learner = Learner(PENDULUM, adapt_config("small"))
    result = learner.round(policy, real, fleet="f", slot="device", device="d")
    assert result.model_kind == "physics" and result.verdict in ("published", "corrected", "blocked")
    assert result.scores["physics_g"] > 0


# ---------------------------------------------------------------------------- cursors


def _batch(device: str, seq: int, n: int = 100) -> TraceBatch:
    real = _pendulum_data({"m": 1.6, "g": 12.0}, n, seed=seq)
    t = 1000.0 + seq * n * 0.02 + np.arange(n) * 0.02
    return TraceBatch(fleet="f", device=device, seq=seq, episode=np.zeros(n, np.uint32),
                      step=np.arange(n, dtype=np.uint32), obs=real.obs, action=real.act,
                      reward=real.rew, next_obs=real.next_obs, terminated=np.zeros(n, bool),
                      truncated=np.zeros(n, bool),
                      versions={"fleet": np.zeros(n, np.uint32), "device": np.zeros(n, np.uint32)},
                      timestamp=t)


class _Publisher:
    def __init__(self) -> None:
        self.submitted: list[tuple[str, str | None]] = []
        self.key = SigningKey.generate()  # the worker reads published packets with its public key

    def waiting(self, slot: str, device: str | None = None) -> bool:
        return False

    def publish_audit(self, record: object) -> None:
        pass

    def submit(self, adapter: object, slot: str, device: str | None, **_: object) -> None:
        self.submitted.append((slot, device))


def _worker(store: TraceStore) -> AdaptationWorker:
    policy = MLPPolicy.init(3, 1, (16, 16), obs_mean=PENDULUM.obs_mean, obs_std=PENDULUM.obs_std,
                            act_low=PENDULUM.act_low, act_high=PENDULUM.act_high)
    return AdaptationWorker(store, _Publisher(), PENDULUM, policy,  # type: ignore[arg-type]
                            ScheduleConfig("f", min_new_transitions=200), adapt_config("small"))


def test_cursor_survives_restart_and_failed_round_keeps_data(tmp_path) -> None:
    path = tmp_path / "store.sqlite"
    with TraceStore(path) as store:
        for seq in range(3):
            store.add_traces(_batch("d1", seq))
        worker = _worker(store)

        def boom(*_: object, **__: object) -> None:
            raise RuntimeError("round failed")

        worker._learner("device", "d1").round = boom  # type: ignore[method-assign]
        with pytest.raises(RuntimeError):
            worker.step()
        assert worker.cursor["d1"] == 0 and store.load_learner("f", "device", "d1") is None
        worker = _worker(store)  # the failed round's data are still due
        results = worker.step()
        assert len(results) == 1 and results[0].transitions == 300
        saved = store.load_learner("f", "device", "d1")
        assert saved is not None and saved["cursor"] == store.last_chunk_id("f", "d1")
        assert saved["rounds"] == 1
        assert (saved["adapter"] is not None) == (results[0].adapter is not None)
    with TraceStore(path) as store:  # a restarted server resumes: nothing new, no round
        worker = _worker(store)
        assert worker.step() == []
        assert worker.cursor["d1"] == saved["cursor"]
        if saved["adapter"] is not None:
            assert worker.learners["d1"].adapter is not None
        store.add_traces(_batch("d1", 3))
        store.add_traces(_batch("d1", 4))
        assert len(worker.step()) == 1 and worker.learners["d1"].rounds == 2


# ---------------------------------------------------------------------------- it must work


def test_short_adaptation_closes_half_the_real_gap() -> None:
    """One device (m=1.6, g=12), the small budget, seed 0: the noise-free return of the policy the
    device runs (int8, edge runtime) must close at least half the gap to the oracle."""
    from plasma.server.bench.adapt import AdaptBenchConfig, bench_adapt

    out = bench_adapt(AdaptBenchConfig(physics={"m": 1.6, "g": 12.0}, budget="small",
                                       real_steps=800, seed=0))
    assert out["packets"] >= 1
    assert out["final_return"] - out["base_return"] >= 0.5 * (out["oracle_return"]
                                                              - out["base_return"]), out["gap_curve"]
