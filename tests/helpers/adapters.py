"""Test helpers: small LoRA adapters, random or sized against a bundle's layers, and probe
observations drawn from a bundle's normalisation."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from plasma.protocol import Adapter
from plasma.protocol.bundle import Bundle


def small_adapter(sizes: Sequence[int], seed: int = 1, scale: float = 0.02,
                  rank: int = 2) -> Adapter:
    """Factors ~ N(0, scale) for every layer ``l{k}`` of an MLP with these sizes; alpha 2."""
    rng = np.random.default_rng(seed)
    layers = {f"l{k}": (rng.normal(0, scale, (rank, i)).astype(np.float32),
                        rng.normal(0, scale, (o, rank)).astype(np.float32))
              for k, (i, o) in enumerate(zip(sizes[:-1], sizes[1:]))}
    return Adapter(alpha=2.0, rank=rank, layers=layers)


def random_adapter(shapes: Mapping[str, tuple[int, int]], rank: int, seed: int = 0,
                   magnitude: float = 1.0, alpha: float = 8.0) -> Adapter:
    """name -> (in, out); factors ~ N(0, magnitude), float32."""
    rng = np.random.default_rng(seed)
    layers = {
        name: ((rng.standard_normal((rank, i)) * magnitude).astype(np.float32),  # (rank, in)
               (rng.standard_normal((o, rank)) * magnitude).astype(np.float32))  # (out, rank)
        for name, (i, o) in shapes.items()
    }
    return Adapter(alpha=alpha, rank=rank, layers=layers)


def bundle_adapter(bundle: Bundle, seed: int, rank: int = 4, size: float = 0.1,
                   layers: list[str] | None = None) -> Adapter:
    """delta W with entries ~ size * typical |W| (random A, B) on the bundle's layers;
    alpha = 2 * rank."""
    rng = np.random.default_rng(seed)
    factors = {}
    for name, n_in, n_out in bundle.layer_specs:
        if layers is not None and name not in layers:
            continue
        a = rng.standard_normal((rank, n_in)).astype(np.float32) / np.sqrt(n_in)
        b = (size / np.sqrt(n_in) / np.sqrt(2 * rank)
             * rng.standard_normal((n_out, rank))).astype(np.float32)
        factors[name] = (a, b)
    return Adapter(alpha=2.0 * rank, rank=rank, layers=factors)


def probes(bundle: Bundle, n: int = 400, seed: int = 5) -> np.ndarray:
    """``n`` observations ~ N(obs_mean, obs_std) of the bundle, float32 (n, obs_dim)."""
    m = bundle.manifest
    rng = np.random.default_rng(seed)
    return (np.array(m.obs_mean) + np.array(m.obs_std)
            * rng.standard_normal((n, m.obs_dim))).astype(np.float32)
