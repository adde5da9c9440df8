"""``plasma-server bench audit``: does the judicial audit ship honest gains and stop hacking?

Three scenarios on one device world (Pendulum-v1 with m=1.6, g=12), each one adaptation
round (world model -> phantom DAgger -> LoRA -> judicial review with one correction):

- ``honest``: the ensemble fitted on the device's real transitions.
- ``exploit``: the same ensemble with a corrupted region that every member shares (so
  disagreement cannot see it): braking hard while spinning (torque < -1 at angular
  velocity > 2, never done in the real data: the base policy pumps energy) "teleports" the
  pendulum upright and at rest, the highest reward there is. The planner exploits it.
  (Why this region: docs/benchmarks.md, "Judicial audit: the exploit scenario".)
- ``few_data``: the ensemble fitted on a handful of transitions.

``return_after`` is the REAL return (gym env, fixed evaluation seeds) with the final
candidate applied, whether it was published or not; the target is that the honest
packet is published and helps, and that no published packet lowers the real return.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from ..adapt import AdaptConfig, Model, adapt_config, adaptation_round, fit_model, seeded
from ..basepolicy import TrainBaseConfig, cached_policy, collect, evaluate
from ..judicial import JudicialAuditor, JudicialConfig, RealData
from ..policy_net import LoRA, MLPPolicy
from ..tasks import TaskSpec, get_task

__all__ = ["AuditBenchConfig", "bench_audit", "TeleportModel"]

log = logging.getLogger(__name__)


@dataclass
class AuditBenchConfig:
    """Budgets of ``bench audit`` (defaults: about two minutes on two cores)."""

    env_id: str = "Pendulum-v1"
    """Device world."""
    physics: dict[str, float] = field(default_factory=lambda: {"m": 1.6, "g": 12.0})
    """The device's (shifted) physics."""
    episodes: int = 4
    """Real episodes collected with the base policy (Pendulum: 200 steps each)."""
    few_transitions: int = 60
    """Transitions the ``few_data`` world model is fitted on."""
    corrupt_speed: float = 2.0
    """The corrupted region: angular velocity above this..."""
    corrupt_torque: float = -1.0
    """...and torque below this (braking): the model predicts upright at rest."""
    eval_episodes: int = 10
    """Real evaluation episodes per policy, fixed seeds."""
    round: AdaptConfig = field(default_factory=lambda: adapt_config("default"))
    """Adaptation-round budgets: those of ``plasma-server run --budget default`` (its world model
    too: the identified physics prior for Pendulum; ``adapt_config(world_model="ensemble")`` for
    the learned ensemble)."""
    judicial: JudicialConfig = field(default_factory=JudicialConfig)
    """Auditor thresholds."""
    scenarios: tuple[str, ...] = ("honest", "exploit", "few_data")
    """Which scenarios to run."""
    seed: int = 0
    """Seed of collection and of every round."""


class TeleportModel:
    """Mixin of a fitted Pendulum model (ensemble or physics prior) whose every member teleports
    to upright-at-rest in a region; ``wrap`` makes a corrupted copy of any fitted model."""

    region: tuple[float, float] = (2.0, -1.0)
    """(angular velocity above, torque below)."""

    @classmethod
    def wrap(cls, model: Model, region: tuple[float, float]) -> Model:
        corrupted = copy.copy(model)  # shares the fitted members and normalization
        corrupted.__class__ = type(f"Teleport{type(model).__name__}", (cls, type(model)), {})
        corrupted.region = region  # type: ignore[attr-defined]
        return corrupted

    def _teleport(self, obs: np.ndarray, act: np.ndarray, out: np.ndarray) -> np.ndarray:
        speed, torque = self.region
        hit = (obs[:, 2] > speed) & (act[:, 0] < torque)
        out[hit, :3] = (1.0, 0.0, 0.0)
        return out

    def step_member(self, member: int, obs: np.ndarray, act: np.ndarray) -> np.ndarray:
        return self._teleport(obs, act, super().step_member(member, obs, act))  # type: ignore[misc]

    def step_mean(self, obs: np.ndarray, act: np.ndarray) -> np.ndarray:
        return self._teleport(obs, act, super().step_mean(obs, act))  # type: ignore[misc]


