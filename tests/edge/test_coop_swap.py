"""Cooperative builds: the control loop builds sessions in its idle time (PolicyRuntime.maintain).

Default ("rebuild", tiered): activation needs no build; the loop builds the prepacked upgrade of
the side just made live. Without tiers (the load-time in-place self-test failed, fixture
``legacy``): the staged side's session is built by the loop before activation, as before.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from plasma.edge.merge import MergeEngine
from plasma.edge.runtime import PolicyRuntime, SessionSide
from plasma.protocol.bundle import Bundle
from tests.helpers.adapters import bundle_adapter as random_adapter
from tests.helpers.adapters import probes
from tests.helpers.daemon import DeviceKit, InProcess


@pytest.fixture
def engine(bundle: Bundle) -> MergeEngine:
    runtime = PolicyRuntime(bundle, swap="rebuild", build_timeout_s=5.0)
    assert runtime.tiered
    return MergeEngine(runtime)


def _legacy_runtime(bundle: Bundle, monkeypatch: pytest.MonkeyPatch, build_timeout_s: float) -> PolicyRuntime:
    monkeypatch.setattr(PolicyRuntime, "_inplace_works", lambda self, base_q, graph: False)
    runtime = PolicyRuntime(bundle, swap="rebuild", build_timeout_s=build_timeout_s)
    monkeypatch.undo()
    assert runtime.swap == "rebuild" and not runtime.tiered
    return runtime


@pytest.fixture
def legacy(bundle: Bundle, monkeypatch: pytest.MonkeyPatch) -> MergeEngine:
    """Rebuild mode as it was before tiers: what a machine whose in-place self-test fails runs."""
    return MergeEngine(_legacy_runtime(bundle, monkeypatch, 5.0))


def _record_build_threads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    idents: list[int] = []
    build = SessionSide.build

    def traced(self: SessionSide) -> Any:
        idents.append(threading.get_ident())
        return build(self)

    monkeypatch.setattr(SessionSide, "build", traced)
    return idents


def _nothing_owed(rt: PolicyRuntime) -> bool:
    return rt._pending is None and rt._want is None


def test_rebuild_is_the_default_and_tiered(bundle: Bundle) -> None:
    rt = PolicyRuntime(bundle)
    assert rt.swap == "rebuild" and rt.tiered and rt.live_prepacked


def test_no_loop_attached_upgrades_on_a_background_thread(engine: MergeEngine, bundle: Bundle,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    rt = engine.runtime
    idents = _record_build_threads(monkeypatch)
    engine.activate(engine.stage({"fleet": random_adapter(bundle, 1)}))
    assert rt.wait_upgraded() and rt.live_prepacked
    assert len(idents) == 1 and idents[0] != threading.get_ident()
    assert rt.builds_in_background == 1 and rt.builds_on_loop == 0 and rt.build_fallbacks == 0
    assert rt.maintain() is False  # nothing owed


def test_legacy_no_loop_attached_builds_on_the_calling_thread(legacy: MergeEngine, bundle: Bundle,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    idents = _record_build_threads(monkeypatch)
    legacy.activate(legacy.stage({"fleet": random_adapter(bundle, 1)}))
    assert idents == [threading.get_ident()]
    assert legacy.runtime.builds_on_loop == 0 and legacy.runtime.build_fallbacks == 0
    assert legacy.runtime.maintain() is False  # nothing pending
    assert legacy.runtime.live_prepacked


@pytest.mark.parametrize("mode", ["tiered", "legacy"])
def test_loop_builds_and_every_act_sees_old_or_new(bundle: Bundle, monkeypatch: pytest.MonkeyPatch,
                                                  mode: str) -> None:
    """A control thread acts + idles while this thread stages/activates 60 times."""
    rt = PolicyRuntime(bundle, build_timeout_s=5.0) if mode == "tiered" else _legacy_runtime(bundle, monkeypatch, 5.0)
    engine = MergeEngine(rt)
    obs = probes(bundle, 1)[0]
    adapters = [random_adapter(bundle, 1, size=0.5), random_adapter(bundle, 2, size=0.5)]
    expected = []
    for a in adapters:
        engine.activate(engine.stage({"fleet": a}))
        expected.append(rt.act(obs).copy())
    assert not np.array_equal(*expected)
    rt.wait_upgraded()
    background = rt.builds_in_background
    idents = _record_build_threads(monkeypatch)
    seen: list[np.ndarray] = []
    prepacked: list[bool] = []
    stop, attached = threading.Event(), threading.Event()
    loop_ident: list[int] = []

    def control_loop() -> None:
        loop_ident.append(threading.get_ident())
        with rt.attach_control_loop():
            attached.set()
            while not stop.is_set():
                prepacked.append(rt.live_prepacked)
                seen.append(rt.act(obs).copy())
                rt.idle(0.0005)

    thread = threading.Thread(target=control_loop)
    thread.start()
    assert attached.wait(5)
    for i in range(60):
        staged = engine.stage({"fleet": adapters[i % 2]})
        assert np.allclose(staged.act_batch(obs[None])[0], expected[i % 2], atol=1e-2)  # probes on the staged side
        engine.activate(staged)
        time.sleep(0.002)
    stop.set()
    thread.join()
    assert len(seen) > 60
    assert all(np.array_equal(s, expected[0]) or np.array_equal(s, expected[1]) for s in seen)
    assert idents and set(idents) == set(loop_ident)  # every build on the loop
    assert rt.build_fallbacks == 0 and rt.builds_in_background == background
    if mode == "legacy":
        assert len(idents) == 60 and rt.builds_on_loop == 60 and all(prepacked)
    else:
        assert rt.builds_on_loop == len(idents) >= 1
        assert True in prepacked and False in prepacked  # act() ran on both tiers


def test_stage_on_the_loop_thread(engine: MergeEngine, legacy: MergeEngine, bundle: Bundle) -> None:
    """A merge issued from the control thread itself must not wait on itself."""
    with legacy.runtime.attach_control_loop():
        legacy.activate(legacy.stage({"fleet": random_adapter(bundle, 1)}))
    assert legacy.runtime.builds_on_loop == 0 and legacy.runtime.build_fallbacks == 0
    with engine.runtime.attach_control_loop():
        engine.activate(engine.stage({"fleet": random_adapter(bundle, 1)}))
        assert not engine.runtime.live_prepacked  # owed, built on detach (or the next maintain)
    assert engine.runtime.builds_on_loop == 1 and engine.runtime.live_prepacked
    assert engine.runtime.builds_in_background == 0


def test_legacy_timeout_fallback_when_the_loop_stops_maintaining(bundle: Bundle, monkeypatch: pytest.MonkeyPatch,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    engine = MergeEngine(_legacy_runtime(bundle, monkeypatch, 0.1))
    rt = engine.runtime
    idents = _record_build_threads(monkeypatch)
    attached, release = threading.Event(), threading.Event()

    def stuck_loop() -> None:  # attached, but e.g. stuck in env.step: never maintains
        with rt.attach_control_loop():
            attached.set()
            release.wait(10)

    thread = threading.Thread(target=stuck_loop)
    thread.start()
    assert attached.wait(5)
    adapter = random_adapter(bundle, 1)
    t0 = time.perf_counter()
    with caplog.at_level(logging.WARNING, logger="plasma.edge.runtime"):
        engine.activate(engine.stage({"fleet": adapter}))
    assert 0.1 <= time.perf_counter() - t0 < 3
    assert "did not run the session build" in caplog.text
    assert idents == [threading.get_ident()] and rt.build_fallbacks == 1
    release.set()
    thread.join()
    assert rt.maintain() is False  # the cancelled request is not built again
    fresh = MergeEngine(PolicyRuntime(bundle))
    fresh.restore({"fleet": adapter})
    x = probes(bundle)
    assert np.array_equal(rt.act_batch(x), fresh.runtime.act_batch(x))


def test_a_stuck_loop_does_not_delay_a_tiered_swap(engine: MergeEngine, bundle: Bundle,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing waits on the loop: the swap completes at once; the loop upgrades when it is back."""
    rt = engine.runtime
    adapter = random_adapter(bundle, 1)
    fresh = MergeEngine(PolicyRuntime(bundle))
    fresh.restore({"fleet": adapter})
    idents = _record_build_threads(monkeypatch)
    attached, release = threading.Event(), threading.Event()
    loop_ident: list[int] = []

    def stuck_loop() -> None:
        loop_ident.append(threading.get_ident())
        with rt.attach_control_loop():
            attached.set()
            release.wait(10)
            rt.maintain()

    thread = threading.Thread(target=stuck_loop)
    thread.start()
    assert attached.wait(5)
    t0 = time.perf_counter()
    engine.activate(engine.stage({"fleet": adapter}))
    assert time.perf_counter() - t0 < 0.1 and idents == []
    x = probes(bundle)
    assert np.array_equal(rt.act_batch(x), fresh.runtime.act_batch(x)) and not rt.live_prepacked
    release.set()
    thread.join()
    assert idents == loop_ident and rt.builds_on_loop == 1 and rt.build_fallbacks == 0
    assert rt.live_prepacked and np.array_equal(rt.act_batch(x), fresh.runtime.act_batch(x))


