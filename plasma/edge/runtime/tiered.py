"""Edge runtime: tiered activation's prepacked upgrade, built after a side went live on its plain session.

The build runs on the attached control loop (``maintain``) or, with none attached, on a
background daemon thread started on demand; its result is installed by one reference
assignment only if that side is still active and unwritten (else counted in ``stale_builds``).
"""

from __future__ import annotations

import logging
import threading
import time

from .session import Runner, SessionSide

__all__ = ["TieredUpgrades"]

log = logging.getLogger(__name__)


class TieredUpgrades:
    """PolicyRuntime's prepacked upgrades after a tiered activation."""

    # State owned and initialised by PolicyRuntime.__init__ (guarded by _coop / _cond).
    sides: tuple[SessionSide, ...]
    upgrade_linger_s: float
    _active: SessionSide
    _live: Runner
    _cond: threading.Condition
    _loop_ident: int | None
    _want: tuple[int, int] | None
    _building: int | None
    _worker: threading.Thread | None
    _wake: threading.Event
    _deferred: bool
    _build_s: float
    builds_in_background: int
    stale_builds: int

    # -- tiered upgrades: prepacked build after activation ----------------------------------------
    def _request_upgrade(self) -> threading.Thread | None:
        """Under _coop: wake whoever builds upgrades; returns a new background thread to start, if any."""
        self._deferred = False
        if self._loop_ident is not None:
            self._wake.set()
            return None
        self._cond.notify_all()
        if self._worker is None:
            # Not a daemon thread: killed at interpreter exit inside an ONNX Runtime session build,
            # it aborted the process ("terminate called without an active exception", 1 run in 3
            # of docs/examples/lora_distillation.py). Exit now waits for it: at most one build
            # plus upgrade_linger_s.
            self._worker = threading.Thread(target=self._background, name="plasma-prepack", daemon=False)
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
        except Exception:  # the side keeps its exact non-prepacked session
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
