"""Edge benchmarks for stages 9-10: act() latency against bare ORT, merge + activate time, loop stall, fidelity.

Each function returns a dict of figures (times from ``time.perf_counter_ns``, medians unless
named otherwise) and prints nothing; ``plasma-edge bench inference|merge`` prints them. With no
bundle directory they run on the shipped ``DEFAULT_BUNDLE``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from plasma.protocol import Adapter
from plasma.protocol.bundle import Bundle, load_bundle

from ..merge import MergeEngine, merged_weights
from ..runtime import PolicyRuntime, SwapMode, reference_forward

__all__ = ["bench_inference", "bench_merge"]

_BLOCK = 1000  # calls per alternating block: both paths see the same cache and frequency conditions


DEFAULT_BUNDLE = Path(__file__).with_name("mlp-64-256x3-8")
"""The bench model shipped with the package: a random MLP 64-256-256-256-8 (seed 0) exported by
``plasma.server.export`` once, so the edge bench needs no server code."""


def _bundle(bundle_dir: str | Path | None) -> Bundle:
    return load_bundle(bundle_dir if bundle_dir is not None else DEFAULT_BUNDLE)


def _observations(bundle: Bundle, n: int, seed: int = 0) -> np.ndarray:
    m = bundle.manifest
    rng = np.random.default_rng(seed)
    return (np.asarray(m.obs_mean) + np.asarray(m.obs_std) * rng.standard_normal((n, m.obs_dim))).astype(np.float32)


def _time_calls(call: Callable[[np.ndarray], object], rows: list[np.ndarray], out: list[int]) -> None:
    clock = time.perf_counter_ns
    for row in rows:
        t0 = clock()
        call(row)
        out.append(clock() - t0)


def _bare_session(bundle: Bundle) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1  # like for like with the runtime; prepacking and optimizations at defaults
    return ort.InferenceSession(bundle.model_bytes, so, providers=["CPUExecutionProvider"])


def bench_inference(bundle_dir: str | Path | None = None, n: int = 20000, swap: SwapMode = "rebuild") -> dict[str, Any]:
    """Batch-1 act() against a plain ``InferenceSession.run`` with a dict feed, in alternating blocks."""
    bundle = _bundle(bundle_dir)
    runtime, bare = PolicyRuntime(bundle, swap=swap), _bare_session(bundle)
    rows = list(_observations(bundle, _BLOCK)[:, None, :])  # (1, obs_dim) each, made before timing
    feed_run = bare.run
    ours: list[int] = []
    theirs: list[int] = []
    _time_calls(runtime.act, rows, [])  # warm-up both
    _time_calls(lambda x: feed_run(["action"], {"obs": x}), rows, [])
    for _ in range(max(1, n // _BLOCK)):
        _time_calls(runtime.act, rows, ours)
        _time_calls(lambda x: feed_run(["action"], {"obs": x}), rows, theirs)
    p50, bare_p50 = np.percentile(ours, 50) / 1e3, np.percentile(theirs, 50) / 1e3
    widths = [bundle.manifest.obs_dim, *(e.out_features for e in bundle.manifest.layers)]
    result = {
        "model": "-".join(str(w) for w in widths),
        "swap": runtime.swap, "n": len(ours),
        "p50_us": float(p50), "p99_us": float(np.percentile(ours, 99) / 1e3),
        "bare_ort_p50_us": float(bare_p50), "bare_ort_p99_us": float(np.percentile(theirs, 99) / 1e3),
        "overhead_ratio": float(p50 / bare_p50),
    }
    if runtime.tiered:  # act() between a tiered activation and its prepacked upgrade
        engine = MergeEngine(runtime)
        plain: list[int] = []
        bare_again: list[int] = []
        with runtime.attach_control_loop():  # this thread is the loop and does not build until the end
            engine.activate(engine.stage({"fleet": None}))
            _time_calls(runtime.act, rows, [])
            for _ in range(max(1, n // _BLOCK // 4)):
                _time_calls(runtime.act, rows, plain)
                _time_calls(lambda x: feed_run(["action"], {"obs": x}), rows, bare_again)
        plain_p50 = np.percentile(plain, 50) / 1e3
        result.update(tier1_act_p50_us=float(plain_p50),
                      tier1_overhead_ratio=float(plain_p50 / (np.percentile(bare_again, 50) / 1e3)))
    return result


def random_adapters(bundle: Bundle, rank: int, count: int, rel_size: float = 0.1, seed: int = 0) -> list[Adapter]:
    """Adapters on every layer whose delta W has a Frobenius norm ~ rel_size x that of W."""
    rng = np.random.default_rng(seed)
    adapters = []
    for _ in range(count):
        layers = {}
        for name, n_in, n_out in bundle.layer_specs:
            a = rng.standard_normal((rank, n_in)).astype(np.float32)  # (rank, in)
            b = rng.standard_normal((n_out, rank)).astype(np.float32)  # (out, rank)
            w_norm = float(np.linalg.norm(bundle.weights[name]))
            b *= rel_size * w_norm / float(np.linalg.norm(b @ a))  # alpha / rank = 1 below
            layers[name] = (a, b)
        adapters.append(Adapter(alpha=float(rank), rank=rank, layers=layers))
    return adapters


def _merge_windows(engine: MergeEngine, adapters: list[Adapter], n: int, spacing_s: float = 0.0,
                   upgrades: list[int] | None = None) -> np.ndarray:
    """Stage + activate ``n`` adapters ``spacing_s`` apart; (n, 2) start and end times in ns.

    With ``upgrades`` (a list), also the time (ns) from each activation until act() runs a
    prepacked session again (tiered runtime, measured within the spacing).
    """
    windows = np.zeros((n, 2), np.int64)
    for i in range(n):
        windows[i, 0] = time.perf_counter_ns()
        engine.activate(engine.stage({"fleet": adapters[i % len(adapters)]}))
        windows[i, 1] = time.perf_counter_ns()
        if upgrades is not None:
            engine.runtime.wait_upgraded(1.0)
            upgrades.append(time.perf_counter_ns() - windows[i, 1])
        if spacing_s:
            time.sleep(max(0.0, spacing_s - (time.perf_counter_ns() - windows[i, 1]) / 1e9))
    return windows


def _act_starts(runtime: PolicyRuntime, obs: np.ndarray, work: Callable[[], object], period_s: float) -> np.ndarray:
    """Start times (ns) of act() calls on a control thread while ``work`` runs in this one.

    period_s 0: act() back to back; otherwise act() on a fixed schedule (sleeping in between).
    """
    stop = threading.Event()
    starts = np.zeros(1 << 22, np.int64)  # preallocated: the loop itself must not allocate (or trigger GC)
    count = [0]

    def control_loop() -> None:  # what a real control loop does: act, then do pending builds in its idle time
        clock, i = time.perf_counter_ns, 0
        tick = clock()
        with runtime.attach_control_loop():
            while not stop.is_set() and i < len(starts):
                starts[i], i = clock(), i + 1
                runtime.act(obs)
                if not period_s:
                    runtime.maintain()
                    continue
                tick += int(period_s * 1e9)
                while (left := tick - clock()) > 0:
                    runtime.idle(left / 1e9)
        count[0] = i

    loop = threading.Thread(target=control_loop)
    loop.start()
    time.sleep(0.02)
    try:
        work()
        time.sleep(2 * period_s)  # at a low loop rate, let an act() follow the last window
    finally:
        stop.set()
        loop.join()
    return starts[:count[0]]


def _until_next(windows: np.ndarray, tail_ns: int) -> np.ndarray:
    """Each merge's window extended to the next merge's start (the last by ``tail_ns``): a tiered
    activation leaves the prepacked build to the control loop after it, and that must count."""
    out = windows.copy()
    out[:-1, 1] = np.maximum(windows[:-1, 1], windows[1:, 0])
    out[-1, 1] = windows[-1, 1] + tail_ns
    return out


def _stall_per_window(starts: np.ndarray, windows: np.ndarray) -> np.ndarray:
    """For each (start, end) window, the longest gap (ns) between act() starts overlapping it."""
    gaps = np.diff(starts)  # gaps[i] spans starts[i] .. starts[i + 1]
    # clipped: under load the control thread may stop before the last window's tail ends
    first = np.clip(np.searchsorted(starts, windows[:, 0]) - 1, 0, len(gaps) - 1)
    last = np.maximum(np.minimum(np.searchsorted(starts, windows[:, 1]), len(gaps) - 1), first)
    return np.array([gaps[lo:hi + 1].max() for lo, hi in zip(first, last)])


def _fidelity(runtime: PolicyRuntime, obs: np.ndarray, want: np.ndarray) -> float:
    """Max |act(obs_i) - want_i| over rows, batch-1 like the device (dynamic int8 is batch dependent)."""
    return float(max(np.abs(runtime.act(row) - w).max() for row, w in zip(obs, want)))


def bench_merge(bundle_dir: str | Path | None = None, rank: int = 8, n: int = 200, swap: SwapMode = "rebuild",
                spacing_ms: float = 5.0, loop_hz: float = 0.0) -> dict[str, Any]:
    """Stage + activate time, control-loop stall during merges, merged-policy fidelity, full reload time.

    ``merge_activate_p50_ms`` / ``_p99_ms``: stage + activate (the packet's critical path: merge,
    write the inactive side, flip), ``n`` merges ``spacing_ms`` apart (packets are isolated
    events) with no loop attached, so in tiered rebuild mode the background thread builds each
    prepacked session after the flip, inside the spacing; ``prepacked_after_activate_p50_ms`` is
    how long after the flip act() runs prepacked again. ``merge_activate_back_to_back_p50_ms``:
    the same with no spacing (each merge then overlaps the previous one's background build).
    The stall run merges ``n`` adapters ``spacing_ms`` apart while a control thread calls act()
    non-stop (``loop_hz`` 0) or at ``loop_hz``; that thread is attached as the control loop and
    calls ``maintain()`` between act() calls (``idle()`` while waiting for its tick), so it does
    every session build itself (tiered: the prepacked upgrade after each flip; not tiered: the
    staged side's session before it, which ``..._under_loop_...`` then includes). A stall is a gap
    between consecutive act() starts beyond the period: ``max_loop_stall_ms`` over the whole run
    (builds included), and ``per_merge_stall_*`` the longest gap from each merge's start to the
    next one's (so the build the loop does after a tiered flip counts). The idle run measures
    the same loop as long with no merges, for comparison: on a shared 2-core VM the loop alone
    shows multi-ms gaps now and then.
    """
    bundle = _bundle(bundle_dir)
    engine = MergeEngine(PolicyRuntime(bundle, swap=swap))
    runtime, adapters = engine.runtime, random_adapters(bundle, rank, 8)
    period_s, spacing_s = (1 / loop_hz if loop_hz else 0.0), spacing_ms / 1e3
    _merge_windows(engine, adapters, 10)  # warm-up
    upgrade_ns: list[int] = []
    merge_ns = np.diff(_merge_windows(engine, adapters, n, spacing_s, upgrade_ns)).ravel()
    back_to_back_ns = np.diff(_merge_windows(engine, adapters, n)).ravel()
    obs = _observations(bundle, 1000, seed=1)
    windows: list[np.ndarray] = []
    busy = _act_starts(runtime, obs[0], lambda: windows.append(_merge_windows(engine, adapters, n, spacing_s)),
                       period_s)
    idle = _act_starts(runtime, obs[0], lambda: time.sleep((busy[-1] - busy[0]) / 1e9), period_s)
    stall_windows = _until_next(windows[0], int(max(spacing_s, 2 * period_s) * 1e9))
    per_merge_ms = (_stall_per_window(busy, stall_windows) / 1e6 - period_s * 1e3)
    busy_ms, idle_ms = np.diff(busy) / 1e6 - period_s * 1e3, np.diff(idle) / 1e6 - period_s * 1e3
    engine.restore({"fleet": None, "device": None})
    base_err = _fidelity(runtime, obs, reference_forward(bundle, obs))
    engine.restore({"fleet": adapters[0]})
    merged = merged_weights(bundle.weights, {"fleet": adapters[0]})
    merged_err = _fidelity(runtime, obs, reference_forward(bundle, obs, merged))
    reload_ns = []
    for _ in range(max(5, n // 10)):
        t0 = time.perf_counter_ns()
        _bare_session(bundle)
        reload_ns.append(time.perf_counter_ns() - t0)
    return {
        "swap": runtime.swap, "tiered": runtime.tiered, "rank": rank, "n": n,
        "builds_on_loop": runtime.builds_on_loop, "build_fallbacks": runtime.build_fallbacks,
        "builds_in_background": runtime.builds_in_background,
        "stale_builds": runtime.stale_builds,
        "merge_activate_p50_ms": float(np.percentile(merge_ns, 50) / 1e6),
        "merge_activate_p99_ms": float(np.percentile(merge_ns, 99) / 1e6),
        "merge_activate_back_to_back_p50_ms": float(np.percentile(back_to_back_ns, 50) / 1e6),
        "prepacked_after_activate_p50_ms": float(np.percentile(upgrade_ns, 50) / 1e6) if upgrade_ns else None,
        "merge_activate_under_loop_p50_ms": float(np.percentile(np.diff(windows[0]), 50) / 1e6),
        "max_loop_stall_ms": float(busy_ms.max()),
        "per_merge_stall_p50_ms": float(np.percentile(per_merge_ms, 50)),
        "per_merge_stall_p90_ms": float(np.percentile(per_merge_ms, 90)),
        "loop_gaps_over_3ms": int((busy_ms > 3).sum()),
        "idle_max_loop_stall_ms": float(idle_ms.max()), "idle_loop_gaps_over_3ms": int((idle_ms > 3).sum()),
        "stall_merge_spacing_ms": spacing_ms, "loop_hz": loop_hz,
        "fidelity_max_abs_err": merged_err, "int8_base_max_abs_err": base_err,
        "fidelity_ratio": merged_err / base_err if base_err > 0 else float("inf"),
        "full_reload_p50_ms": float(np.percentile(reload_ns, 50) / 1e6),
    }
