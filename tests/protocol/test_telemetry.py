"""Telemetry frames: TraceBatch round trips, and every malformed frame is a TelemetryError."""

from __future__ import annotations

import json
import struct
import warnings
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from plasma.protocol import StateTrace, TelemetryError, TraceBatch, decode_traces, encode_traces
from plasma.protocol import telemetry as tele

CODES = {"too_large", "truncated", "bad_magic", "unsupported_format", "bad_length",
         "bad_header", "non_finite", "bad_payload"}
COLUMNS = ["episode", "step", "obs", "action", "reward", "next_obs", "terminated",
           "truncated", "fleet_version", "device_version", "timestamp"]


def make_batch(n: int, obs_dim: int, act_dim: int, seed: int = 0, seq: int = 0,
               fleet: str = "fleet-1", device: str = "dev_7") -> TraceBatch:
    rng = np.random.default_rng(seed)
    return TraceBatch(
        fleet=fleet, device=device,
        episode=rng.integers(0, 2**32, n, dtype=np.uint32),
        step=rng.integers(0, 2**32, n, dtype=np.uint32),
        obs=rng.standard_normal((n, obs_dim)).astype(np.float32),  # (n, obs_dim)
        action=rng.uniform(-1, 1, (n, act_dim)).astype(np.float32),  # (n, act_dim)
        reward=(rng.standard_normal(n) * 1e3).astype(np.float32),  # (n,)
        next_obs=rng.standard_normal((n, obs_dim)).astype(np.float32),  # (n, obs_dim)
        terminated=rng.random(n) < 0.3, truncated=rng.random(n) < 0.3,
        versions={"fleet": rng.integers(0, 2**32, n, dtype=np.uint32),
                  "device": rng.integers(0, 2**32, n, dtype=np.uint32)},
        timestamp=1.7e9 + rng.random(n) * 1e6,  # float64: sub-microsecond must survive
        seq=seq,
    )


def assert_same(a: TraceBatch, b: TraceBatch) -> None:
    assert (a.fleet, a.device, a.seq, len(a)) == (b.fleet, b.device, b.seq, len(b))
    for name in COLUMNS:
        x, y = getattr(a, name), getattr(b, name)
        assert x.shape == y.shape, name
        np.testing.assert_array_equal(x, y, err_msg=name)


def error_code(data: bytes, **kwargs: Any) -> str:
    try:
        decode_traces(data, **kwargs)
    except TelemetryError as exc:
        assert exc.code in CODES, exc.code
        assert str(exc)
        return exc.code
    raise AssertionError("malformed frame decoded")


def split(frame: bytes) -> tuple[tuple[Any, ...], bytes, bytes]:
    prefix = tele._PREFIX.unpack_from(frame)
    header_len = prefix[3]
    start = tele._PREFIX.size
    return prefix, frame[start:start + header_len], frame[start + header_len:]


def join(prefix: tuple[Any, ...], header: bytes, body: bytes, **patch: int | bytes) -> bytes:
    names = ["magic", "fmt", "flags", "header_len", "body_len"]
    fields = dict(zip(names, prefix))
    fields.update(header_len=len(header), body_len=len(body))
    fields.update(patch)
    return tele._PREFIX.pack(*(fields[n] for n in names)) + header + body


# ---------------------------------------------------------------- round trips


@settings(max_examples=150, deadline=None)
@given(n=st.integers(0, 300), obs_dim=st.integers(1, 64), act_dim=st.integers(1, 16),
       seed=st.integers(0, 2**32 - 1), seq=st.integers(0, 2**40))
