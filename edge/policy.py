"""Edge stage 10: bundle -> onnxruntime policy, batch-1 act() on pre-bound buffers, two swappable weight sides.

The runtime owns two ``SessionSide`` objects (A and B). Each holds its own numpy buffers for
every layer's int8 weight (in, out) and float32 scale (out,), handed to ONNX Runtime with
``SessionOptions.add_initializer``. ``act()`` reads ``_active`` once per call, so a call runs
wholly on one side; ``plasma.edge.merge`` writes the other side and flips the reference.

Two ways to make a written side visible (``swap=``), measured on this 2-core x86 VM (shared,
load average 2-4) with onnxruntime 1.32 and MLP 64-256x3-8 (dynamic int8), merging rank-8
adapters 5 ms apart while a control loop runs:

- ``"rebuild"`` (default): prepacking on (act() 0.89-0.91x a bare ``run()``); after writing the
  buffers, build a new session for that side from graph bytes ORT optimized once at load
  (0.57 ms in isolation; stage + activate 1.3 ms p50 with no loop attached). Building holds the
  GIL, so from a second thread it stalled the control loop 3-12 ms per merge. Hence the build
  is *cooperative*: a control loop registers with ``attach_control_loop()`` and calls
  ``maintain()`` between steps, or ``idle(time_to_next_tick)`` as its sleep; ``commit`` (from
  the merge thread) then only requests the build, and the control thread does it in its idle
  time and wakes the writer. A build that would not fit before the tick is put off to just
  after it (once). With no loop attached (tests, server benches), or on the loop's own thread,
  ``commit`` builds at once; if the loop does not answer within ``build_timeout_s`` (a stuck
  env step) the writer builds itself and logs a warning. Measured: at 50 Hz the longest
  loop gap beyond the period during 200 merges 0.5-1.4 ms (the same loop idle: 3.4-3.9 ms on
  this busy VM), at 1 kHz 3.0-5.3 ms (per-merge p50 0.75 ms; idle 2.3-2.7 ms). A loop with
  no idle time (act() back to back) pays each build between two steps: per-merge p50 2.5-5.7 ms.
- ``"inplace"``: ``session.disable_prepacking=1``, so writes show on the next run with no new
  session (DESIGN.md section 6). Stage + activate 0.46 ms p50, no build at all, but
  MatMulInteger repacks B on every call: act() ~28 us against 18.7 us bare (ratio 1.5).
  Guarded by a self-test at load; if it fails, the runtime logs a warning and uses "rebuild".

Dynamic int8 quantizes activations per tensor, so a row's action in ``act_batch`` depends on the
other rows of the batch (differences ~1e-3): compare probes batch-for-batch, never with act().
"""

from __future__ import annotations

import logging
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import numpy as np
import onnxruntime as ort

from .bundle import Bundle, BundleError

__all__ = ["PolicyRuntime", "SessionSide", "SwapMode", "quantize_weight", "reference_forward"]

log = logging.getLogger(__name__)

SwapMode = Literal["rebuild", "inplace"]
_TINY = float(np.finfo(np.float32).tiny)


