"""Edge stage 9: merge, requantization from the master, atomic flip and rollback, on real ORT sessions."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from plasma.edge.merge import MergeEngine, MergeError, merged_weights
from plasma.edge.runtime import PolicyRuntime, quantize_weight, reference_forward
from plasma.protocol import Adapter
from plasma.protocol.bundle import Bundle
from tests.helpers.adapters import bundle_adapter as random_adapter
from tests.helpers.adapters import probes

SWAPS = ["rebuild", "inplace"]


def delta(adapter: Adapter, name: str) -> np.ndarray:
    a, b = adapter.layers[name]
    return (adapter.alpha / adapter.rank) * (b.astype(np.float64) @ a)  # (out, in)


@pytest.fixture(params=SWAPS)
def engine(request: pytest.FixtureRequest, bundle: Bundle) -> MergeEngine:
    runtime = PolicyRuntime(bundle, swap=request.param)
    assert runtime.swap == request.param  # the in-place self-test passed
    return MergeEngine(runtime)


def side_weights(engine: MergeEngine, index: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    side = engine.runtime.sides[index]
    return {n: (side.q[n].copy(), side.scale[n].copy()) for n in side.q}


# -- pure merge ---------------------------------------------------------------------------------

def test_merged_weights_is_base_plus_deltas(bundle: Bundle) -> None:
    x, y = random_adapter(bundle, 1), random_adapter(bundle, 2, rank=2, layers=["l1"])
    merged = merged_weights(bundle.weights, {"fleet": x, "device": y})
    for name, w in bundle.weights.items():
        want = w + delta(x, name) + (delta(y, name) if name == "l1" else 0)
        assert merged[name].dtype == np.float32 and merged[name].shape == w.shape
        assert np.abs(merged[name] - want).max() < 1e-6
    assert all(np.array_equal(merged_weights(bundle.weights, {"fleet": None})[n], w) for n, w in bundle.weights.items())


# -- engine -------------------------------------------------------------------------------------

def test_merged_int8_policy_matches_fp32_within_int8_tolerance(engine: MergeEngine) -> None:
    bundle, rt = engine.runtime.bundle, engine.runtime
    x = random_adapter(bundle, 1, size=0.6)  # 7-bit weights: base error ~2x that of 8-bit
    obs = probes(bundle)
    engine.activate(engine.stage({"fleet": x}))
    fp32 = reference_forward(bundle, obs, merged_weights(bundle.weights, {"fleet": x}))
    base_err = np.abs(rt.base_act_batch(obs) - reference_forward(bundle, obs)).max()
    err = np.abs(rt.act_batch(obs) - fp32).max()
    assert np.abs(fp32 - reference_forward(bundle, obs)).max() > 10 * base_err  # the adapter matters
    assert err <= 1.5 * base_err + 1e-6
    for name, w in merged_weights(bundle.weights, {"fleet": x}).items():  # buffers hold the requantized merge
        q, scale = quantize_weight(w, bundle.manifest.weight_qmax)
        side = rt.sides[rt.active_index]
        assert np.array_equal(side.q[name], q) and np.array_equal(side.scale[name], scale)


def test_twenty_merges_do_not_drift(engine: MergeEngine, bundle: Bundle) -> None:
    final = random_adapter(bundle, 99)
    for seed in range(20):
        fleet, device = random_adapter(bundle, seed), random_adapter(bundle, seed + 50)
        engine.activate(engine.stage({"fleet": fleet, "device": device}))
    engine.activate(engine.stage({"fleet": final, "device": None}))
    fresh = MergeEngine(PolicyRuntime(bundle))
    fresh.activate(fresh.stage({"fleet": final}))
    chained, single = side_weights(engine, engine.runtime.active_index), side_weights(fresh, fresh.runtime.active_index)
    for name in chained:
        assert np.array_equal(chained[name][0], single[name][0]) and np.array_equal(chained[name][1], single[name][1])
    obs = probes(bundle)
    assert np.array_equal(engine.runtime.act_batch(obs), fresh.runtime.act_batch(obs))


def test_stage_is_invisible_until_activate_and_rollback_is_instant(engine: MergeEngine, bundle: Bundle) -> None:
    rt, obs = engine.runtime, probes(bundle)
    base_row, base = rt.act(obs[0]).copy(), rt.act_batch(obs)
    staged = engine.stage({"fleet": random_adapter(bundle, 1)})
    assert np.array_equal(rt.act(obs[0]), base_row) and np.array_equal(rt.act_batch(obs), base)
    candidate = staged.act_batch(obs)
    assert not np.array_equal(candidate, base)
    engine.activate(staged)
    assert np.array_equal(rt.act_batch(obs), candidate) and engine.active["fleet"] is staged.adapters["fleet"]
    rt.wait_upgraded()  # tiered: let the background prepacked build land before taking the sessions
    sessions = [s.session for s in rt.sides]
    t0 = time.perf_counter()
    restored = engine.rollback()
    elapsed = time.perf_counter() - t0
    assert [s.session for s in rt.sides] == sessions  # nothing rebuilt or rewritten: a flip
    assert elapsed < 0.005  # measured ~10 us; generous for loaded CI machines
    assert restored["fleet"] is None and engine.active["fleet"] is None
    assert np.array_equal(rt.act_batch(obs), base) and np.array_equal(rt.act(obs[0]), base_row)
    with pytest.raises(MergeError) as err:
        engine.rollback()
    assert err.value.code == "no_rollback"


def test_rollback_after_a_later_stage_rebuilds_the_previous_state(engine: MergeEngine, bundle: Bundle) -> None:
    obs = probes(bundle)
    x, y = random_adapter(bundle, 1), random_adapter(bundle, 2)
    engine.activate(engine.stage({"fleet": x}))
    with_x = engine.runtime.act_batch(obs)
    engine.activate(engine.stage({"fleet": y}))
    engine.stage({"fleet": random_adapter(bundle, 3)})  # overwrites the side that held x
    assert engine.rollback()["fleet"] is x
    assert np.array_equal(engine.runtime.act_batch(obs), with_x)


def test_two_slots_add_up_and_unlisted_slots_are_kept(engine: MergeEngine, bundle: Bundle) -> None:
    x, y = random_adapter(bundle, 1), random_adapter(bundle, 2, rank=3, layers=["l0", "l2"])
    engine.activate(engine.stage({"fleet": x}))
    engine.activate(engine.stage({"device": y}))
    assert engine.active["fleet"] is x and engine.active["device"] is y
    both = side_weights(engine, engine.runtime.active_index)
    for name, w in bundle.weights.items():
        want = w.astype(np.float64) + delta(x, name) + (delta(y, name) if name in y.layers else 0)
        q, scale = quantize_weight(want.astype(np.float32), bundle.manifest.weight_qmax)
        assert np.abs(both[name][0].astype(int) - q).max() <= 1  # float32 sum order: within 1 LSB
        assert np.allclose(both[name][1], scale, rtol=1e-6)


def test_removing_every_slot_returns_to_base_exactly(engine: MergeEngine, bundle: Bundle) -> None:
    obs = probes(bundle)
    base = engine.runtime.act_batch(obs)
    engine.activate(engine.stage({"fleet": random_adapter(bundle, 1), "device": random_adapter(bundle, 2)}))
    engine.activate(engine.stage({"fleet": None}))
    assert not np.array_equal(engine.runtime.act_batch(obs), base)  # device slot still live
    engine.activate(engine.stage({"device": None}))
    assert np.array_equal(engine.runtime.act_batch(obs), base)
    assert np.array_equal(engine.runtime.act_batch(obs), engine.runtime.base_act_batch(obs))
    for name, (q, scale) in side_weights(engine, engine.runtime.active_index).items():
        base_q, base_scale = engine.runtime.base_q[name]
        assert np.array_equal(q, base_q) and np.array_equal(scale, base_scale)


def test_restore_brings_a_known_state(bundle: Bundle) -> None:
    x = random_adapter(bundle, 1)
    first = MergeEngine(PolicyRuntime(bundle))
    first.restore({"fleet": x, "device": None})
    again = MergeEngine(PolicyRuntime(bundle))
    again.restore(dict(first.active))
    obs = probes(bundle)
    assert np.array_equal(first.runtime.act_batch(obs), again.runtime.act_batch(obs))


@pytest.mark.parametrize("swap", SWAPS)
def test_flip_is_atomic_under_a_running_control_loop(bundle: Bundle, swap: str) -> None:
    """Every act() during 100 swaps returns exactly the old or the new policy's action, never a mix."""
    engine = MergeEngine(PolicyRuntime(bundle, swap=swap))  # type: ignore[arg-type]
    rt, obs = engine.runtime, probes(bundle, 1)[0]
    adapters = [random_adapter(bundle, 1, size=0.5), random_adapter(bundle, 2, size=0.5)]
    expected = []
    for a in adapters:
        engine.activate(engine.stage({"fleet": a}))
        expected.append(rt.act(obs).copy())
    assert not np.array_equal(*expected)
    seen, stop = [], threading.Event()

    def control_loop() -> None:
        while not stop.is_set():
            seen.append(rt.act(obs).copy())

    thread = threading.Thread(target=control_loop)
    thread.start()
    for i in range(100):
        engine.activate(engine.stage({"fleet": adapters[i % 2]}))
    stop.set()
    thread.join()
    assert len(seen) > 100
    assert all(np.array_equal(s, expected[0]) or np.array_equal(s, expected[1]) for s in seen)


