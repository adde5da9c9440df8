"""Server stage 5: candidate adapter -> Decision (published, corrected or blocked) with its AuditRecord."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import numpy as np

from plasma.protocol import AuditRecord, Slot

from ..policy_net import LoRA, MLPPolicy
from ..tasks import TaskSpec
from ..worldmodel import WorldModel
from .checks import Judgement, _reason, run_checks
from .config import JudicialConfig, RealData, Redistill, StateFilter
from .evidence import EvidenceGatherer
from .trust import TrustModel

__all__ = ["Decision", "JudicialAuditor"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Decision:
    """What to do with a candidate, and the record saying why."""

    verdict: str
    """published, corrected or blocked."""
    adapter: LoRA | None
    """The adapter to publish (None when blocked)."""
    record: AuditRecord
    first: Judgement
    """The audit of the submitted candidate."""
    submitted: LoRA | None = None
    """The candidate as submitted."""
    corrected: LoRA | None = None
    """The candidate distilled again under the penalty, if a correction ran."""
    second: Judgement | None = None
    """The audit of the corrected candidate, if a correction was tried."""

    @property
    def candidate(self) -> LoRA | None:
        """The last candidate audited, published or not."""
        return self.corrected if self.corrected is not None else self.submitted


class JudicialAuditor(EvidenceGatherer):
    """Audits candidates for one task and base policy against a world model and real data."""

    def __init__(self, task: TaskSpec, policy: MLPPolicy, cfg: JudicialConfig | None = None
                 ) -> None:
        self.task, self.policy = task, policy
        self.cfg = cfg or JudicialConfig()

    # ------------------------------------------------------------------ verdicts
    def audit(self, candidate: LoRA, *, model: WorldModel, real: RealData,
              reference: LoRA | None = None, heldout: WorldModel | None = None,
              trust: TrustModel | None = None) -> Judgement:
        ev = self.evidence(candidate, model=model, real=real, reference=reference, heldout=heldout,
                           trust=trust)
        return run_checks(ev, self.cfg)

    def penalized_task(self, trust: TrustModel, real: RealData) -> TaskSpec | None:
        """The task with MOPO's r - lambda * untrust as reward (None if the reward is learned)."""
        reward = self.task.reward
        if reward is None:
            return None
        lam = self._lambda(real)

        def penalized(obs: np.ndarray, act: np.ndarray, next_obs: np.ndarray) -> np.ndarray:
            return reward(obs, act, next_obs) - lam * trust.untrust_fast(obs, act)

        return dataclasses.replace(self.task, reward=penalized)

    def state_filter(self, trust: TrustModel) -> StateFilter:
        """Keep label states where members agree (under the base action) and near real data."""
        def keep(states: np.ndarray) -> np.ndarray:
            states = states.astype(np.float32)
            return trust.trusted_states(states, self.policy.forward(states), self.cfg.drop_support)
        return keep

    def review(self, candidate: LoRA, *, model: WorldModel, real: RealData, fleet: str,
               slot: Slot, device: str | None = None, reference: LoRA | None = None,
               heldout: WorldModel | None = None, redistill: Redistill | None = None,
               subject: str = "candidate") -> Decision:
        """Audit; if only correctable checks fail, redistill once under the penalty and re-audit."""
        trust = TrustModel(model, real, self.cfg, self.task)
        first = self.audit(candidate, model=model, real=real, reference=reference,
                           heldout=heldout, trust=trust)
        if first.ok:
            return self._decide("published", candidate, first, None, fleet, slot, device, subject,
                                candidate, None)
        task = self.penalized_task(trust, real)
        if not first.correctable or redistill is None or task is None:
            return self._decide("blocked", None, first, None, fleet, slot, device, subject,
                                candidate, None)
        log.info("judicial: %s failed %s; distilling again under the uncertainty penalty",
                 subject, ", ".join(r.code for r in first.reasons))
        corrected = redistill(task, self.state_filter(trust))
        second = self.audit(corrected, model=model, real=real, reference=reference,
                            heldout=heldout, trust=trust)
        if second.ok:
            return self._decide("corrected", corrected, first, second, fleet, slot, device,
                                subject, candidate, corrected)
        return self._decide("blocked", None, first, second, fleet, slot, device, subject,
                            candidate, corrected)

    def _decide(self, verdict: str, adapter: LoRA | None, first: Judgement,
                second: Judgement | None, fleet: str, slot: Slot, device: str | None,
                subject: str, submitted: LoRA, corrected: LoRA | None) -> Decision:
        final = second or first
        reasons = list(final.reasons)
        if second is not None:  # keep what the first audit found: it is why a correction ran
            reasons = [_reason(r.code, r.check, "before correction: " + r.message)
                       for r in first.reasons] + reasons
        scores = dict(final.scores)
        if second is not None:
            scores.update({f"first_{k}": v for k, v in first.scores.items()})
        record = AuditRecord(auditor="judicial", subject=subject[:256], fleet=fleet, device=device,
                             slot=slot, verdict=verdict,  # type: ignore[arg-type]
                             reasons=tuple(reasons[:64]), scores=scores)
        log.info("judicial: %s %s (%s)", subject, verdict,
                 ", ".join(r.code for r in final.reasons) or "all checks passed")
        return Decision(verdict, adapter, record, first, submitted, corrected, second)
