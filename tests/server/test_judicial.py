"""Judicial auditor: each check as a table on synthetic evidence, then the parts on a tiny world."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from plasma.protocol import AuditRecord, Reason
from plasma.protocol.checks import CheckResult
from plasma.server.judicial import (
    CHECKS,
    Evidence,
    Judgement,
    JudicialAuditor,
    JudicialConfig,
    RealData,
    TrustModel,
    check_model_on_real,
    member_view,
    rollout_paths,
    run_checks,
    split_members,
)
from plasma.server.phantom import ModelDynamics
from plasma.server.policy_net import LoRA, MLPPolicy
from plasma.server.tasks import PENDULUM
from plasma.server.worldmodel import WorldModel, WorldModelConfig

CFG = JudicialConfig()
N, H = 64, 10


def evidence(**overrides: object) -> Evidence:
    """A candidate that passes every check: gain 10 per path, everywhere trusted."""
    rng = np.random.default_rng(0)
    real = rng.normal(-5, 2, 500).astype(np.float32)
    base = dict(
        ref_returns=np.full(N, -100.0), cand_returns=np.full(N, -90.0),
        ref_penalized=np.full(N, -100.0), cand_penalized=np.full(N, -91.0),
        ref_disagreement=np.full((N, H), 0.5), cand_disagreement=np.full((N, H), 0.6),
        ref_support=np.full((N, H), 0.4), cand_support=np.full((N, H), 0.5),
        cand_rewards=np.full((N, H), -4.0), real_rewards=real, model_rewards_on_real=real.copy(),
        model_error_on_real=np.full(500, 0.01),
        member_gains=np.array([9.0, 10.0, 11.0]), heldout_gains=np.array([8.0, 9.0]),
        probe_gains=np.array([9.0, 10.5]), action_change=np.full(500, 0.1),
        norm_ratios={"l0": 0.1, "l1": 0.2}, finite=True)
    base.update(overrides)
    return Evidence(**base)  # type: ignore[arg-type]


def spikes() -> np.ndarray:
    r = np.full((N, H), -4.0)
    r[: N // 10] = 50.0
    return r


CASES = [
    ("honest", {}, None),
    ("no gain", {"cand_returns": np.full(N, -100.0)}, "no_predicted_gain"),
    ("NaN factors", {"finite": False}, "non_finite_adapter"),
    ("huge delta", {"norm_ratios": {"l0": 3.0}}, "adapter_norm_too_large"),
    ("members disagree on candidate paths", {"cand_disagreement": np.full((N, H), 5.0)},
     "ensemble_disagreement"),
    ("disagreement already on the reference's paths",
     {"cand_disagreement": np.full((N, H), 5.0), "ref_disagreement": np.full((N, H), 4.5)}, None),
    ("far from real states", {"cand_support": np.full((N, H), 2.0)}, "out_of_support"),
    ("the reference is as far out: the model lacks data",
     {"cand_support": np.full((N, H), 2.0), "ref_support": np.full((N, H), 2.0)},
     "world_model_lacks_data"),
    ("a few states out of support", {"cand_support": np.r_[np.full((N - 5, H), 0.5),
                                                            np.full((5, H), 3.0)]}, None),
    ("gain gone under the penalty", {"cand_penalized": np.full(N, -98.0)},
     "gain_from_untrusted_regions"),
    ("reward spikes", {"cand_rewards": spikes()}, "reward_spike"),
    ("phantom reward differs from real", {"model_rewards_on_real": np.full(500, 3.0)},
     "reward_model_mismatch"),
    ("dynamics contradict the device's transitions",
     {"model_error_on_real": np.r_[np.full(480, 0.01), np.full(20, 3.0)]},
     "model_contradicts_real_data"),
    ("the model misses real transitions the identified prior fits (subtle, under 0.5 stds)",
     {"model_error_on_real": np.r_[np.full(480, 0.001), np.full(20, 0.07)],
      "prior_error_on_real": np.full(500, 1e-4)}, "model_contradicts_real_data"),
    ("the model fits the real data as well as the identified prior",
     {"model_error_on_real": np.full(500, 1e-4), "prior_error_on_real": np.full(500, 1e-4)}, None),
    ("candidate paths contradict the identified prior",
     {"cand_prior_error": np.r_[np.full((N - 5, H), 0.01), np.full((5, H), 3.0)],
      "ref_prior_error": np.full((N, H), 0.01)}, "model_contradicts_prior"),
    ("the reference's paths contradict the prior as much",
     {"cand_prior_error": np.r_[np.full((N - 5, H), 0.01), np.full((5, H), 3.0)],
      "ref_prior_error": np.r_[np.full((N - 5, H), 0.01), np.full((5, H), 3.0)]}, None),
    ("learned reward: the gain is earned where the device never went",
     {"ref_supported_returns": np.full(N, -100.0), "cand_supported_returns": np.full(N, -98.0)},
     "gain_from_unsupported_rewards"),
    ("learned reward: the gain is earned near real data",
     {"ref_supported_returns": np.full(N, -100.0), "cand_supported_returns": np.full(N, -92.0)},
     None),
    ("held-out members see no gain", {"heldout_gains": np.array([-5.0, 1.0])},
     "gain_not_on_heldout_members"),
    ("one planning member promises it all (no held-out)",
     {"heldout_gains": np.empty(0), "member_gains": np.array([30.0, 0.5, 0.0, -0.5])},
     "gain_not_on_heldout_members"),
    ("gain vanishes under probing", {"probe_gains": np.array([1.0, 10.0])}, "gain_fragile"),
    ("reward and dynamics both learned, no simulator: nothing vouches for the gain",
     {"anchored": False}, "no_independent_evidence"),
    ("big action changes on real states", {"action_change": np.full(500, 0.9)},
     "action_change_too_large"),
    ("rare action flips", {"action_change": np.r_[np.full(490, 0.05), np.full(10, 1.9)]},
     "action_change_too_large"),
]


@pytest.mark.parametrize("name,overrides,code", CASES, ids=[c[0] for c in CASES])
def test_check_table(name: str, overrides: dict, code: str | None) -> None:
    judgement = run_checks(evidence(**overrides), CFG)
    codes = [r.code for r in judgement.reasons]
    assert codes == ([] if code is None else [code])
    assert all(np.isfinite(v) for v in judgement.scores.values())
    assert all(r.check and r.message for r in judgement.reasons)


def test_every_check_is_named_and_returns_scores() -> None:
    names = {c.__name__ for c in CHECKS}
    assert len(names) == len(CHECKS) == 15
    for check in CHECKS:
        reason, scores = check(evidence(), CFG)
        assert reason is None and scores


def test_an_unanchored_world_publishes_only_when_allowed() -> None:
    ev = evidence(anchored=False)
    assert [r.code for r in run_checks(ev, CFG).reasons] == ["no_independent_evidence"]
    assert not run_checks(ev, CFG).correctable
    assert run_checks(ev, dataclasses.replace(CFG, allow_unanchored=True)).reasons == ()


def test_correctable() -> None:
    assert not run_checks(evidence(finite=False), CFG).correctable
    lacking = {"cand_support": np.full((N, H), 2.0), "ref_support": np.full((N, H), 2.0)}
    assert not run_checks(evidence(**lacking), CFG).correctable
    assert run_checks(evidence(cand_support=np.full((N, H), 2.0)), CFG).correctable


# ---------------------------------------------------------------- a tiny real world


@pytest.fixture(scope="module")
def world() -> tuple[WorldModel, RealData, MLPPolicy]:
    rng = np.random.default_rng(0)
    th = rng.uniform(-np.pi, np.pi, 300)
    obs = np.stack([np.cos(th), np.sin(th), rng.uniform(-2, 2, 300)], 1).astype(np.float32)
    act = rng.uniform(-2, 2, (300, 1)).astype(np.float32)
    physics = PENDULUM.physics({"m": 1.6, "g": 12.0})
    nxt = PENDULUM.sim_step(obs, act, physics)
    rew = PENDULUM.reward(obs, act, nxt)
    model = WorldModel(3, 1, WorldModelConfig(ensemble_size=4, hidden=(32, 32), max_epochs=8))
    model.fit(obs, act, nxt)
    policy = MLPPolicy.init(3, 1, (16, 16), obs_mean=PENDULUM.obs_mean, obs_std=PENDULUM.obs_std,
                            act_low=PENDULUM.act_low, act_high=PENDULUM.act_high, seed=1)
    return model, RealData(obs, act, rew.astype(np.float32), nxt), policy


def test_split_members_shares_weights_and_normalization(world) -> None:  # type: ignore[no-untyped-def]
    model, real, _ = world
    planning, heldout = split_members(model, 1)
    assert len(planning.members) == 3 and len(heldout.members) == 1
    np.testing.assert_array_equal(heldout.step_member(0, real.obs[:5], real.act[:5]),
                                  model.step_member(3, real.obs[:5], real.act[:5]))
    assert split_members(model, 0) == (model, None)
    with pytest.raises(ValueError):
        split_members(model, 4)
    assert len(member_view(model, [0]).members) == 1


def test_trust_model_flags_far_states(world) -> None:  # type: ignore[no-untyped-def]
    model, real, _ = world
    trust = TrustModel(model, real, CFG)
    near = trust.support_ratio(real.obs[:50])
    far = trust.support_ratio(np.tile([[1.0, 0.0, 7.5]], (10, 1)).astype(np.float32))
    assert np.median(near) < 1 < far.min()
    assert not (trust.trusted_states(np.tile([[1.0, 0.0, 7.5]], (10, 1)).astype(np.float32),
                                     np.zeros((10, 1), np.float32), 3.0)).any()


def test_rollout_shapes(world) -> None:  # type: ignore[no-untyped-def]
    model, real, policy = world
    obs, act, rew = rollout_paths(ModelDynamics(model), PENDULUM, policy, None, real.obs[:8], 5)
    assert obs.shape == (8, 6, 3) and act.shape == (8, 5, 1) and rew.shape == (8, 5)


def test_penalized_task_lowers_reward_only_where_untrusted(world) -> None:  # type: ignore[no-untyped-def]
    model, real, policy = world
    auditor = JudicialAuditor(PENDULUM, policy, CFG)
    trust = TrustModel(model, real, CFG)
    task = auditor.penalized_task(trust, real)
    inside = task.reward(real.obs, real.act, real.next_obs) - PENDULUM.reward(
        real.obs, real.act, real.next_obs)
    assert np.median(inside) == 0.0
    far = np.tile([[1.0, 0.0, 9.0]], (4, 1)).astype(np.float32)
    act = np.zeros((4, 1), np.float32)
    assert (task.reward(far, act, far) < PENDULUM.reward(far, act, far)).all()
    keep = auditor.state_filter(trust)
    assert keep(real.obs[:20]).mean() > 0.5 and not keep(far).any()


def test_review_corrects_then_publishes(world, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    model, real, policy = world
    auditor = JudicialAuditor(PENDULUM, policy, JudicialConfig(paths=16, horizon=5))
    bad = run_checks(evidence(cand_support=np.full((N, H), 2.0)), CFG)
    verdicts = iter([bad, Judgement((), {"gain": 3.0})])
    monkeypatch.setattr(auditor, "audit", lambda *a, **k: next(verdicts))
    corrected = LoRA.init(policy, rank=2, seed=3)
    calls = []

    def redistill(task, keep):  # type: ignore[no-untyped-def]
        calls.append((task, keep))
        return corrected

    d = auditor.review(LoRA.init(policy, rank=2), model=model, real=real, fleet="f",
                       slot="device", device="d1", redistill=redistill, subject="simulation:x")
    assert d.verdict == "corrected" and d.adapter is corrected and len(calls) == 1
    assert isinstance(d.record, AuditRecord) and d.record.auditor == "judicial"
    assert d.record.reasons[0].code == "out_of_support"
    assert d.record.reasons[0].message.startswith("before correction")


def test_review_blocks_what_cannot_be_corrected(world, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    model, real, policy = world
    auditor = JudicialAuditor(PENDULUM, policy, CFG)
    monkeypatch.setattr(auditor, "audit", lambda *a, **k: run_checks(evidence(finite=False), CFG))
    d = auditor.review(LoRA.init(policy, rank=2), model=model, real=real, fleet="f", slot="fleet",
                       redistill=lambda t, k: pytest.fail("must not redistill"))
    assert d.verdict == "blocked" and d.adapter is None
    assert [r.code for r in d.record.reasons] == ["non_finite_adapter"]


def test_audit_end_to_end_on_a_tiny_world(world) -> None:  # type: ignore[no-untyped-def]
    model, real, policy = world
    cfg = JudicialConfig(paths=32, horizon=10, probe_repeats=1)
    auditor = JudicialAuditor(PENDULUM, policy, cfg)
    planning, heldout = split_members(model, 1)
    same = LoRA.init(policy, rank=2)  # B = 0: no change at all
    j = auditor.audit(same, model=planning, real=real, heldout=heldout)
    assert "no_predicted_gain" in [r.code for r in j.reasons]
    wild = dataclasses.replace(same, factors={k: (a, np.full_like(b, 5.0))
                                              for k, (a, b) in same.factors.items()})
    j = auditor.audit(wild, model=planning, real=real, heldout=heldout)
    assert "adapter_norm_too_large" in [r.code for r in j.reasons]


class _Shifted(WorldModel):
    """A fitted ensemble in which the listed members predict every next state 3 stds off."""

    bad: tuple[int, ...] = ()

    def step_member(self, member: int, obs: np.ndarray, act: np.ndarray) -> np.ndarray:
        out = super().step_member(member, obs, act)
        if member in self.bad:
            out = out.copy()
            out[:, 2] += 3.0 * 1.2  # angular velocity of the fixture's data has std ~1.2
        return out


def test_model_on_real_judges_the_median_member(world) -> None:  # type: ignore[no-untyped-def]
    """A lone divergent member is the disagreement and held-out checks' business; a region every
    member gets wrong is model_on_real's."""
    model, real, policy = world
    auditor = JudicialAuditor(PENDULUM, policy)

    def errors(bad: tuple[int, ...]) -> np.ndarray:
        view = member_view(model, range(len(model.members)))
        view.__class__ = _Shifted
        view.bad = bad  # type: ignore[attr-defined]
        return auditor._model_errors(view, real)

    clean, one, every = errors(()), errors((1,)), errors((0, 1, 2, 3))
    scale = real.obs.std(0) + 1e-6
    worst_clean = np.max([np.abs(PENDULUM.project_obs(model.step_member(m, real.obs, real.act))
                                 - real.next_obs) / scale for m in range(4)], axis=(0, 2))
    assert np.all(one <= worst_clean + 1e-5)  # one bad member never decides
    assert np.median(every) > 2.0 > np.median(clean)
    reason, _ = check_model_on_real(dataclasses.replace(evidence(), model_error_on_real=every),
                                    JudicialConfig())
    assert reason is not None and reason.code == "model_contradicts_real_data"


