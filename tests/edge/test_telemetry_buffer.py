"""The telemetry buffer's columns: one anonymous mapping, resident only where rows were written."""

from __future__ import annotations

import mmap

import numpy as np

from plasma.edge.telemetry import TelemetryBuffer, TelemetryConfig
from plasma.protocol import decode_traces


def _root(a: np.ndarray) -> object:
    base: object = a
    while True:
        if isinstance(base, np.ndarray) and base.base is not None:
            base = base.base
        elif isinstance(base, memoryview):
            base = base.obj
        else:
            return base


def test_columns_share_one_anonymous_mapping_and_round_trip() -> None:
    frames: list[bytes] = []
    buf = TelemetryBuffer("f", "d", 3, 2, frames.append, lambda: True,
                          TelemetryConfig(flush_rows=4, capacity=10))
    roots = {id(_root(c)) for c in buf._cols.values()}
    assert len(roots) == 1 and isinstance(_root(buf._cols["obs"]), mmap.mmap)
    for name, col in buf._cols.items():
        assert len(col) == 10 and not col.any(), name
        assert col.ctypes.data % 64 == 0, name
    rng = np.random.default_rng(0)
    rows = [(rng.normal(size=3).astype(np.float32), rng.normal(size=2).astype(np.float32))
            for _ in range(12)]
    for i, (obs, act) in enumerate(rows):
        buf.add(1, i, obs, act, float(i), obs + 1, i == 11, False, (2, 3))
    assert buf.dropped_rows == 2 and buf.flush() == 10
    got = [decode_traces(f) for f in frames]
    obs = np.concatenate([np.asarray(b.obs) for b in got])
    assert np.array_equal(obs, np.stack([o for o, _ in rows[:10]]))
    assert np.array_equal(np.concatenate([np.asarray(b.action) for b in got]),
                          np.stack([a for _, a in rows[:10]]))
    assert [float(r) for b in got for r in b.reward] == [float(i) for i in range(10)]
