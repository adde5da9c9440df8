"""One telemetry frame <-> one blob: the chunk layout both store backends write.

Why transitions are stored as one compact blob per telemetry frame (a *chunk*), not one
SQL row per transition: a device sends frames of tens to hundreds of rows, and the
adaptation worker always reads "every transition of device D since T" as whole numpy
columns. One INSERT per frame keeps ingest at frame rate rather than row rate, and the blob
is the frame's own column layout (``numpy.frombuffer`` back, no pickle).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from plasma.protocol import TraceBatch

__all__ = ["COLUMNS", "pack", "to_batch", "unpack"]

COLUMNS = (  # the blob layout: the telemetry frame's columns, in this order
    ("episode", "<u4", False), ("step", "<u4", False), ("obs", "<f4", True),
    ("action", "<f4", True), ("reward", "<f4", False), ("next_obs", "<f4", True),
    ("terminated", "u1", False), ("truncated", "u1", False), ("fleet_version", "<u4", False),
    ("device_version", "<u4", False), ("timestamp", "<f8", False),
)


def pack(batch: TraceBatch) -> bytes:
    return b"".join(np.ascontiguousarray(getattr(batch, name), dtype=dt).tobytes()
                    for name, dt, _ in COLUMNS)


def unpack(blob: bytes, n: int, obs_dim: int, act_dim: int) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    offset = 0
    for name, dt, wide in COLUMNS:
        width = (act_dim if name == "action" else obs_dim) if wide else 1
        arr = np.frombuffer(blob, dtype=dt, count=n * width, offset=offset)
        offset += arr.nbytes
        out[name] = arr.reshape(n, width) if wide else arr
    out["terminated"] = out["terminated"].astype(bool)
    out["truncated"] = out["truncated"].astype(bool)
    return out


def to_batch(fleet: str, device: str | None, rows: Sequence[Sequence[object]],
             since: float | None) -> TraceBatch | None:
    """Chunk rows ``(id, n_rows, obs_dim, act_dim, data)``, oldest first -> one batch.

    Only chunks with the dims of the newest chunk are kept (a device that changed model does
    not mix shapes); rows older than ``since`` are masked out."""
    if not rows:
        return None
    dims = tuple(rows[-1][2:4])
    parts = [unpack(bytes(r[4]), int(r[1]), int(r[2]), int(r[3]))  # type: ignore[call-overload]
             for r in rows if tuple(r[2:4]) == dims]
    cols = {name: np.concatenate([p[name] for p in parts]) for name, _, _ in COLUMNS}
    if since is not None:
        keep = cols["timestamp"] >= since
        cols = {k: v[keep] for k, v in cols.items()}
    if len(cols["reward"]) == 0:
        return None
    # the blob holds the two version columns of schema 1; a new slot kind needs a migration
    versions = {slot: cols.pop(f"{slot}_version") for slot in ("fleet", "device")}
    return TraceBatch(fleet=fleet, device=device or "*", seq=int(rows[-1][0]),  # type: ignore[call-overload]
                      versions=versions, **cols)
