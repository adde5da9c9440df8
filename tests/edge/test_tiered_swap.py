"""Tiered activation (default "rebuild" mode): activate flips to the staged side's non-prepacked
session at once; its prepacked session is built afterwards (control loop or background thread)
and installed by one reference assignment, only if that side is still live and unwritten."""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np
import pytest

from plasma.edge.merge import MergeEngine
from plasma.edge.runtime import PolicyRuntime, SessionSide
from plasma.protocol.bundle import Bundle
from tests.helpers.adapters import bundle_adapter as random_adapter
from tests.helpers.adapters import probes


@pytest.fixture
def engine(bundle: Bundle) -> MergeEngine:
    runtime = PolicyRuntime(bundle)
    assert runtime.swap == "rebuild" and runtime.tiered
    return MergeEngine(runtime)


def reference(bundle: Bundle, adapters: dict[str, Any]) -> PolicyRuntime:
    """A separate runtime holding ``adapters`` on its prepacked session."""
    fresh = MergeEngine(PolicyRuntime(bundle))
    fresh.restore(adapters)
    assert fresh.runtime.wait_upgraded()
    return fresh.runtime


def test_prepacked_and_non_prepacked_sessions_are_bit_identical(engine: MergeEngine, bundle: Bundle) -> None:
    """MatMulInteger over int8 is exact: both sessions over the same buffers give the same bits."""
    rt = engine.runtime
    for seed in range(4):
        engine.activate(engine.stage({"fleet": random_adapter(bundle, seed, size=0.5),
                                      "device": random_adapter(bundle, seed + 10, rank=2)}))
        assert rt.wait_upgraded()
        side = rt.sides[rt.active_index]
        assert side.plain is not None and side.fast is not None and side.current is side.fast
        for n in (1, 7, 400):
            x = probes(bundle, n, seed=seed)
            plain = side.plain.session.run(["action"], {"obs": x})[0]
            fast = side.fast.session.run(["action"], {"obs": x})[0]
            assert np.array_equal(plain, fast)
        for row in probes(bundle, 20, seed=seed):  # batch-1 through the bound buffers too
            np.copyto(side.obs_buf, row)
            side.plain.session.run_with_iobinding(side.plain.binding)
            via_plain = side.out_row.copy()
            side.fast.session.run_with_iobinding(side.fast.binding)
            assert np.array_equal(side.out_row, via_plain)


def test_act_right_after_activate_uses_the_new_weights_then_the_prepacked_session(engine: MergeEngine,
                                                                                  bundle: Bundle) -> None:
    rt = engine.runtime
    adapter = random_adapter(bundle, 1, size=0.5)
    want = reference(bundle, {"fleet": adapter})
    obs = probes(bundle, 50)
    base = [rt.act(row).copy() for row in obs]
    with rt.attach_control_loop():  # this thread is the loop: nothing builds until it maintains
        staged = engine.stage({"fleet": adapter})
        staged_batch = staged.act_batch(obs)  # the probes: on the staged side's non-prepacked session
        engine.activate(staged)
        assert not rt.live_prepacked
        side = rt.sides[rt.active_index]
        assert rt._live is side.plain and side.fast is None
        now = [rt.act(row).copy() for row in obs]
        assert all(np.array_equal(a, want.act(row)) for a, row in zip(now, obs))
        assert not any(np.array_equal(a, b) for a, b in zip(now, base))
        assert np.array_equal(staged_batch, want.act_batch(obs))
        assert rt.maintain() is True  # the loop's idle time: build the prepacked session, install it
        assert rt.live_prepacked and rt._live is side.fast and side.current is side.fast
        assert all(np.array_equal(rt.act(row), a) for a, row in zip(now, obs))
        assert np.array_equal(rt.act_batch(obs), staged_batch)
        assert rt.maintain() is False
    assert rt.builds_on_loop == 1 and rt.builds_in_background == 0


def test_background_upgrade_without_a_loop(engine: MergeEngine, bundle: Bundle) -> None:
    rt = engine.runtime
    obs = probes(bundle, 30)
    engine.activate(engine.stage({"fleet": random_adapter(bundle, 2, size=0.5)}))
    first = [rt.act(row).copy() for row in obs]
    assert rt.wait_upgraded() and rt.builds_in_background == 1
    side = rt.sides[rt.active_index]
    assert rt._live is side.fast and side.fast is not None and side.fast.prepacked
    assert all(np.array_equal(rt.act(row), a) for a, row in zip(first, obs))
    worker = rt._worker
    # not a daemon thread: interpreter exit waits for a build in progress instead of aborting in it
    assert worker is not None and not worker.daemon and worker.name == "plasma-prepack"


