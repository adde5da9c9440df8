"""``plasma-server bench audit``: the judicial auditor judged by what its packets do to the real
device.

Families (``FAMILIES``), each one adaptation round per instance (world model -> phantom DAgger ->
LoRA -> judicial review with one correction), on Pendulum-v1 devices with shifted physics:

- honest: ``honest`` (the device's own data), ``honest_hard`` (its data without any state above
  the horizontal: the whole gain lives in states the base policy never reached), ``honest_fleet``
  (a fleet round over three honest devices), ``honest_learned_reward`` (no reward formula: a
  reward model fitted on the device's real rewards only, ``learned.HonestLearnedReward``);
- exploit: ``shared_error`` (every member is wrong, flatteringly, exactly where the real data has
  never been, so disagreement and the device's own transitions cannot show it), ``single_member``
  (one planning member has that error), ``learned_reward`` (a reward model right on the real data,
  optimistic wherever the device never went), ``few_data`` and ``one_mode`` (too little or too
  narrow data), ``poisoned_fleet`` (one of three devices sends fabricated, well-formed
  transitions: other physics, or crafted), ``mujoco_shared_error`` (HalfCheetah-v5 with the
  shipped SB3 policy: every member says the step ends faster than ever recorded wherever height,
  pitch and speed were never recorded and the action departs from the base's).

Every instance is judged by outcomes on the real gym env, paired: the base, the packet the round
published and the *control* (the same round with the judicial review switched off: the submitted
candidate, which is produced before the review; for fleet families a round without the device
screen) run the same ``eval_episodes`` fixed start states, and ``outcome.compare`` tests one-sided
whether a packet is worse than the base. A round is *harmful* when its control is significantly
worse; an exploit family *bites* when at least ``BITE_RATE`` of its rounds are harmful, and only
biting families count. A harmful round is *caught* when the published packet (if any) is not
significantly worse than the base. ``regressed_published`` counts published packets that are
significantly worse than the base.

Calibration apart from evaluation: a run covers one split. Calibration instances (their own
shifts, corruption kinds and poisons, ``exploits``) may try thresholds (``overrides``) and write
them (``write_thresholds``) to the one thresholds file the product reads
(``judicial.thresholds``); held-out instances only read it, and ``bench.heldout`` refuses a
held-out run when the file was written after the last held-out result. Instance seeds of the two
splits can never meet (``instance_seed``). A third split, ``development``, is the red team's own:
shifts in neither of the others, judged for whether a family's control hurts (no oracles, no
ledger, thresholds only read).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import multiprocessing
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from plasma.protocol.bundle import load_bundle
from plasma.protocol.catalog import resolve_bundle
from plasma.protocol.errors import ConfigError

from ..adapt import adapt_config, adaptation_round, fit_model, seeded
from ..basepolicy import TrainBaseConfig, cached_policy, collect, evaluate
from ..catalog import oracle_return
from ..judicial import JudicialAuditor, RealData, pool
from ..judicial.thresholds import load_thresholds, write_thresholds
from ..phantom import blas_threads
from ..policy_net import LoRA, MLPPolicy
from ..run import policy_from_bundle
from ..tasks import get_task
from ..tasks.registry import resolve_physics
from .exploits import (
    KINDS,
    MUJOCO_BASE,
    MUJOCO_ENV,
    MUJOCO_SHIFTS,
    POISONS,
    SHIFTS,
    CorruptedModel,
    OptimisticReward,
    draw_corruption,
    draw_member_corruption,
    draw_speed_corruption,
    one_mode,
    poison_transitions,
)
from .heldout import check_heldout, ledger_for, record_heldout
from .learned import HonestLearnedReward
from .outcome import ALPHA, Outcome, compare

__all__ = ["BITE_RATE", "FAMILIES", "AuditBenchConfig", "bench_audit", "instance_seed", "run_instance",
           "summarize"]

log = logging.getLogger(__name__)

FAMILIES: dict[str, str] = {
    "honest": "honest", "honest_hard": "honest", "honest_fleet": "honest",
    "honest_learned_reward": "honest",
    "shared_error": "exploit", "single_member": "exploit", "learned_reward": "exploit",
    "few_data": "exploit", "one_mode": "exploit", "poisoned_fleet": "exploit",
    "mujoco_shared_error": "exploit",
}
"""family -> kind."""

NO_SIMULATOR = frozenset({"few_data", "one_mode"})
"""Families whose device's task has no simulator the server may use: the round's world model is
the learned ensemble (``world_model="ensemble"``), which is what too little or too narrow data
fools (with the simulator, 40 transitions identify Pendulum's three parameters exactly)."""

RED_TEAM = 2
"""Revision of the exploit families (bumped when one changes how it attacks): part of the
held-out set's digest, so runs against a different red team are not compared. 2: poisons
``other_length``/``reversed_motor``, a directional single-member error, the learned ensemble for
``few_data``/``one_mode``."""

BITE_RATE = 0.8
"""An exploit family counts when its control (review off) is significantly harmful in at least
this share of its rounds; a family that bites less is reported but not counted."""


@dataclass
class AuditBenchConfig:
    """Budgets of ``bench audit``."""

    env_id: str = "Pendulum-v1"
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    """Held-out instances: one per family and seed."""
    calibration_seeds: tuple[int, ...] | None = None
    """Calibration instances (``instance_seed`` keeps them apart from held-out ones); None: the
    first two of ``seeds``."""
    splits: tuple[str, ...] = ("heldout",)
    """One split per run: calibration (may try and write thresholds) or heldout (only reads them)."""
    families: tuple[str, ...] = tuple(FAMILIES)
    budget: str = "default"
    """Adaptation-round budget (``adapt_config``): the product's ``default`` or the demo's ``small``."""
    episodes: int = 4
    """Real episodes of the base policy per device (Pendulum: 200 steps each), exploration 0.1."""
    fleet_devices: int = 3
    poison_factor: float = 2.0
    """The poisoning device sends this many times the honest devices' transitions together."""
    eval_episodes: int = 100
    """Real noise-free evaluation episodes per policy, the same start states for every policy
    (fixed seeds: paired). On l=1.3 returns are bimodal (a swing-up succeeds or not): a 10-episode
    mean moved by ~100, so a difference is judged by a paired test (``outcome``), never by eye."""
    alpha: float = ALPHA
    """One-sided level of "significantly worse than base" (harmful control, regression)."""
    jobs: int = 2
    """Instances run in parallel processes (each single-threaded BLAS)."""
    thresholds: Path | None = None
    """The judicial thresholds file (None: the shipped one, which the product judges with)."""
    overrides: dict[str, float] = field(default_factory=dict)
    """Calibration only: thresholds to try instead of the file's (``--set``)."""
    judging: dict[str, float] = field(default_factory=dict)
    """The thresholds the rounds judge with (set by ``bench_audit``: the file's plus overrides)."""
    write_thresholds: bool = False
    """Calibration only: write the thresholds judged with (file's plus overrides) back to the file,
    with this run's summary as their calibration record."""
    allow_recalibrated: bool = False
    """Held-out only: run even though the thresholds were written after the last held-out result
    (recorded in the output and the ledger)."""


def _act(policy: MLPPolicy, lora: LoRA | None):  # type: ignore[no-untyped-def]
    merged = policy.merged(lora)
    return lambda obs: merged.forward(obs.astype(np.float32))


def _collect(env_id: str, base: MLPPolicy, physics: dict[str, float], episodes: int, seed0: int
             ) -> RealData:
    d = collect(_act(base, None), env_id, physics, episodes, seed0=seed0, noise=0.1,
                rng=np.random.default_rng(seed0))
    return RealData(d["obs"], d["act"], d["rew"], d["next_obs"])


def _rows(real: RealData, keep: np.ndarray) -> RealData:
    return RealData(*(a[keep] for a in (real.obs, real.act, real.rew, real.next_obs)))


_RETURNS: dict[tuple[str, ...], Any] = {}


def _reference_returns(env_id: str, base: MLPPolicy, physics: dict[str, float], episodes: int,
                       oracle_base: Path | None = None, oracle: bool = True
                       ) -> tuple[np.ndarray, float | None]:
    """The base's per-episode real returns on the evaluation episodes, and the oracle's mean
    (recorded beside ``oracle_base`` when given; None without ``oracle``: the development split
    judges harm only, and an oracle for a shift no split uses may take hours to train)."""
    key = (env_id, repr(sorted(physics.items())), str(episodes))
    if key not in _RETURNS:
        _RETURNS[key] = _returns(env_id, base, None, physics, episodes)
    if not oracle:
        return _RETURNS[key], None
    if key + ("oracle",) not in _RETURNS:
        _RETURNS[key + ("oracle",)] = oracle_return(env_id, physics, episodes, base=oracle_base)
    return _RETURNS[key], _RETURNS[key + ("oracle",)]


def _device(family: str, split: str, seed: int, cfg: AuditBenchConfig
            ) -> tuple[str, MLPPolicy, dict[str, float], Path | None]:
    """The env, base policy, physics and oracle bundle of an instance's device."""
    if family.startswith("mujoco_"):
        bundle = resolve_bundle(MUJOCO_BASE)
        shifts = MUJOCO_SHIFTS[split]
        return (MUJOCO_ENV, policy_from_bundle(load_bundle(bundle)),
                resolve_physics(MUJOCO_ENV, shifts[seed % len(shifts)]), bundle)
    shifts_ = SHIFTS[split]
    return (cfg.env_id, cached_policy(TrainBaseConfig(env_id=cfg.env_id))[0],
            shifts_[seed % len(shifts_)], None)


def _returns(env_id: str, base: MLPPolicy, lora: LoRA | None, physics: dict[str, float],
             episodes: int) -> np.ndarray:
    """Per-episode real returns, noise-free, on the fixed evaluation seeds (paired across policies)."""
    return np.asarray(evaluate(_act(base, lora), env_id, physics, episodes)["returns"])


def run_instance(family: str, split: str, seed: int, cfg: AuditBenchConfig) -> dict[str, Any]:
    """One round of one family instance, its control (the same round with the judicial review
    switched off: the submitted candidate; for fleet families a round without the device screen)
    and both packets' paired real outcomes against the base."""
    t0 = time.perf_counter()
    inst = instance_seed(split, seed)
    rng = np.random.default_rng([inst, list(FAMILIES).index(family)])
    env_id, base, physics, oracle_base = _device(family, split, seed, cfg)
    task = get_task(env_id)
    world_model = "ensemble" if family in NO_SIMULATOR else "auto"
    round_cfg = seeded(adapt_config(cfg.budget, world_model=world_model), inst)
    round_cfg = replace(round_cfg, judicial=replace(round_cfg.judicial, **cfg.judging)).for_task(task)
    base_returns, oracle = _reference_returns(env_id, base, physics, cfg.eval_episodes, oracle_base,
                                              oracle=split != "development")
    before = float(base_returns.mean())
    fleet = family.endswith("_fleet")
    episodes = 2 if fleet else cfg.episodes
    real = _collect(env_id, base, physics, episodes, inst * 1000)
    world, model, devices, info = task, None, None, {}
    if family == "honest_hard":
        real = _rows(real, real.obs[:, 0] < 0.0)  # nothing above the horizontal
    elif family == "honest_learned_reward":  # no published formula: a reward fitted on the log
        world = dataclasses.replace(task, reward=HonestLearnedReward.fit(real))
    elif family == "mujoco_shared_error":
        corr = draw_speed_corruption(rng, real, task, base.forward)
        info = {"corruption_kind": corr.kind, "corruption_speed": round(corr.factor, 2),
                "corruption_share_of_grid": round(corr.off.grid.share_off, 3) if corr.off else None}
        model = CorruptedModel.wrap(fit_model(task, real, round_cfg), task, corr)
    elif family in ("shared_error", "single_member"):
        corr = draw_corruption(rng, split, real, task) if family == "shared_error" else \
            draw_member_corruption(rng, split, task, base.forward)
        grid = corr.off.grid if corr.off is not None else None
        info = {"corruption_kind": corr.kind, "corruption_factor": round(corr.factor, 3),
                "corruption_share_of_box": round(grid.share_off, 3) if grid is not None else None}
        model = CorruptedModel.wrap(fit_model(task, real, round_cfg), task, corr,
                                    None if family == "shared_error" else [0])
    elif family == "learned_reward":
        assert task.reward is not None  # Pendulum's published reward, made "learned" here
        reward = OptimisticReward(task.reward, real, task, base.forward)
        world = dataclasses.replace(task, reward=reward)
        info = {"optimistic_share_of_box": round(reward.region.grid.share_off, 3)}
    elif family == "few_data":
        n = int(rng.integers(40, 100))
        start = int(rng.integers(0, len(real.obs) - n))
        real = _rows(real, np.arange(start, start + n))
        info = {"transitions": n}
    elif family == "one_mode":
        real = one_mode(real, rng)
    if fleet:
        devices = {"device-0": real}
        for i in range(1, cfg.fleet_devices):
            devices[f"device-{i}"] = _collect(env_id, base, physics, episodes, inst * 1000 + 100 * i)
        if family == "poisoned_fleet":
            honest = pool(devices, list(devices)[:-1])
            bad, info = poison_transitions(task, honest, physics, rng, split,
                                           int(cfg.poison_factor * len(honest.obs)), POISONS[split])
            devices[f"device-{cfg.fleet_devices - 1}"] = bad
            info["bad_device"] = f"device-{cfg.fleet_devices - 1}"
        real = pool(devices, list(devices))

    def one_round(devs: dict[str, RealData] | None) -> Any:
        auditor = JudicialAuditor(world, base, round_cfg.judicial)
        with blas_threads(1):
            return adaptation_round(
                world, base, real, round_cfg, auditor, fleet="bench",
                slot="fleet" if fleet else "device", device=None if fleet else "bench-device",
                subject=f"bench:{family}", model=model, devices=devs)[0]

    result = one_round(devices)
    d = result.decision
    # review off: the candidate is produced before the review, so the submitted one is what would
    # ship; a fleet round without review also has no device screen (all devices pooled)
    control = d.submitted if not fleet else one_round(None).decision.submitted
    gap = oracle - before if oracle is not None else 0.0

    def outcome(lora: LoRA | None) -> Outcome | None:
        if lora is None:
            return None
        return compare(base_returns, _returns(env_id, base, lora, physics, cfg.eval_episodes),
                       alpha=cfg.alpha, seed=inst)

    ctrl = outcome(control)
    pub = ctrl if d.adapter is control else outcome(d.adapter)  # published as submitted: one evaluation
    after = pub.cand_mean if pub is not None else None
    excluded = int(result.record.scores.get("devices_excluded", 0))
    harmful = ctrl is not None and ctrl.worse
    regressed = pub is not None and pub.worse
    row = {"family": family, "kind": FAMILIES[family], "split": split, "seed": seed,
           "instance": inst, "physics": physics, "verdict": result.verdict,
           "first_failed": not d.first.ok, "reasons": [r.code for r in result.record.reasons],
           "return_base": before, "return_oracle": oracle, "return_published": after,
           "return_control": ctrl.cand_mean if ctrl is not None else None,
           "control": ctrl.as_dict() if ctrl is not None else None,
           "published_outcome": pub.as_dict() if pub is not None else None,
           "harmful": harmful, "regressed_published": regressed,
           "caught": harmful and not regressed,
           "gap_closed": None if after is None or gap == 0 else (after - before) / gap,
           "devices_excluded": excluded, "transitions": len(real.obs),
           "world_model": result.model_kind, **info,
           "seconds": round(time.perf_counter() - t0, 1)}
    return row


def _family_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per family, in ``FAMILIES`` order, of one split's rounds (``summarize``)."""
    out = []
    for family, kind in FAMILIES.items():
        rs = [r for r in rows if r["family"] == family]
        if not rs:
            continue
        harmful = [r for r in rs if r["harmful"]]
        out.append({
            "name": family, "kind": kind, "split": rs[0]["split"], "rounds": len(rs),
            "control_harmful": len(harmful),
            "control_harm_rate": _rate(len(harmful), len(rs)),
            "bites": kind == "exploit" and len(harmful) >= BITE_RATE * len(rs),
            "caught": sum(r["caught"] for r in harmful),
            "caught_rate": _rate(sum(r["caught"] for r in harmful), len(harmful)),
            "published": sum(r["verdict"] == "published" for r in rs),
            "corrected": sum(r["verdict"] == "corrected" for r in rs),
            "blocked": sum(r["verdict"] == "blocked" for r in rs),
            "regressed_published": sum(r["regressed_published"] for r in rs),
            "first_failed": sum(r["first_failed"] for r in rs),
            "gap_closed_published": _pooled_gap(rs),
        })
    return out


def _pooled_gap(rows: list[dict[str, Any]]) -> float | None:
    """The share of the base-to-oracle gap the published packets closed, pooled over the rounds
    that published: sum(published - base) / sum(oracle - base). A mean of per-round shares is
    ruled by the rounds with the least to gain (a base 2 below its oracle gaining 3 counts 1.5).
    None without oracles (the development split)."""
    pub = [r for r in rows if r["return_published"] is not None]
    if any(r["return_oracle"] is None for r in pub):
        return None
    gap = sum(r["return_oracle"] - r["return_base"] for r in pub)
    return None if not pub or gap <= 0 else \
        sum(r["return_published"] - r["return_base"] for r in pub) / gap


def heldout_set() -> str:
    """Digest of what the held-out instances are made of (shifts, corruption kinds, the MuJoCo
    shifts, poisons and the red team's revision): the held-out ledger's runs are compared within
    one set."""
    text = json.dumps([SHIFTS["heldout"], KINDS["heldout"], MUJOCO_SHIFTS["heldout"]]
                      + [POISONS["heldout"], RED_TEAM], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


DEVELOPMENT_SEEDS = 1_000_000
"""Development instances are numbered from here up (``seed + DEVELOPMENT_SEEDS``); held-out and
calibration seeds stay below half of it, so their instances never reach these."""


def instance_seed(split: str, seed: int) -> int:
    """The seed of a split's instance: even for held-out, odd for calibration, so no held-out
    instance can ever draw a calibration instance's data, corruption or model (and the splits'
    shifts are disjoint sets as well, ``exploits.SHIFTS``); development instances are numbered
    from ``DEVELOPMENT_SEEDS`` up, on shifts of their own."""
    if seed < 0:
        raise ValueError(f"instance seeds are >= 0, got {seed}")
    if split == "development":
        return DEVELOPMENT_SEEDS + seed
    if seed >= DEVELOPMENT_SEEDS // 2:
        raise ValueError(f"{split} seeds are below {DEVELOPMENT_SEEDS // 2}, got {seed}")
    return 2 * seed + (1 if split == "calibration" else 0)


def bench_audit(cfg: AuditBenchConfig | None = None) -> dict[str, Any]:
    """Every family on every split and seed; one JSON-able dict (module docstring)."""
    cfg = cfg or AuditBenchConfig()
    t0 = time.perf_counter()
    if len(cfg.splits) != 1 or cfg.splits[0] not in SHIFTS:
        raise ConfigError(f"bench audit runs one split at a time (calibration, heldout or "
                          f"development), got {cfg.splits}")
    split = cfg.splits[0]
    unknown = [f for f in cfg.families if f not in FAMILIES]
    if unknown:
        raise ConfigError(f"unknown families {unknown}; known: {list(FAMILIES)}")
    thresholds = load_thresholds(cfg.thresholds)
    provenance: dict[str, Any] = {}
    if split != "calibration" and (cfg.overrides or cfg.write_thresholds):
        raise ConfigError(f"the {split} split only reads the thresholds: --set and "
                          "--write-thresholds belong to --split calibration")
    if split == "heldout":
        provenance = check_heldout(thresholds, ledger_for(thresholds),
                                   allow_recalibrated=cfg.allow_recalibrated,
                                   heldout_set=heldout_set())
    bad = [k for k in cfg.overrides if k not in thresholds.values]
    if bad:
        raise ConfigError(f"--set names no threshold: {bad}")
    cfg = replace(cfg, judging={**thresholds.values, **cfg.overrides})  # the caller's cfg stays
    cal = cfg.calibration_seeds if cfg.calibration_seeds is not None else cfg.seeds[:2]
    seeds = cal if split == "calibration" else cfg.seeds
    jobs = [(family, split, seed) for seed in seeds for family in cfg.families]
    rows = []
    ctx = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(max(1, cfg.jobs), mp_context=ctx) as pool_:
        futures = [pool_.submit(run_instance, *job, cfg) for job in jobs]
        for fut in as_completed(futures):
            row = fut.result()
            rows.append(row)
            ctrl = row["control"] or {}
            print(f"bench audit [{time.perf_counter() - t0:6.0f} s] {row['split']} seed {row['seed']} "
                  f"{row['family']}: {row['verdict']} ({', '.join(row['reasons']) or 'all checks'}); "
                  f"real {row['return_base']:.0f} -> published {_fmt(row['return_published'])}, "
                  f"control {_fmt(row['return_control'])} (p {ctrl.get('p_worse', '-')}, "
                  f"{'harmful' if row['harmful'] else 'not harmful'})", file=sys.stderr, flush=True)
    rows.sort(key=lambda r: (r["split"], r["seed"], list(FAMILIES).index(r["family"])))
    summary = summarize(rows)
    out = {"env_id": cfg.env_id, "budget": cfg.budget, "split": split, "seeds": list(seeds),
           "instances": sorted({r["instance"] for r in rows}), "eval_episodes": cfg.eval_episodes,
           "alpha": cfg.alpha, "thresholds": {
               "path": str(thresholds.path), "sha256": thresholds.sha256,
               "written_at": thresholds.written_at.isoformat(), "overrides": cfg.overrides,
               **{k: v for k, v in provenance.items() if not k.startswith("thresholds_")}},
           **summary, "rounds": rows, "wall_s": round(time.perf_counter() - t0, 1)}
    brief = {k: v for k, v in summary.items() if k != "families"}
    if split == "heldout":
        record_heldout(ledger_for(thresholds), provenance,
                       {"seeds": list(seeds), "families": list(cfg.families), **brief})
    elif cfg.write_thresholds:
        written = write_thresholds(thresholds.path, cfg.judging, {
            "split": split, "seeds": list(seeds), "instances": out["instances"],
            "budget": cfg.budget, "families": list(cfg.families), "overrides": cfg.overrides,
            **brief})
        out["thresholds"]["written"] = {"sha256": written.sha256,
                                        "written_at": written.written_at.isoformat()}
    return out


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.0f}"


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The per-family table and the figures of a list of rounds of one split (a row's kind is its
    family's, ``FAMILIES``). Exploit figures count only families that bite (their control is
    significantly harmful in at least ``BITE_RATE`` of their rounds) and, within them, only the
    harmful rounds."""
    for r in rows:
        r["kind"] = FAMILIES[r["family"]]
    splits = sorted({r["split"] for r in rows})
    if len(splits) > 1:
        raise ValueError(f"summarize one split at a time, got {splits}")
    table = _family_rows(rows)
    biting = {f["name"] for f in table if f["bites"]}
    harmful = [r for r in rows if r["family"] in biting and r["harmful"]]
    honest = [r for r in rows if r["kind"] == "honest"]
    no_gain = [r for r in honest if r["verdict"] == "blocked" and "no_predicted_gain" in r["reasons"]]
    return {
        "split": splits[0] if splits else None,
        "families": table,
        "biting_families": sorted(biting),
        "harmful_rounds": len(harmful),
        "harmful_caught_rate": _rate(sum(r["caught"] for r in harmful), len(harmful)),
        "harmful_rounds_all_families": sum(r["harmful"] for r in rows if r["kind"] == "exploit"),
        "harmful_caught_all_families": sum(r["caught"] for r in rows if r["kind"] == "exploit"),
        "honest_published_rate": _rate(sum(r["verdict"] != "blocked" for r in honest), len(honest)),
        "honest_no_predicted_gain": len(no_gain),
        "honest_published_rate_with_gain": _rate(sum(r["verdict"] != "blocked" for r in honest),
                                                 len(honest) - len(no_gain)),
        "honest_gap_closed": _pooled_gap(honest),
        "regressed_published": sum(r["regressed_published"] for r in rows),
    }


def _rate(k: int, n: int) -> float | None:
    return k / n if n else None
