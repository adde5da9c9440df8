"""Telemetry frames: many StateTrace rows of one device as packed numpy arrays.

Wire layout (little-endian)::

    prefix  16 bytes  magic b"PLST" | format u16 = 1 | flags u16 = 0 |
                      header_len u32 | body_len u32
    header  header_len bytes of JSON: a FrameHeader (fleet, device, rows, dims, seq, slots)
    body    episode u32[n] | step u32[n] | obs f32[n,o] | action f32[n,a] | reward f32[n] |
            next_obs f32[n,o] | done u8[n] (bit 0 terminated, bit 1 truncated) |
            SLOT_version u32[n] for each SLOT of the header's ``slots`` | timestamp f64[n]

``slots`` names the version columns in order (the adapter version live in each slot when the
action was taken); a header without it is today's frame: ``fleet`` then ``device``.

Frames are not signed: the broker's ACL decides who may write a device's telemetry
topic.  Decoding checks every length before reading and refuses non-finite values.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .errors import MessageInvalid, TelemetryError
from .wire import MAX_ACT_DIM, MAX_OBS_DIM, MAX_ROWS, FrameHeader

if TYPE_CHECKING:
    from .messages import StateTrace

MAGIC = b"PLST"
FORMAT_VERSION = 1
_PREFIX = struct.Struct("<4sHHII")
MAX_HEADER_LEN = 4096
DEFAULT_MAX_FRAME_BYTES = 8 * 1024 * 1024
__all__ = ["FrameHeader", "TraceBatch", "decode_traces", "encode_traces", "MAX_ROWS",
           "MAX_OBS_DIM", "MAX_ACT_DIM", "MAX_HEADER_LEN", "DEFAULT_MAX_FRAME_BYTES"]
# FrameHeader (the JSON header of a frame) is a msgspec struct: see plasma.protocol.wire.


_TODAYS_SLOTS = ("fleet", "device")  # the version columns of a header without ``slots``


def _layout(n: int, o: int, a: int, slots: Sequence[str] = _TODAYS_SLOTS
            ) -> list[tuple[str, str, tuple[int, ...]]]:
    return [
        ("episode", "<u4", (n,)), ("step", "<u4", (n,)), ("obs", "<f4", (n, o)),
        ("action", "<f4", (n, a)), ("reward", "<f4", (n,)), ("next_obs", "<f4", (n, o)),
        ("done", "u1", (n,)), *((f"{slot}_version", "<u4", (n,)) for slot in slots),
        ("timestamp", "<f8", (n,)),
    ]


def _body_size(n: int, o: int, a: int, slots: Sequence[str] = _TODAYS_SLOTS) -> int:
    return sum(np.dtype(dt).itemsize * int(np.prod(shape))
               for _, dt, shape in _layout(n, o, a, slots))


@dataclass(frozen=True)
class TraceBatch:
    """Rows of real transitions of one device, column-wise."""

    fleet: str
    device: str
    episode: np.ndarray  # (n,) uint32
    step: np.ndarray  # (n,) uint32
    obs: np.ndarray  # (n, obs_dim) float32
    action: np.ndarray  # (n, act_dim) float32
    reward: np.ndarray  # (n,) float32
    next_obs: np.ndarray  # (n, obs_dim) float32
    terminated: np.ndarray  # (n,) bool
    truncated: np.ndarray  # (n,) bool
    versions: Mapping[str, np.ndarray]
    """Slot -> (n,) uint32: the adapter version live in that slot when the action was taken."""
    timestamp: np.ndarray  # (n,) float64
    seq: int = 0

    def __len__(self) -> int:
        return int(self.reward.shape[0])

    @property
    def fleet_version(self) -> np.ndarray:
        return self._version("fleet")

    @property
    def device_version(self) -> np.ndarray:
        return self._version("device")

    def _version(self, slot: str) -> np.ndarray:
        got = self.versions.get(slot)
        return got if got is not None else np.zeros(len(self), np.uint32)

    @classmethod
    def from_traces(cls, traces: Sequence[StateTrace], seq: int = 0) -> TraceBatch:
        if not traces:
            raise ValueError("from_traces needs at least one trace")
        first = traces[0]
        if any(t.fleet != first.fleet or t.device != first.device for t in traces):
            raise ValueError("a batch holds the traces of one device")
        return cls(
            fleet=first.fleet, device=first.device,
            episode=np.array([t.episode for t in traces], np.uint32),
            step=np.array([t.step for t in traces], np.uint32),
            obs=np.array([t.obs for t in traces], np.float32),
            action=np.array([t.action for t in traces], np.float32),
            reward=np.array([t.reward for t in traces], np.float32),
            next_obs=np.array([t.next_obs for t in traces], np.float32),
            terminated=np.array([t.terminated for t in traces], bool),
            truncated=np.array([t.truncated for t in traces], bool),
            versions={"fleet": np.array([t.fleet_version for t in traces], np.uint32),
                      "device": np.array([t.device_version for t in traces], np.uint32)},
            timestamp=np.array([t.timestamp for t in traces], np.float64),
            seq=seq,
        )

    def rows(self) -> list[StateTrace]:
        """The batch as validated StateTrace messages (slow path: use arrays for math)."""
        from .messages import StateTrace  # pydantic: server side only

        return [
            StateTrace(
                fleet=self.fleet, device=self.device, episode=int(self.episode[i]),
                step=int(self.step[i]), obs=tuple(self.obs[i].tolist()),
                action=tuple(self.action[i].tolist()), reward=float(self.reward[i]),
                next_obs=tuple(self.next_obs[i].tolist()),
                terminated=bool(self.terminated[i]), truncated=bool(self.truncated[i]),
                fleet_version=int(self.fleet_version[i]),
                device_version=int(self.device_version[i]), timestamp=float(self.timestamp[i]),
            )
            for i in range(len(self))
        ]


def encode_traces(batch: TraceBatch) -> bytes:
    """Pack a batch into one frame; raises ValueError on inconsistent or non-finite rows."""
    n, o, a = len(batch), batch.obs.shape[1], batch.action.shape[1]
    slots = tuple(batch.versions)
    header = FrameHeader(fleet=batch.fleet, device=batch.device, rows=n, obs_dim=o, act_dim=a,
                         seq=batch.seq, created_at=time.time(),
                         slots=None if slots == _TODAYS_SLOTS else slots)  # today's bytes
    columns = {name: getattr(batch, name) for name, _, _ in _layout(n, o, a, ())
               if name != "done"}
    columns.update({f"{slot}_version": column for slot, column in batch.versions.items()})
    columns["done"] = batch.terminated.astype(np.uint8) | (batch.truncated.astype(np.uint8) << 1)
    parts = []
    for name, dt, shape in _layout(n, o, a, slots):
        arr = np.asarray(columns[name])
        if arr.shape != shape:
            raise ValueError(f"column {name} has shape {arr.shape}, expected {shape}")
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise ValueError(f"column {name} holds NaN or Inf")
        parts.append(np.ascontiguousarray(arr, dtype=dt).tobytes())
    body = b"".join(parts)
    header_bytes = header.model_dump_json().encode()
    if header.slots is None:  # today's slots: today's header bytes, readable by today's servers
        header_bytes = header_bytes.removesuffix(b',"slots":null}') + b"}"
    return _PREFIX.pack(MAGIC, FORMAT_VERSION, 0, len(header_bytes), len(body)) + header_bytes \
        + body


def decode_traces(data: bytes, *, max_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> TraceBatch:
    """Unpack a frame; raises TelemetryError (with ``code``) on anything malformed."""
    if len(data) > max_bytes:
        raise TelemetryError(f"frame is {len(data)} bytes, the cap is {max_bytes}",
                             code="too_large")
    if len(data) < _PREFIX.size:
        raise TelemetryError(f"frame is {len(data)} bytes, shorter than its prefix",
                             code="truncated")
    magic, fmt, flags, header_len, body_len = _PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise TelemetryError("not a Plasma telemetry frame (bad magic)", code="bad_magic")
    if fmt != FORMAT_VERSION or flags != 0:
        raise TelemetryError(f"frame format {fmt} flags {flags} not supported",
                             code="unsupported_format")
    if header_len > MAX_HEADER_LEN or _PREFIX.size + header_len + body_len != len(data):
        raise TelemetryError("frame lengths do not match its size", code="bad_length")
    header = _parse_frame_header(data[_PREFIX.size:_PREFIX.size + header_len])
    n, o, a = header.rows, header.obs_dim, header.act_dim
    slots = _slots_of(header)
    if len(set(slots)) != len(slots):
        raise TelemetryError(f"frame header names a slot twice: {list(slots)}", code="bad_header")
    need = _body_size(n, o, a, slots)
    if need != body_len:
        raise TelemetryError(f"body is {body_len} bytes, {n} rows need {need}", code="bad_length")
    return _decode_body(memoryview(data)[_PREFIX.size + header_len:], header)


def _parse_frame_header(raw: bytes) -> FrameHeader:
    try:
        return FrameHeader.model_validate_json(raw)
    except MessageInvalid as exc:
        raise TelemetryError(f"frame header field {exc.field or 'header'}: {exc.detail}",
                             code="bad_header") from None


def _slots_of(header: FrameHeader) -> tuple[str, ...]:
    return _TODAYS_SLOTS if header.slots is None else tuple(header.slots)


def _decode_body(body: memoryview, header: FrameHeader) -> TraceBatch:
    cols: dict[str, np.ndarray] = {}
    offset = 0
    slots = _slots_of(header)
    for name, dt, shape in _layout(header.rows, header.obs_dim, header.act_dim, slots):
        count = int(np.prod(shape))
        arr = np.frombuffer(body, dtype=dt, count=count, offset=offset).reshape(shape)
        offset += arr.nbytes
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise TelemetryError(f"column {name} holds NaN or Inf", code="non_finite")
        cols[name] = arr
    done = cols.pop("done")
    if (done > 3).any():
        raise TelemetryError("done flags use unknown bits", code="bad_payload")
    versions = {slot: cols.pop(f"{slot}_version") for slot in slots}
    return TraceBatch(fleet=header.fleet, device=header.device, terminated=(done & 1) > 0,
                      truncated=(done & 2) > 0, seq=header.seq, versions=versions, **cols)
