"""Server stage 5: candidate adapter -> AuditRecord; reward hacking is corrected or blocked.

Reward hacking here means phantom-path gain that comes from where the world model cannot be
trusted. The auditor measures the gain itself (it does not take the producer's word): it
rolls the reference policy (base + the slot's current adapter) and the candidate from the
same real start states through the same members, then asks where the gain comes from.

Each check is a small function of an ``Evidence`` value returning ``(Reason | None, scores)``
(Gymnasium's ``check_env`` shape; never ``assert``):

===========================  ==========================================================
check                        flags when
===========================  ==========================================================
``norms``                    factors not finite, or ||dW|| / ||W|| of a layer too large
``gain``                     no predicted gain at all (nothing worth shipping)
``disagreement``             candidate paths run where members disagree far more than on
                             the real data (ratio to the real-data 95th percentile)
``support``                  many candidate path states far from every real state (nearest-
                             neighbour distance in real-std units vs the real data's own),
                             whoever drives them there: with few data even the reference's
                             paths leave the support, and the whole comparison is untrusted.
                             With a simulator in the task, a path state also counts as
                             supported when every transition leading to it matches the
                             nominal simulator at physics the auditor identifies itself on
                             the real data (``vouch_prior``): the prior carries the support
                             there, and a corrupted transition ends it
``penalized_gain``           most of the gain disappears under MOPO's r - lambda * u, with
                             u the disagreement in excess of the real-data level (support
                             distance is not in u: measured on Pendulum, an honest gain
                             lives in states the base policy never reached, e.g. balanced
                             upright, where the members still agree)
``reward_spikes``            path rewards above anything the device ever recorded
``reward_model``             the reward the paths use differs from recorded real rewards
``reward_support``           (learned rewards only) the gain does not survive capping path
                             rewards at states far from every real state by what the recorded
                             rewards nearby allow (``RewardBound``: their value less their
                             measured slope times the distance, at worst the worst recorded
                             reward): a reward model is only trusted where it was fitted;
                             and over whole episodes in the world model from the env's reset
                             states, with those capped rewards, the candidate loses more than
                             ``max_prior_loss`` of the reference
``model_on_real``            the dynamics the paths use (median member) contradict the
                             device's own recorded transitions (a corrupted or poisoned region
                             that all members share: disagreement cannot see it)
``model_on_prior``           (tasks with a simulator) candidate paths run through transitions
                             that contradict the nominal simulator at physics the auditor
                             identifies itself on the real data, more than the reference's
                             paths do (a corrupted region the data never visited: neither
                             disagreement nor the real transitions can see it)
``prior_gain``               (tasks with a simulator) in the auditor's own identified physics,
                             over whole episodes from the environment's reset states, the
                             candidate is worse than the reference (a narrow log audits only its states)
``heldout_members``          the gain does not hold under ensemble members the producer
                             never planned with (docs/design.md section 7: an adapter tuned
                             on one member kept its predicted return while the real one
                             fell, and mean disagreement did not move)
``probing``                  the gain vanishes when start states are perturbed slightly
``replay``                   on recorded real states the candidate's actions move too far
                             from the reference's
===========================  ==========================================================

Self-correction (``JudicialAuditor.review``): if only correctable checks fail, the producer
is asked to distill again with an uncertainty-penalized reward (MOPO) and with untrusted
label states (members disagree, or far outside the real data) dropped; the new candidate
is audited from scratch. Verdicts: ``published``
(passed), ``corrected`` (passed after correction), ``blocked``.

Fleet rounds (``fleet``): devices whose transitions contradict the physics the other devices
agree on are excluded from the round's data (the record names them), and an approved fleet
candidate must not hurt any kept device in that device's own identified physics.
"""

from .auditor import Decision, JudicialAuditor
from .checks import (
    CHECKS,
    NOT_CORRECTABLE,
    CheckResult,
    Judgement,
    check_disagreement,
    check_gain,
    check_heldout_members,
    check_model_on_prior,
    check_model_on_real,
    check_norms,
    check_penalized_gain,
    check_prior_gain,
    check_probing,
    check_replay,
    check_reward_model,
    check_reward_spikes,
    check_reward_support,
    check_support,
    run_checks,
)
from .config import JudicialConfig, RealData, Redistill, StateFilter, UntrustFn, reward_is_learned
from .evidence import Evidence, EvidenceGatherer
from .fleet import DeviceScreen, fleet_decision, hurt_devices, judge_devices, pool, screen_devices
from .paths import member_view, rollout_paths, split_members
from .trust import TrustModel

__all__ = ["CHECKS", "NOT_CORRECTABLE", "CheckResult", "Decision", "DeviceScreen", "Evidence",
           "EvidenceGatherer",
           "JudicialAuditor", "JudicialConfig", "Judgement", "RealData", "Redistill",
           "StateFilter", "TrustModel", "UntrustFn", "check_disagreement", "check_gain",
           "check_heldout_members", "check_model_on_prior", "check_model_on_real", "check_norms",
           "check_penalized_gain", "check_prior_gain",
           "check_probing", "check_replay", "check_reward_model", "check_reward_spikes", "check_reward_support",
           "check_support", "fleet_decision", "hurt_devices", "judge_devices", "member_view", "pool",
           "reward_is_learned", "rollout_paths", "run_checks", "screen_devices", "split_members"]
