"""Edge stage 0: real transitions -> preallocated buffer -> TraceBatch frames on the telemetry topic.

The control thread calls ``add`` (copies into preallocated numpy columns; no allocation, no
I/O). A flusher thread sends a frame every ``flush_rows`` rows or ``flush_s`` seconds, QoS 1.
While the broker is down the rows stay in the buffer (paho would queue QoS 1 messages without
limit: ``MqttBus`` sets ``max_queued_messages_set(0)``), so memory is bounded by ``capacity``
rows; rows that arrive when it is full are dropped and counted. ``close`` flushes what is left.

The columns live in one anonymous memory mapping: the kernel hands out zero pages as rows are
first written, so a connected device keeps ~``flush_rows`` rows resident (the buffer restarts
at row 0 after every flush), not the whole ``capacity`` (~1 MB for Pendulum: ``np.zeros``
served it from the malloc heap, cleared, 0.6 MiB resident at start).
"""

from __future__ import annotations

import logging
import mmap
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from plasma.protocol import SLOTS, TraceBatch, encode_traces

__all__ = ["TelemetryBuffer", "TelemetryConfig"]

log = logging.getLogger(__name__)

Publish = Callable[[bytes], None]
"""Send one frame (QoS 1); raises on failure."""


@dataclass(frozen=True)
class TelemetryConfig:
    flush_rows: int = 256
    """Rows per frame: 256 Pendulum rows are ~16 KB, one frame every ~5 s at 50 Hz."""
    flush_s: float = 5.0
    """Send what is there at least this often."""
    capacity: int = 16384
    """Rows kept while the broker is down (~1 MB for Pendulum); more are dropped and counted."""


def _zero_columns(rows: int, spec: dict[str, tuple[tuple[int, ...], type[np.generic]]]
                  ) -> dict[str, np.ndarray]:
    """name -> zeroed (rows, *shape) array, all in one anonymous mapping (zero pages, resident
    only once written). Each column starts on a 64-byte boundary."""
    offsets, total = {}, 0
    for name, (shape, dtype) in spec.items():
        offsets[name] = total
        total += -(-rows * int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize // 64) * 64
    private = getattr(mmap, "MAP_PRIVATE", None)  # POSIX: plain anonymous memory, not shmem
    buf = (mmap.mmap(-1, max(total, 1)) if private is None  # the arrays keep it alive (.base)
           else mmap.mmap(-1, max(total, 1), flags=private))
    return {name: np.frombuffer(buf, dtype, count=rows * int(np.prod(shape, dtype=np.int64)),
                                offset=offsets[name]).reshape((rows, *shape))
            for name, (shape, dtype) in spec.items()}


class TelemetryBuffer:
    """Column buffers for one device; ``add`` from the control thread, flushing on its own thread."""

    def __init__(self, fleet: str, device: str, obs_dim: int, act_dim: int, publish: Publish,
                 connected: Callable[[], bool], cfg: TelemetryConfig = TelemetryConfig()) -> None:
        self.fleet, self.device, self.cfg = fleet, device, cfg
        self._publish, self._connected = publish, connected
        n = cfg.capacity
        self._cols = _zero_columns(n, {
            "episode": ((), np.uint32), "step": ((), np.uint32),
            "obs": ((obs_dim,), np.float32), "action": ((act_dim,), np.float32),
            "reward": ((), np.float32), "next_obs": ((obs_dim,), np.float32),
            "terminated": ((), np.bool_), "truncated": ((), np.bool_),
            **{f"{slot}_version": ((), np.uint32) for slot in SLOTS},
            "timestamp": ((), np.float64),
        })
        self._version_cols = [self._cols[f"{slot}_version"] for slot in SLOTS]  # slot-table order
        self._rows = 0
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._seq = 0
        self.sent_rows = 0
        self.sent_frames = 0
        self.dropped_rows = 0
        self._thread = threading.Thread(target=self._run, name="plasma-telemetry", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def add(self, episode: int, step: int, obs: np.ndarray, action: np.ndarray, reward: float,
            next_obs: np.ndarray, terminated: bool, truncated: bool,
            versions: tuple[int, ...]) -> None:
        """One transition (control thread). Never blocks on the network."""
        with self._lock:
            i = self._rows
            if i >= self.cfg.capacity:
                self.dropped_rows += 1
                return
            c = self._cols
            c["episode"][i], c["step"][i] = episode, step
            c["obs"][i], c["action"][i], c["next_obs"][i] = obs, action, next_obs
            c["reward"][i], c["terminated"][i], c["truncated"][i] = reward, terminated, truncated
            for column, version in zip(self._version_cols, versions):
                column[i] = version
            c["timestamp"][i] = time.time()
            self._rows = i + 1
        if i + 1 >= self.cfg.flush_rows and (i + 1) % self.cfg.flush_rows == 0:
            self._wake.set()

    @property
    def pending(self) -> int:
        return self._rows

    def flush(self) -> int:
        """Send every buffered row if the broker is up; returns rows sent."""
        if not self._connected():
            return 0
        with self._lock:
            n = self._rows
            if n == 0:
                return 0
            cols = {k: v[:n].copy() for k, v in self._cols.items()}
            self._rows = 0
        sent = 0
        for start in range(0, n, self.cfg.flush_rows):
            part = {k: v[start:start + self.cfg.flush_rows] for k, v in cols.items()}
            try:
                self._publish(self._frame(part))
            except Exception as exc:  # noqa: BLE001 - bus error or non-finite rows: count, go on
                self.dropped_rows += n - start
                log.warning("telemetry frame not sent (%s); %d rows dropped", exc, n - start)
                break
            sent += len(part["reward"])
        self.sent_rows += sent
        return sent

    def _frame(self, cols: dict[str, np.ndarray]) -> bytes:
        cols = dict(cols)
        versions = {slot: cols.pop(f"{slot}_version") for slot in SLOTS}
        batch = TraceBatch(fleet=self.fleet, device=self.device, seq=self._seq,
                           versions=versions, **cols)
        self._seq += 1
        self.sent_frames += 1
        return encode_traces(batch)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.cfg.flush_s)
            self._wake.clear()
            if self._stop.is_set():
                break
            self.flush()

    def close(self) -> int:
        """Stop the flusher and send what is left; returns rows that could not be sent."""
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(5)
        self.flush()
        left = self._rows
        if left:
            log.warning("%d telemetry rows not sent: the broker is unreachable", left)
        return left
