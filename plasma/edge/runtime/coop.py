"""Edge runtime: cooperative session builds, done by the control loop between its steps.

A session build holds the GIL (~1 ms), so from a second thread it stalls the control loop;
instead the merge thread requests it and the attached loop builds in ``maintain()``/``idle()``.
Used by rebuild mode without tiers (``commit``) and by tiered upgrades (``maintain``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, TypeVar

from .session import SessionSide

__all__ = ["CooperativeBuilds"]

log = logging.getLogger(__name__)

_Self = TypeVar("_Self", bound="CooperativeBuilds")


class CooperativeBuilds:
    """PolicyRuntime's control-loop side: ``commit`` requests a build, the loop does it."""

    # State owned and initialised by PolicyRuntime.__init__ (guarded by _coop).
    swap: str
    tiered: bool
    sides: tuple[SessionSide, ...]
    build_timeout_s: float
    _coop: threading.Lock
    _loop_ident: int | None
    _pending: int | None
    _want: tuple[int, int] | None
    _built: threading.Event
    _build_error: BaseException | None
    _wake: threading.Event
    _deferred: bool
    _build_s: float
    builds_on_loop: int
    build_fallbacks: int

    if TYPE_CHECKING:
        def _upgrade(self) -> bool: ...  # TieredUpgrades

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

    # -- cooperative builds: the control loop's side ---------------------------------------------
    @contextmanager
    def attach_control_loop(self: _Self) -> Iterator[_Self]:
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
