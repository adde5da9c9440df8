"""Benchmark of edge stages 7-8 on the hot path: verify + decode of one packet."""

from __future__ import annotations

import time

import numpy as np

from plasma.protocol import Adapter, SigningKey, TrustStore, decode_packet, encode_packet

__all__ = ["bench_packet"]


def bench_packet(sizes: tuple[int, ...] = (64, 256, 256, 256, 8), rank: int = 4,
                 dtype: str = "int8", n: int = 5000, seed: int = 0) -> dict[str, float | int | str]:
    """Median and p99 of ``decode_packet`` (signature, digest, header, factors) in us.

    The adapter covers every layer of an MLP with the given sizes; the signature check
    (one Ed25519 verify, about 95 us here) is the largest single cost.
    """
    rng = np.random.default_rng(seed)
    layers = {f"l{i}": (rng.normal(size=(rank, sizes[i])).astype(np.float32),
                        rng.normal(size=(sizes[i + 1], rank)).astype(np.float32))
              for i in range(len(sizes) - 1)}
    key = SigningKey.generate()
    trust = TrustStore([key.public_key])
    data = encode_packet(Adapter(alpha=2.0 * rank, rank=rank, layers=layers), key=key,
                         fleet="bench", slot="fleet", version=1, base_sha256="0" * 64,
                         dtype=dtype)
    for _ in range(200):  # warm caches and allocator
        decode_packet(data, trust)
    samples = np.empty(n, dtype=np.int64)  # ns
    for i in range(n):
        t0 = time.perf_counter_ns()
        decode_packet(data, trust)
        samples[i] = time.perf_counter_ns() - t0
    return {
        "model": "-".join(map(str, sizes)), "rank": rank, "dtype": dtype,
        "packet_bytes": len(data), "n": n,
        "verify_decode_p50_us": round(float(np.median(samples)) / 1e3, 1),
        "verify_decode_p99_us": round(float(np.percentile(samples, 99)) / 1e3, 1),
    }