def test_legacy_detach_serves_a_pending_build(legacy: MergeEngine, bundle: Bundle,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A loop leaving (shutdown) while a build is pending does it on its way out: no deadlock, no timeout."""
    rt = legacy.runtime
    idents = _record_build_threads(monkeypatch)
    attached, leave = threading.Event(), threading.Event()
    loop_ident: list[int] = []

    def leaving_loop() -> None:
        loop_ident.append(threading.get_ident())
        with rt.attach_control_loop():
            attached.set()
            leave.wait(10)

    thread = threading.Thread(target=leaving_loop)
    thread.start()
    assert attached.wait(5)
    timer = threading.Timer(0.05, leave.set)
    timer.start()
    t0 = time.perf_counter()
    legacy.activate(legacy.stage({"fleet": random_adapter(bundle, 1)}))
    assert time.perf_counter() - t0 < 2  # well inside the 5 s timeout
    thread.join()
    assert idents == loop_ident and rt.build_fallbacks == 0
    legacy.activate(legacy.stage({"fleet": None}))  # detached: builds here again
    assert idents[-1] == threading.get_ident()


def test_legacy_build_error_on_the_loop_reaches_the_writer(legacy: MergeEngine, bundle: Bundle,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    rt = legacy.runtime

    def broken(self: SessionSide) -> Any:
        raise RuntimeError("boom")

    stop, attached = threading.Event(), threading.Event()

    def control_loop() -> None:
        with rt.attach_control_loop():
            attached.set()
            while not stop.is_set():
                rt.idle(0.01)

    thread = threading.Thread(target=control_loop)
    thread.start()
    assert attached.wait(5)
    monkeypatch.setattr(SessionSide, "build", broken)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            legacy.stage({"fleet": random_adapter(bundle, 1)})
    finally:
        stop.set()
        thread.join()


def test_a_failed_upgrade_leaves_act_on_the_exact_session(engine: MergeEngine, bundle: Bundle,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    rt = engine.runtime

    def broken(self: SessionSide) -> Any:
        raise RuntimeError("boom")

    monkeypatch.setattr(SessionSide, "build", broken)
    adapter = random_adapter(bundle, 1)
    with caplog.at_level(logging.ERROR, logger="plasma.edge.runtime"):
        with rt.attach_control_loop():
            engine.activate(engine.stage({"fleet": adapter}))
            assert rt.maintain() is True
    assert "prepacked session build failed" in caplog.text and not rt.live_prepacked
    monkeypatch.undo()
    fresh = MergeEngine(PolicyRuntime(bundle))
    fresh.restore({"fleet": adapter})
    obs = probes(bundle, 20)
    assert all(np.array_equal(rt.act(row), fresh.runtime.act(row)) for row in obs)


def test_only_one_loop_attaches(engine: MergeEngine) -> None:
    with engine.runtime.attach_control_loop():
        errors: list[BaseException] = []

        def other() -> None:
            try:
                with engine.runtime.attach_control_loop():
                    pass
            except RuntimeError as exc:
                errors.append(exc)

        t = threading.Thread(target=other)
        t.start()
        t.join()
        assert len(errors) == 1
    with engine.runtime.attach_control_loop():  # detached cleanly: attachable again
        pass


@pytest.mark.parametrize("mode", ["tiered", "legacy"])
def test_idle_wakes_at_once_on_a_request(engine: MergeEngine, legacy: MergeEngine, bundle: Bundle,
                                         mode: str) -> None:
    """A loop sleeping a long idle() is woken by the request, not by its timeout."""
    eng = engine if mode == "tiered" else legacy
    rt = eng.runtime
    woke: list[tuple[bool, float]] = []
    attached = threading.Event()

    def control_loop() -> None:
        with rt.attach_control_loop():
            attached.set()
            woke.append((rt.idle(3.0), time.perf_counter()))

    thread = threading.Thread(target=control_loop)
    thread.start()
    assert attached.wait(5)
    time.sleep(0.05)  # the loop is now inside idle(3.0)
    t0 = time.perf_counter()
    eng.activate(eng.stage({"fleet": random_adapter(bundle, 1)}))
    thread.join()
    assert woke[0][0] is True and woke[0][1] - t0 < 1.0 and rt.builds_on_loop == 1
    assert rt.live_prepacked


@pytest.mark.parametrize("mode", ["tiered", "legacy"])
def test_idle_puts_a_build_off_once_when_it_would_miss_the_tick(engine: MergeEngine, legacy: MergeEngine,
                                                                bundle: Bundle, mode: str) -> None:
    eng = engine if mode == "tiered" else legacy
    rt = eng.runtime
    results: list[bool] = []
    attached, requested = threading.Event(), threading.Event()

    def control_loop() -> None:
        with rt.attach_control_loop():
            attached.set()
            requested.wait(5)
            while _nothing_owed(rt):  # the writer sets it just after the event
                time.sleep(0.001)
            results.append(rt.idle(0.0))  # no time left before the tick: put off
            results.append(rt.idle(0.0))  # the next call builds whatever the time left
            results.append(rt.idle(0.0))  # nothing pending

    thread = threading.Thread(target=control_loop)
    thread.start()
    assert attached.wait(5)
    threading.Timer(0.02, requested.set).start()
    eng.activate(eng.stage({"fleet": random_adapter(bundle, 1)}))
    thread.join()
    assert results == [False, True, False] and rt.builds_on_loop == 1


def test_daemon_control_loop_builds_the_accepted_adapter(tmp_path: Path, pendulum: DeviceKit) -> None:
    """In the daemon, an accepted packet's prepacked session is built by the control thread."""
    from plasma.protocol import topics

    with InProcess(pendulum, tmp_path / "state") as d:
        rt = d.daemon.runtime
        assert rt.swap == "rebuild" and rt.tiered
        d.publish(topics.fleet_adapter("fmem"), pendulum.packet("fmem", "fleet", 1))
        assert d.until(lambda: d.audits)[0]["verdict"] == "accepted"
        assert d.until(lambda: rt.builds_on_loop >= 1 and rt.live_prepacked)
        assert rt.build_fallbacks == 0 and rt.builds_in_background == 0
