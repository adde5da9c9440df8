"""Edge stage 10: bundle -> onnxruntime policy, batch-1 act() on pre-bound buffers, two swappable weight sides.

The runtime owns two ``SessionSide`` objects (A and B). Each holds its own numpy buffers for
every layer's int8 weight (in, out) and float32 scale (out,), handed to ONNX Runtime with
``SessionOptions.add_initializer``. ``act()`` reads ``_live`` (one session runner over one side's
buffers) once per call, so a call runs wholly on one session and one weight state;
``plasma.edge.merge`` writes the other side and flips the reference.

Two ways to make a written side visible (``swap=``), measured on this 2-core x86 VM with
onnxruntime 1.32 and MLP 64-256x3-8 (dynamic int8), merging rank-8 adapters 5 ms apart:

- ``"rebuild"`` (default), *tiered*: each side holds two sessions over the SAME buffers, a
  non-prepacked one (``session.disable_prepacking=1``, made once at load: it sees buffer writes
  on its next run) and a prepacked one (act() 0.89-0.91x a bare ``run()``; stale once its
  buffers are written). ``begin_write`` (called by ``MergeEngine.stage``) waits until no act()
  can run on the inactive side and no prepacked build over it is owed (cancelled) or running
  (waited for), bumps the side's ``generation`` and puts the side on its non-prepacked
  session; the staged probes run there. MatMulInteger over int8 is exact integer arithmetic,
  so both sessions give bit-identical outputs (tested). ``flip`` makes the side live on its
  non-prepacked session at once (act() ~28-29 us, 1.5x bare, until the upgrade), and requests
  the prepacked build: done by the attached control loop in ``maintain()``/``idle()`` (session
  builds hold the GIL, ~1 ms: they must not run beside the loop), else by a background daemon
  thread started on demand (it ends after ``upgrade_linger_s`` idle). The result is installed
  by one reference assignment (act() reads ``_live`` once per call) only if that side is still
  active and its generation unchanged; otherwise it is dropped (``stale_builds``). Rollback to
  the previous side is a flip: its buffers were not rewritten, so its prepacked session holds.
  Measured (same runs, old = session rebuilt before activation): stage + activate p50 0.93-0.95
  ms against 1.97-2.17 ms (5 ms apart, no loop), 1.05-1.09 against 1.41-1.46 ms back to back;
  prepacked again 1.0 ms after the flip (background); with a 50 Hz control loop attached,
  stage + activate 0.94-1.0 ms against 2.2-2.3 ms (old waited for the loop's build); longest
  loop gap beyond the period 1.0-3.0 ms against 0.55-1.3 ms (the loop's own idle run: 0.2-0.7
  ms) - the builds run on the loop between ticks, the late ticks (~1 ms) are the next merge's
  numpy work holding the GIL when the loop wakes; per-merge stall p90 0.8-0.9 ms against 0.07.
  End to end (``plasma-server bench e2e``, rank 4): publish -> swap p50 3.3 ms against 3.9-4.0
  ms, device handle p50 2.9 ms against 3.6 ms.
  If the in-place self-test fails at load, the runtime logs a warning and works as before tiers
  (``tiered`` False): after writing a side, ``commit`` builds its prepacked session before it
  can be activated. Building holds the GIL, so from a second thread it stalled the control
  loop 3-12 ms per merge; hence the build is *cooperative*: a control loop registers with
  ``attach_control_loop()`` and calls ``maintain()`` between steps, or
  ``idle(time_to_next_tick)`` as its sleep; ``commit`` (from the merge thread) then only
  requests the build, and the control thread does it in its idle time and wakes the writer. A
  build that would not fit before the tick is put off to just after it (once). With no loop
  attached, or on the loop's own thread, ``commit`` builds at once; if the loop does not answer
  within ``build_timeout_s`` (a stuck env step) the writer builds itself and logs a warning.
- ``"inplace"``: only the non-prepacked session (DESIGN.md section 6). Stage + activate ~0.5 ms
  p50 and no build ever, but MatMulInteger repacks B on every call: act() ~28 us against
  18.7 us bare (ratio 1.5). Guarded by the same self-test; if it fails, "rebuild" (not tiered).

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

from plasma.protocol.bundle import Bundle, BundleError

__all__ = ["PolicyRuntime", "SessionSide", "SwapMode", "quantize_weight", "reference_forward"]

log = logging.getLogger(__name__)

SwapMode = Literal["rebuild", "inplace"]
_TINY = float(np.finfo(np.float32).tiny)


def quantize_weight(w: np.ndarray, qmax: int = 127) -> tuple[np.ndarray, np.ndarray]:
    """W float32 (out, in) -> (q int8 (in, out), scale float32 (out,)): quantize_dynamic's per-channel QInt8.

    Symmetric, zero point 0: scale computed in float64 as 2*max|W_col| / (2*qmax) then cast,
    q = clip(round_half_even(W / scale), -qmax, qmax); an all-zero column gets scale 1.0. With
    qmax 64 (``reduce_range=True``) or 127 this reproduces onnxruntime.quantization 1.32's
    weights bit for bit (tested).
    """
    # Always a copy: for a one-row or one-column W, W.T is already contiguous and
    # ascontiguousarray would hand back the read-only master itself.
    acc = np.array(np.asarray(w, np.float32).T, order="C", copy=True)  # (in, out)
    q = np.empty(acc.shape, np.int8)
    scale = np.empty(acc.shape[1], np.float32)
    quantize_into(acc, q, scale, np.empty_like(acc), qmax)
    return q, scale


def quantize_into(acc: np.ndarray, q: np.ndarray, scale: np.ndarray, scratch: np.ndarray,
                  qmax: int = 127) -> None:
    """In place: acc float32 (in, out) is consumed; writes q int8 (in, out) and scale (out,)."""
    np.abs(acc, out=scratch)
    absmax = scratch.max(axis=0).astype(np.float64)  # (out,)
    s64 = absmax * 2.0 / (2.0 * qmax)
    s32 = s64.astype(np.float32)
    s32[s64 < _TINY] = 1.0  # the quantizer's guard for an all-zero column
    np.divide(acc, s32, out=acc)
    np.round(acc, out=acc)
    np.clip(acc, -qmax, qmax, out=acc)
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


class _Runner:
    """One session over a side's buffers with its batch-1 binding: what act() reads, as ONE reference.

    Immutable once made, so a call that read it runs wholly on one session and one set of buffers.
    """

    __slots__ = ("session", "binding", "obs_buf", "out_row", "prepacked", "_keep")

    def __init__(self, session: ort.InferenceSession, binding: ort.IOBinding, obs_buf: np.ndarray,
                 out_row: np.ndarray, prepacked: bool, keep: list[ort.OrtValue]) -> None:
        self.session, self.binding, self.obs_buf, self.out_row = session, binding, obs_buf, out_row
        self.prepacked = prepacked
        self._keep = keep  # ORT borrows the buffers: the OrtValues must outlive the session


class SessionSide:
    """One weight state: int8/scale buffers shared with its session(s), and pre-bound batch-1 I/O buffers.

    ``current`` is the runner act() uses while this side is active. With ``tiered`` a non-prepacked
    runner (``plain``, made once: it sees buffer writes on its next run) lives beside the prepacked
    one (``fast``, None while the buffers hold writes it has not seen). ``generation`` counts writes.
    """

    def __init__(self, bundle: Bundle, base_q: Mapping[str, tuple[np.ndarray, np.ndarray]], prepack: bool,
                 graph: bytes | None = None, *, tiered: bool = False) -> None:
        self._bundle = bundle
        self._prepack = prepack
        self._graph = graph  # ORT-optimized model bytes (see _preoptimize), or None for the file as shipped
        self.q = {name: q.copy() for name, (q, _) in base_q.items()}  # name -> int8 (in, out)
        self.scale = {name: s.copy() for name, (_, s) in base_q.items()}  # name -> float32 (out,)
        m = bundle.manifest
        self.obs_buf = np.zeros((1, m.obs_dim), np.float32)  # bound input, shared by this side's runners
        self.out_buf = np.zeros((1, m.act_dim), np.float32)  # bound output
        self.out_row: np.ndarray = self.out_buf[0]  # (act_dim,) view handed back by act()
        self.generation = 0  # bumped by PolicyRuntime.begin_write before the buffers are written
        self.plain: _Runner | None = self._make(prepack=False) if tiered or not prepack else None
        self.fast: _Runner | None = None
        self.current: _Runner
        if prepack:
            self.install(self.build())
        else:
            assert self.plain is not None
            self.current = self.plain

    @property
    def session(self) -> ort.InferenceSession:
        return self.current.session

    @property
    def binding(self) -> ort.IOBinding:
        return self.current.binding

    def build(self) -> _Runner:
        """A new session over the current buffers (prepacked unless the side is "inplace"); not installed.

        Measured for 64-256x3-8: 1.28 ms p50 from the shipped bytes with all graph optimizations,
        0.54 ms from pre-optimized bytes with optimizations off; the same run() time (18.8 us).
        """
        return self._make(prepack=self._prepack)

    def install(self, runner: _Runner) -> None:
        """Make ``runner`` (built over the buffers as they are now) this side's session."""
        if runner.prepacked:
            self.fast = runner
        self.current = runner

    def _make(self, *, prepack: bool) -> _Runner:
        so = _options(optimize=self._graph is None)
        if not prepack:
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
        return _Runner(session, binding, self.obs_buf, self.out_row, prepack, keep)

    def act_batch(self, obs: np.ndarray) -> np.ndarray:
        """(n, obs_dim) -> (n, act_dim), a fresh array (plain run with a dict feed) on ``current``."""
        x = np.ascontiguousarray(obs, dtype=np.float32).reshape(-1, self._bundle.manifest.obs_dim)
        out: np.ndarray = self.current.session.run(["action"], {"obs": x})[0]
        return out