def quantize_weight(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """W float32 (out, in) -> (q int8 (in, out), scale float32 (out,)): quantize_dynamic's per-channel QInt8.

    Symmetric, zero point 0: scale computed in float64 as 2*max|W_col| / 254 (= /127) then cast,
    q = clip(round_half_even(W / scale), -128, 127); an all-zero column gets scale 1.0. This
    reproduces the shipped weights of onnxruntime.quantization 1.32 bit for bit (tested).
    """
    # Always a copy: for a one-row or one-column W, W.T is already contiguous and
    # ascontiguousarray would hand back the read-only master itself.
    acc = np.array(np.asarray(w, np.float32).T, order="C", copy=True)  # (in, out)
    q = np.empty(acc.shape, np.int8)
    scale = np.empty(acc.shape[1], np.float32)
    quantize_into(acc, q, scale, np.empty_like(acc))
    return q, scale


def quantize_into(acc: np.ndarray, q: np.ndarray, scale: np.ndarray, scratch: np.ndarray) -> None:
    """In place: acc float32 (in, out) is consumed; writes q int8 (in, out) and scale (out,)."""
    np.abs(acc, out=scratch)
    absmax = scratch.max(axis=0).astype(np.float64)  # (out,)
    s64 = absmax * 2.0 / 254.0
    s32 = s64.astype(np.float32)
    s32[s64 < _TINY] = 1.0  # the quantizer's guard for an all-zero column
    np.divide(acc, s32, out=acc)
    np.round(acc, out=acc)
    np.clip(acc, -128, 127, out=acc)
    np.copyto(q, acc, casting="unsafe")
    np.copyto(scale, s32)


def reference_forward(bundle: Bundle, obs: np.ndarray, weights: Mapping[str, np.ndarray] | None = None) -> np.ndarray:
    """fp32 numpy forward of the policy convention; ``weights`` (name -> W (out, in)) overrides the master."""
    m = bundle.manifest
    h = (np.asarray(obs, np.float32) - np.asarray(m.obs_mean, np.float32)) / np.asarray(m.obs_std, np.float32)
    act = np.tanh if m.hidden_activation == "tanh" else (lambda z: np.maximum(z, 0))
    for k, e in enumerate(m.layers):
        w = bundle.weights[e.name] if weights is None or e.name not in weights else weights[e.name]
        h = h @ w.T + bundle.biases[e.name]  # (batch, out)
        if k < len(m.layers) - 1:
            h = act(h)
    low, high = np.asarray(m.act_low, np.float32), np.asarray(m.act_high, np.float32)
    return (low + (np.tanh(h) + 1) / 2 * (high - low)).astype(np.float32)


class SessionSide:
    """One weight state: int8/scale buffers shared with its session, and a pre-bound batch-1 IOBinding."""

    def __init__(self, bundle: Bundle, base_q: Mapping[str, tuple[np.ndarray, np.ndarray]], prepack: bool,
                 graph: bytes | None = None) -> None:
        self._bundle = bundle
        self._prepack = prepack
        self._graph = graph  # ORT-optimized model bytes (see _preoptimize), or None for the file as shipped
        self.q = {name: q.copy() for name, (q, _) in base_q.items()}  # name -> int8 (in, out)
        self.scale = {name: s.copy() for name, (_, s) in base_q.items()}  # name -> float32 (out,)
        m = bundle.manifest
        self.obs_buf = np.zeros((1, m.obs_dim), np.float32)  # bound input
        self.out_buf = np.zeros((1, m.act_dim), np.float32)  # bound output
        self.out_row: np.ndarray = self.out_buf[0]  # (act_dim,) view handed back by act()
        self.build()

    def build(self) -> None:
        """(Re)create the session over the current buffers and re-bind I/O.

        Measured for 64-256x3-8: 1.28 ms p50 from the shipped bytes with all graph optimizations,
        0.54 ms from pre-optimized bytes with optimizations off; the same run() time (18.8 us).
        """
        so = _options(optimize=self._graph is None)
        if not self._prepack:
            so.add_session_config_entry("session.disable_prepacking", "1")
        keep = []  # ORT borrows these buffers: the OrtValues must outlive the session
        for e in self._bundle.manifest.layers:
            for init_name, buf in ((e.weight_q, self.q[e.name]), (e.weight_scale, self.scale[e.name])):
                value = ort.OrtValue.ortvalue_from_numpy(buf)
                so.add_initializer(init_name, value)
                keep.append(value)
        try:
            session = ort.InferenceSession(self._graph or self._bundle.model_bytes, so, providers=_PROVIDERS)
        except (RuntimeError, ValueError) as exc:  # ORT's Fail/InvalidGraph/InvalidArgument derive from these
            raise BundleError(f"onnxruntime refused {self._bundle.int8_path.name}: {exc}", code="bad_model") from None
        binding = session.io_binding()
        keep += [ort.OrtValue.ortvalue_from_numpy(self.obs_buf), ort.OrtValue.ortvalue_from_numpy(self.out_buf)]
        binding.bind_ortvalue_input("obs", keep[-2])
        binding.bind_ortvalue_output("action", keep[-1])
        self.session, self.binding, self._keep = session, binding, keep

    def act_batch(self, obs: np.ndarray) -> np.ndarray:
        """(n, obs_dim) -> (n, act_dim), a fresh array (plain run with a dict feed)."""
        x = np.ascontiguousarray(obs, dtype=np.float32).reshape(-1, self._bundle.manifest.obs_dim)
        out: np.ndarray = self.session.run(["action"], {"obs": x})[0]
        return out


class PolicyRuntime:
    """The device policy: ``act(obs)`` on the active side; two sides for ``plasma.edge.merge``."""

    def __init__(self, bundle: Bundle, *, swap: SwapMode = "rebuild", build_timeout_s: float = 1.0) -> None:
        self.bundle = bundle
        base_q = {name: quantize_weight(w) for name, w in bundle.weights.items()}
        self.base_q: Mapping[str, tuple[np.ndarray, np.ndarray]] = base_q
        """name -> (int8 (in, out), scale (out,)) requantized from the fp32 master (== shipped)."""
        self.lock = threading.RLock()
        """Held by writers (merge) and by probes; act() never takes it."""
        self._base_session: _PlainSession | None = None
        self.swap: SwapMode = swap
        graph = _preoptimize(bundle.model_bytes)
        if swap == "inplace" and not self._inplace_works(base_q, graph):
            log.warning("in-place initializer writes did not show on the next run; swapping by session rebuild "
                        "(act() faster, but each merge may stall the control loop for several ms)")
            self.swap = "rebuild"
        prepack = self.swap == "rebuild"
        self.sides = (SessionSide(bundle, base_q, prepack, graph), SessionSide(bundle, base_q, prepack, graph))
        self._active = self.sides[0]
        self._entered = 0  # act() calls begun / finished: written only by the control thread
        self._exited = 0
        self._flip_mark = 0  # value of _entered right after the last flip
        # Cooperative rebuilds (see commit / maintain): all guarded by _coop
        self.build_timeout_s = build_timeout_s
        self._coop = threading.Lock()
        self._loop_ident: int | None = None  # thread ident of the attached control loop
        self._pending: int | None = None  # side index whose build the control loop owes
        self._built = threading.Event()  # set when the requested build is done (or failed)
        self._build_error: BaseException | None = None
        self._wake = threading.Event()  # set by a build request: ends the control loop's idle()
        self._deferred = False  # idle() put the pending build off once to keep a tick on time
        self._build_s = 0.0015  # running estimate of a build's duration (s), updated by maintain()
        self.builds_on_loop = 0  # builds done by maintain(), for benches and tests
        self.build_fallbacks = 0  # builds the worker did itself because the loop did not answer
        self.base_requant_err = self._check_base()

    # -- the hot path -------------------------------------------------------------------------
    def act(self, obs: np.ndarray) -> np.ndarray:
        """obs (obs_dim,) -> action (act_dim,): a view of the bound output buffer, overwritten by the next call.

        Call from one control thread. Nothing is allocated: the observation is copied into the
        bound input buffer and ``run_with_iobinding`` writes the bound output buffer, whose
        preallocated row view is returned. Copy it if you keep it past the next call.
        """
        self._entered += 1
        side = self._active  # read once: the whole call runs on one weight state
        try:
            np.copyto(side.obs_buf, obs)
            side.session.run_with_iobinding(side.binding)
        finally:
            self._exited += 1
        return side.out_row

    def act_batch(self, obs: np.ndarray) -> np.ndarray:
        """(n, obs_dim) -> (n, act_dim) on the active weights, for probes (takes the writer lock)."""
        with self.lock:
            return self._active.act_batch(obs)

    def base_act_batch(self, obs: np.ndarray) -> np.ndarray:
        """(n, obs_dim) -> (n, act_dim) on the shipped base model, whatever is active (audit probes)."""
        with self.lock:
            return self._base().act_batch(obs)

    # -- what plasma.edge.merge uses ----------------------------------------------------------
    @property
    def active_index(self) -> int:
        return 0 if self._active is self.sides[0] else 1

    def flip(self, index: int) -> None:
        """Make side ``index`` active: one reference assignment; later act() calls run on it."""
        self._active = self.sides[index]
        self._flip_mark = self._entered  # calls begun before this may still run on the old side

    def wait_quiet(self, index: int) -> None:
        """Block until no act() call can still be running on side ``index`` (it must be inactive)."""
        if self.sides[index] is self._active:
            raise RuntimeError("refusing to wait on the active side")
        while self._exited < self._flip_mark:  # a batch-1 call lasts ~20 us
            time.sleep(0)

    def commit(self, index: int) -> None:
        """Make writes to side ``index``'s buffers visible to its session (rebuild mode: new session).

        With a control loop attached (``attach_control_loop``), the build is requested from it and
        this call blocks until the loop has done it in ``maintain()``; if the loop does not answer
        within ``build_timeout_s`` (a stuck env step), this thread builds and logs a warning.
        With no loop attached, or when called on the loop's own thread, it builds right here.
        """
        if self.swap != "rebuild":
            return
        with self._coop:
            here = self._loop_ident is None or self._loop_ident == threading.get_ident()
            if not here:
                if self._pending is not None:  # one writer at a time holds self.lock
                    raise RuntimeError("a build request is already pending")
                self._built.clear()
                self._build_error = None
                self._pending = index
                self._deferred = False
                self._wake.set()  # under the lock: maintain() clears it under the lock when it claims
        if here:
            self.sides[index].build()
            return
        if not self._built.wait(self.build_timeout_s):
            with self._coop:
                unclaimed = self._pending == index
                if unclaimed:
                    self._pending = None
                    self._wake.clear()
            if unclaimed:  # the loop never picked it up: build here (may stall the loop, but progresses)
                log.warning("control loop did not run the session build within %.2f s; building on the "
                            "merge thread", self.build_timeout_s)
                self.build_fallbacks += 1
                self.sides[index].build()
                return
            self._built.wait()  # the loop is building right now: ~1 ms
        if self._build_error is not None:
            error, self._build_error = self._build_error, None
            raise error

    # -- cooperative rebuilds: the control loop's side ------------------------------------------
    @contextmanager
    def attach_control_loop(self) -> Iterator[PolicyRuntime]:
        """Register the calling thread as the control loop: session builds then run in its ``maintain()``.

        The loop must call ``maintain()`` (or ``idle(timeout)``) between steps. On exit any pending
        build is done before detaching, so a writer never waits on a loop that has left.
        """
        with self._coop:
            if self._loop_ident is not None:
                raise RuntimeError("a control loop is already attached")
            self._loop_ident = threading.get_ident()
        try:
            yield self
        finally:
            with self._coop:
                self._loop_ident = None
            self.maintain()

    def maintain(self) -> bool:
        """Do a requested session build now, on this thread; True if one was done. A no-op costs ~0.1 us."""
        if self._pending is None:  # unlocked read: a request missed here is seen on the next call
            return False
        with self._coop:
            index, self._pending = self._pending, None
            self._wake.clear()
            self._deferred = False
        if index is None:
            return False
        try:
            t0 = time.perf_counter()
            self.sides[index].build()
            self._build_s += 0.2 * (time.perf_counter() - t0 - self._build_s)
            self.builds_on_loop += 1
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting writer, which raises it
            self._build_error = exc
        finally:
            self._built.set()
        return True

    def idle(self, timeout: float) -> bool:
        """Sleep up to ``timeout`` s, waking at once to do a requested build; True if one was done.

        For a fixed-rate loop: call it with the time left to the next tick, again while time is
        left. If a build (~1-1.5 ms, running estimate) would not fit in ``timeout``, it is put off
        once: idle() sleeps to the tick and the next call builds whatever time is left, so a
        build delays at most one tick, by at most its own length, and only when the period is
        shorter than a build.
        """
        t0 = time.perf_counter()
        if self._pending is None and timeout > 0:
            self._wake.wait(timeout)
        if self._pending is None:
            return False
        left = timeout - (time.perf_counter() - t0)
        if not self._deferred and left < 2 * self._build_s:
            self._deferred = True  # build on the next call, right after this tick's step
            if left > 0:
                time.sleep(left)
            return False
        return self.maintain()

    # -- load-time checks ---------------------------------------------------------------------
    def _base(self) -> _PlainSession:
        if self._base_session is None:
            self._base_session = _PlainSession(self.bundle)
        return self._base_session

    def _probe_obs(self, n: int = 16) -> np.ndarray:
        m = self.bundle.manifest
        rng = np.random.default_rng(0)
        return (np.asarray(m.obs_mean) + np.asarray(m.obs_std) * rng.standard_normal((n, m.obs_dim))).astype(np.float32)

    def _check_base(self) -> float:
        """The requantized master must drive the same policy as the shipped int8 weights."""
        x = self._probe_obs()
        err = float(np.abs(self.sides[0].act_batch(x) - self._base().act_batch(x)).max())
        span = float(np.max(np.subtract(self.bundle.manifest.act_high, self.bundle.manifest.act_low)))
        if err > 1e-3 * span:  # measured 0.0: requantization is bit-exact with onnxruntime 1.32
            raise BundleError(f"fp32 master does not requantize to the shipped int8 model (err {err:.3g})",
                              code="base_mismatch")
        return err

    def _inplace_works(self, base_q: Mapping[str, tuple[np.ndarray, np.ndarray]], graph: bytes | None) -> bool:
        """Write a changed state in place, compare with a fresh session over copies, restore, compare again."""
        side = SessionSide(self.bundle, base_q, prepack=False, graph=graph)
        x = self._probe_obs()
        before = side.act_batch(x)
        for name in side.q:
            np.negative(side.q[name], out=side.q[name], casting="unsafe")  # int8: -(-127..127) stays in range
            side.scale[name] *= 1.5
        changed = side.act_batch(x)
        fresh = SessionSide(self.bundle, {n: (side.q[n], side.scale[n]) for n in side.q}, prepack=True)
        want = fresh.act_batch(x)
        for name, (q, s) in base_q.items():
            np.copyto(side.q[name], q)
            np.copyto(side.scale[name], s)
        restored = side.act_batch(x)
        return bool(np.array_equal(changed, want) and not np.array_equal(changed, before)
                    and np.array_equal(restored, before))


_PROVIDERS = ["CPUExecutionProvider"]


def _options(*, optimize: bool = True) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1  # one control thread per device; a pool only adds wake-up jitter
    so.inter_op_num_threads = 1
    so.log_severity_level = 3  # errors only: library code prints nothing
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return so


def _preoptimize(model_bytes: bytes) -> bytes | None:
    """Let ORT fuse the graph once (DynamicQuantizeMatMul) and serialize it, so each rebuild skips it.

    The result is specific to this machine's ORT build and CPU, so it is made at load and never
    stored. None if ORT will not serialize it (the caller then builds from the shipped bytes).
    """
    so = _options()
    with tempfile.TemporaryDirectory(prefix="plasma-ort-") as tmp:
        path = Path(tmp) / "optimized.onnx"
        so.optimized_model_filepath = str(path)
        try:
            ort.InferenceSession(model_bytes, so, providers=_PROVIDERS)
            return path.read_bytes()
        except (RuntimeError, OSError) as exc:
            log.warning("could not pre-optimize the policy graph (%s); rebuilding from the shipped model", exc)
            return None


class _PlainSession:
    """The shipped model exactly as in the file: no shared buffers, default prepacking."""

    def __init__(self, bundle: Bundle) -> None:
        self.session = ort.InferenceSession(bundle.model_bytes, _options(), providers=_PROVIDERS)
        self._obs_dim = bundle.manifest.obs_dim

    def act_batch(self, obs: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(obs, dtype=np.float32).reshape(-1, self._obs_dim)
        out: np.ndarray = self.session.run(["action"], {"obs": x})[0]
        return out