# -- contract violations ------------------------------------------------------------------------

def test_bad_adapters_are_refused_before_any_write(engine: MergeEngine, bundle: Bundle) -> None:
    good = random_adapter(bundle, 1)
    a, b = good.layers["l1"]
    cases = [
        {"cloud": good},
        {"fleet": Adapter(alpha=1.0, rank=4, layers={"l9": (a, b)})},
        {"fleet": Adapter(alpha=1.0, rank=4, layers={"l0": (a, b)})},  # l1's shapes on l0
    ]
    for case in cases:
        with pytest.raises(MergeError) as err:
            engine.stage(case)  # type: ignore[arg-type]
        assert err.value.code == "bad_adapter"
    huge = Adapter(alpha=1e30, rank=4, layers={"l1": (a * 1e10, b * 1e10)})
    with pytest.raises(MergeError) as err:
        engine.stage({"fleet": huge})
    assert err.value.code == "non_finite"
    engine.activate(engine.stage({"fleet": good}))  # a failed stage leaves the engine usable
    assert engine.active["fleet"] is good
    fresh = MergeEngine(PolicyRuntime(bundle))
    fresh.restore({"fleet": good})
    obs = probes(bundle)
    assert np.array_equal(engine.runtime.act_batch(obs), fresh.runtime.act_batch(obs))