class PolicyRuntime:
    """The device policy: ``act(obs)`` on the active side; two sides for ``plasma.edge.merge``."""

    def __init__(self, bundle: Bundle, *, swap: SwapMode = "rebuild", build_timeout_s: float = 1.0,
                 upgrade_linger_s: float = 2.0) -> None:
        self.bundle = bundle
        base_q = {name: quantize_weight(w, bundle.manifest.weight_qmax)
                  for name, w in bundle.weights.items()}
        self.base_q: Mapping[str, tuple[np.ndarray, np.ndarray]] = base_q
        """name -> (int8 (in, out), scale (out,)) requantized from the fp32 master (== shipped)."""
        self.lock = threading.RLock()
        """Held by writers (merge) and by probes; act() never takes it."""
        self._base_session: _PlainSession | None = None
        self.swap: SwapMode = swap
        graph = _preoptimize(bundle.model_bytes)
        inplace_ok = self._inplace_works(base_q, graph)
        if swap == "inplace" and not inplace_ok:
            log.warning("in-place initializer writes did not show on the next run; swapping by session rebuild "
                        "(act() faster, but each merge may stall the control loop for several ms)")
            self.swap = "rebuild"
        elif swap == "rebuild" and not inplace_ok:
            log.warning("in-place initializer writes did not show on the next run; tiered activation off: "
                        "each staged side's session is rebuilt before it goes live")
        self.tiered = self.swap == "rebuild" and inplace_ok
        """rebuild mode with a non-prepacked session per side: activation needs no session build."""
        prepack = self.swap == "rebuild"
        self.sides = tuple(SessionSide(bundle, base_q, prepack, graph, tiered=self.tiered) for _ in range(2))
        self._active = self.sides[0]
        self._live: _Runner = self._active.current  # what act() reads: one reference per call
        self._entered = 0  # act() calls begun / finished: written only by the control thread
        self._exited = 0
        self._flip_mark = 0  # value of _entered right after the last flip
        # Cooperative builds (see commit / maintain / _upgrade): all guarded by _coop
        self.build_timeout_s = build_timeout_s
        self.upgrade_linger_s = upgrade_linger_s
        self._coop = threading.Lock()
        self._cond = threading.Condition(self._coop)  # notified when a build ends or an upgrade is requested
        self._loop_ident: int | None = None  # thread ident of the attached control loop
        self._pending: int | None = None  # side index whose pre-activation build the loop owes (not tiered)
        self._want: tuple[int, int] | None = None  # (side, generation) whose prepacked upgrade is owed (tiered)
        self._building: int | None = None  # side index an upgrade build is running over
        self._worker: threading.Thread | None = None  # background upgrader when no loop is attached
        self._built = threading.Event()  # set when the requested build is done (or failed)
        self._build_error: BaseException | None = None
        self._wake = threading.Event()  # set by a build request: ends the control loop's idle()
        self._deferred = False  # idle() put the pending build off once to keep a tick on time
        self._build_s = 0.0015  # running estimate of a build's duration (s), updated by maintain()
        self.builds_on_loop = 0  # builds done by maintain(), for benches and tests
        self.build_fallbacks = 0  # builds the worker did itself because the loop did not answer
        self.builds_in_background = 0  # prepacked upgrades built by the background thread
        self.stale_builds = 0  # upgrade builds dropped: side no longer active or rewritten
        self.base_requant_err = self._check_base()

    # -- the hot path -------------------------------------------------------------------------
    def act(self, obs: np.ndarray) -> np.ndarray:
        """obs (obs_dim,) -> action (act_dim,): a view of the bound output buffer, overwritten by the next call.

        Call from one control thread. Nothing is allocated: the observation is copied into the
        bound input buffer and ``run_with_iobinding`` writes the bound output buffer, whose
        preallocated row view is returned. Copy it if you keep it past the next call.
        """
        self._entered += 1
        run = self._live  # read once: the whole call runs on one session over one weight state
        try:
            np.copyto(run.obs_buf, obs)
            run.session.run_with_iobinding(run.binding)
        finally:
            self._exited += 1
        return run.out_row

    def act_batch(self, obs: np.ndarray) -> np.ndarray:
        """(n, obs_dim) -> (n, act_dim) on the active weights, for probes (takes the writer lock)."""
        with self.lock:
            return self._active.act_batch(obs)

    def base_act_batch(self, obs: np.ndarray) -> np.ndarray:
        """(n, obs_dim) -> (n, act_dim) on the shipped base model, whatever is active (audit probes)."""
        with self.lock:
            return self._base().act_batch(obs)

    @property
    def live_prepacked(self) -> bool:
        """True when act() runs a prepacked session (False right after a tiered activation)."""
        return self._live.prepacked

    # -- what plasma.edge.merge uses ----------------------------------------------------------
    @property
    def active_index(self) -> int:
        return 0 if self._active is self.sides[0] else 1

    def flip(self, index: int) -> None:
        """Make side ``index`` active: one reference assignment; later act() calls run on it.

        Tiered: if the side has no valid prepacked session, act() runs its non-prepacked one
        and the prepacked build is requested (control loop, else a background thread).
        """
        side = self.sides[index]
        start = None
        with self._coop:
            self._active = side
            self._live = side.current
            self._flip_mark = self._entered  # calls begun before this may still run on the old side
            if self.tiered and side.current is not side.fast:
                self._want = (index, side.generation)
                start = self._request_upgrade()
            else:
                self._want = None
        if start is not None:
            start.start()  # outside the lock: the thread takes it at once

    def wait_quiet(self, index: int) -> None:
        """Block until no act() call can still be running on side ``index`` (it must be inactive)."""
        if self.sides[index] is self._active:
            raise RuntimeError("refusing to wait on the active side")
        while self._exited < self._flip_mark:  # a batch-1 call lasts ~20 us
            time.sleep(0)

    def begin_write(self, index: int) -> None:
        """Call before writing side ``index``'s buffers (it must be inactive).

        Waits until no act() can still run on it and no prepacked build over it is pending
        (cancelled) or running (waited for, ~1 ms), then counts the write; tiered, the side's
        session becomes its non-prepacked one, which shows the writes on its next run.
        """
        side = self.sides[index]
        self.wait_quiet(index)
        with self._cond:
            if self._want is not None and self._want[0] == index:
                self._want = None
            while self._building == index:
                self._cond.wait()
            side.generation += 1
            if self.tiered:
                assert side.plain is not None
                side.fast = None
                side.current = side.plain

    def commit(self, index: int) -> None:
        """Make writes to side ``index``'s buffers visible to act() once it is flipped to.

        Tiered or inplace: nothing to do (a non-prepacked session sees the writes). Rebuild without
        tiers (the load-time self-test failed): a new session, requested from the attached control
        loop; this call blocks until the loop has done it in ``maintain()``; if the loop does not
        answer within ``build_timeout_s`` (a stuck env step), this thread builds and logs a warning.
        With no loop attached, or when called on the loop's own thread, it builds right here.
        """
        if self.swap != "rebuild" or self.tiered:
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
            self._rebuild(index)
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
                self._rebuild(index)
                return
            self._built.wait()  # the loop is building right now: ~1 ms
        if self._build_error is not None:
            error, self._build_error = self._build_error, None
            raise error

    def _rebuild(self, index: int) -> None:
        side = self.sides[index]
        side.install(side.build())

    # -- tiered upgrades: prepacked build after activation ----------------------------------------
    def _request_upgrade(self) -> threading.Thread | None:
        """Under _coop: wake whoever builds upgrades; returns a new background thread to start, if any."""
        self._deferred = False
        if self._loop_ident is not None:
            self._wake.set()
            return None
        self._cond.notify_all()
        if self._worker is None:
            self._worker = threading.Thread(target=self._background, name="plasma-prepack", daemon=True)
            return self._worker
        return None

    def _background(self) -> None:
        """Build requested upgrades while no control loop is attached; end after ``upgrade_linger_s`` idle."""
        while True:
            with self._cond:
                deadline = time.monotonic() + self.upgrade_linger_s
                while self._want is None or self._loop_ident is not None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        self._worker = None  # the next request starts a new thread
                        return
                    self._cond.wait(left)
            if self._upgrade():
                self.builds_in_background += 1

    def _upgrade(self) -> bool:
        """Build the requested prepacked session; install it only if its side is still active and unwritten."""
        with self._cond:
            job, self._want = self._want, None
            if job is None:
                return False
            index, generation = job
            side = self.sides[index]
            if side.generation != generation or self._active is not side or side.current is side.fast:
                return False  # stale, or already upgraded
            self._building = index
            self._deferred = False
        runner = None
        try:
            t0 = time.perf_counter()
            runner = side.build()
            self._build_s += 0.2 * (time.perf_counter() - t0 - self._build_s)
        except Exception:  # noqa: BLE001 - the side keeps its exact non-prepacked session
            log.exception("prepacked session build failed; act() stays on the non-prepacked session")
        finally:
            with self._cond:
                self._building = None
                if runner is not None:
                    if side.generation == generation and self._active is side:
                        side.install(runner)
                        self._live = runner  # one reference: the next act() runs prepacked
                    else:
                        self.stale_builds += 1
                self._cond.notify_all()
        return True

    def wait_upgraded(self, timeout: float = 5.0) -> bool:
        """Block until no prepacked upgrade is owed or running (tests, benches); True if act() is prepacked."""
        end = time.monotonic() + timeout
        with self._cond:
            while self._want is not None or self._building is not None:
                left = end - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(min(left, 0.01))
            return self._live.prepacked

    # -- cooperative builds: the control loop's side ---------------------------------------------
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
        if self._want is not None:  # unlocked read: a request missed here is seen on the next call
            if self._upgrade():
                self.builds_on_loop += 1
                return True
        if self._pending is None:
            return False
        with self._coop:
            index, self._pending = self._pending, None
            self._wake.clear()
            self._deferred = False
        if index is None:
            return False
        try:
            t0 = time.perf_counter()
            self._rebuild(index)
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
        if self._pending is None and self._want is None and timeout > 0:
            self._wake.wait(timeout)
        self._wake.clear()
        if self._pending is None and self._want is None:
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
