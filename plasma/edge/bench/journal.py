"""Edge bench: the journal's commit latency (one append + one fdatasync per accepted packet)."""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from plasma.edge.journal import Journal

__all__ = ["bench_commit"]


def bench_commit(root: str | Path, n: int = 200, *, size: int = 32 * 1024,
                 journal: Callable[[Path], Any] = Journal) -> dict[str, float]:
    """Time ``n`` commits of ``size``-byte packets into a fresh directory under ``root``.

    ``journal`` builds the journal under test (e.g. an older implementation, for a comparison).
    """
    payload = os.urandom(size)
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        j = journal(Path(tmp) / "state")
        times = []
        for version in range(1, n + 1):
            t0 = time.perf_counter()
            j.commit("fleet", payload, version)
            times.append((time.perf_counter() - t0) * 1e3)
        j.close()
    times.sort()
    return {"commit_p50_ms": times[len(times) // 2],
            "commit_p99_ms": times[min(len(times) - 1, (len(times) * 99) // 100)]}
