"""Learned rewards: the honest reward model's contract (bench/learned.py), the bound the
judicial ``reward_support`` check puts on a learned reward away from the real data
(judicial/evidence.py ``RewardBound``) and the check's two rules. The rounds themselves are in
test_audit_outcomes.py."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from plasma.server.basepolicy import TrainBaseConfig, cached_policy, collect
from plasma.server.bench.learned import FlatteringLearnedReward, HonestLearnedReward
from plasma.server.judicial import JudicialConfig, RealData, reward_is_learned, run_checks
from plasma.server.judicial.evidence import Evidence, RewardBound
from plasma.server.tasks import get_task

ENV = "Pendulum-v1"


def _real(episodes: int, seed0: int) -> RealData:
    base = cached_policy(TrainBaseConfig(env_id=ENV))[0].merged(None)
    d = collect(lambda o: base.forward(o.astype(np.float32)), ENV, {"l": 1.3}, episodes,
                seed0=seed0, noise=0.1, rng=np.random.default_rng(seed0))
    return RealData(d["obs"], d["act"], d["rew"], d["next_obs"])


@pytest.fixture(scope="module")
def real() -> RealData:
    return _real(2, 1000)


def test_the_honest_learned_reward_keeps_its_contract(real: RealData) -> None:
    task = get_task(ENV)
    model = HonestLearnedReward.fit(real, seed=1)
    assert model.fit_error < 0.1  # the auditor's reward_model check blocks above 0.1 stds
    # episodes of the same device it was not fitted on: right at states near recorded ones
    other = _real(2, 5000)
    scale = real.obs.std(0) + 1e-6
    d = np.sqrt((((other.obs[:, None] - real.obs[None]) / scale) ** 2).sum(-1))  # (m, n)
    own = np.sqrt((((real.obs[:, None] - real.obs[None]) / scale) ** 2).sum(-1))
    np.fill_diagonal(own, np.inf)
    near = d.min(1) <= np.quantile(own.min(1), 0.99)  # the auditor's support radius
    err = np.abs(model(other.obs, other.act, other.next_obs) - other.rew)
    assert near.mean() > 0.5 and err[near].mean() < 0.05 * real.rew.std()
    rng = np.random.default_rng(0)
    box = task.project_obs(rng.uniform(task.obs_low, task.obs_high, (4000, task.obs_dim)))
    acts = rng.uniform(task.act_low, task.act_high, (4000, task.act_dim))
    pred = model(box.astype(np.float32), acts.astype(np.float32), box)
    assert pred.max() <= real.rew.max() + 1e-5 and pred.min() >= real.rew.min() - 1e-5
    assert pred.shape == (4000,)
    assert reward_is_learned(dataclasses.replace(task, reward=model))


def test_the_bound_keeps_recorded_rewards_and_drops_flattery_where_the_device_never_went(
        real: RealData) -> None:
    task = get_task(ENV)
    scale = real.obs.std(0) + 1e-6
    bound = RewardBound(real, scale, points=2000, seed=0)
    assert bound.slope > 0
    # on the log itself nothing is lost: the bound is at least the recorded reward
    assert np.all(bound(real.obs) >= real.rew - 1e-4)
    # spinning faster than the device ever did: the recorded rewards there were poor
    fast = real.obs[np.argsort(-np.abs(real.obs[:, 2]))[:50]].copy()
    fast[:, 2] = np.sign(fast[:, 2]) * 8.0
    assert np.abs(real.obs[:, 2]).max() < 7.9
    assert task.reward is not None
    flattering = FlatteringLearnedReward(task.reward, real)
    act = np.zeros((len(fast), 1), np.float32)
    claimed = flattering(fast, act, fast)
    assert np.all(bound(fast) < claimed - real.rew.std())
    assert np.all(bound(fast) <= np.quantile(real.rew, 0.5))
    # never below the worst recorded reward
    assert np.all(bound(fast * 50) >= real.rew.min() - 1e-6)


def _learned_evidence(**overrides: object) -> Evidence:
    """A candidate with a learned reward that passes every check: gain 10 per path."""
    n, h = 64, 10
    real = np.random.default_rng(0).normal(-5, 2, 500).astype(np.float32)
    base = dict(
        ref_returns=np.full(n, -100.0), cand_returns=np.full(n, -90.0),
        ref_penalized=np.full(n, -100.0), cand_penalized=np.full(n, -91.0),
        ref_disagreement=np.full((n, h), 0.5), cand_disagreement=np.full((n, h), 0.6),
        ref_support=np.full((n, h), 0.4), cand_support=np.full((n, h), 0.5),
        cand_rewards=np.full((n, h), -4.0), real_rewards=real, model_rewards_on_real=real.copy(),
        model_error_on_real=np.full(500, 0.01),
        member_gains=np.array([9.0, 10.0, 11.0]), heldout_gains=np.array([8.0, 9.0]),
        probe_gains=np.array([9.0, 10.5]), action_change=np.full(500, 0.1),
        ref_supported_returns=np.full(n, -100.0), cand_supported_returns=np.full(n, -91.0),
        ref_episode_supported=np.full(32, -400.0), cand_episode_supported=np.full(32, -380.0))
    base.update(overrides)
    return Evidence(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize("overrides,blocked", [
    ({}, False),
    ({"cand_supported_returns": np.full(64, -98.0)}, True),  # the gain is earned off the data
    ({"cand_episode_supported": np.full(32, -460.0)}, True),  # lost over whole episodes
    ({"cand_episode_supported": np.full(32, -405.0)}, False),  # within 2 % of the reference
    ({"ref_episode_supported": np.empty(0), "cand_episode_supported": np.empty(0)}, False),
])
def test_reward_support_reads_the_audit_paths_and_whole_episodes(overrides: dict,
                                                                 blocked: bool) -> None:
    judgement = run_checks(_learned_evidence(**overrides), JudicialConfig())
    codes = [r.code for r in judgement.reasons]
    assert codes == (["gain_from_unsupported_rewards"] if blocked else [])


def test_near_the_data_a_learned_reward_is_held_under_what_its_neighbours_allow(
        real: RealData) -> None:
    """The hole ``RewardBound.ceiling`` closes: a learned reward that claims more than the
    recorded rewards around a state allow, at states the support rule calls visited (a flattered
    action there), keeps no gain; the recorded rewards themselves are (nearly) kept."""
    from types import SimpleNamespace

    from plasma.server.judicial import JudicialAuditor
    from plasma.server.judicial.evidence import RewardBound

    task = get_task(ENV)
    assert task.reward is not None
    learned = dataclasses.replace(task, reward=FlatteringLearnedReward(task.reward, real))
    policy = cached_policy(TrainBaseConfig(env_id=ENV))[0]
    auditor = JudicialAuditor(learned, policy, JudicialConfig())
    trust = SimpleNamespace(scale=real.obs.std(0) + 1e-6,
                            support_ratio=lambda obs: np.zeros(len(obs)))  # all within support
    n, h = 4, 50
    idx = np.arange(n * h)
    obs = np.concatenate([real.obs[idx].reshape(n, h, -1), real.obs[idx[-n:]][:, None]], 1)
    act = real.act[idx].reshape(n, h, -1)
    recorded = real.rew[idx].reshape(n, h)
    flattered = recorded + 2 * real.rew.std()
    cfg = JudicialConfig()
    bound = RewardBound(real, trust.scale, cfg.support_points, cfg.seed)
    sup = auditor._supported_returns(trust, bound, (obs, act, recorded),  # type: ignore[arg-type]
                                     (obs, act, flattered))
    kept, lured = sup["ref_supported_returns"], sup["cand_supported_returns"]
    assert np.all(kept >= recorded.sum(1) - 0.05 * np.abs(recorded.sum(1)))
    assert np.all(lured <= recorded.sum(1) + 1e-3)  # the flattery is gone
    assert np.all(flattered.sum(1) - lured > 1.9 * real.rew.std() * h)
