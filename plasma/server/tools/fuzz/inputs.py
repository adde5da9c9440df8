"""Fuzz tool: how inputs are made - structure-aware edits that re-sign packets, and byte-level havoc."""

from __future__ import annotations

import hashlib
import json
import random
import struct
from collections.abc import Sequence
from typing import Any

import numpy as np

from plasma.protocol import SigningKey
from plasma.protocol import packet as packet_mod
from plasma.protocol import telemetry as telemetry_mod

__all__ = ["MAX_INPUT", "edit_header", "mutate", "random_json", "resign", "restructure_frame",
           "restructure_packet", "split_packet"]

MAX_INPUT = 64 * 1024
INTERESTING_U32 = (0, 1, 2, 7, 8, 16, 48, 255, 256, 4096, 32768, 65535, 65536, 2**31 - 1, 2**31,
                   2**32 - 1)
INTERESTING_BYTES = (0, 1, 0x7F, 0x80, 0xFF, ord("{"), ord("}"), ord('"'), ord("["), ord("9"))


# ---------------------------------------------------------------- structure-aware inputs


def random_json(rng: random.Random, depth: int = 0) -> Any:
    roll = rng.randrange(10 if depth < 3 else 7)
    if roll == 0:
        return None
    if roll == 1:
        return rng.random() < 0.5
    if roll == 2:
        return rng.choice([0, 1, -1, 2**31, 2**53, 2**64, -(2**63), 10**30, rng.randrange(100)])
    if roll == 3:
        return rng.choice([0.0, -0.0, 1e308, -1e308, 5e-324, 0.5, rng.uniform(-1e6, 1e6)])
    if roll in (4, 5, 6):
        alphabet = "abcdef0123456789-_./:{}\"\\ \u00e9\u0000\ud7ff"
        return "".join(rng.choice(alphabet) for _ in range(rng.choice([0, 1, 8, 32, 64, 65,
                                                                       129])))
    if roll in (7, 8):
        return [random_json(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {random_json(rng, 3) if rng.random() < 0.3 else "k": random_json(rng, depth + 1)
            for _ in range(rng.randrange(4))}


def edit_header(rng: random.Random, header: dict[str, Any]) -> dict[str, Any]:
    """Replace, drop or add fields, nested layer fields included."""
    header = json.loads(json.dumps(header))
    for _ in range(rng.randint(1, 3)):
        op = rng.randrange(4)
        keys = sorted(header)
        if op == 0 and keys:
            header[rng.choice(keys)] = random_json(rng)
        elif op == 1 and keys:
            header.pop(rng.choice(keys))
        elif op == 2:
            header[str(random_json(rng, 3))] = random_json(rng)
        elif isinstance(header.get("layers"), list) and header["layers"]:
            layer = rng.choice(header["layers"])
            if isinstance(layer, dict):
                layer[rng.choice(["name", "in_features", "out_features"])] = rng.choice(
                    [rng.randint(-2, 70_000), random_json(rng)])
    return header


def split_packet(data: bytes) -> tuple[dict[str, Any], bytes]:
    header_len = struct.unpack_from("<I", data, 8)[0]
    at = packet_mod.PREFIX_LEN + header_len
    payload_at = at + 1 + data[at] * packet_mod.SIG_ENTRY_LEN
    return json.loads(data[packet_mod.PREFIX_LEN:at]), data[payload_at:]


def resign(key: SigningKey, header_bytes: bytes, payload: bytes) -> bytes:
    """A packet with consistent prefix lengths and digest, signed by ``key``."""
    prefix = packet_mod._PREFIX.pack(packet_mod.MAGIC, packet_mod.FORMAT_VERSION, 0,
                                     len(header_bytes), len(payload),
                                     hashlib.sha256(payload).digest())
    signed = prefix + header_bytes
    return signed + b"\x01" + bytes.fromhex(key.key_id) + key.sign(signed) + payload


def restructure_packet(rng: random.Random, seeds: list[bytes], key: SigningKey) -> bytes:
    header, payload = split_packet(rng.choice(seeds))
    if rng.random() < 0.6:
        header = edit_header(rng, header)
    roll = rng.random()
    if roll < 0.15:  # same length, arbitrary values
        payload = rng.randbytes(len(payload))
    elif roll < 0.4 and payload:  # a few values edited in place: huge int8 scales, NaN, Inf
        buf = bytearray(payload)
        for _ in range(rng.randint(1, 4)):
            at = rng.randrange(len(buf))
            if rng.random() < 0.5:
                buf[at] ^= 1 << rng.randrange(8)
            else:
                buf[at] = rng.choice(INTERESTING_BYTES)
        payload = bytes(buf)
    elif roll < 0.55:
        payload = payload[:rng.randrange(len(payload) + 1)] + rng.randbytes(rng.randrange(64))
    if rng.random() < 0.8:
        header["payload_len"] = len(payload)
        header["payload_sha256"] = hashlib.sha256(payload).hexdigest()
    raw = json.dumps(header).encode()
    return resign(key, raw, payload)


def restructure_frame(rng: random.Random, seeds: list[bytes]) -> bytes:
    """Edited header, then a body of exactly the size the edited header asks for (if small)."""
    seed = rng.choice(seeds)
    header_len = struct.unpack_from("<I", seed, 8)[0]
    header = edit_header(rng, json.loads(seed[16:16 + header_len]))
    for name in ("rows", "obs_dim", "act_dim"):
        if rng.random() < 0.2:
            header[name] = rng.randint(-1, 12)
    raw = json.dumps(header).encode()
    try:
        size = telemetry_mod._body_size(int(header["rows"]), int(header["obs_dim"]),
                                        int(header["act_dim"]))
    except (KeyError, TypeError, ValueError, OverflowError):
        size = -1
    if not 0 <= size <= 16384:
        size = rng.randrange(128)
    body = rng.randbytes(size)
    if rng.random() < 0.5 and size >= 4:  # plant a NaN / Inf somewhere
        at = rng.randrange(size - 3)
        body = body[:at] + struct.pack("<f", rng.choice([np.nan, np.inf, -np.inf])) + body[at + 4:]
    return telemetry_mod._PREFIX.pack(telemetry_mod.MAGIC, 1, 0, len(raw), len(body)) + raw + body



# ---------------------------------------------------------------- byte-level mutation


def mutate(rng: random.Random, data: bytes, corpus: Sequence[bytes]) -> bytes:
    """1 to 8 stacked edits of ``data`` (havoc)."""
    buf = bytearray(data)
    for _ in range(rng.choice([1, 1, 1, 2, 2, 3, 4, 8])):
        op = rng.randrange(10)
        at = rng.randrange(len(buf) + 1)
        if op == 0 and buf:  # bit flip
            at = min(at, len(buf) - 1)
            buf[at] ^= 1 << rng.randrange(8)
        elif op == 1 and buf:  # interesting byte
            buf[min(at, len(buf) - 1)] = rng.choice(INTERESTING_BYTES)
        elif op == 2:
            buf[at:at] = rng.randbytes(rng.choice([1, 2, 4, 16, 80]))
        elif op == 3:
            del buf[at:at + rng.choice([1, 2, 4, 16, 80, 1024])]
        elif op == 4 and buf:  # duplicate a range
            end = min(len(buf), at + rng.randrange(1, 256))
            buf[at:at] = buf[at:end]
        elif op == 5 and len(buf) >= 16:  # length fields: prefix u32s, signature count
            where = rng.choice([4, 6, 8, 12, 8, 12])
            if where < 8:
                struct.pack_into("<H", buf, where, rng.choice([0, 1, 2, 0xFFFF]))
            else:
                struct.pack_into("<I", buf, where, rng.choice(INTERESTING_U32)
                                 if rng.random() < 0.7 else rng.randrange(2**32))
            if where == 8 and rng.random() < 0.3:
                header_len = struct.unpack_from("<I", buf, 8)[0]
                sig_at = packet_mod.PREFIX_LEN + header_len
                if sig_at < len(buf):
                    buf[sig_at] = rng.choice([0, 1, 2, 8, 9, 255])
        elif op == 6:  # splice with another input
            other = rng.choice(corpus)
            buf = buf[:at] + other[rng.randrange(len(other) + 1):]
        elif op == 7:
            del buf[at:]
        elif op == 8 and buf:  # arithmetic on a byte
            at = min(at, len(buf) - 1)
            buf[at] = (buf[at] + rng.choice([-16, -1, 1, 16])) % 256
        elif buf:  # overwrite a range with random bytes
            chunk = rng.randbytes(rng.randrange(1, 33))
            buf[at:at + len(chunk)] = chunk
    return bytes(buf[:MAX_INPUT])
