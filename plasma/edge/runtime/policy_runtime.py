"""Edge runtime: the device policy, act() on the live side of two weight sides; load-time self-tests.

How a written side becomes visible is split by mechanism: ``coop.py`` (session builds run by
the control loop), ``tiered.py`` (prepacked upgrades after a tiered activation); "inplace"
needs neither. See the package docstring for the measurements behind them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping

import numpy as np

from plasma.protocol.bundle import Bundle, BundleError

from .coop import CooperativeBuilds
from .quantize import quantize_weight
from .session import PlainSession, Runner, SessionSide, SwapMode, preoptimize
from .tiered import TieredUpgrades

__all__ = ["PolicyRuntime"]

log = logging.getLogger(__name__)


class PolicyRuntime(TieredUpgrades, CooperativeBuilds):
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
        self._base_session: PlainSession | None = None
        self.swap: SwapMode = swap
        graph = preoptimize(bundle.model_bytes)
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
        # Tiered, the inactive side starts without a prepacked session: its first write (the
        # first stage) would drop it unused, and a flip to it builds one (0.2 MiB, ~1.5 ms).
        self.sides = tuple(SessionSide(bundle, base_q, prepack, graph, tiered=self.tiered, build_fast=i == 0)
                           for i in range(2))
        self._active = self.sides[0]
        self._live: Runner = self._active.current  # what act() reads: one reference per call
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

    def flip(self, index: int, *, wake: bool = True) -> None:
        """Make side ``index`` active: one reference assignment; later act() calls run on it.

        Tiered: if the side has no valid prepacked session, act() runs its non-prepacked one
        and the prepacked build is requested (control loop, else a background thread). With
        ``wake`` False it is only owed: an attached control loop builds it at its next
        ``maintain``/``idle`` call that finds time (about one period later), anyone may wake
        the builder sooner with ``request_upgrade`` (the packet worker does, once it has
        reported the accept: the build no longer competes with the report for the GIL).
        """
        side = self.sides[index]
        start = None
        with self._coop:
            self._active = side
            self._live = side.current
            self._flip_mark = self._entered  # calls begun before this may still run on the old side
            if self.tiered and side.current is not side.fast:
                self._want = (index, side.generation)
                start = self._request_upgrade() if wake else None
            else:
                self._want = None
        if start is not None:
            start.start()  # outside the lock: the thread takes it at once

    def request_upgrade(self) -> None:
        """Wake whoever builds prepacked upgrades if one is owed (after ``flip(wake=False)``)."""
        start = None
        with self._coop:
            if self._want is not None:
                start = self._request_upgrade()
        if start is not None:
            start.start()

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


    # -- load-time checks ---------------------------------------------------------------------
    def _base(self) -> PlainSession:
        if self._base_session is None:
            self._base_session = PlainSession(self.bundle)
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
