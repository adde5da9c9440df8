"""LoRA adapters in memory and in their npz file form.

An adapter holds, for each target layer, ``A`` (rank x in) and ``B`` (out x rank):
delta W (out x in) = alpha / rank * B @ A.  The npz form has arrays ``NAME.A`` and
``NAME.B`` for each layer and a scalar ``alpha``; it is loaded without pickle.
"""

from __future__ import annotations

import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from numpy.typing import ArrayLike

from ._limits import MAX_FEATURES, MAX_LAYERS, MAX_RANK
from .errors import AdapterFileError

__all__ = ["Adapter", "adapter_from_arrays", "load_adapter_npz", "save_adapter_npz"]


@dataclass(frozen=True)
class Adapter:
    """A complete low-rank adapter for one slot, relative to one base model."""

    alpha: float
    rank: int
    layers: Mapping[str, tuple[np.ndarray, np.ndarray]]
    """name -> (A float32 (rank, in), B float32 (out, rank)), in a stable order."""

    def __post_init__(self) -> None:
        if not (1 <= self.rank <= MAX_RANK):
            raise ValueError(f"rank must be in 1..{MAX_RANK}, got {self.rank}")
        if not np.isfinite(self.alpha):
            raise ValueError("alpha must be finite")
        if len(self.layers) > MAX_LAYERS:
            raise ValueError(f"at most {MAX_LAYERS} layers")
        frozen: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for name, (a, b) in self.layers.items():
            a = np.asarray(a, dtype=np.float32)
            b = np.asarray(b, dtype=np.float32)
            if a.ndim != 2 or b.ndim != 2 or a.shape[0] != self.rank or b.shape[1] != self.rank:
                raise ValueError(
                    f"layer {name!r}: A must be (rank, in) and B (out, rank) with rank "
                    f"{self.rank}; got A {a.shape}, B {b.shape}"
                )
            if max(a.shape[1], b.shape[0]) > MAX_FEATURES:
                raise ValueError(f"layer {name!r}: too many features")
            if a.flags.writeable or b.flags.writeable:  # read-only views are shared as they are
                a, b = a.copy(), b.copy()
                a.flags.writeable = False
                b.flags.writeable = False
            frozen[name] = (a, b)
        object.__setattr__(self, "layers", MappingProxyType(frozen))
        object.__setattr__(self, "alpha", float(self.alpha))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta(self, name: str) -> np.ndarray:
        """delta W (out, in) for one layer, float32."""
        a, b = self.layers[name]
        return np.asarray(self.scale * (b @ a), dtype=np.float32)

    def shapes(self) -> dict[str, tuple[int, int]]:
        """name -> (in_features, out_features)."""
        return {name: (a.shape[1], b.shape[0]) for name, (a, b) in self.layers.items()}

    def is_finite(self) -> bool:
        return all(np.isfinite(a).all() and np.isfinite(b).all() for a, b in self.layers.values())


def save_adapter_npz(adapter: Adapter, path: str | Path) -> Path:
    """Write the npz form (``NAME.A``, ``NAME.B``, ``alpha``)."""
    arrays: dict[str, ArrayLike] = {"alpha": np.float32(adapter.alpha)}
    for name, (a, b) in adapter.layers.items():
        arrays[f"{name}.A"] = a
        arrays[f"{name}.B"] = b
    path = Path(path)
    with path.open("wb") as fh:
        np.savez(fh, allow_pickle=False, **arrays)
    return path


def load_adapter_npz(path: str | Path) -> Adapter:
    """Read the npz form; raises AdapterFileError with a precise message on anything odd."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise AdapterFileError(f"{path}: not a readable npz file ({exc})") from None
    return adapter_from_arrays(arrays, source=str(path))


def adapter_from_arrays(arrays: Mapping[str, np.ndarray], *, source: str = "adapter") -> Adapter:
    if "alpha" not in arrays or np.asarray(arrays["alpha"]).size != 1:
        raise AdapterFileError(f"{source}: needs a scalar 'alpha'")
    names = sorted({key[:-2] for key in arrays if key.endswith((".A", ".B"))})
    extra = set(arrays) - {"alpha"} - {f"{n}.A" for n in names} - {f"{n}.B" for n in names}
    if extra:
        raise AdapterFileError(f"{source}: unexpected arrays {sorted(extra)}")
    if not names:
        raise AdapterFileError(f"{source}: no layers (arrays NAME.A and NAME.B)")
    layers = {}
    for name in names:
        if f"{name}.A" not in arrays or f"{name}.B" not in arrays:
            raise AdapterFileError(f"{source}: layer {name!r} needs both {name}.A and {name}.B")
        layers[name] = (np.asarray(arrays[f"{name}.A"]), np.asarray(arrays[f"{name}.B"]))
    ranks = {a.shape[0] if a.ndim == 2 else -1 for a, _ in layers.values()}
    if len(ranks) != 1:
        raise AdapterFileError(f"{source}: all layers must share one rank, got {sorted(ranks)}")
    try:
        return Adapter(alpha=float(np.asarray(arrays["alpha"]).reshape(())), rank=ranks.pop(),
                       layers=layers)
    except (ValueError, TypeError) as exc:
        raise AdapterFileError(f"{source}: {exc}") from None
