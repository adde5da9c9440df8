"""Fuzz tool: what is fuzzed - each decoder that reads network bytes, with its seeds and output oracle."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from plasma.protocol import (
    Adapter,
    PacketError,
    PlasmaError,
    SigningKey,
    TelemetryError,
    TraceBatch,
    TrustStore,
    decode_packet,
    decode_traces,
    encode_packet,
    encode_traces,
)

from .inputs import restructure_frame, restructure_packet

__all__ = ["Target", "frame_seeds", "make_targets", "packet_seeds"]


@dataclass
class Target:
    """One decoder with its seeds, its allowed error family and its output check."""

    name: str
    seeds: list[bytes]
    decode: Callable[[bytes], Any]
    expected: type[PlasmaError]
    oracle: Callable[[Any], str | None]
    restructure: Callable[[random.Random], bytes]


def _adapter(shapes: dict[str, tuple[int, int]], rank: int, seed: int) -> Adapter:
    rng = np.random.default_rng(seed)
    return Adapter(alpha=4.0, rank=rank, layers={
        name: (rng.standard_normal((rank, i)).astype(np.float32),  # (rank, in)
               rng.standard_normal((o, rank)).astype(np.float32))  # (out, rank)
        for name, (i, o) in shapes.items()})


def packet_seeds(key: SigningKey) -> list[bytes]:
    """Valid packets: every dtype, both slots, a multi-layer one and a slot-clearing one."""
    t0 = time.time()
    seeds = [encode_packet(_adapter({"net.0": (8, 16), "net.2": (16, 16), "net.4": (16, 2)}, r, i),
                           key=key, fleet="f1", slot="fleet", version=i + 1, base_sha256="ab" * 32,
                           dtype=dtype, created_at=t0)
             for i, (dtype, r) in enumerate((("int8", 4), ("fp16", 2), ("fp32", 1)))]
    seeds.append(encode_packet(_adapter({"net.0": (3, 5)}, 2, 9), key=key, fleet="f1",
                               slot="device", device="d-1", version=3, base_sha256="cd" * 32,
                               created_at=t0))
    seeds.append(encode_packet(None, key=key, fleet="f1", slot="fleet", version=4,
                               base_sha256="ab" * 32, created_at=t0))
    return seeds


def frame_seeds() -> list[bytes]:
    seeds = []
    for n, o, a in ((1, 3, 1), (16, 8, 2), (0, 1, 1), (64, 3, 1)):
        rng = np.random.default_rng(n)
        seeds.append(encode_traces(TraceBatch(
            fleet="f1", device="d-1", episode=rng.integers(0, 9, n).astype(np.uint32),
            step=np.arange(n, dtype=np.uint32), obs=rng.standard_normal((n, o)).astype(np.float32),
            action=rng.standard_normal((n, a)).astype(np.float32),
            reward=rng.standard_normal(n).astype(np.float32),
            next_obs=rng.standard_normal((n, o)).astype(np.float32),
            terminated=rng.random(n) < 0.1, truncated=rng.random(n) < 0.1,
            versions={"fleet": np.ones(n, np.uint32), "device": np.zeros(n, np.uint32)},
            timestamp=1.7e9 + np.arange(n, dtype=np.float64), seq=n)))
    return seeds


def _finite_adapter(decoded: Any) -> str | None:
    for name, (a, b) in decoded.adapter.layers.items():
        if not (np.isfinite(a).all() and np.isfinite(b).all()):
            return f"decoded layer {name!r} holds non-finite factors"
    return None


def _finite_batch(batch: Any) -> str | None:
    for column in ("obs", "action", "reward", "next_obs", "timestamp"):
        if not np.isfinite(getattr(batch, column)).all():
            return f"decoded telemetry column {column} holds non-finite values"
    return None


def make_targets(which: str) -> list[Target]:
    """An ephemeral key signs the seeds and the re-signed inputs; no real key is read."""
    key = SigningKey.generate()
    trust = TrustStore([key.public_key])
    p_seeds, f_seeds = packet_seeds(key), frame_seeds()
    targets = {
        "packet": Target("packet", p_seeds, lambda d: decode_packet(d, trust), PacketError,
                         _finite_adapter, lambda rng: restructure_packet(rng, p_seeds, key)),
        "telemetry": Target("telemetry", f_seeds, decode_traces, TelemetryError, _finite_batch,
                            lambda rng: restructure_frame(rng, f_seeds)),
    }
    return list(targets.values()) if which == "both" else [targets[which]]