def test_stale_staged_handles_are_refused(engine: MergeEngine, bundle: Bundle) -> None:
    first = engine.stage({"fleet": random_adapter(bundle, 1)})
    second = engine.stage({"fleet": random_adapter(bundle, 2)})  # same side, overwritten
    for call in (lambda: engine.activate(first), lambda: first.act_batch(probes(bundle))):
        with pytest.raises(MergeError) as err:
            call()
        assert err.value.code == "stale"
    engine.activate(second)
    with pytest.raises(MergeError) as err:
        engine.activate(second)  # already active
    assert err.value.code == "stale"


def test_bench_smoke(shared_bundle_dir: Path) -> None:
    from plasma.edge.bench.runtime import bench_inference, bench_merge

    inference = bench_inference(shared_bundle_dir, n=1000)
    assert {"p50_us", "p99_us", "bare_ort_p50_us", "overhead_ratio"} <= set(inference)
    assert inference["n"] == 1000 and inference["p50_us"] > 0
    merge = bench_merge(shared_bundle_dir, rank=2, n=10, spacing_ms=1.0)
    assert {"merge_activate_p50_ms", "merge_activate_p99_ms", "max_loop_stall_ms", "fidelity_max_abs_err",
            "int8_base_max_abs_err", "full_reload_p50_ms"} <= set(merge)
    assert 0 < merge["fidelity_max_abs_err"] < 0.05


def test_one_output_layer_loads_and_merges() -> None:
    """Pendulum's policy ends in a 1-output layer: W.T is contiguous there (regression)."""
    import numpy as np

    from plasma.edge.merge import MergeEngine
    from plasma.edge.runtime import PolicyRuntime
    from plasma.protocol import Adapter
    from plasma.protocol.bundle import BASE_WEIGHTS, load_bundle
    from tests.helpers.bundles import ONE_OUTPUT, bundle_path

    bundle = load_bundle(bundle_path(ONE_OUTPUT))
    with np.load(bundle_path(ONE_OUTPUT) / BASE_WEIGHTS) as npz:
        master_l1 = npz["l1.W"]
    runtime = PolicyRuntime(bundle)
    before = runtime.act(np.zeros(3, np.float32)).copy()
    rng = np.random.default_rng(0)
    adapter = Adapter(alpha=2.0, rank=2, layers={"l1": (rng.normal(0, 0.5, (2, 16)),
                                                        rng.normal(0, 0.5, (1, 2)))})
    engine = MergeEngine(runtime)
    engine.activate(engine.stage({"device": adapter}))
    assert not np.allclose(runtime.act(np.zeros(3, np.float32)), before)
    assert np.all(bundle.weights["l1"] == master_l1)  # the master was not touched
