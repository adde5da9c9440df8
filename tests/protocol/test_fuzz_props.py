"""Property tests: the two decoders that read bytes from the network fail only in their own way.

``decode_packet`` may raise ``PacketError`` subclasses and nothing else; ``decode_traces`` may
raise ``TelemetryError`` and nothing else; whatever they return holds only finite numbers.
Inputs: arbitrary bytes, byte-level mutations of valid packets and frames (what an attacker
without the key can send), and structure-aware mutations that fix the lengths and digest and
RE-SIGN with the trusted key, so the header and payload parsers behind the signature check
are reached too (what a buggy or compromised server could send).  ``plasma-server fuzz``
(server/tools/fuzz/) runs the long version of this.
"""

from __future__ import annotations

import hashlib
import json
import struct
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from plasma.protocol import (
    PacketError,
    SigningKey,
    TelemetryError,
    TraceBatch,
    TrustStore,
    decode_packet,
    decode_traces,
    encode_packet,
    encode_traces,
)
from plasma.protocol import packet as packet_mod
from plasma.protocol import telemetry as telemetry_mod
from plasma.protocol.adapter import Adapter
from tests.helpers.adapters import random_adapter

FUZZ = settings(max_examples=250, deadline=None, derandomize=False,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

KEY = SigningKey.generate()
TRUST = TrustStore([KEY.public_key])
BASE = "ab" * 32


def _adapter(shapes: dict[str, tuple[int, int]], rank: int, seed: int) -> Adapter:
    return random_adapter(shapes, rank, seed, alpha=4.0)


def _packets() -> list[bytes]:
    created = 1_700_000_000.0
    out = []
    for i, dtype in enumerate(("int8", "fp16", "fp32")):
        out.append(encode_packet(_adapter({"net.0": (6, 5), "net.2": (5, 2)}, 2, i), key=KEY,
                                 fleet="f1", slot="fleet", version=i + 1, base_sha256=BASE,
                                 dtype=dtype, created_at=created))
    out.append(encode_packet(_adapter({"net.0": (3, 4)}, 1, 9), key=KEY, fleet="f1",
                             slot="device", device="d1", version=7, base_sha256=BASE,
                             created_at=created))
    out.append(encode_packet(None, key=KEY, fleet="f1", slot="fleet", version=9,
                             base_sha256=BASE, created_at=created))  # clears the slot
    return out


def _frames() -> list[bytes]:
    out = []
    for n, o, a in ((1, 3, 1), (5, 4, 2), (0, 2, 1)):
        rng = np.random.default_rng(n)
        batch = TraceBatch(
            fleet="f1", device="d1", episode=np.zeros(n, np.uint32),
            step=np.arange(n, dtype=np.uint32), obs=rng.standard_normal((n, o)).astype(np.float32),
            action=rng.standard_normal((n, a)).astype(np.float32),
            reward=rng.standard_normal(n).astype(np.float32),
            next_obs=rng.standard_normal((n, o)).astype(np.float32),
            terminated=np.zeros(n, bool), truncated=np.zeros(n, bool),
            versions={"fleet": np.zeros(n, np.uint32), "device": np.zeros(n, np.uint32)},
            timestamp=np.arange(n, dtype=np.float64), seq=n)
        out.append(encode_traces(batch))
    return out


PACKETS = _packets()
FRAMES = _frames()


# ---------------------------------------------------------------- oracles


def check_packet(data: bytes) -> None:
    try:
        decoded = decode_packet(data, TRUST)
    except PacketError:
        return
    for a, b in decoded.adapter.layers.values():
        assert np.isfinite(a).all() and np.isfinite(b).all(), "decoded a non-finite factor"


def check_frame(data: bytes) -> None:
    try:
        batch = decode_traces(data)
    except TelemetryError:
        return
    for column in (batch.obs, batch.action, batch.reward, batch.next_obs, batch.timestamp):
        assert np.isfinite(column).all(), "decoded a non-finite telemetry value"


# ---------------------------------------------------------------- mutation strategies


@st.composite
def mutated(draw: st.DrawFn, seeds: list[bytes]) -> bytes:
    """A valid seed after 1-4 byte-level edits (flip, insert, delete, overwrite, splice,
    truncate, or a u32 length field of the prefix set to a chosen value)."""
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "overwrite", "splice",
                                   "truncate", "u32"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del data[at:at + draw(st.integers(1, 64))]
        elif op == "overwrite":
            chunk = draw(st.binary(min_size=1, max_size=8))
            data[at:at + len(chunk)] = chunk
        elif op == "splice":
            other = draw(st.sampled_from(seeds))
            data = data[:at] + other[draw(st.integers(0, len(other))):]
        elif op == "truncate":
            data = data[:at]
        elif op == "u32" and len(data) >= 16:
            where = draw(st.sampled_from([8, 12]))  # header_len, payload_len / body_len
            value = draw(st.one_of(st.integers(0, 64), st.integers(0, 2**32 - 1),
                                   st.sampled_from([0, 1, 2**31, 2**32 - 1])))
            data[where:where + 4] = struct.pack("<I", value)
    return bytes(data)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.sampled_from([0, 1, -1, 2**53])
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=8)


