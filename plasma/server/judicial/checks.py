"""Server stage 5: Evidence -> reasons and scores; each judicial check is one function in ``CHECKS``."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from plasma.protocol import Reason
from plasma.protocol.checks import Check, CheckResult, judge_all

from .config import JudicialConfig
from .evidence import Evidence

__all__ = ["CHECKS", "NOT_CORRECTABLE", "CheckResult", "Judgement", "check_anchor", "check_disagreement",
           "check_gain", "check_heldout_members", "check_model_on_prior", "check_model_on_real", "check_norms",
           "check_penalized_gain", "check_probing", "check_replay", "check_reward_model",
           "check_prior_gain", "check_reward_spikes", "check_reward_support", "check_support", "run_checks"]

NOT_CORRECTABLE = {"non_finite_adapter", "adapter_norm_too_large", "no_predicted_gain",
                   "no_independent_evidence",
                   "reward_model_mismatch", "model_contradicts_real_data",
                   "model_contradicts_prior", "world_model_lacks_data",
                   "gain_from_unsupported_rewards", "candidate_worse_in_prior"}
"""Reasons a redistillation in the same world cannot fix (broken adapter, no gain, wrong world)."""


def _reason(code: str, check: str, message: str) -> Reason:
    return Reason(code=code, check=check, message=message[:1000])


def _reject(code: str, check: str, message: str, scores: dict[str, float]) -> CheckResult[Reason]:
    return CheckResult(_reason(code, check, message), scores)


def check_norms(ev: Evidence, cfg: JudicialConfig) -> CheckResult[Reason]:
    worst = max(ev.norm_ratios.values(), default=0.0)
    scores = {"max_relative_norm": worst if math.isfinite(worst) else 1e9}
    if not ev.finite:
        return _reject("non_finite_adapter", "norms", "adapter factors hold NaN or Inf", scores)
    if worst > cfg.max_relative_norm:
        layer = max(ev.norm_ratios, key=ev.norm_ratios.__getitem__)
        return _reject("adapter_norm_too_large", "norms",
                       f"layer {layer}: ||dW||/||W|| = {worst:.2f} > {cfg.max_relative_norm}",
                       scores)
    return CheckResult(None, scores)


def check_anchor(ev: Evidence, cfg: JudicialConfig) -> CheckResult[Reason]:
    scores = {"anchored": float(ev.anchored)}
    if not ev.anchored and not cfg.allow_unanchored:
        return _reject("no_independent_evidence", "anchor",
                       "the reward and the dynamics are both learned from the device's log and "
                       "the task has no simulator: nothing outside the world model vouches for the "
                       "gain (judicial.allow_unanchored publishes anyway; the device's rollback is "
                       "then the only check)", scores)
    return CheckResult(None, scores)


def check_gain(ev: Evidence, cfg: JudicialConfig) -> CheckResult[Reason]:
    scores = {"gain": ev.gain, "ref_return": float(ev.ref_returns.mean()),
              "cand_return": float(ev.cand_returns.mean())}
    if ev.gain <= cfg.min_gain:
        return _reject("no_predicted_gain", "gain",
                       f"predicted gain {ev.gain:.2f} per path is not above {cfg.min_gain}", scores)
    return CheckResult(None, scores)


def check_disagreement(ev: Evidence, cfg: JudicialConfig) -> CheckResult[Reason]:
    cand, ref = float(ev.cand_disagreement.mean()), float(ev.ref_disagreement.mean())
    scores = {"disagreement_ratio": cand, "disagreement_ratio_ref": ref}
    if cand > cfg.max_disagreement_ratio and cand > cfg.max_disagreement_increase * ref:
        return _reject("ensemble_disagreement", "disagreement",
                       f"members disagree {cand:.1f}x more along candidate paths than on real data "
                       f"(reference paths: {ref:.1f}x)", scores)
    return CheckResult(None, scores)


def check_support(ev: Evidence, cfg: JudicialConfig) -> CheckResult[Reason]:
    cand, ref = float((ev.cand_support > 1).mean()), float((ev.ref_support > 1).mean())
    scores = {"out_of_support": cand, "out_of_support_ref": ref}
    if cand > cfg.max_out_of_support and ref > cfg.max_out_of_support:
        return _reject("world_model_lacks_data", "support",
                       f"{cand:.0%} of candidate and {ref:.0%} of reference path states are far "
                       "from every real state: the world model needs more real transitions", scores)
    if cand > cfg.max_out_of_support:
        return _reject("out_of_support", "support",
                       f"{cand:.0%} of candidate path states are far from every real state "
                       f"(reference: {ref:.0%})", scores)
    return CheckResult(None, scores)


def check_penalized_gain(ev: Evidence, cfg: JudicialConfig) -> CheckResult[Reason]:
    pen = float(np.mean(ev.cand_penalized - ev.ref_penalized))
    share = pen / ev.gain if ev.gain > 0 else 1.0
    scores = {"penalized_gain": pen, "penalized_share": share}
    if ev.gain > 0 and share < cfg.min_penalized_share:
        return _reject("gain_from_untrusted_regions", "penalized_gain",
                       f"only {share:.0%} of the predicted gain {ev.gain:.1f} survives the "
                       f"uncertainty penalty (gain {pen:.1f})", scores)
    return CheckResult(None, scores)


def check_reward_spikes(ev: Evidence, cfg: JudicialConfig) -> CheckResult[Reason]:
    real = ev.real_rewards
    ceiling = float(real.max() + cfg.spike_sigmas * (real.std() + 1e-6))
    frac = float((ev.cand_rewards > ceiling).mean())
    scores = {"spike_frac": frac, "reward_ceiling": ceiling,
              "max_path_reward": float(ev.cand_rewards.max())}
    if frac > cfg.max_spike_frac:
        return _reject("reward_spike", "reward_spikes",
                       f"{frac:.1%} of candidate path rewards exceed {ceiling:.2f}, above anything "
                       "the device ever recorded", scores)
    return CheckResult(None, scores)


def check_reward_model(ev: Evidence, cfg: JudicialConfig) -> CheckResult[Reason]:
    err = float(np.mean(np.abs(ev.model_rewards_on_real - ev.real_rewards)))
    rel = err / (float(ev.real_rewards.std()) + 1e-6)
    scores = {"reward_error": rel}
    if rel > cfg.max_reward_error:
        return _reject("reward_model_mismatch", "reward_model",
                       f"the phantom reward differs from recorded real rewards by {rel:.2f} stds "
                       "on the device's own transitions", scores)
    return CheckResult(None, scores)


def check_reward_support(ev: Evidence, cfg: JudicialConfig) -> CheckResult[Reason]:
    if not ev.cand_supported_returns.size:  # the task's own reward: trusted everywhere
        return CheckResult(None, {"reward_support_share": 1.0})
    kept = float(np.mean(ev.cand_supported_returns - ev.ref_supported_returns))
    share = kept / ev.gain if ev.gain > 0 else 1.0
    scores = {"reward_support_share": share}
    if ev.gain > 0 and share < cfg.min_reward_support_share:
        return _reject("gain_from_unsupported_rewards", "reward_support",
                       f"the reward is learned and only {share:.0%} of the predicted gain "
                       f"{ev.gain:.1f} is earned at states near the device's real data", scores)
    if ev.cand_episode_supported.size:
        ref = float(np.mean(ev.ref_episode_supported))
        episode = float(np.mean(ev.cand_episode_supported)) - ref
        scores.update({"reward_support_episode_gain": episode, "reward_support_episode_ref": ref})
        if ev.gain > 0 and episode < -cfg.max_prior_loss * abs(ref):
            return _reject("gain_from_unsupported_rewards", "reward_support",
                           f"the reward is learned and over whole episodes in the world model, "
                           f"with rewards off the device's real data capped, the candidate loses "
                           f"{-episode:.1f} per episode against the reference ({ref:.1f})", scores)
    return CheckResult(None, scores)


def check_model_on_real(ev: Evidence, cfg: JudicialConfig) -> CheckResult[Reason]:
    frac = float((ev.model_error_on_real > cfg.max_model_error).mean())
    scores = {"contradicted_frac": frac, "model_error_p99": float(np.quantile(
        ev.model_error_on_real, 0.99)) if len(ev.model_error_on_real) else 0.0}
    if frac > cfg.max_contradicted:
        return _reject("model_contradicts_real_data", "model_on_real",
                       f"the phantom dynamics contradict {frac:.1%} of the device's own recorded "
                       f"transitions (by more than {cfg.max_model_error} stds)", scores)
    if ev.prior_error_on_real.size and len(ev.model_error_on_real):
        # the identified prior shows how well these data CAN be fitted: a model that misses
        # them far worse (a subtle error that compounds along paths) is not the device's
        limit = max(cfg.min_fit_error, cfg.max_fit_ratio * float(np.quantile(
            ev.prior_error_on_real, 0.99)))
        worse = float((ev.model_error_on_real > limit).mean())
        scores.update({"worse_than_prior_frac": worse, "prior_error_p99": float(np.quantile(
            ev.prior_error_on_real, 0.99))})
        if worse > cfg.max_contradicted:
            return _reject("model_contradicts_real_data", "model_on_real",
                           f"the phantom dynamics miss {worse:.1%} of the device's own recorded "
                           f"transitions by more than {limit:.3f} stds, which the physics the "
                           "auditor identifies on the same data does not", scores)
    else:
        scores.update({"worse_than_prior_frac": 0.0, "prior_error_p99": 0.0})
    return CheckResult(None, scores)


def check_model_on_prior(ev: Evidence, cfg: JudicialConfig) -> CheckResult[Reason]:
    if not ev.cand_prior_error.size:  # no simulator in the task: nothing to compare with
        return CheckResult(None, {"prior_contradicted": 0.0, "prior_contradicted_ref": 0.0})
    cand = float((ev.cand_prior_error > cfg.max_model_error).mean())
    ref = float((ev.ref_prior_error > cfg.max_model_error).mean()) if ev.ref_prior_error.size \
        else 0.0
    scores = {"prior_contradicted": cand, "prior_contradicted_ref": ref}
    if cand > cfg.max_prior_contradicted and cand > cfg.max_prior_increase * ref:
        return _reject("model_contradicts_prior", "model_on_prior",
                       f"{cand:.1%} of candidate path transitions contradict the simulator at the "
                       f"physics identified on the real data (reference paths: {ref:.1%})", scores)
    return CheckResult(None, scores)


def check_prior_gain(ev: Evidence, cfg: JudicialConfig) -> CheckResult[Reason]:
    if not ev.prior_cand_returns.size:  # no simulator in the task
        return CheckResult(None, {"prior_gain": 0.0})
    gain = float(np.mean(ev.prior_cand_returns - ev.prior_ref_returns))
    ref = float(np.mean(ev.prior_ref_returns))
    scores = {"prior_gain": gain, "prior_ref_return": ref}
    if gain < -cfg.max_prior_loss * abs(ref):
        return _reject("candidate_worse_in_prior", "prior_gain",
                       f"in the physics the auditor identifies on the real data, from the "
                       f"environment's reset states, the candidate loses {-gain:.1f} "
                       f"per path against the reference ({ref:.1f})", scores)
    return CheckResult(None, scores)


def check_heldout_members(ev: Evidence, cfg: JudicialConfig) -> CheckResult[Reason]:
    gains = ev.heldout_gains if len(ev.heldout_gains) else ev.member_gains
    which = "held-out" if len(ev.heldout_gains) else "single planning"
    # the median: a gain that only one member promises is not a gain
    share = float(np.median(gains)) / ev.gain if ev.gain > 0 and len(gains) else 1.0
    scores = {"heldout_share": share,
              "heldout_gain_min": float(np.min(gains)) if len(gains) else 0.0,
              "member_gain_min": float(np.min(ev.member_gains)) if len(ev.member_gains) else 0.0}
    if ev.gain > 0 and len(gains) and (share < cfg.min_heldout_share or float(np.max(gains)) <= 0):
        return _reject("gain_not_on_heldout_members", "heldout_members",
                       f"under {which} members the gain is {share:.0%} of the audited "
                       f"{ev.gain:.1f} (per member: {', '.join(f'{g:.1f}' for g in gains)})",
                       scores)
    return CheckResult(None, scores)


def check_probing(ev: Evidence, cfg: JudicialConfig) -> CheckResult[Reason]:
    share = float(np.min(ev.probe_gains)) / ev.gain if ev.gain > 0 and len(ev.probe_gains) else 1.0
    scores = {"probe_share": share}
    if ev.gain > 0 and share < cfg.min_probe_share:
        return _reject("gain_fragile", "probing",
                       f"perturbing start states by {cfg.probe_sigma} stds leaves {share:.0%} of "
                       "the gain", scores)
    return CheckResult(None, scores)


def check_replay(ev: Evidence, cfg: JudicialConfig) -> CheckResult[Reason]:
    rms = float(np.sqrt(np.mean(ev.action_change**2)))
    p99 = float(np.quantile(ev.action_change, 0.99))
    scores = {"action_change_rms": rms, "action_change_p99": p99}
    if rms > cfg.max_action_rms or p99 > cfg.max_action_p99:
        return _reject("action_change_too_large", "replay",
                       f"on recorded real states the candidate moves actions {rms:.2f} half-ranges"
                       f" RMS ({p99:.2f} at the 99th percentile)", scores)
    return CheckResult(None, scores)


CHECKS: tuple[Check[Evidence, JudicialConfig, Reason], ...] = (
    check_norms, check_anchor, check_gain, check_disagreement, check_support, check_penalized_gain,
    check_reward_spikes, check_reward_model, check_reward_support, check_model_on_real, check_model_on_prior,
    check_prior_gain, check_heldout_members, check_probing, check_replay,
)


@dataclass(frozen=True)
class Judgement:
    """One audit: the failed checks' reasons and every score."""

    reasons: tuple[Reason, ...]
    scores: dict[str, float]

    @property
    def ok(self) -> bool:
        return not self.reasons

    @property
    def correctable(self) -> bool:
        return bool(self.reasons) and not any(r.code in NOT_CORRECTABLE for r in self.reasons)


def run_checks(ev: Evidence, cfg: JudicialConfig,
               checks: Sequence[Check[Evidence, JudicialConfig, Reason]] = CHECKS) -> Judgement:
    """Every check of ``checks`` on ``ev``, in order; scores made finite for the AuditRecord."""
    reasons, scores = judge_all(checks, ev, cfg)
    return Judgement(reasons, {k: _finite(v) for k, v in scores.items()})


def _finite(x: float) -> float:
    """AuditRecord refuses NaN and Inf: clamp infinities, zero NaN."""
    if math.isfinite(x):
        return float(x)
    return 1e12 if x > 0 else -1e12 if x < 0 else 0.0