def test_background_thread_ends_when_idle_and_restarts(bundle: Bundle) -> None:
    rt = PolicyRuntime(bundle, upgrade_linger_s=0.05)
    engine = MergeEngine(rt)
    engine.activate(engine.stage({"fleet": random_adapter(bundle, 1)}))
    worker = rt._worker
    assert rt.wait_upgraded() and worker is not None
    worker.join(2)
    assert not worker.is_alive() and rt._worker is None
    engine.activate(engine.stage({"fleet": random_adapter(bundle, 2)}))
    assert rt.wait_upgraded() and rt.builds_in_background == 2


def test_a_build_over_a_side_that_goes_inactive_is_dropped_and_stage_waits_for_it(
        engine: MergeEngine, bundle: Bundle, monkeypatch: pytest.MonkeyPatch) -> None:
    """Side X's upgrade is running; X is flipped away and re-staged: the stage waits for the
    build, which is dropped (X inactive), and X's new state runs on its exact session."""
    rt = engine.runtime
    x_adapter, y_adapter, z_adapter = (random_adapter(bundle, s, size=0.5) for s in (1, 2, 3))
    want_z = reference(bundle, {"fleet": z_adapter})
    started, release = threading.Event(), threading.Event()
    built: list[Any] = []
    build = SessionSide.build

    def slow(self: SessionSide) -> Any:
        started.set()
        assert release.wait(10)
        runner = build(self)
        built.append(runner)
        return runner

    monkeypatch.setattr(SessionSide, "build", slow)
    engine.activate(engine.stage({"fleet": x_adapter}))
    x = rt.active_index
    assert started.wait(5) and rt._building == x
    monkeypatch.setattr(SessionSide, "build", build)
    engine.activate(engine.stage({"fleet": y_adapter}))  # the other side: no wait
    assert rt.active_index == 1 - x
    x_q = {n: q.copy() for n, q in rt.sides[x].q.items()}
    done: list[Any] = []
    writer = threading.Thread(target=lambda: done.append(engine.stage({"fleet": z_adapter})))
    writer.start()
    time.sleep(0.1)
    assert writer.is_alive() and not done  # waiting for the build over side x
    assert all(np.array_equal(q, x_q[n]) for n, q in rt.sides[x].q.items())  # not written yet
    release.set()
    writer.join(5)
    assert done and rt.stale_builds == 1 and len(built) == 1
    stale = built[0]
    assert rt.sides[x].fast is None and rt.sides[x].current is rt.sides[x].plain
    with rt.attach_control_loop():
        engine.activate(done[0])
        assert rt._live is rt.sides[x].plain and rt._live is not stale
        obs = probes(bundle, 30)
        assert all(np.array_equal(rt.act(row), want_z.act(row)) for row in obs)
    assert rt._live is not stale and rt.live_prepacked


