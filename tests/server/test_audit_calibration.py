"""Calibration apart from evaluation, by construction: one thresholds file that only calibration
writes, a held-out gate that refuses thresholds written after its last result, instance seeds
that can never meet, and a paired test that tells noise from harm."""

from __future__ import annotations

import json
from dataclasses import fields
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest

from plasma.protocol.errors import ConfigError
from plasma.server.bench import audit
from plasma.server.bench.audit import AuditBenchConfig, bench_audit, instance_seed
from plasma.server.bench.exploits import RETIRED, SHIFTS
from plasma.server.bench.heldout import HeldoutRefused, check_heldout, ledger_for, record_heldout
from plasma.server.bench.outcome import compare, one_sided_p
from plasma.server.judicial import JudicialConfig
from plasma.server.judicial.thresholds import (
    SHIPPED,
    THRESHOLDS,
    ThresholdsError,
    load_thresholds,
    write_thresholds,
)


def test_the_shipped_file_holds_every_threshold_and_the_config_reads_it() -> None:
    shipped = load_thresholds()
    assert set(shipped.values) == set(THRESHOLDS)
    cfg = JudicialConfig()
    for name in THRESHOLDS:
        assert getattr(cfg, name) == shipped.values[name], name
    # every field of the config that is not a budget or an on/off switch is a threshold in the file
    budgets = {"paths", "horizon", "seed", "probe_repeats", "support_points", "device_paths",
               "penalty_lambda", "vouch_prior", "allow_unanchored"}
    assert {f.name for f in fields(JudicialConfig)} - budgets == set(THRESHOLDS)


def _copy(tmp_path: Path) -> Path:
    path = tmp_path / "thresholds.json"
    path.write_bytes(SHIPPED.read_bytes())
    return path


def test_a_malformed_thresholds_file_is_a_typed_error(tmp_path: Path) -> None:
    path = _copy(tmp_path)
    doc = json.loads(path.read_text())
    del doc["thresholds"]["max_prior_loss"]
    path.write_text(json.dumps(doc))
    with pytest.raises(ThresholdsError, match="max_prior_loss"):
        load_thresholds(path)
    path.write_text("{not json")
    with pytest.raises(ThresholdsError):
        load_thresholds(path)


def test_heldout_refuses_thresholds_written_after_its_last_result(tmp_path: Path) -> None:
    path = _copy(tmp_path)
    t0 = datetime(2026, 12, 7, 10, 0, tzinfo=timezone.utc)
    th = write_thresholds(path, load_thresholds(path).values, {"split": "calibration"}, now=t0)
    ledger = ledger_for(th)
    prov = check_heldout(th, ledger)  # no held-out result yet
    assert prov["recalibrated_after_heldout"] is False
    record_heldout(ledger, prov, {"regressed_published": 0}, now=t0 + timedelta(hours=1))
    assert check_heldout(th, ledger)["previous_heldout_at"]  # the same thresholds: fine
    # calibration writes again after the held-out result was seen
    th2 = write_thresholds(path, {**th.values, "max_prior_loss": 0.05}, {"split": "calibration"},
                           now=t0 + timedelta(hours=2))
    with pytest.raises(HeldoutRefused, match="after the last held-out result"):
        check_heldout(th2, ledger)
    prov2 = check_heldout(th2, ledger, allow_recalibrated=True)
    assert prov2["recalibrated_after_heldout"] is True
    entry = record_heldout(ledger, prov2, {}, now=t0 + timedelta(hours=3))
    assert json.loads(ledger.read_text())["runs"][-1] == entry
    # fresh held-out instances (a new set) have no result yet: no threshold was chosen after them
    assert check_heldout(th2, ledger, heldout_set="fresh")["recalibrated_after_heldout"] is False


def test_the_heldout_split_never_writes_or_overrides_thresholds(tmp_path: Path) -> None:
    path = _copy(tmp_path)
    before = path.read_bytes()
    for bad in (dict(overrides={"max_prior_loss": 0.5}), dict(write_thresholds=True)):
        with pytest.raises(ConfigError, match="only reads"):
            bench_audit(AuditBenchConfig(splits=("heldout",), thresholds=path, **bad))  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="one split"):
        bench_audit(AuditBenchConfig(splits=("calibration", "heldout"), thresholds=path))
    assert path.read_bytes() == before