def test_round_trip(n: int, obs_dim: int, act_dim: int, seed: int, seq: int) -> None:
    batch = make_batch(n, obs_dim, act_dim, seed, seq)
    frame = encode_traces(batch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        back = decode_traces(frame)
    assert_same(batch, back)
    assert back.obs.dtype == np.float32 and back.timestamp.dtype == np.float64
    assert back.terminated.dtype == bool and back.episode.dtype == np.uint32


def test_rows_give_state_traces_and_from_traces_inverts_them() -> None:
    batch = decode_traces(encode_traces(make_batch(5, 3, 2, seed=1, seq=9)))
    rows = batch.rows()
    assert len(rows) == 5 and all(isinstance(r, StateTrace) for r in rows)
    r = rows[2]
    assert (r.fleet, r.device, r.episode, r.step) == ("fleet-1", "dev_7",
                                                       int(batch.episode[2]),
                                                       int(batch.step[2]))
    assert r.obs == tuple(batch.obs[2].tolist()) and len(r.next_obs) == 3
    assert r.action == tuple(batch.action[2].tolist()) and r.reward == float(batch.reward[2])
    assert (r.terminated, r.truncated) == (bool(batch.terminated[2]), bool(batch.truncated[2]))
    assert r.timestamp == float(batch.timestamp[2])
    again = TraceBatch.from_traces(rows, seq=9)
    assert_same(batch, again)
    assert_same(again, decode_traces(encode_traces(again)))


def test_from_traces_refuses_mixed_devices_and_empty() -> None:
    rows = make_batch(2, 2, 1).rows()
    other = make_batch(1, 2, 1, device="dev_8").rows()
    with pytest.raises(ValueError):
        TraceBatch.from_traces(rows + other)
    with pytest.raises(ValueError):
        TraceBatch.from_traces([])


@pytest.mark.parametrize(("column", "value"), [
    ("obs", np.nan), ("action", np.inf), ("reward", -np.inf), ("next_obs", np.nan),
    ("timestamp", np.nan),
])
def test_encode_refuses_non_finite(column: str, value: float) -> None:
    batch = make_batch(3, 2, 2)
    arr = getattr(batch, column).copy()
    arr.flat[1] = value
    with pytest.raises(ValueError):
        encode_traces(TraceBatch(**{**batch.__dict__, column: arr}))


def test_encode_refuses_inconsistent_shapes() -> None:
    batch = make_batch(3, 2, 2)
    with pytest.raises(ValueError):
        encode_traces(TraceBatch(**{**batch.__dict__, "reward": batch.reward[:2]}))
    with pytest.raises(ValueError):
        encode_traces(TraceBatch(**{**batch.__dict__, "next_obs": batch.obs[:, :1]}))


# ---------------------------------------------------------------- malformed frames


@pytest.fixture(scope="module")
def frame() -> bytes:
    return encode_traces(make_batch(4, 3, 2, seed=3))


def test_every_truncation_is_a_telemetry_error(frame: bytes) -> None:
    codes = {error_code(frame[:n]) for n in range(len(frame))}
    assert codes <= {"truncated", "bad_length"}
    assert error_code(frame[:15]) == "truncated"
    assert error_code(frame[:-1]) == "bad_length"


def test_every_single_byte_flip_is_refused_or_decodes_cleanly(frame: bytes) -> None:
    """Frames are not signed: a flip in the data may decode, but never crashes."""
    buf = bytearray(frame)
    for pos in range(len(frame)):
        for bit in (0, 7):
            buf[pos] ^= 1 << bit
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("error")
                    decode_traces(bytes(buf))
            except TelemetryError as exc:
                assert exc.code in CODES
            buf[pos] ^= 1 << bit


@pytest.mark.parametrize("extra", [b"\0", b"x" * 100])
def test_appended_bytes_are_bad_length(frame: bytes, extra: bytes) -> None:
    assert error_code(frame + extra) == "bad_length"


@pytest.mark.parametrize(("patch", "code"), [
    ({"magic": b"PLSM"}, "bad_magic"),
    ({"magic": b"\0\0\0\0"}, "bad_magic"),
    ({"fmt": 2}, "unsupported_format"),
    ({"flags": 4}, "unsupported_format"),
    ({"header_len": tele.MAX_HEADER_LEN + 1}, "bad_length"),
    ({"header_len": 2**32 - 1}, "bad_length"),
    ({"body_len": 2**32 - 1}, "bad_length"),
    ({"body_len": 0}, "bad_length"),
])
def test_prefix_fields(frame: bytes, patch: dict[str, int | bytes], code: str) -> None:
    prefix, header, body = split(frame)
    assert error_code(join(prefix, header, body, **patch)) == code


def _with_header(frame: bytes, **changes: Any) -> bytes:
    prefix, header, body = split(frame)
    fields = json.loads(header)
    fields.update(changes)
    return join(prefix, json.dumps(fields).encode(), body)


@pytest.mark.parametrize(("changes", "code"), [
    ({"rows": 5}, "bad_length"),  # the body holds 4 rows
    ({"rows": 3}, "bad_length"),
    ({"obs_dim": 2}, "bad_length"),
    ({"act_dim": 3}, "bad_length"),
    ({"rows": tele.MAX_ROWS + 1}, "bad_header"),
    ({"obs_dim": 0}, "bad_header"),
    ({"obs_dim": tele.MAX_OBS_DIM + 1}, "bad_header"),
    ({"rows": -1}, "bad_header"),
    ({"rows": "4"}, "bad_header"),
    ({"fleet": "a/b"}, "bad_header"),
    ({"device": "+"}, "bad_header"),
    ({"device": "x" * 65}, "bad_header"),
    ({"seq": -1}, "bad_header"),
    ({"surprise": 1}, "bad_header"),
    ({"schema_version": 2}, "bad_header"),
])
def test_header_fields(frame: bytes, changes: dict[str, Any], code: str) -> None:
    assert error_code(_with_header(frame, **changes)) == code


@pytest.mark.parametrize("header", [b"", b"{", b"[]", b"null", b"\xff\xfe\xfd", b"{}"])
def test_garbage_header(frame: bytes, header: bytes) -> None:
    prefix, _, body = split(frame)
    assert error_code(join(prefix, header, body)) == "bad_header"


def _poke(frame: bytes, column: str, value: float | int) -> bytes:
    """Set the first element of one column of the 4-row, 3-obs, 2-action frame."""
    prefix, header, body = split(frame)
    offset = 0
    for name, dt, shape in tele._layout(4, 3, 2):
        if name == column:
            break
        offset += np.dtype(dt).itemsize * int(np.prod(shape))
    dt = dict((n, d) for n, d, _ in tele._layout(4, 3, 2))[column]
    raw = np.array([value], dtype=dt).tobytes()
    body = body[:offset] + raw + body[offset + len(raw):]
    return join(prefix, header, body)


@pytest.mark.parametrize(("column", "value"), [
    ("obs", np.nan), ("obs", np.inf), ("action", -np.inf), ("reward", np.nan),
    ("next_obs", np.inf), ("timestamp", np.nan), ("timestamp", -np.inf),
])
def test_non_finite_values_in_the_body(frame: bytes, column: str, value: float) -> None:
    assert error_code(_poke(frame, column, value)) == "non_finite"


@pytest.mark.parametrize("flags", [4, 8, 255])
def test_unknown_done_bits(frame: bytes, flags: int) -> None:
    assert error_code(_poke(frame, "done", flags)) == "bad_payload"


def test_oversized_frames(frame: bytes) -> None:
    assert error_code(frame, max_bytes=len(frame) - 1) == "too_large"
    assert len(decode_traces(frame, max_bytes=len(frame))) == 4
    assert error_code(b"\0" * (tele.DEFAULT_MAX_FRAME_BYTES + 1)) == "too_large"


@pytest.mark.parametrize("data", [b"", b"PLST", b"PLST\x01\x00\x00\x00", b"x" * 15])
def test_short_frames_are_truncated(data: bytes) -> None:
    assert error_code(data) == "truncated"


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=2000))
def test_random_bytes(data: bytes) -> None:
    error_code(data)


