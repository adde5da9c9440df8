"""Edge stage 10b: canary decision rule (table) and a real rollback on the real runtime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from plasma.edge.audit import AuditContext
from plasma.edge.canary import Canary, CanaryConfig, regression
from plasma.edge.journal import Journal
from plasma.edge.merge import MergeEngine
from plasma.edge.pipeline import AdapterPipeline
from plasma.edge.probes import AuditThresholds, ObservationRing
from plasma.edge.runtime import PolicyRuntime, reference_forward
from plasma.protocol import Adapter, SigningKey, TrustStore, encode_packet
from plasma.protocol.bundle import Bundle

RNG = np.random.default_rng(0)
SAME = RNG.normal(-5.0, 1.0, 400)


@pytest.mark.parametrize("canary, expected", [
    (RNG.normal(-5.0, 1.0, 400), False),  # the same policy: noise only
    (RNG.normal(-5.3, 1.0, 400), False),  # 6 % worse: under the 10 % floor
    (RNG.normal(-7.0, 1.0, 400), True),  # 40 % worse, many standard errors
    (RNG.normal(-3.0, 1.0, 400), False),  # better
    (RNG.normal(-5.6, 8.0, 400), False),  # 12 % worse but very noisy: under 3 standard errors
])
def test_regression_rule(canary: np.ndarray, expected: bool) -> None:
    regressed, drop, threshold = regression(SAME, canary, CanaryConfig())
    assert regressed is expected, (drop, threshold)


def test_canary_windows_and_grace() -> None:
    c = Canary(CanaryConfig(window=10, grace=3, min_baseline=5))
    for _ in range(10):
        assert c.push(-1.0) is None
    c.arm("tag")
    verdicts = [c.push(-5.0) for _ in range(13)]
    assert verdicts[:12] == [None] * 12 and verdicts[12] is not None
    v = verdicts[12]
    assert v.regressed and v.tag == "tag" and v.baseline_mean == -1.0 and v.canary_mean == -5.0
    assert not c.armed and c.push(-5.0) is None


def test_canary_without_baseline_lets_the_merge_stand() -> None:
    c = Canary(CanaryConfig(window=10, grace=0, min_baseline=5))
    c.push(0.0)
    c.arm("x")
    v = [c.push(-100.0) for _ in range(10)][-1]
    assert v is not None and not v.regressed


class ImitateBase:
    """Reward = -|action - fp32 base action|^2: the base policy is optimal, any shift hurts."""

    def __init__(self, bundle: Bundle, seed: int = 0) -> None:
        self.bundle, self.rng = bundle, np.random.default_rng(seed)
        m = bundle.manifest
        self.mean, self.std = np.array(m.obs_mean), np.array(m.obs_std)

    def _obs(self) -> np.ndarray:
        self.obs = (self.mean + self.std * self.rng.standard_normal(len(self.mean))).astype(np.float32)
        return self.obs

    def reset(self, *, seed: int | None = None) -> tuple[np.ndarray, dict]:
        return self._obs(), {}

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict]:
        target = reference_forward(self.bundle, self.obs[None])[0]
        reward = -float(np.sum((action - target) ** 2))
        return self._obs(), reward, False, False, {}


def shift_adapter(bundle: Bundle, size: float) -> Adapter:
    """A rank-1 change of the last layer that pushes every action the same way."""
    name, n_in, n_out = bundle.layer_specs[-1]
    a = np.full((1, n_in), size / n_in, np.float32)
    b = np.ones((n_out, 1), np.float32)
    return Adapter(alpha=1.0, rank=1, layers={name: (a, b)})


def make_pipeline(bundle: Bundle, state: Path, key: SigningKey, canary: Canary
                  ) -> AdapterPipeline:
    runtime = PolicyRuntime(bundle)
    ctx = AuditContext(trust=TrustStore([key.public_key]), fleet="f1", device="d1",
                       base_sha256=bundle.base_sha256,
                       layers={n: (i, o) for n, i, o in bundle.layer_specs})
    loose = AuditThresholds(max_mean_action_change=1.0, max_p90_action_change=1.0,
                            max_delta_ratio=5.0, max_sensitivity_ratio=100.0)
    return AdapterPipeline(runtime, MergeEngine(runtime), Journal(state), ctx, canary,
                           ObservationRing(256, bundle.manifest.obs_dim), loose)


def run_steps(pipeline: AdapterPipeline, env: ImitateBase, canary: Canary, n: int) -> list:
    obs, _ = env.reset()
    verdicts = []
    for _ in range(n):
        action = pipeline.runtime.act(obs).copy()
        obs_next, reward, *_ = env.step(action)
        pipeline.ring.push(obs)
        verdict = canary.push(reward)
        if verdict is not None:
            verdicts.append(verdict)
        obs = obs_next
    return verdicts


def test_bad_adapter_is_rolled_back_and_stays_rolled_back(bundle: Bundle, tmp_path: Path) -> None:
    key = SigningKey.generate()
    canary = Canary(CanaryConfig(window=200, grace=20))
    pipeline = make_pipeline(bundle, tmp_path / "state", key, canary)
    env = ImitateBase(bundle)
    assert run_steps(pipeline, env, canary, 250) == []  # no merge yet: nothing to judge

    data = encode_packet(shift_adapter(bundle, 3.0), key=key, fleet="f1", slot="device",
                         device="d1", version=4, base_sha256=bundle.base_sha256)
    outcome = pipeline.handle(data)
    assert outcome.record.verdict == "accepted", outcome.describe()
    assert pipeline.versions == (0, 4) and canary.armed

    verdicts = run_steps(pipeline, env, canary, 230)
    assert len(verdicts) == 1 and verdicts[0].regressed
    rolled = pipeline.on_canary(verdicts[0])
    assert rolled is not None and rolled.record.verdict == "rolled_back"
    assert rolled.record.reasons[0].code == "reward_regression"
    assert rolled.record.scores["canary_mean"] < rolled.record.scores["baseline_mean"]
    assert "rolled back device adapter v4" in rolled.describe()
    assert pipeline.versions == (0, 0)
    x = env._obs()
    np.testing.assert_array_equal(pipeline.runtime.act_batch(x[None]),
                                  pipeline.runtime.base_act_batch(x[None]))

    # A restart does not re-apply it, and a replay of the same bytes stays refused.
    again = make_pipeline(bundle, tmp_path / "state", key, Canary())
    again.restore()
    assert again.versions == (0, 0)
    assert again.journal.highest()["device"] == 4
    replay = again.handle(data)
    assert replay.record.reasons[0].code == "replayed_version"


def test_good_adapter_passes_the_canary(bundle: Bundle, tmp_path: Path) -> None:
    key = SigningKey.generate()
    canary = Canary(CanaryConfig(window=200, grace=20))
    pipeline = make_pipeline(bundle, tmp_path / "state", key, canary)
    env = ImitateBase(bundle)
    run_steps(pipeline, env, canary, 250)
    data = encode_packet(shift_adapter(bundle, 1e-4), key=key, fleet="f1", slot="fleet",
                         version=1, base_sha256=bundle.base_sha256)
    assert pipeline.handle(data).record.verdict == "accepted"
    verdicts = run_steps(pipeline, env, canary, 230)
    assert len(verdicts) == 1 and not verdicts[0].regressed
    assert pipeline.on_canary(verdicts[0]) is None and pipeline.versions == (1, 0)
