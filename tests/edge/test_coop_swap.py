"""Cooperative rebuild: the control loop builds the staged side's session in its idle time (PolicyRuntime.maintain)."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from plasma.edge.bundle import Bundle
from plasma.edge.merge import MergeEngine
from plasma.edge.policy import PolicyRuntime, SessionSide

from .test_daemon_wire import InProcess, packet, pendulum  # noqa: F401 - pendulum is a fixture
from .test_merge import probes, random_adapter


@pytest.fixture
def engine(bundle: Bundle) -> MergeEngine:
    return MergeEngine(PolicyRuntime(bundle, swap="rebuild", build_timeout_s=5.0))


def _record_build_threads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    idents: list[int] = []
    build = SessionSide.build

    def traced(self: SessionSide) -> None:
        idents.append(threading.get_ident())
        build(self)

    monkeypatch.setattr(SessionSide, "build", traced)
    return idents


def test_rebuild_is_the_default(bundle: Bundle) -> None:
    assert PolicyRuntime(bundle).swap == "rebuild"


def test_no_loop_attached_builds_on_the_calling_thread(engine: MergeEngine, bundle: Bundle,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    idents = _record_build_threads(monkeypatch)
    engine.activate(engine.stage({"fleet": random_adapter(bundle, 1)}))
    assert idents == [threading.get_ident()]
    assert engine.runtime.builds_on_loop == 0 and engine.runtime.build_fallbacks == 0
    assert engine.runtime.maintain() is False  # nothing pending


def test_loop_builds_and_every_act_sees_old_or_new(engine: MergeEngine, bundle: Bundle,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A control thread acts + maintains while this thread stages/activates 60 times."""
    rt, obs = engine.runtime, probes(bundle, 1)[0]
    adapters = [random_adapter(bundle, 1, size=0.5), random_adapter(bundle, 2, size=0.5)]
    expected = []
    for a in adapters:
        engine.activate(engine.stage({"fleet": a}))
        expected.append(rt.act(obs).copy())
    assert not np.array_equal(*expected)
    idents = _record_build_threads(monkeypatch)
    seen: list[np.ndarray] = []
    stop, attached = threading.Event(), threading.Event()
    loop_ident: list[int] = []

    def control_loop() -> None:
        loop_ident.append(threading.get_ident())
        with rt.attach_control_loop():
            attached.set()
            while not stop.is_set():
                seen.append(rt.act(obs).copy())
                rt.idle(0.0005)

    thread = threading.Thread(target=control_loop)
    thread.start()
    assert attached.wait(5)
    for i in range(60):
        staged = engine.stage({"fleet": adapters[i % 2]})
        assert np.allclose(staged.act_batch(obs[None])[0], expected[i % 2], atol=1e-2)  # probes on the staged side
        engine.activate(staged)
    stop.set()
    thread.join()
    assert len(seen) > 60
    assert all(np.array_equal(s, expected[0]) or np.array_equal(s, expected[1]) for s in seen)
    assert len(idents) == 60 and set(idents) == set(loop_ident)
    assert rt.builds_on_loop == 60 and rt.build_fallbacks == 0


def test_stage_on_the_loop_thread_builds_there(engine: MergeEngine, bundle: Bundle) -> None:
    """A merge issued from the control thread itself must not wait on itself."""
    with engine.runtime.attach_control_loop():
        engine.activate(engine.stage({"fleet": random_adapter(bundle, 1)}))
    assert engine.runtime.builds_on_loop == 0 and engine.runtime.build_fallbacks == 0


def test_timeout_fallback_when_the_loop_stops_maintaining(bundle: Bundle, monkeypatch: pytest.MonkeyPatch,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    engine = MergeEngine(PolicyRuntime(bundle, swap="rebuild", build_timeout_s=0.1))
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
    with caplog.at_level(logging.WARNING, logger="plasma.edge.policy"):
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


def test_detach_serves_a_pending_build(engine: MergeEngine, bundle: Bundle,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A loop leaving (shutdown) while a build is pending does it on its way out: no deadlock, no timeout."""
    rt = engine.runtime
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
    engine.activate(engine.stage({"fleet": random_adapter(bundle, 1)}))
    assert time.perf_counter() - t0 < 2  # well inside the 5 s timeout
    thread.join()
    assert idents == loop_ident and rt.build_fallbacks == 0
    engine.activate(engine.stage({"fleet": None}))  # detached: builds here again
    assert idents[-1] == threading.get_ident()


def test_a_build_error_on_the_loop_reaches_the_writer(engine: MergeEngine, bundle: Bundle,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    rt = engine.runtime

    def broken(self: SessionSide) -> None:
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
            engine.stage({"fleet": random_adapter(bundle, 1)})
    finally:
        stop.set()
        thread.join()


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


def test_idle_wakes_at_once_on_a_request(engine: MergeEngine, bundle: Bundle) -> None:
    """A loop sleeping a long idle() is woken by the request, not by its timeout."""
    rt = engine.runtime
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
    engine.stage({"fleet": random_adapter(bundle, 1)})
    thread.join()
    assert woke[0][0] is True and woke[0][1] - t0 < 1.0 and rt.builds_on_loop == 1


def test_idle_puts_a_build_off_once_when_it_would_miss_the_tick(engine: MergeEngine, bundle: Bundle) -> None:
    rt = engine.runtime
    results: list[bool] = []
    attached, requested = threading.Event(), threading.Event()

    def control_loop() -> None:
        with rt.attach_control_loop():
            attached.set()
            requested.wait(5)
            while rt._pending is None:  # the writer sets it just after the event
                time.sleep(0.001)
            results.append(rt.idle(0.0))  # no time left before the tick: put off
            results.append(rt.idle(0.0))  # the next call builds whatever the time left
            results.append(rt.idle(0.0))  # nothing pending

    thread = threading.Thread(target=control_loop)
    thread.start()
    assert attached.wait(5)
    threading.Timer(0.02, requested.set).start()
    engine.activate(engine.stage({"fleet": random_adapter(bundle, 1)}))
    thread.join()
    assert results == [False, True, False] and rt.builds_on_loop == 1


def test_daemon_control_loop_builds_the_accepted_adapter(tmp_path: Path, pendulum: dict[str, Any]) -> None:
    """In the daemon, an accepted packet's session is built by the control thread, no fallback."""
    from plasma.protocol import topics


    with InProcess(pendulum, tmp_path / "state") as d:
        rt = d.daemon.runtime
        assert rt.swap == "rebuild"
        d.publish(topics.fleet_adapter("fmem"), packet(pendulum, "fmem", "fleet", 1))
        assert d.until(lambda: d.audits)[0]["verdict"] == "accepted"
        assert rt.builds_on_loop >= 1 and rt.build_fallbacks == 0
