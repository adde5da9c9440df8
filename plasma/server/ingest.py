"""Server stage 1: MQTT telemetry -> validated rows in the trace store.

The bus callback only enqueues (a bounded queue, never a decode on the network thread);
one worker thread decodes, checks and stores. Every refused frame is counted under a
reason code and logged at most once per ``log_every_s`` per code, so a flood of hostile
frames costs a counter increment each and cannot drown the log or stall good frames.

Reason codes: the ``TelemetryError`` codes of ``decode_traces`` (too_large, truncated,
bad_magic, unsupported_format, bad_length, bad_header, non_finite, bad_payload) plus
bad_topic (not a device telemetry topic), identity_mismatch (the frame names another
fleet or device than its topic: a device may only write its own rows), wrong_dims
(dims differ from the task's), empty, future_timestamp, queue_full and store_error.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter
from dataclasses import dataclass

import numpy as np

from plasma.protocol import TelemetryError, TopicError, TraceBatch, decode_traces, topics
from plasma.protocol.bus import Bus, Message
from plasma.protocol.telemetry import DEFAULT_MAX_FRAME_BYTES

from .store import Store, StoreError

__all__ = ["Ingest", "IngestConfig", "RateLimitedLog", "SHARE_GROUP"]

log = logging.getLogger(__name__)

SHARE_GROUP = "plasma-ingest"


@dataclass(frozen=True)
class IngestConfig:
    """What the ingest stage accepts and how it protects itself."""

    fleet: str = "+"
    """Fleet to subscribe to; ``"+"`` means every fleet."""
    share_group: str | None = SHARE_GROUP
    """MQTT 5 shared-subscription group (several servers split the devices); None = plain."""
    dims: tuple[int, int] | None = None
    """(obs_dim, act_dim) frames must have; None accepts any."""
    queue_size: int = 2048
    """Frames waiting for the worker; beyond it frames are dropped (counted as queue_full)."""
    batch_frames: int = 64
    """Frames already waiting that are stored in one transaction."""
    enqueue_timeout_s: float = 0.05
    """How long the bus callback may wait for queue space (backpressure) before dropping."""
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
    """Size cap checked before anything else is read."""
    max_clock_skew_s: float = 24 * 3600.0
    """Rows stamped further in the future than this are refused (they would poison 'since T')."""
    log_every_s: float = 10.0
    """At most one log line per reason code per this many seconds."""


class RateLimitedLog:
    """One warning per key per period; the lines say how many were suppressed in between."""

    def __init__(self, logger: logging.Logger, period_s: float) -> None:
        self._log, self._period = logger, period_s
        self._last: dict[str, float] = {}
        self._suppressed: Counter[str] = Counter()

    def warning(self, key: str, msg: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._last.get(key, -1e18) < self._period:
            self._suppressed[key] += 1
            return
        extra = self._suppressed.pop(key, 0)
        self._last[key] = now
        suffix = f" ({extra} more like it since the last report)" if extra else ""
        self._log.warning(msg + suffix, *args)


class Ingest:
    """Subscribes to device telemetry and writes checked frames into the store."""

    def __init__(self, bus: Bus, store: Store, cfg: IngestConfig | None = None) -> None:
        self.bus, self.store = bus, store
        self.cfg = cfg or IngestConfig()
        self._queue: queue.Queue[Message | None] = queue.Queue(self.cfg.queue_size)
        self._thread: threading.Thread | None = None
        self._stats_lock = threading.Lock()
        self.refused: Counter[str] = Counter()
        """Frames refused, per reason code."""
        self.frames = 0
        """Frames stored."""
        self.rows = 0
        """Rows stored."""
        self.duplicates = 0
        """Frames already in the store (QoS 1 redelivery)."""
        self._rlog = RateLimitedLog(log, self.cfg.log_every_s)

    # ------------------------------------------------------------------ lifecycle
    @property
    def topic_filter(self) -> str:
        """Shared subscription on MQTT 5, a plain filter otherwise (3.1.1 has no $share)."""
        group = self.cfg.share_group if self.bus.protocol == "5" else None
        return topics.device_filter(self.cfg.fleet, "telemetry", share_group=group)

    def start(self) -> None:
        """Start the worker and subscribe; call after ``bus.connect()`` (the protocol is known)."""
        self._thread = threading.Thread(target=self._work, name="plasma-ingest", daemon=True)
        self._thread.start()
        self.bus.subscribe(self.topic_filter, self._on_message, qos=1)
        log.info("ingest: listening on %s", self.topic_filter)

    def stop(self, timeout: float = 5.0) -> None:
        """Finish the frames already queued, then stop the worker."""
        if self._thread is None:
            return
        self._queue.put(None)
        self._thread.join(timeout)
        self._thread = None

    def drain(self, timeout: float = 10.0) -> bool:
        """Wait until every queued frame is handled (tests, clean shutdown)."""
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.01)
        return not self._queue.unfinished_tasks

    # ------------------------------------------------------------------ bus thread
    def _on_message(self, message: Message) -> None:
        try:
            self._queue.put(message, timeout=self.cfg.enqueue_timeout_s)
        except queue.Full:
            self._refuse("queue_full", message.topic, "ingest queue is full; frame dropped")

    # ------------------------------------------------------------------ worker thread
    def _work(self) -> None:
        """Frames waiting together are stored in one transaction (one commit per backlog, up
        to ``batch_frames``), so a backlog drains faster than frames arrive one by one."""
        while True:
            messages = [self._queue.get()]
            while messages[-1] is not None and len(messages) < self.cfg.batch_frames:
                try:
                    messages.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            frames = [m for m in messages if m is not None]
            try:
                self._handle_many(frames)
            except Exception as exc:  # noqa: BLE001 - bad frames must never stop ingest; counted
                for message in frames:
                    self._refuse("internal_error", message.topic,
                                 f"unexpected error while ingesting: {exc!r}")
            finally:
                for _ in messages:
                    self._queue.task_done()
            if messages[-1] is None:
                return

    def handle(self, message: Message) -> str | None:
        """Check and store one frame; returns the refusal code or None if stored."""
        return self._handle_many([message])[0]

    def _handle_many(self, messages: list[Message]) -> list[str | None]:
        checked = [self._check(m) for m in messages]
        batches = [c for c in checked if isinstance(c, TraceBatch)]
        if not batches:
            return [c for c in checked if not isinstance(c, TraceBatch)]
        try:
            fresh = self.store.add_traces_many(batches)
        except StoreError as exc:
            return [c if not isinstance(c, TraceBatch) else
                    self._refuse("store_error", m.topic, str(exc))
                    for c, m in zip(checked, messages, strict=True)]
        with self._stats_lock:
            for batch, new in zip(batches, fresh, strict=True):
                if new:
                    self.frames += 1
                    self.rows += len(batch)
                else:
                    self.duplicates += 1
        return [None if isinstance(c, TraceBatch) else c for c in checked]

    def _check(self, message: Message) -> TraceBatch | str:
        """The frame's rows, or the code it was refused with (counted)."""
        try:
            topic = topics.parse(message.topic)
        except TopicError:
            return self._refuse("bad_topic", message.topic, "not a device telemetry topic")
        if topic.kind != "telemetry":
            return self._refuse("bad_topic", message.topic, "not a device telemetry topic")
        try:
            batch = decode_traces(message.payload, max_bytes=self.cfg.max_frame_bytes)
        except TelemetryError as exc:
            return self._refuse(exc.code, message.topic, str(exc))
        if (batch.fleet, batch.device) != (topic.fleet, topic.device):
            return self._refuse("identity_mismatch", message.topic,
                                f"frame claims {batch.fleet}/{batch.device}")
        code = self._check_rows(batch)
        if code is not None:
            return self._refuse(code[0], message.topic, code[1])
        return batch

    def _check_rows(self, batch: TraceBatch) -> tuple[str, str] | None:
        if len(batch) == 0:
            return "empty", "frame holds no rows"
        dims = (batch.obs.shape[1], batch.action.shape[1])
        if self.cfg.dims is not None and dims != tuple(self.cfg.dims):
            return "wrong_dims", f"frame has dims {dims}, the task has {self.cfg.dims}"
        if float(np.max(batch.timestamp)) > time.time() + self.cfg.max_clock_skew_s:
            return "future_timestamp", "rows are stamped in the future beyond the allowed skew"
        return None

    def _refuse(self, code: str, topic: str, detail: str) -> str:
        with self._stats_lock:  # the bus thread refuses too (queue_full)
            self.refused[code] += 1
            self._rlog.warning(code, "ingest: refused a frame on %s (%s): %s", topic, code, detail)
        return code

    def stats(self) -> dict[str, object]:
        with self._stats_lock:
            return {"frames": self.frames, "rows": self.rows, "duplicates": self.duplicates,
                    "refused": dict(self.refused), "queued": self._queue.qsize()}