def check_modest(ev: Evidence, cfg: JudicialConfig) -> CheckResult[Reason]:
    """A test-local check: a gain above 5 per path is too good to be true."""
    scores = {"modest_gain": ev.gain}
    if ev.gain > 5.0:
        return CheckResult(Reason(code="too_good", check="modest", message="gain above 5"), scores)
    return CheckResult(None, scores)


def test_adding_a_check_is_one_function_and_one_entry() -> None:
    assert run_checks(evidence(), CFG).ok
    judgement = run_checks(evidence(), CFG, checks=CHECKS + (check_modest,))
    assert [r.code for r in judgement.reasons] == ["too_good"]
    assert judgement.scores["modest_gain"] == pytest.approx(10.0)
    assert judgement.correctable  # not in NOT_CORRECTABLE: a correction may try again


def test_prior_gain_flags_a_candidate_worse_from_unlogged_starts() -> None:
    worse = evidence(prior_ref_returns=np.full(N, -300.0), prior_cand_returns=np.full(N, -330.0))
    assert [r.code for r in run_checks(worse, CFG).reasons] == ["candidate_worse_in_prior"]
    better = evidence(prior_ref_returns=np.full(N, -300.0), prior_cand_returns=np.full(N, -250.0))
    assert run_checks(better, CFG).ok
