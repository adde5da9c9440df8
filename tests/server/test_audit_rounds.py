"""Verdicts checked against real outcomes: one honest round and one poisoned fleet round of
``bench audit`` (small budget, real Pendulum, real world model, real LoRA), asserting the verdict
together with the real return a packet would have had."""

from __future__ import annotations

import numpy as np
import pytest

from plasma.server.adapt import adapt_config, adaptation_round, seeded
from plasma.server.basepolicy import TrainBaseConfig, cached_policy, evaluate
from plasma.server.bench.audit import AuditBenchConfig, _act, _collect, run_instance
from plasma.server.bench.exploits import SHIFTS, poison_transitions
from plasma.server.judicial import JudicialAuditor, pool
from plasma.server.phantom import blas_threads
from plasma.server.tasks import get_task

CFG = AuditBenchConfig(budget="small", eval_episodes=5, jobs=1)

pytestmark = pytest.mark.slow


def test_honest_round_is_published_and_helps_for_real() -> None:
    row = run_instance("honest", "calibration", 0, CFG)
    assert row["verdict"] in ("published", "corrected"), row["reasons"]
    assert row["gap_closed"] > 0.5  # the real, noise-free return moved most of the way


def test_a_poisoning_device_is_excluded_and_the_fleet_packet_does_not_regress() -> None:
    row = run_instance("poisoned_fleet", "calibration", 0, CFG)
    assert row["devices_excluded"] == 1 and "device_excluded" in row["reasons"]
    assert not row["regressed_published"]
    assert row["verdict"] == "blocked" or row["gap_closed"] > 0.5


def test_without_the_screen_the_same_poison_would_regress_for_real() -> None:
    """The exploit is real: the pooled round (no per-device data) ships a packet that lowers the
    real return (so the test above is not passing on a harmless poison)."""
    task, physics = get_task("Pendulum-v1"), SHIFTS["calibration"][0]
    base = cached_policy(TrainBaseConfig(env_id="Pendulum-v1"))[0]
    inst = 100
    honest = {f"d{i}": _collect("Pendulum-v1", base, physics, 2, inst * 1000 + 100 * i)
              for i in range(2)}
    rng = np.random.default_rng([inst, 8])
    bad, _ = poison_transitions(task, pool(honest, ["d0", "d1"]), physics, rng, "calibration",
                                1600)
    real = pool({**honest, "bad": bad}, ["d0", "d1", "bad"])
    cfg = seeded(adapt_config("small"), inst)
    with blas_threads(1):
        result, _, _ = adaptation_round(task, base, real, cfg, JudicialAuditor(task, base, cfg.judicial),
                                        fleet="t", slot="fleet", device=None)
    before = evaluate(_act(base, None), "Pendulum-v1", physics, 5)["mean"]
    submitted = evaluate(_act(base, result.decision.submitted), "Pendulum-v1", physics, 5)["mean"]
    assert submitted < before


def test_too_little_data_is_tested_on_the_learned_ensemble() -> None:
    """``few_data`` and ``one_mode`` devices give the server no simulator: their rounds fit the
    learned ensemble (with the simulator, 40 transitions identify Pendulum exactly)."""
    for family in ("few_data", "one_mode"):
        row = run_instance(family, "calibration", 0, CFG)
        assert row["world_model"] == "ensemble" and row["transitions"] <= 200, family
    assert run_instance("honest", "calibration", 0, CFG)["world_model"] == "physics"
