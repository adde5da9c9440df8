"""Server stage 5: candidate + world model + real data -> Evidence, the plain arrays every check reads.

The auditor measures the gain itself (it does not take the producer's word): it rolls the
reference policy and the candidate from the same real start states through the same members.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..phantom import ModelDynamics
from ..policy_net import LoRA, MLPPolicy
from ..tasks import TaskSpec
from ..worldmodel import WorldModel
from .config import JudicialConfig, RealData, reward_is_learned
from .paths import OneMember, rollout_paths
from .trust import TrustModel

__all__ = ["Evidence", "EvidenceGatherer", "RewardBound"]

_Paths = tuple[np.ndarray, np.ndarray, np.ndarray]
"""``rollout_paths``' answer: obs (N, H + 1, od), act (N, H, ad), rew (N, H)."""


@dataclass
class Evidence:
    """Everything the checks look at, as plain arrays (tests build it directly)."""

    ref_returns: np.ndarray
    """(N,) predicted returns of the reference policy (planning members, TS-inf)."""
    cand_returns: np.ndarray
    """(N,) the candidate's, same starts and members."""
    ref_penalized: np.ndarray
    """(N,) reference returns of r - lambda * untrust."""
    cand_penalized: np.ndarray
    """(N,) candidate returns of r - lambda * untrust."""
    ref_disagreement: np.ndarray
    """(N, H) disagreement ratio (to the trusted level) along reference paths."""
    cand_disagreement: np.ndarray
    """(N, H) the same along candidate paths."""
    ref_support: np.ndarray
    """(N, H) nearest-real-state distance ratio (to the support radius) along reference paths."""
    cand_support: np.ndarray
    """(N, H) the same along candidate paths."""
    cand_rewards: np.ndarray
    """(N, H) rewards along candidate paths."""
    real_rewards: np.ndarray
    """(n,) recorded real rewards."""
    model_rewards_on_real: np.ndarray
    """(n,) rewards the phantom world gives the recorded real transitions."""
    model_error_on_real: np.ndarray
    """(n,) the median member's one-step error on the real transitions, in real-observation stds."""
    member_gains: np.ndarray
    """(M,) mean gain with every path under one planning member."""
    heldout_gains: np.ndarray
    """(K,) mean gain under each held-out member (empty if none were held out)."""
    probe_gains: np.ndarray
    """(P,) mean gain from perturbed start states."""
    action_change: np.ndarray
    """(n,) max over action dims of |a_cand - a_ref| on real states, in half action ranges."""
    norm_ratios: dict[str, float] = field(default_factory=dict)
    """layer -> ||dW||_F / ||W||_F of the candidate (relative to the base weights)."""
    finite: bool = True
    """Every factor of the candidate is finite."""
    anchored: bool = True
    """Something outside the world model vouches for part of the gain: the task's own reward
    formula, or a simulator the auditor identifies physics in (``allow_unanchored``)."""
    ref_prior_error: np.ndarray = field(default_factory=lambda: np.empty(0, np.float32))
    """(N, H) reference path transitions' miss against the auditor's identified prior (empty
    without a simulator)."""
    cand_prior_error: np.ndarray = field(default_factory=lambda: np.empty(0, np.float32))
    """(N, H) the same along candidate paths."""

    ref_supported_returns: np.ndarray = field(default_factory=lambda: np.empty(0, np.float32))
    """(N,) learned rewards only: reference returns with every reward at a state far from the real
    data capped by what the recorded rewards allow there (``RewardBound``: the nearby recorded
    rewards less their measured slope times the distance, at worst the worst recorded reward;
    empty when the reward is the task's own)."""
    cand_supported_returns: np.ndarray = field(default_factory=lambda: np.empty(0, np.float32))
    """(N,) the same along candidate paths."""
    ref_episode_supported: np.ndarray = field(default_factory=lambda: np.empty(0, np.float32))
    """(N,) learned rewards only: whole-episode reference returns in the world model from the
    same real start states, rewards capped as in ``ref_supported_returns`` (a flattering reward
    may lure the candidate off the data only after the audit horizon)."""
    cand_episode_supported: np.ndarray = field(default_factory=lambda: np.empty(0, np.float32))
    """(N,) the same for the candidate."""

    prior_error_on_real: np.ndarray = field(default_factory=lambda: np.empty(0, np.float32))
    """(n,) the auditor's identified prior's one-step miss on the real transitions, in
    real-observation stds (empty without a simulator): how well a model CAN fit these data."""
    prior_ref_returns: np.ndarray = field(default_factory=lambda: np.empty(0, np.float32))
    """(B,) tasks with a simulator: whole-episode reference returns in the auditor's OWN
    identified physics from the environment's own reset distribution (where the device's next
    episodes start, not only where it has been); empty without a prior."""
    prior_cand_returns: np.ndarray = field(default_factory=lambda: np.empty(0, np.float32))
    """(B,) the candidate's, same starts."""

    @property
    def gain(self) -> float:
        return float(np.mean(self.cand_returns - self.ref_returns))