def test_a_heldout_run_judges_with_the_file_and_records_itself(tmp_path: Path, monkeypatch) -> None:
    path = _copy(tmp_path)
    seen: list[tuple[str, int, dict[str, float]]] = []

    def fake_instance(family: str, split: str, seed: int, cfg: AuditBenchConfig) -> dict:
        seen.append((split, instance_seed(split, seed), dict(cfg.judging)))
        return {"family": family, "split": split, "seed": seed, "instance": instance_seed(split, seed),
                "verdict": "blocked", "reasons": [], "return_base": -400.0,
                "return_published": None, "return_control": -900.0, "control": {"p_worse": 0.0},
                "harmful": True, "regressed_published": False, "caught": True, "gap_closed": None,
                "first_failed": True}

    monkeypatch.setattr(audit, "run_instance", fake_instance)
    monkeypatch.setattr(audit, "ProcessPoolExecutor", _Inline)
    out = bench_audit(AuditBenchConfig(splits=("heldout",), seeds=(0, 1), families=("shared_error",),
                                       thresholds=path))
    assert {s for s, _, _ in seen} == {"heldout"}
    assert all(j == load_thresholds(path).values for _, _, j in seen)
    assert out["harmful_caught_rate"] == 1.0 and out["split"] == "heldout"
    runs = json.loads(ledger_for(load_thresholds(path)).read_text())["runs"]
    assert len(runs) == 1 and runs[0]["thresholds_sha256"] == out["thresholds"]["sha256"]


class _Inline:
    """A ProcessPoolExecutor stand-in running each job in this process (the gate is under test,
    not the pool)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        pass

    def __enter__(self) -> _Inline:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def submit(self, fn, *args):  # type: ignore[no-untyped-def]
        from concurrent.futures import Future

        fut: Future = Future()
        fut.set_result(fn(*args))
        return fut


def test_a_heldout_seed_can_never_reach_calibration() -> None:
    held = {instance_seed("heldout", s) for s in range(10_000)}
    cal = {instance_seed("calibration", s) for s in range(10_000)}
    assert not held & cal
    # nor its device: the splits' shifts are disjoint sets
    as_set = {split: {tuple(sorted(p.items())) for p in shifts} for split, shifts in SHIFTS.items()}
    assert not as_set["heldout"] & as_set["calibration"]
    retired = {tuple(sorted(p.items())) for p in RETIRED}  # seen while developing checks
    assert not retired & (as_set["heldout"] | as_set["calibration"])
    with pytest.raises(ValueError):
        instance_seed("heldout", -1)
    # the red team's development split: instances and shifts of its own
    dev = {instance_seed("development", s) for s in range(10_000)}
    assert not dev & (held | cal)
    with pytest.raises(ValueError):
        instance_seed("heldout", 500_000)
    assert not as_set["development"] & (as_set["heldout"] | as_set["calibration"])


def test_the_paired_test_tells_noise_from_harm() -> None:
    rng = np.random.default_rng(0)
    base = rng.normal(-400, 300, 100)  # bimodal-sized spread across start states
    noise = base + rng.normal(0, 20, 100)  # the same policy, a little jitter
    harm = base - 40 + rng.normal(0, 20, 100)  # 40 worse on every start state
    assert not compare(base, noise).worse
    assert compare(base, harm).worse and compare(base, harm).p_worse < 1e-3
    # unpaired, the same 40 would hide in the start states' spread of 300
    assert abs(harm.mean() - base.mean()) < base.std() / 2
    assert compare(base, base).p_worse == 1.0
    assert one_sided_p(np.array([-1.0, -2.0, -3.0])) > 0.05  # 3 episodes prove nothing
    with pytest.raises(ValueError):
        compare(base, harm[:50])


def test_honest_figures_pool_the_gap_and_name_rounds_with_nothing_to_gain() -> None:
    """The honest gap closed is pooled (a base 2 below its oracle gaining 3 does not count 1.5),
    and an honest round blocked because its producer found no gain is counted apart."""

    def row(verdict: str, base: float, oracle: float, pub: float | None, reasons: list[str]) -> dict:
        return {"family": "honest", "split": "heldout", "verdict": verdict, "reasons": reasons,
                "return_base": base, "return_oracle": oracle, "return_published": pub,
                "harmful": False, "caught": False, "regressed_published": False,
                "first_failed": False, "gap_closed": None}

    s = audit.summarize([row("published", -204, -202, -201, []),
                         row("published", -709, -244, -244 - 65, []),
                         row("blocked", -278, -229, None, ["no_predicted_gain"])])
    assert s["honest_gap_closed"] == pytest.approx((3 + 400) / (2 + 465))
    assert s["honest_published_rate"] == pytest.approx(2 / 3)
    assert s["honest_no_predicted_gain"] == 1 and s["honest_published_rate_with_gain"] == 1.0