@st.composite
def header_edit(draw: st.DrawFn, header: dict[str, Any]) -> dict[str, Any]:
    """Replace, drop or add header fields (nested layer fields included)."""
    header = json.loads(json.dumps(header))
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["replace", "drop", "add", "layer"]))
        keys = sorted(header)
        if op == "replace" and keys:
            header[draw(st.sampled_from(keys))] = draw(JSON)
        elif op == "drop" and keys:
            header.pop(draw(st.sampled_from(keys)))
        elif op == "add":
            header[draw(st.text(max_size=10))] = draw(JSON)
        elif op == "layer" and isinstance(header.get("layers"), list) and header["layers"]:
            layer = draw(st.sampled_from(header["layers"]))
            if isinstance(layer, dict):
                field = draw(st.sampled_from(["name", "in_features", "out_features"]))
                layer[field] = draw(st.one_of(st.integers(-2, 70_000), JSON))
    return header


def _split_packet(data: bytes) -> tuple[dict[str, Any], bytes]:
    header_len = struct.unpack_from("<I", data, 8)[0]
    raw = data[packet_mod.PREFIX_LEN:packet_mod.PREFIX_LEN + header_len]
    count = data[packet_mod.PREFIX_LEN + header_len]
    payload = data[packet_mod.PREFIX_LEN + header_len + 1 + count * packet_mod.SIG_ENTRY_LEN:]
    return json.loads(raw), payload


def resign(header_bytes: bytes, payload: bytes, payload_len: int | None = None) -> bytes:
    """Prefix with consistent lengths and digest, signed by the trusted key."""
    prefix = packet_mod._PREFIX.pack(packet_mod.MAGIC, packet_mod.FORMAT_VERSION, 0,
                                     len(header_bytes),
                                     len(payload) if payload_len is None else payload_len,
                                     hashlib.sha256(payload).digest())
    signed = prefix + header_bytes
    return signed + b"\x01" + bytes.fromhex(KEY.key_id) + KEY.sign(signed) + payload


@st.composite
def resigned_packet(draw: st.DrawFn) -> bytes:
    header, payload = _split_packet(draw(st.sampled_from(PACKETS)))
    if draw(st.booleans()):
        header = draw(header_edit(header))
    if draw(st.booleans()):  # new payload bytes, the header made to agree with them
        payload = draw(st.one_of(st.binary(max_size=600),
                                 st.builds(lambda p, b: p[:len(p) // 2] + b, st.just(payload),
                                           st.binary(max_size=64))))
        if isinstance(header, dict) and draw(st.booleans()):
            header["payload_len"] = len(payload)
            header["payload_sha256"] = hashlib.sha256(payload).hexdigest()
    if draw(st.booleans()):  # payload of the right length, arbitrary values (NaN, huge scales)
        payload = draw(st.binary(min_size=len(payload), max_size=len(payload)))
        header["payload_sha256"] = hashlib.sha256(payload).hexdigest()
    raw = json.dumps(header).encode()
    if draw(st.integers(0, 9)) == 0:
        raw = draw(mutated([raw]))  # not even JSON any more
    return resign(raw, payload)


@st.composite
def restructured_frame(draw: st.DrawFn) -> bytes:
    """A frame whose header was edited and whose body is arbitrary bytes of the length the
    edited header asks for (when that is small), so the body parser is reached."""
    seed = draw(st.sampled_from(FRAMES))
    header_len = struct.unpack_from("<I", seed, 8)[0]
    header = json.loads(seed[16:16 + header_len])
    header = draw(header_edit(header))
    for field in ("rows", "obs_dim", "act_dim"):
        if draw(st.integers(0, 3)) == 0:
            header[field] = draw(st.integers(-1, 9))
    raw = json.dumps(header).encode()
    try:
        size = telemetry_mod._body_size(int(header["rows"]), int(header["obs_dim"]),
                                        int(header["act_dim"]))
    except (KeyError, TypeError, ValueError, OverflowError):
        size = draw(st.integers(0, 64))
    size = size if 0 <= size <= 4096 else draw(st.integers(0, 64))
    body = draw(st.binary(min_size=size, max_size=size))
    return telemetry_mod._PREFIX.pack(telemetry_mod.MAGIC, 1, 0, len(raw), len(body)) + raw + body


# ---------------------------------------------------------------- properties


def test_seeds_are_valid() -> None:
    for data in PACKETS:
        decode_packet(data, TRUST)
    for data in FRAMES:
        decode_traces(data)


@FUZZ
@given(st.binary(max_size=2048))
def test_packet_arbitrary_bytes(data: bytes) -> None:
    check_packet(data)
    check_packet(packet_mod.MAGIC + data)


@FUZZ
@given(mutated(PACKETS))
def test_packet_byte_mutations(data: bytes) -> None:
    check_packet(data)


@FUZZ
@given(resigned_packet())
def test_packet_resigned_structure_mutations(data: bytes) -> None:
    check_packet(data)


@FUZZ
@given(st.binary(max_size=2048))
def test_frame_arbitrary_bytes(data: bytes) -> None:
    check_frame(data)
    check_frame(telemetry_mod.MAGIC + data)


@FUZZ
@given(mutated(FRAMES))
def test_frame_byte_mutations(data: bytes) -> None:
    check_frame(data)


@FUZZ
@given(restructured_frame())
def test_frame_structure_mutations(data: bytes) -> None:
    check_frame(data)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), 3e38])
def test_int8_scale_extremes_are_refused_not_overflowed(value: float) -> None:
    """Regression: a finite but huge int8 row scale once decoded to inf factors."""
    header, payload = _split_packet(PACKETS[0])
    scales = bytearray(payload)
    scales[:4] = struct.pack("<f", value)
    header["payload_sha256"] = hashlib.sha256(bytes(scales)).hexdigest()
    check_packet(resign(json.dumps(header).encode(), bytes(scales)))