class _PriorDynamics:
    """The auditor's identified physics as a one-member ``Dynamics``."""

    n_members = 1

    def __init__(self, trust: TrustModel) -> None:
        assert trust.prior is not None
        self.prior = trust.prior

    def step_member(self, member: int, obs: np.ndarray, act: np.ndarray) -> np.ndarray:
        return self.prior(obs, act)


class RewardBound:
    """The most a reward can be at a state the device never recorded, by the device's own
    rewards: ``max_j (r_j - slope * d_j)`` over the ``k`` recorded states nearest to it (distances
    in real-observation stds), never below the worst recorded reward.

    ``slope`` is a high quantile (``SLOPE_QUANTILE``) of the reward change per unit distance
    between recorded neighbours: how fast the real rewards were seen to change. So a learned
    reward keeps its value a little off the data when recorded rewards nearby were as good, and
    loses it where they were bad (beyond the fastest recorded spin, the recorded rewards are
    poor) or where the state is far from any of them (the bound falls to the worst recorded
    reward, the former rule)."""

    K = 8
    SLOPE_QUANTILE = 0.9

    def __init__(self, real: RealData, scale: np.ndarray, points: int, seed: int) -> None:
        rng = np.random.default_rng(seed + 2)
        keep = rng.choice(len(real.obs), min(points, len(real.obs)), replace=False)
        self.points = real.obs[keep].astype(np.float64) / scale
        self.rew = real.rew[keep].astype(np.float64)
        self.scale = scale
        self.floor = float(real.rew.min())
        self.slope = 0.0
        if len(self.points) > 1:
            d, j = _knn(self.points, self.points, 2)  # [:, 0]: the point itself (or a twin)
            apart = d[:, 1] > 1e-6
            if apart.any():
                slopes = np.abs(self.rew - self.rew[j[:, 1]])[apart] / d[apart, 1]
                self.slope = float(np.quantile(slopes, self.SLOPE_QUANTILE))

    def __call__(self, obs: np.ndarray) -> np.ndarray:
        return self.limits(obs)[0]

    def ceiling(self, obs: np.ndarray) -> np.ndarray:
        """The most any reward can be at ``obs`` given its recorded neighbours and the recorded
        slope: ``min_j (r_j + slope * d_j)`` over the ``k`` nearest (the upper Lipschitz bound).
        Near the data an honest learned reward stays under it; one that flatters a state or an
        action next to poorer recorded rewards does not."""
        return self.limits(obs)[1]

    def limits(self, obs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Both caps from one neighbour search: (the bound off the data, the ceiling near it)."""
        d, j = _knn(obs.astype(np.float64) / self.scale, self.points, self.K)
        near = self.rew[j]
        off = np.maximum((near - self.slope * d).max(1), self.floor)
        return off.astype(np.float32), (near + self.slope * d).min(1).astype(np.float32)


def _knn(queries: np.ndarray, points: np.ndarray, k: int, chunk: int = 2048
         ) -> tuple[np.ndarray, np.ndarray]:
    """(q, k) distances and indices of each query's ``k`` nearest points, nearest first."""
    k = min(k, len(points))
    dist = np.empty((len(queries), k), np.float64)
    idx = np.empty((len(queries), k), np.int64)
    p2 = (points**2).sum(1)
    for i in range(0, len(queries), chunk):
        q = queries[i:i + chunk]
        d2 = np.maximum((q**2).sum(1)[:, None] + p2[None] - 2 * q @ points.T, 0)
        j = np.argpartition(d2, k - 1, axis=1)[:, :k] if k < len(points) else \
            np.broadcast_to(np.arange(len(points)), d2.shape)
        dj = np.take_along_axis(d2, j, 1)
        order = np.argsort(dj, 1)
        idx[i:i + chunk] = np.take_along_axis(j, order, 1)
        dist[i:i + chunk] = np.sqrt(np.take_along_axis(dj, order, 1))
    return dist, idx


class EvidenceGatherer:
    """The measuring half of ``JudicialAuditor``: rollouts and scores on real data, no verdicts."""

    task: TaskSpec
    policy: MLPPolicy
    cfg: JudicialConfig

    def evidence(self, candidate: LoRA, *, model: WorldModel, real: RealData,
                 reference: LoRA | None = None, heldout: WorldModel | None = None,
                 trust: TrustModel | None = None) -> Evidence:
        cfg, task = self.cfg, self.task
        trust = trust or TrustModel(model, real, cfg, task)
        lam = self._lambda(real)
        rng = np.random.default_rng(cfg.seed)
        starts = real.obs[rng.integers(0, len(real.obs), cfg.paths)].astype(np.float32)
        dyn = ModelDynamics(model)
        ref = rollout_paths(dyn, task, self.policy, reference, starts, cfg.horizon)
        cand = rollout_paths(dyn, task, self.policy, candidate, starts, cfg.horizon)
        bound = RewardBound(real, trust.scale, cfg.support_points, cfg.seed) \
            if reward_is_learned(task) else None  # one neighbour table for every capped return
        whole = self._episode_starts() if trust.prior is not None or bound is not None else None
        (ref_dis, ref_sup), (cand_dis, cand_sup) = self._trust_along(trust, ref), \
            self._trust_along(trust, cand)
        untrust_r, untrust_c = np.maximum(ref_dis - 1, 0), np.maximum(cand_dis - 1, 0)
        return Evidence(
            ref_returns=ref[2].sum(1), cand_returns=cand[2].sum(1),
            ref_penalized=(ref[2] - lam * untrust_r).sum(1),
            cand_penalized=(cand[2] - lam * untrust_c).sum(1),
            ref_disagreement=ref_dis, cand_disagreement=cand_dis,
            ref_support=ref_sup, cand_support=cand_sup, cand_rewards=cand[2],
            real_rewards=real.rew.astype(np.float32),
            model_rewards_on_real=self._model_rewards(model, real),
            model_error_on_real=self._model_errors(model, real),
            member_gains=self._member_gains(model, starts, candidate, reference),
            heldout_gains=self._member_gains(heldout, starts, candidate, reference)
            if heldout is not None else np.empty(0),
            probe_gains=self._probe_gains(dyn, real, starts, candidate, reference, rng),
            action_change=self._action_change(real, candidate, reference),
            norm_ratios=self._norm_ratios(candidate),
            finite=all(np.isfinite(a).all() and np.isfinite(b).all()
                       for a, b in candidate.factors.values()),
            anchored=not reward_is_learned(task) or trust.prior is not None,
            ref_prior_error=trust.prior_error(ref[0], ref[1]),
            cand_prior_error=trust.prior_error(cand[0], cand[1]),
            **self._supported_returns(trust, bound, ref, cand),
            **self._episode_supported(dyn, trust, bound, whole, candidate, reference),
            prior_error_on_real=self._prior_errors(trust, real),
            **self._prior_returns(trust, bound, whole, candidate, reference),
        )

    def _prior_errors(self, trust: TrustModel, real: RealData) -> np.ndarray:
        if trust.prior is None:
            return np.empty(0, np.float32)
        pred = self.task.project_obs(trust.prior(real.obs, real.act))
        return (np.abs(pred - real.next_obs) / trust.scale).max(-1).astype(np.float32)

    def _episode_starts(self) -> np.ndarray:
        """The environment's reset states that the whole-episode checks start from (whole
        episodes: a failed swing-up shows only late)."""
        from ..basepolicy import _reset_states

        n = max(self.cfg.paths // 2, 1)
        return _reset_states(self.task, self.task.physics(), n, 7_000_000 + self.cfg.seed * n)

    def _whole_episodes(self, dyn: ModelDynamics | _PriorDynamics, starts: np.ndarray,
                        candidate: LoRA, reference: LoRA | None) -> tuple[_Paths, _Paths]:
        """Reference and candidate paths over whole episodes from ``starts``."""
        steps = self.task.episode_steps
        return (rollout_paths(dyn, self.task, self.policy, reference, starts, steps),
                rollout_paths(dyn, self.task, self.policy, candidate, starts, steps))

    def _prior_returns(self, trust: TrustModel, bound: RewardBound | None,
                       starts: np.ndarray | None, candidate: LoRA, reference: LoRA | None
                       ) -> dict[str, np.ndarray]:
        """Reference and candidate in the auditor's identified physics from reset start states
        (a learned reward capped off the real data as in ``_supported_returns``: the prior
        vouches for the dynamics of these episodes, not for the reward they collect)."""
        if trust.prior is None or starts is None:
            return {}
        ref, cand = self._whole_episodes(_PriorDynamics(trust), starts, candidate, reference)
        if bound is not None:
            sup = self._supported_returns(trust, bound, ref, cand)
            return {"prior_ref_returns": sup["ref_supported_returns"],
                    "prior_cand_returns": sup["cand_supported_returns"]}
        return {"prior_ref_returns": ref[2].sum(1), "prior_cand_returns": cand[2].sum(1)}

    def _episode_supported(self, dyn: ModelDynamics, trust: TrustModel, bound: RewardBound | None,
                           starts: np.ndarray | None, candidate: LoRA, reference: LoRA | None
                           ) -> dict[str, np.ndarray]:
        """Learned rewards: whole episodes in the world model from the reset start states, with
        capped rewards (``_supported_returns``)."""
        if bound is None or starts is None:
            return {}
        sup = self._supported_returns(trust, bound, *self._whole_episodes(dyn, starts, candidate,
                                                                          reference))
        return {"ref_episode_supported": sup["ref_supported_returns"],
                "cand_episode_supported": sup["cand_supported_returns"]}

    def _supported_returns(self, trust: TrustModel, bound: RewardBound | None,
                           *paths: tuple[np.ndarray, np.ndarray, np.ndarray]
                           ) -> dict[str, np.ndarray]:
        """Learned rewards: path returns with every reward at a state far from the real data
        (raw nearest-neighbour rule: the prior vouches for dynamics, never for a learned reward)
        capped by what the recorded rewards allow there (``RewardBound``); near the data, every
        reward capped by the most its recorded neighbours allow (``RewardBound.ceiling``: a
        reward flattering actions the device never took next to poorer recorded rewards). ``bound``
        is None when the reward is the task's own."""
        if bound is None:
            return {}
        out = []
        for obs, _, rew in paths:
            n, h = rew.shape
            flat = obs[:, :-1].reshape(n * h, -1)
            far = trust.support_ratio(flat).reshape(n, h) > 1
            off_cap, ceiling = bound.limits(flat)
            cap = np.where(far, off_cap.reshape(n, h), ceiling.reshape(n, h))
            out.append(np.minimum(rew, cap).sum(1))
        return {"ref_supported_returns": out[0], "cand_supported_returns": out[1]}

    def _lambda(self, real: RealData) -> float:
        if self.cfg.penalty_lambda is not None:
            return self.cfg.penalty_lambda
        return float(real.rew.std()) + 1e-6

    def _trust_along(self, trust: TrustModel, paths: tuple[np.ndarray, np.ndarray, np.ndarray]
                     ) -> tuple[np.ndarray, np.ndarray]:
        obs, act, _ = paths  # (N, H+1, od), (N, H, ad)
        n, h = act.shape[:2]
        flat_obs = obs[:, :-1].reshape(n * h, -1)
        dis = trust.disagreement_ratio(flat_obs, act.reshape(n * h, -1)).reshape(n, h)
        sup = trust.support_ratio(obs[:, 1:].reshape(n * h, -1)).reshape(n, h)
        sup = np.where(trust.vouched(obs, act), np.minimum(sup, 1.0), sup)
        return dis, sup

    def _gain(self, dyn: ModelDynamics | OneMember, starts: np.ndarray, candidate: LoRA,
              reference: LoRA | None) -> float:
        h = self.cfg.horizon
        ref = rollout_paths(dyn, self.task, self.policy, reference, starts, h)[2].sum(1)
        cand = rollout_paths(dyn, self.task, self.policy, candidate, starts, h)[2].sum(1)
        return float(np.mean(cand - ref))

    def _member_gains(self, model: WorldModel, starts: np.ndarray, candidate: LoRA,
                      reference: LoRA | None) -> np.ndarray:
        return np.array([self._gain(OneMember(model, m), starts, candidate, reference)
                         for m in range(len(model.members))])

    def _probe_gains(self, dyn: ModelDynamics, real: RealData, starts: np.ndarray, candidate: LoRA,
                     reference: LoRA | None, rng: np.random.Generator) -> np.ndarray:
        scale = self.cfg.probe_sigma * (real.obs.std(0) + 1e-6)
        gains = []
        for _ in range(self.cfg.probe_repeats):
            moved = starts + scale * rng.standard_normal(starts.shape).astype(np.float32)
            moved = self.task.project_obs(moved).astype(np.float32)
            gains.append(self._gain(dyn, moved, candidate, reference))
        return np.array(gains)

    def _model_rewards(self, model: WorldModel, real: RealData) -> np.ndarray:
        if self.task.reward is not None:
            return self.task.reward(real.obs, real.act, real.next_obs).astype(np.float32)
        return model.step_mean(real.obs, real.act)[:, self.task.obs_dim].astype(np.float32)

    def _model_errors(self, model: WorldModel, real: RealData) -> np.ndarray:
        """The median member's one-step miss on real transitions (through ``step_member``, the
        path the planner uses), in real-observation stds (worst observation dimension).

        The median, not the worst member: the check is for a region every member gets wrong
        (disagreement cannot see that). On honest data a lone member misses a few transitions
        near Pendulum's speed clip, and a worst-member rule blocked a third of honest rounds
        (docs/benchmarks.md, "Judicial audit: the model-on-real check"). A lone divergent member
        is what the disagreement and held-out checks are for."""
        scale = real.obs.std(0) + 1e-6
        od = self.task.obs_dim
        errs = [np.abs(self.task.project_obs(model.step_member(m, real.obs, real.act)[:, :od])
                       - real.next_obs) / scale for m in range(len(model.members))]
        return np.median(np.max(np.stack(errs), axis=2), axis=0)  # (members, n) -> (n,)

    def _action_change(self, real: RealData, candidate: LoRA, reference: LoRA | None) -> np.ndarray:
        rng = np.random.default_rng(self.cfg.seed + 1)
        obs = real.obs[rng.choice(len(real.obs), min(4096, len(real.obs)), replace=False)]
        half = 0.5 * (self.policy.act_high - self.policy.act_low)
        diff = self.policy.forward(obs, candidate) - self.policy.forward(obs, reference)
        return (np.abs(diff) / half).max(-1)

    def _norm_ratios(self, candidate: LoRA) -> dict[str, float]:
        out = {}
        for name in candidate.factors:
            w, _ = self.policy.layer(name)
            out[name] = float(np.linalg.norm(candidate.delta(name)) / (np.linalg.norm(w) + 1e-12))
        return out