def _act(policy: MLPPolicy, lora: LoRA | None):  # type: ignore[no-untyped-def]
    merged = policy.merged(lora)
    return lambda obs: merged.forward(obs.astype(np.float32))


def bench_audit(cfg: AuditBenchConfig | None = None) -> dict[str, Any]:
    """Run the scenarios; returns ``{"scenarios": [...], ...}`` (see the module docstring)."""
    cfg = _seeded(cfg or AuditBenchConfig())
    t0 = time.perf_counter()
    task = get_task(cfg.env_id)
    base = cached_policy(TrainBaseConfig(env_id=cfg.env_id))[0]
    data = collect(_act(base, None), cfg.env_id, cfg.physics, cfg.episodes, seed0=cfg.seed * 1000,
                   noise=0.1, rng=np.random.default_rng(cfg.seed))
    real = RealData(data["obs"], data["act"], data["rew"], data["next_obs"])
    before = evaluate(_act(base, None), cfg.env_id, cfg.physics, cfg.eval_episodes)
    model = fit_model(task, real, cfg.round)  # honest and exploit share the fitted model
    out = []
    for name in cfg.scenarios:
        world, rows, fitted = task, real, model
        if name == "exploit":
            fitted = TeleportModel.wrap(model, (cfg.corrupt_speed, cfg.corrupt_torque))
        elif name == "few_data":
            rows = RealData(*(a[:cfg.few_transitions] for a in
                              (real.obs, real.act, real.rew, real.next_obs)))
            fitted = None
        out.append(_scenario(name, world, base, rows, fitted, cfg, before["mean"]))
    return {"env_id": cfg.env_id, "physics": dict(cfg.physics), "real_transitions": len(real.obs),
            "eval_episodes": cfg.eval_episodes, "return_before_sem": before["sem"],
            "scenarios": out, "wall_s": time.perf_counter() - t0}


def _seeded(cfg: AuditBenchConfig) -> AuditBenchConfig:
    """One seed for everything: collection, world model, planner, distiller and auditor."""
    return replace(cfg, round=seeded(cfg.round, cfg.seed), judicial=replace(cfg.judicial, seed=cfg.seed))


def _scenario(name: str, world: TaskSpec, base: MLPPolicy, real: RealData,
              model: Model | None, cfg: AuditBenchConfig, before: float) -> dict[str, Any]:
    t0 = time.perf_counter()
    auditor = JudicialAuditor(world, base, cfg.judicial)
    result, _, _ = adaptation_round(world, base, real, cfg.round, auditor, fleet="bench",
                                    slot="device", device="bench-device", subject=f"bench:{name}",
                                    model=model)
    decision = result.decision
    after = evaluate(_act(base, decision.candidate), cfg.env_id, cfg.physics, cfg.eval_episodes)
    record = result.record
    row = {"name": name, "published": result.verdict in ("published", "corrected"),
           "verdict": result.verdict, "return_before": before, "return_after": after["mean"],
           "return_after_sem": after["sem"], "reasons": [r.code for r in record.reasons],
           "scores": {k: round(v, 4) for k, v in record.scores.items()},
           "transitions": len(real.obs), "seconds": time.perf_counter() - t0}
    if decision.corrected is not None:  # what the submitted candidate would have done for real
        row["return_submitted"] = evaluate(_act(base, decision.submitted), cfg.env_id,
                                           cfg.physics, cfg.eval_episodes)["mean"]
    log.info("bench audit %s: %s, real return %.1f -> %.1f (%s)", name, result.verdict, before,
             after["mean"], ", ".join(row["reasons"]) or "no reasons")
    return row