@settings(max_examples=300, deadline=None)
@given(header=st.binary(max_size=200), body=st.binary(max_size=400))
def test_random_bytes_after_a_valid_prefix(header: bytes, body: bytes) -> None:
    frame = struct.pack("<4sHHII", b"PLST", 1, 0, len(header), len(body)) + header + body
    error_code(frame)


@settings(max_examples=200, deadline=None)
@given(n=st.integers(0, 6), obs_dim=st.integers(1, 4), act_dim=st.integers(1, 3),
       body=st.data())
def test_random_body_under_a_valid_header(n: int, obs_dim: int, act_dim: int,
                                          body: st.DataObject) -> None:
    """Any body of the right length decodes to finite arrays or is refused with a code."""
    size = tele._body_size(n, obs_dim, act_dim)
    raw = body.draw(st.binary(min_size=size, max_size=size))
    header = tele.FrameHeader(fleet="f", device="d", rows=n, obs_dim=obs_dim,
                              act_dim=act_dim).model_dump_json().encode()
    frame = struct.pack("<4sHHII", b"PLST", 1, 0, len(header), size) + header + raw
    try:
        batch = decode_traces(frame)
    except TelemetryError as exc:
        assert exc.code in {"non_finite", "bad_payload"}
    else:
        assert len(batch) == n and np.isfinite(batch.obs).all()
        batch.rows()  # every decoded row is a valid StateTrace


# ---------------------------------------------------------------- versions per slot
def test_todays_frames_keep_their_bytes_and_decode() -> None:
    """fleet then device is today's layout: no ``slots`` in the header, same body."""
    batch = make_batch(4, 3, 2, seed=5)
    frame = encode_traces(batch)
    assert b'"slots"' not in frame
    back = decode_traces(frame)
    assert list(back.versions) == ["fleet", "device"]
    assert_same(batch, back)


def test_version_columns_follow_the_header_slots() -> None:
    batch = make_batch(3, 2, 2, seed=6)
    swapped = TraceBatch(**{**batch.__dict__, "versions": {"device": batch.device_version,
                                                            "fleet": batch.fleet_version}})
    frame = encode_traces(swapped)
    assert b'"slots":["device","fleet"]' in frame
    back = decode_traces(frame)
    assert list(back.versions) == ["device", "fleet"]
    assert_same(batch, back)
    only_fleet = TraceBatch(**{**batch.__dict__, "versions": {"fleet": batch.fleet_version}})
    one = decode_traces(encode_traces(only_fleet))  # one version column fewer in the body
    assert list(one.versions) == ["fleet"] and one.device_version.tolist() == [0, 0, 0]
    np.testing.assert_array_equal(one.fleet_version, batch.fleet_version)


def test_a_slot_named_twice_is_a_bad_header() -> None:
    batch = make_batch(2, 2, 2)
    frame = encode_traces(TraceBatch(**{**batch.__dict__,
                                        "versions": {"device": batch.device_version,
                                                     "fleet": batch.fleet_version}}))
    twice = frame.replace(b'["device","fleet"]', b'["fleet", "fleet"]')  # same length
    assert error_code(twice) == "bad_header"
