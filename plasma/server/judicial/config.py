"""Server stage 5: what the judicial audit is given - its budgets and thresholds, and the device's real data."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..policy_net import LoRA
from ..tasks import TaskSpec
from .thresholds import load_thresholds

__all__ = ["JudicialConfig", "RealData", "Redistill", "StateFilter", "UntrustFn",
           "reward_is_learned"]

UntrustFn = Callable[[np.ndarray, np.ndarray], np.ndarray]
"""untrust(obs (n, od), act (n, ad)) -> (n,) >= 0; 0 where the model can be trusted."""
StateFilter = Callable[[np.ndarray], np.ndarray]
"""keep(states (n, od)) -> (n,) bool: label states the planner may learn from."""
Redistill = Callable[[TaskSpec, StateFilter], LoRA]
"""Distill again planning under the given (penalized) task and labelling only kept states."""


_T = load_thresholds().values


@dataclass(frozen=True)
class JudicialConfig:
    """Budgets and thresholds of the judicial audit. The thresholds' defaults are read from the
    shipped ``thresholds.json``, which only ``bench audit``'s calibration split writes (see
    ``judicial.thresholds``); the numbers quoted below are the measurements they came from."""

    paths: int = 256
    """Phantom paths per policy, from real start states (common random numbers for both)."""
    horizon: int = 60
    """Steps per audit path."""
    seed: int = 0
    """Seed of start-state sampling and probes."""
    min_gain: float = _T["min_gain"]
    """Per-path predicted gain the candidate must exceed to be worth publishing."""
    disagreement_quantile: float = _T["disagreement_quantile"]
    """Quantile of disagreement on real transitions used as the trusted level."""
    max_disagreement_ratio: float = _T["max_disagreement_ratio"]
    """Flag if the candidate's mean path disagreement exceeds this multiple of the trusted level"""
    max_disagreement_increase: float = _T["max_disagreement_increase"]
    """...and this multiple of the reference policy's own path disagreement."""
    support_quantile: float = _T["support_quantile"]
    """Quantile of real-to-real nearest-neighbour distances used as the support radius."""
    max_out_of_support: float = _T["max_out_of_support"]
    """Flag if more than this fraction of candidate path states lie beyond the support radius
    (bench audit: honest candidates 0.00-0.08; models fitted on 60 transitions 0.24-0.36)."""
    penalty_lambda: float | None = None
    """MOPO lambda in reward units per unit of excess disagreement ratio; None = std of real
    rewards."""
    min_penalized_share: float = _T["min_penalized_share"]
    """Share of the gain that must survive the uncertainty penalty (bench audit, one seed:
    honest candidates kept 0.38-0.45 of their gain and improved the real return by ~540;
    0.5 blocked them)."""
    spike_sigmas: float = _T["spike_sigmas"]
    """A path reward is a spike above max(real rewards) + this many real-reward stds."""
    max_spike_frac: float = _T["max_spike_frac"]
    """Flag if more than this fraction of candidate path rewards are spikes."""
    max_reward_error: float = _T["max_reward_error"]
    """Flag if phantom and recorded real rewards differ by this many real-reward stds (mean abs)."""
    max_model_error: float = _T["max_model_error"]
    """A real transition is contradicted when a member's one-step prediction misses it by
    more than this many real-observation stds (honest fits miss by ~0.01)."""
    max_contradicted: float = _T["max_contradicted"]
    """Flag if more than this fraction of the real transitions are contradicted."""
    min_fit_error: float = _T["min_fit_error"]
    """With a simulator: a real transition is also contradicted when the model misses it by more
    than this many stds AND by more than ``max_fit_ratio`` times the auditor's identified prior's
    99th-percentile miss (honest physics fits miss by ~1e-4; a stronger-motor error of 0.07 stds
    per step compounds along paths but stays under ``max_model_error``)."""
    max_fit_ratio: float = _T["max_fit_ratio"]
    """See ``min_fit_error``."""
    min_heldout_share: float = _T["min_heldout_share"]
    """Mean gain under held-out members must be at least this share of the audited gain."""
    probe_sigma: float = _T["probe_sigma"]
    """Start-state perturbation, in real-observation stds."""
    probe_repeats: int = 2
    """Perturbed replays of the gain measurement."""
    min_probe_share: float = _T["min_probe_share"]
    """Worst perturbed gain must be at least this share of the unperturbed gain."""
    max_action_rms: float = _T["max_action_rms"]
    """RMS action change on recorded real states, in half action ranges."""
    max_action_p99: float = _T["max_action_p99"]
    """99th percentile of the action change on recorded real states, in half action ranges."""
    max_relative_norm: float = _T["max_relative_norm"]
    """Largest allowed ||dW||_F / ||W||_F of any adapted layer."""
    support_points: int = 2000
    """Real states kept for nearest-neighbour support distances."""
    drop_support: float = _T["drop_support"]
    """In a correction, label states beyond this many support radii are dropped."""
    max_prior_contradicted: float = _T["max_prior_contradicted"]
    """``model_on_prior``: flag if more than this fraction of candidate path transitions miss the
    auditor's identified prior by more than ``max_model_error`` stds..."""
    max_prior_increase: float = _T["max_prior_increase"]
    """...and more than this multiple of the reference paths' fraction."""
    min_reward_support_share: float = _T["min_reward_support_share"]
    """Learned rewards only (``reward_is_learned``): share of the gain that must survive when
    path rewards at states far from every real state (raw nearest-neighbour rule: the physics
    prior vouches for dynamics, never for a learned reward) are capped by what the recorded
    rewards nearby allow (``evidence.RewardBound``: the best of the 8 nearest recorded rewards
    less their measured slope times the distance, at worst the worst recorded reward). The same
    check also rolls whole episodes from reset states with the capped rewards, where the
    candidate may lose at most ``max_prior_loss``. Below it: ``gain_from_unsupported_rewards``
    (not correctable)."""
    max_device_contradicted: float = _T["max_device_contradicted"]
    """Fleet rounds (``screen_devices``): two devices agree when each one's identified physics
    contradicts at most this fraction of the other's transitions; a device agreeing with fewer
    than half of the others is excluded."""
    device_model_error: float = _T["device_model_error"]
    """Fleet screening: a device's transition is contradicted by another device's identified
    physics when the one-step miss exceeds this many stds of the real one-step change (other
    physics of the kind that matters, g x0.5 or m x0.5, miss most transitions by 0.3-1; devices
    of the same physics by 1e-4)."""
    device_paths: int = 64
    """Fleet rounds (``judge_devices``): audit paths per device in its own identified physics."""
    max_device_loss: float = _T["max_device_loss"]
    """A fleet candidate may cost no kept device more than this fraction of its reference return
    (measured in that device's own identified physics)."""
    max_prior_loss: float = _T["max_prior_loss"]
    """``prior_gain``: the candidate may lose at most this fraction of the reference's return in
    the auditor's identified physics over whole episodes from the environment's reset states (a
    packet runs from wherever the device starts next, not only from the states it logged)."""
    allow_unanchored: bool = False
    """A task with neither a reward formula nor a simulator has its reward *and* its dynamics
    learned from the same log, and nothing outside that world model can vouch for a gain:
    its candidates are blocked (``no_independent_evidence``) unless this is set (per task:
    ``register_task(..., adapt={"judicial.allow_unanchored": True})``; the device's own
    rollback is then the only check on the real outcome). Measured on Pendulum devices with such
    a task (4 real episodes each, six physics shifts, red-team development of 2026-12-07): of
    6 honest candidates the other checks published, 4 were significantly worse on the real
    device (100 paired episodes; e.g. -345 -> -824)."""
    vouch_prior: bool = True
    """Tasks with a simulator: path states reached only through transitions that match the
    simulator at physics identified by the auditor on the real data (within ``max_model_error``
    real-observation stds) count as supported. Off: the nearest-real-state rule alone."""


@dataclass(frozen=True)
class RealData:
    """Recorded real transitions of the device (or fleet) the candidate is for."""

    obs: np.ndarray
    """(n, obs_dim)"""
    act: np.ndarray
    """(n, act_dim)"""
    rew: np.ndarray
    """(n,)"""
    next_obs: np.ndarray
    """(n, obs_dim)"""


def reward_is_learned(task: TaskSpec) -> bool:
    """The phantom reward is a model (fitted on real rewards), not the task's published formula:
    a world model's reward output (``task.reward`` None) or a reward function marked
    ``learned = True``. A learned reward is only trusted near the real data it was fitted on."""
    return task.reward is None or bool(getattr(task.reward, "learned", False))
