"""Edge stage 9: verified adapters -> merged int8 weights, double-buffered, with instant rollback.

Per layer: W = W_base + sum over slots ("fleet", "device") of (alpha / rank) * B @ A, always
from the fp32 master (chained requantization drifts, docs/design.md section 3), then requantized
with exactly the shipped scheme (``quantize_weight``). A layer no adapter touches gets the base
int8 weights, so removing every adapter gives the shipped policy bit for bit.

``stage`` writes the inactive side of the ``PolicyRuntime`` (``begin_write`` first: no act() call
reads it, no session build runs over it) and returns a ``Staged`` handle that can run probes;
``activate`` flips one reference; ``rollback`` flips back while the previous state still sits in
the other side (until the next ``stage``), and otherwise re-stages it from the master. In the
default tiered rebuild mode no session is built on this path: the probes and the first act()
calls after the flip run the side's non-prepacked session (exact), and the prepacked one is
built afterwards by the control loop or a background thread (see ``plasma.edge.runtime``).

Errors: ``MergeError`` (code bad_adapter, non_finite, stale, no_rollback) means a broken contract:
the auditor should have refused the adapter before it got here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Protocol

import numpy as np

from plasma.protocol import SLOTS
from plasma.protocol.errors import MergeError

from .runtime import PolicyRuntime
from .runtime.quantize import quantize_into

__all__ = ["AdapterLike", "MergeEngine", "MergeError", "Staged", "merged_weights"]


class AdapterLike(Protocol):
    """What merge needs of ``plasma.protocol.Adapter``: name -> (A (rank, in), B (out, rank))."""

    @property
    def alpha(self) -> float: ...
    @property
    def rank(self) -> int: ...
    @property
    def layers(self) -> Mapping[str, tuple[np.ndarray, np.ndarray]]: ...


State = Mapping[str, "AdapterLike | None"]


# (factor c, A (rank, in), B (out, rank)) for one layer
_Term = tuple[float, np.ndarray, np.ndarray]


def _terms(state: State, shapes: Mapping[str, tuple[int, int]]) -> dict[str, list[_Term]]:
    """Validate the adapters against the base shapes and group their factors by layer."""
    terms: dict[str, list[_Term]] = {}
    for slot, adapter in state.items():
        if slot not in SLOTS:
            raise MergeError(f"unknown slot {slot!r}; slots are {SLOTS}", code="bad_adapter")
        if adapter is None:
            continue
        rank, alpha = int(adapter.rank), float(adapter.alpha)
        if rank < 1 or not np.isfinite(alpha):
            raise MergeError(f"{slot}: rank {rank}, alpha {alpha}", code="bad_adapter")
        for name, (a, b) in adapter.layers.items():
            if name not in shapes:
                raise MergeError(f"{slot}: no layer {name!r} in the base model", code="bad_adapter")
            n_out, n_in = shapes[name]
            a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
            if a.shape != (rank, n_in) or b.shape != (n_out, rank):
                raise MergeError(f"{slot}.{name}: A {a.shape}, B {b.shape}; want ({rank}, {n_in}), ({n_out}, {rank})",
                                 code="bad_adapter")
            terms.setdefault(name, []).append((alpha / rank, a, b))
    return terms


def _accumulate(acc: np.ndarray, w_base: np.ndarray, terms: list[_Term], tmp: np.ndarray) -> None:
    """acc (in, out) = W_base.T + sum c * (B @ A).T, computed as (c A).T @ B.T into preallocated buffers."""
    np.copyto(acc, w_base.T)
    for c, a, b in terms:
        np.matmul((c * a).T, b.T, out=tmp)  # (in, rank) @ (rank, out) -> (in, out)
        acc += tmp


def merged_weights(base: Mapping[str, np.ndarray], adapters: State) -> dict[str, np.ndarray]:
    """name -> merged W float32 (out, in) for every base layer (same arithmetic as the engine)."""
    shapes = {name: w.shape for name, w in base.items()}
    terms = _terms(adapters, shapes)
    out = {}
    for name, w in base.items():
        acc = np.empty(w.shape[::-1], np.float32)  # (in, out)
        _accumulate(acc, w, terms.get(name, []), np.empty_like(acc))
        out[name] = np.ascontiguousarray(acc.T)  # (out, in)
    return out


@dataclass(frozen=True)
class Staged:
    """A merged state written into the inactive side, not yet live. Valid until the next ``stage``."""

    adapters: State
    """slot -> adapter (or None) that this state holds, every slot listed."""
    _engine: MergeEngine
    _side: int
    _generation: int

    def act_batch(self, obs: np.ndarray) -> np.ndarray:
        """(n, obs_dim) -> (n, act_dim) with the staged weights (probes for the auditor)."""
        with self._engine.runtime.lock:
            self._engine._check_current(self)
            return self._engine.runtime.sides[self._side].act_batch(obs)


class MergeEngine:
    """Stages, activates and rolls back adapter states on a ``PolicyRuntime``'s two sides."""

    def __init__(self, runtime: PolicyRuntime) -> None:
        self.runtime = runtime
        bundle = runtime.bundle
        self._shapes = {name: w.shape for name, w in bundle.weights.items()}
        base_state: State = MappingProxyType({slot: None for slot in SLOTS})
        # what each side's buffers hold (None while being written), and a write counter per side
        self._holds: list[State | None] = [base_state, base_state]
        self._generation = [0, 0]
        self._previous: State | None = None
        self._acc = {n: np.empty(s[::-1], np.float32) for n, s in self._shapes.items()}  # (in, out)
        self._tmp = {n: np.empty(s[::-1], np.float32) for n, s in self._shapes.items()}  # (in, out)

    @property
    def active(self) -> State:
        """slot -> adapter (or None) live in act() right now."""
        state = self._holds[self.runtime.active_index]
        if state is None:  # cannot happen: only the inactive side is ever written
            raise RuntimeError("the active side is marked as being written")
        return state

    def stage(self, adapters: Mapping[str, AdapterLike | None]) -> Staged:
        """Merge ``adapters`` into the inactive side and return the handle; act() does not see it yet.

        Slots not listed keep their active adapter; None removes one. Writing the inactive side
        drops the state ``rollback`` would have flipped back to (it is then rebuilt instead).
        Tiered (default): no session build here. Rebuild without tiers, with a control loop
        attached: the new session is built by that loop (``PolicyRuntime.commit``) and this
        call blocks until it is, up to ~1 period.
        """
        with self.runtime.lock:
            state: State = MappingProxyType({**self.active, **adapters})
            terms = _terms(state, self._shapes)  # validate before touching any buffer
            index = 1 - self.runtime.active_index
            self.runtime.begin_write(index)  # no act() on it, no session build over it
            self._holds[index] = None
            self._generation[index] += 1
            self._write(index, terms)
            self.runtime.commit(index)
            self._holds[index] = state
            return Staged(state, self, index, self._generation[index])

    def activate(self, staged: Staged, *, wake_upgrade: bool = True) -> None:
        """Make a staged state live: one reference flip; the state it replaces stays for ``rollback``.

        ``wake_upgrade`` False: the prepacked upgrade is owed, not started (``PolicyRuntime.flip``).
        """
        with self.runtime.lock:
            self._check_current(staged)
            self._previous = self.active
            self.runtime.flip(staged._side, wake=wake_upgrade)

    def rollback(self) -> State:
        """Return to the state live before the last ``activate``: a flip if it is still in the other side."""
        with self.runtime.lock:
            if self._previous is None:
                raise MergeError("no previous state to roll back to", code="no_rollback")
            previous, self._previous = self._previous, None
            other = 1 - self.runtime.active_index
            if self._holds[other] is previous:
                self.runtime.flip(other)  # instant: the buffers still hold it
            else:  # overwritten by a later stage: rebuild it from the master (~1-2 ms)
                self.runtime.flip(self.stage(previous)._side)
            return previous

    def restore(self, adapters: Mapping[str, AdapterLike | None]) -> None:
        """Bring the runtime to a known state (e.g. read back from disk after a restart)."""
        self.activate(self.stage(adapters))

    def _check_current(self, staged: Staged) -> None:
        index = staged._side
        if (staged._engine is not self or self._generation[index] != staged._generation
                or self._holds[index] is not staged.adapters or index == self.runtime.active_index):
            raise MergeError("this staged state was overwritten or is already active", code="stale")

    def _write(self, index: int, terms: Mapping[str, list[_Term]]) -> None:
        """Fill side ``index``: base int8 for untouched layers, requantized W_base + deltas for the rest."""
        side = self.runtime.sides[index]
        for name, w_base in self.runtime.bundle.weights.items():
            if name not in terms:
                q, scale = self.runtime.base_q[name]
                np.copyto(side.q[name], q)
                np.copyto(side.scale[name], scale)
                continue
            acc, tmp = self._acc[name], self._tmp[name]
            with np.errstate(over="ignore", invalid="ignore"):  # overflow is caught just below, as an error
                _accumulate(acc, w_base, terms[name], tmp)
            if not np.isfinite(acc).all():
                raise MergeError(f"merged {name} is not finite", code="non_finite")
            quantize_into(acc, side.q[name], side.scale[name], tmp, self.runtime.bundle.manifest.weight_qmax)
