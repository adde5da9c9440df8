"""The server's heap: numpy temporaries from malloc's heap, not a fresh mmap per call."""

from __future__ import annotations

import ctypes
import sys

__all__ = ["roomy_heap"]


def roomy_heap(threshold: int = 32 << 20) -> bool:
    """Ask glibc's malloc to serve blocks below ``threshold`` bytes from the heap, and to keep up
    to twice that of freed heap instead of returning it to the system. Returns whether it applied
    (glibc only; elsewhere nothing changes).

    Otherwise a fresh process mmaps, and unmaps again, every numpy temporary above 128 KB (a
    1,000 x 64 policy layer, a 200 x 200 ensemble layer, a planner step over 60,000 paths), on
    every call, until the first large free raises glibc's dynamic threshold; each call then pays
    page faults in system time (a fifth of ``bench phantom``'s rollout). ``plasma-server`` calls
    it at start; the edge does not (its RSS is a guarded figure)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    return bool(mallopt(m_mmap_threshold, threshold)) and bool(mallopt(m_trim_threshold, 2 * threshold))
