"""Smoke run of the whole adaptation loop and of base training, on tiny budgets."""

from __future__ import annotations

import math

import numpy as np

from plasma.server.adapt import AdaptConfig
from plasma.server.basepolicy import TrainBaseConfig, cached_policy, train_base
from plasma.server.bench.adapt import AdaptBenchConfig, bench_adapt
from plasma.server.distill import DistillConfig
from plasma.server.judicial import JudicialConfig
from plasma.server.phantom import PlannerConfig
from plasma.server.worldmodel import WorldModelConfig

TINY_TRAIN = TrainBaseConfig(hidden=(16, 16), expert_episodes=2, dagger_iters=1, dagger_episodes=2, label_states=50,
                             planner=PlannerConfig(candidates=8, horizon=5, iterations=1), bc_steps=20,
                             eval_episodes=1)


def test_train_base_tiny_and_cache(tmp_path) -> None:
    out = train_base(TINY_TRAIN)
    assert math.isfinite(out["mean_return"]) and out["labels"] > 0
    p1, _, d1 = cached_policy(TINY_TRAIN, tmp_path)
    p2, _, d2 = cached_policy(TINY_TRAIN, tmp_path)
    assert d1 == d2 and (d1 / "policy.npz").exists()
    np.testing.assert_array_equal(p1.layers[0][0], p2.layers[0][0])


TINY_ADAPT = AdaptConfig(
    world_model="ensemble", model=WorldModelConfig(ensemble_size=3, hidden=(16, 16), max_epochs=2),
    heldout_members=1, dagger_iters=1, phantom_paths=8, phantom_horizon=5, label_states=20,
    select_paths=8, planner=PlannerConfig(candidates=8, horizon=5, iterations=1),
    distill=DistillConfig(rank=2, steps=5),
    judicial=JudicialConfig(paths=16, horizon=10, probe_repeats=1, support_points=200))


def test_bench_adapt_smoke(tmp_path) -> None:
    hooked: list[int] = []

    def hook(learner, real, run):  # what bench profile-round wraps the rounds with
        hooked.append(len(real.obs))
        return run()

    cfg = AdaptBenchConfig(physics={"m": 1.6, "g": 12.0}, real_steps=400, min_new_transitions=150,
                           adapt=TINY_ADAPT, train=TINY_TRAIN, eval_episodes=1,
                           cache_dir=str(tmp_path), edge_eval=True, round_hook=hook)
    out = bench_adapt(cfg)
    assert hooked == [r["real_steps"] for r in out["rounds"]]
    for key in ("base_return", "final_return", "oracle_return", "gap_closed", "real_steps",
                "packets", "packet_bytes", "wall_s", "server_cpu_s_per_round"):
        assert key in out and math.isfinite(out[key]), key
    assert out["real_steps"] == 400 and len(out["rounds"]) == 2 and out["edge_eval"]
    assert out["packets"] == sum(1 for r in out["rounds"] if "activated_at" in r)
    for r in out["rounds"]:
        assert r["model"] == "ensemble" and r["verdict"] in ("published", "corrected", "blocked")
        if "activated_at" in r:  # real signed packet, rank 2 on 16x16 layers
            assert 500 < r["packet_bytes"] < 5000