def test_a_build_whose_side_was_rewritten_is_never_installed(engine: MergeEngine, bundle: Bundle,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The generation check: a side written while its build ran (simulated) keeps its exact session."""
    rt = engine.runtime
    build = SessionSide.build

    def racing(self: SessionSide) -> Any:
        runner = build(self)
        self.generation += 1  # as if its buffers had been rewritten meanwhile
        return runner

    monkeypatch.setattr(SessionSide, "build", racing)
    with rt.attach_control_loop():
        engine.activate(engine.stage({"fleet": random_adapter(bundle, 1)}))
        plain = rt._live
        assert rt.maintain() is True
        assert rt._live is plain and not rt.live_prepacked and rt.stale_builds == 1
        assert rt.sides[rt.active_index].fast is None
        rt._want = (rt.active_index, rt.sides[rt.active_index].generation - 1)  # a stale request
        assert rt.maintain() is False and rt._live is plain


def test_restaging_cancels_an_owed_build(engine: MergeEngine, bundle: Bundle,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    rt = engine.runtime
    with rt.attach_control_loop():
        engine.activate(engine.stage({"fleet": random_adapter(bundle, 1)}))
        assert rt._want is not None
        engine.rollback()  # back to the base side, whose prepacked session is still valid
        assert rt._want is None and rt.live_prepacked
        engine.activate(engine.stage({"fleet": random_adapter(bundle, 2)}))
        engine.stage({"fleet": random_adapter(bundle, 3)})  # rewrites the base side
        assert rt.maintain() is True and rt.builds_on_loop == 1
        assert rt.maintain() is False


@pytest.mark.parametrize("upgraded", [False, True])
def test_rollback_after_a_tiered_activation_is_an_exact_instant_flip(engine: MergeEngine, bundle: Bundle,
                                                                     upgraded: bool) -> None:
    rt = engine.runtime
    obs = probes(bundle, 40)
    engine.activate(engine.stage({"fleet": random_adapter(bundle, 7, size=0.5)}))
    assert rt.wait_upgraded()
    before_rows = [rt.act(row).copy() for row in obs]
    before_batch = rt.act_batch(obs)
    old_side = rt.sides[rt.active_index]
    old_fast = old_side.fast
    with rt.attach_control_loop():
        engine.activate(engine.stage({"fleet": random_adapter(bundle, 8, size=0.5)}))
        assert not any(np.array_equal(rt.act(row), a) for a, row in zip(before_rows, obs))
        if upgraded:
            assert rt.maintain() and rt.live_prepacked
        t0 = time.perf_counter()
        engine.rollback()
        elapsed = time.perf_counter() - t0
        assert elapsed < 0.005  # a flip
        assert rt._live is old_fast and old_side.fast is old_fast and rt.live_prepacked
        assert rt.maintain() is False  # nothing to build: the old side was never rewritten
        assert all(np.array_equal(rt.act(row), a) for a, row in zip(before_rows, obs))
        assert np.array_equal(rt.act_batch(obs), before_batch)


@pytest.mark.parametrize("loop", ["attached", "background"])
def test_no_act_ever_mixes_sessions_or_sides(bundle: Bundle, loop: str) -> None:
    """Every act() during 80 tiered swaps (and their upgrades) returns exactly the old or the new action."""
    engine = MergeEngine(PolicyRuntime(bundle))
    rt, obs = engine.runtime, probes(bundle, 1)[0]
    adapters = [random_adapter(bundle, 1, size=0.5), random_adapter(bundle, 2, size=0.5)]
    expected = [reference(bundle, {"fleet": a}).act(obs).copy() for a in adapters]
    assert not np.array_equal(*expected)
    engine.activate(engine.stage({"fleet": adapters[1]}))
    assert rt.wait_upgraded() and rt.builds_in_background == 1
    seen: list[np.ndarray] = []
    tiers: list[bool] = []
    stop, attached = threading.Event(), threading.Event()

    def control_loop() -> None:
        if loop == "attached":
            with rt.attach_control_loop():
                attached.set()
                while not stop.is_set():
                    tiers.append(rt.live_prepacked)
                    seen.append(rt.act(obs).copy())
                    rt.maintain()
        else:
            attached.set()
            while not stop.is_set():
                tiers.append(rt.live_prepacked)
                seen.append(rt.act(obs).copy())

    thread = threading.Thread(target=control_loop)
    thread.start()
    assert attached.wait(5)
    for i in range(80):
        engine.activate(engine.stage({"fleet": adapters[i % 2]}))
        time.sleep(0.001 * (i % 3))
    stop.set()
    thread.join()
    assert len(seen) > 80
    assert all(np.array_equal(s, expected[0]) or np.array_equal(s, expected[1]) for s in seen)
    assert True in tiers and False in tiers
    if loop == "attached":
        assert rt.builds_on_loop >= 1 and rt.builds_in_background == 1
    else:
        assert rt.builds_in_background >= 2 and rt.builds_on_loop == 0


def test_the_inactive_side_starts_without_a_prepacked_session(engine: MergeEngine,
                                                              bundle: Bundle) -> None:
    """Its first stage would drop it unused: only the live side builds one at load; a flip to
    the other side before any stage (a rollback cannot: nothing was activated) still upgrades."""
    rt = engine.runtime
    live, idle = rt.sides
    assert live.fast is not None and live.current is live.fast and rt.live_prepacked
    assert idle.fast is None and idle.current is idle.plain
    x = probes(bundle, 9, seed=1)
    assert np.array_equal(idle.act_batch(x), live.act_batch(x))
    rt.flip(1)
    assert rt.wait_upgraded() and rt.live_prepacked and idle.fast is not None
    assert np.array_equal(rt.act_batch(x), live.act_batch(x))
