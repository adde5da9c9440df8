"""Instruction packets: round trips, hostile bytes, tampering, numerics and semantic checks."""

from __future__ import annotations

import hashlib
import struct
import warnings
from collections.abc import Callable

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from plasma.protocol import (
    Adapter,
    InstructionPacket,
    LayerSpec,
    PacketError,
    SigningKey,
    TrustStore,
    check_base_model,
    check_expiry,
    check_layers,
    check_target,
    check_version,
    decode_packet,
    encode_packet,
    peek_header,
)
from plasma.protocol import packet as packet_mod

BASE_SHA = "ab" * 32
T0 = 1_700_000_000.0
KNOWN_CODES = {
    "too_large", "truncated", "bad_magic", "unsupported_format", "bad_length",
    "signature_missing", "signature_duplicate", "unknown_key", "bad_signature",
    "digest_mismatch", "bad_header", "bad_payload", "non_finite",
}
FIXTURES_OK = [HealthCheck.function_scoped_fixture]


def expect_code(data: bytes, trust: TrustStore, **kwargs: object) -> str:
    """Decode bytes that must be refused; return the PacketError code (anything else fails)."""
    with pytest.raises(PacketError) as info:
        decode_packet(data, trust, **kwargs)  # type: ignore[arg-type]
    code = info.value.code
    assert code in KNOWN_CODES, (code, str(info.value))
    assert str(info.value), "every rejection carries a message"
    return code


def refused(data: bytes, trust: TrustStore) -> str:
    """Like expect_code, but without pytest.raises overhead for the big loops."""
    try:
        decode_packet(data, trust)
    except PacketError as exc:
        assert exc.code in KNOWN_CODES, (exc.code, str(exc))
        return exc.code
    raise AssertionError("hostile bytes decoded")


def encode(adapter: Adapter | None, key: SigningKey, **kwargs: object) -> bytes:
    fields: dict[str, object] = dict(key=key, fleet="fleet-1", slot="fleet", version=1,
                                     base_sha256=BASE_SHA)
    fields.update(kwargs)
    return encode_packet(adapter, **fields)  # type: ignore[arg-type]


def regions(data: bytes) -> dict[str, range]:
    """Byte ranges of the wire layout of a one-signature packet."""
    _, _, _, header_len, payload_len, _ = packet_mod._PREFIX.unpack_from(data)
    sig_at = packet_mod.PREFIX_LEN + header_len
    return {
        "magic": range(0, 4), "format": range(4, 8), "header_len": range(8, 12),
        "payload_len": range(12, 16), "digest": range(16, 48),
        "header": range(48, sig_at), "count": range(sig_at, sig_at + 1),
        "key_id": range(sig_at + 1, sig_at + 17), "signature": range(sig_at + 17, sig_at + 81),
        "payload": range(sig_at + 81, sig_at + 81 + payload_len),
    }


# ---------------------------------------------------------------- round trips

NAMES = ["net.0", "blk.1/fc:up", "policy_head", "l-3"]


def _factor_rows(adapter: Adapter) -> list[np.ndarray]:
    """The rows the payload quantizes: per layer A (rank, in) and B.T (rank, out)."""
    return [f for a, b in adapter.layers.values() for f in (a, b.T)]


@st.composite
def adapters(draw: st.DrawFn) -> Adapter:
    rank = draw(st.integers(1, 8))
    n_layers = draw(st.integers(1, 4))
    shapes = [(draw(st.integers(1, 300)), draw(st.integers(1, 300))) for _ in range(n_layers)]
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    magnitude = draw(st.sampled_from([1e-3, 0.05, 1.0, 30.0]))
    pattern = draw(st.sampled_from(["normal", "zero_row", "spike", "constant", "tiny"]))
    layers = {}
    for name, (i, o) in zip(NAMES, shapes):
        a = (rng.standard_normal((rank, i)) * magnitude).astype(np.float32)  # (rank, in)
        b = (rng.standard_normal((o, rank)) * magnitude).astype(np.float32)  # (out, rank)
        if pattern == "zero_row":  # a zero row has scale 0 and must come back as zeros
            a[0] = 0.0
            b[:, -1] = 0.0
        elif pattern == "spike":  # one large value dominates its row's scale
            a[0, rng.integers(i)] = 500.0 * magnitude
        elif pattern == "constant":
            a[-1] = magnitude
        elif pattern == "tiny":  # far below the scale: quantizes to 0
            b[0, 0] = magnitude * 1e-6
        layers[name] = (a, b)
    alpha = draw(st.floats(0.125, 64.0, allow_nan=False, width=32))
    return Adapter(alpha=alpha, rank=rank, layers=layers)


@settings(max_examples=300, deadline=None, suppress_health_check=FIXTURES_OK)
@given(adapter=adapters(), dtype=st.sampled_from(["int8", "fp16", "fp32"]),
       slot=st.sampled_from(["fleet", "device"]), version=st.integers(1, 2**53 - 1))
def test_round_trip_within_dtype_bounds(adapter: Adapter, dtype: str, slot: str, version: int,
                                        key: SigningKey, trust: TrustStore) -> None:
    check_round_trip(adapter, dtype, slot, version, key, trust)


@pytest.mark.parametrize("dtype", ["int8", "fp16", "fp32"])
def test_round_trip_at_the_largest_shapes(dtype: str, key: SigningKey, trust: TrustStore,
                                          make_adapter: Callable[..., Adapter]) -> None:
    """The corner hypothesis rarely reaches: rank 8, four 300 x 300 layers (fp32: 77 KB)."""
    shapes = {name: (300, 300) for name in NAMES}
    check_round_trip(make_adapter(shapes, rank=8, seed=5, magnitude=3.0), dtype, "device",
                     2**53 - 1, key, trust)
    check_round_trip(make_adapter({"x": (1, 1)}, rank=1, seed=6), dtype, "fleet", 1, key, trust)


def check_round_trip(adapter: Adapter, dtype: str, slot: str, version: int, key: SigningKey,
                     trust: TrustStore) -> None:
    device = "dev_7" if slot == "device" else None
    data = encode(adapter, key, dtype=dtype, slot=slot, device=device, version=version,
                  created_at=T0, expires_in=60.0, priority=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no overflow or invalid-value warnings on decode
        decoded = decode_packet(data, trust)
    h = decoded.header
    assert (h.fleet, h.slot, h.device, h.version, h.dtype, h.rank) == \
        ("fleet-1", slot, device, version, dtype, adapter.rank)
    assert (h.created_at, h.expires_at, h.priority, h.key_id) == (T0, T0 + 60.0, 2, key.key_id)
    assert h.payload_len == packet_mod.payload_size(h.layers, h.rank, dtype)
    assert decoded.signers == (key.key_id,) and decoded.size == len(data)
    got = decoded.adapter
    assert got.alpha == adapter.alpha and got.rank == adapter.rank
    assert list(got.layers) == list(adapter.layers)  # order preserved
    assert got.shapes() == adapter.shapes()
    assert [(s.name, s.in_features, s.out_features) for s in h.layers] == \
        [(n, i, o) for n, (i, o) in adapter.shapes().items()]
    for want, have in zip(_factor_rows(adapter), _factor_rows(got)):
        assert have.dtype == np.float32 and have.shape == want.shape
        assert not have.flags.writeable
        err = np.abs(have.astype(np.float64) - want.astype(np.float64))  # (rank, cols)
        if dtype == "fp32":
            assert np.array_equal(have, want)
        elif dtype == "fp16":  # round to nearest: relative 2**-11, absolute 2**-25 if subnormal
            bound = 2.0**-11 * np.abs(want.astype(np.float64)) + 2.0**-25
            assert (err <= bound).all(), err.max()
        else:  # int8: half a quantization step of each row
            scale = np.abs(want).max(axis=1).astype(np.float64) / 127.0  # (rank,)
            bound = scale[:, None] / 2 * (1 + 1e-5) + 1e-30
            assert (err <= bound).all(), (err - bound).max()
            zero_rows = scale == 0
            assert (have[zero_rows] == 0).all()


@pytest.mark.parametrize("dtype", ["int8", "fp16", "fp32"])
def test_clear_slot_packet_round_trips(dtype: str, key: SigningKey, trust: TrustStore) -> None:
    decoded = decode_packet(encode(None, key, dtype=dtype, version=9), trust)
    assert decoded.header.layers == () and decoded.header.payload_len == 0
    assert dict(decoded.adapter.layers) == {} and decoded.header.version == 9


def test_size_rank4_int8_mlp_64_256x3_8(key: SigningKey, trust: TrustStore,
                                        make_adapter: Callable[..., Adapter],
                                        capsys: pytest.CaptureFixture[str]) -> None:
    """About 7.5 KB for rank 4 on all four layers of 64-256-256-256-8 (docs/design.md section 3)."""
    shapes = {"net.0": (64, 256), "net.2": (256, 256), "net.4": (256, 256), "net.6": (256, 8)}
    data = encode(make_adapter(shapes, rank=4, seed=1), key, dtype="int8")
    with capsys.disabled():  # the figure is part of the report, show it in every run
        print(f"\nrank-4 int8 packet for MLP 64-256-256-256-8: {len(data)} bytes "
              f"({len(data) / 1024:.2f} KiB)")
    assert len(data) <= 9 * 1024
    assert decode_packet(data, trust).adapter.shapes() == shapes


# ---------------------------------------------------------------- hostile bytes


def test_every_truncation_is_refused_as_truncated(small_packet: bytes, trust: TrustStore
                                                  ) -> None:
    codes = {n: refused(small_packet[:n], trust) for n in range(len(small_packet))}
    assert set(codes.values()) == {"truncated"}, {c for c in codes.values()}


def test_every_truncation_of_a_large_packet_is_refused(key: SigningKey, trust: TrustStore,
                                                       make_adapter: Callable[..., Adapter]
                                                       ) -> None:
    data = encode(make_adapter({"a": (40, 30), "b": (30, 5)}, rank=4), key, dtype="fp16")
    assert {refused(data[:n], trust) for n in range(len(data))} == {"truncated"}


# Which codes a one-bit flip in each region may give (signed regions: bad_signature).
FLIP_CODES = {
    "magic": {"bad_magic"},
    "format": {"unsupported_format"},
    "header_len": {"bad_length", "truncated"},
    "payload_len": {"bad_length", "truncated"},
    "digest": {"bad_signature"},
    "header": {"bad_signature"},
    "count": {"bad_length", "truncated"},
    "key_id": {"unknown_key"},
    "signature": {"bad_signature"},
    "payload": {"digest_mismatch"},
}


def test_every_single_bit_flip_is_refused(small_packet: bytes, trust: TrustStore) -> None:
    """All 8 x ~1000 bit positions of a valid ~1 KB packet."""
    layout = regions(small_packet)
    assert sum(len(r) for r in layout.values()) == len(small_packet)
    buf = bytearray(small_packet)
    seen: dict[str, set[str]] = {name: set() for name in layout}
    for name, where in layout.items():
        for pos in where:
            for bit in range(8):
                buf[pos] ^= 1 << bit
                code = refused(bytes(buf), trust)
                buf[pos] ^= 1 << bit
                assert code in FLIP_CODES[name], (name, pos, bit, code)
                seen[name].add(code)
    assert bytes(buf) == small_packet
    assert all(seen.values())


@pytest.mark.parametrize("extra", [b"\0", b"x" * 7, b"\xff" * 1000])
def test_appended_bytes_are_bad_length(extra: bytes, small_packet: bytes, trust: TrustStore
                                       ) -> None:
    assert expect_code(small_packet + extra, trust) == "bad_length"


_ANY_TRUST = TrustStore([SigningKey.generate().public_key])


@settings(max_examples=400, deadline=None)
@given(data=st.binary(max_size=3000))
def test_random_bytes_are_refused(data: bytes) -> None:
    refused(data, _ANY_TRUST)


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=3000))
def test_random_bytes_after_a_valid_magic_are_refused(data: bytes) -> None:
    refused(b"PLSM\x01\x00\x00\x00" + data, _ANY_TRUST)


@settings(max_examples=300, deadline=None, suppress_health_check=FIXTURES_OK)
@given(header=st.binary(min_size=2, max_size=300), count=st.integers(0, 12),
       payload=st.binary(max_size=300), trusted_id=st.booleans(), sig=st.binary(min_size=64,
                                                                                max_size=64))
def test_structured_garbage_is_refused(header: bytes, count: int, payload: bytes,
                                       trusted_id: bool, sig: bytes, key: SigningKey,
                                       trust: TrustStore) -> None:
    """Valid prefix and consistent lengths around random contents: reaches the signature step."""
    prefix = packet_mod._PREFIX.pack(b"PLSM", 1, 0, len(header), len(payload),
                                     hashlib.sha256(payload).digest())
    key_id = bytes.fromhex(key.key_id) if trusted_id else b"\x01" * 16
    entries = b"".join((key_id if i == 0 else bytes([0x80 + i]) * 16) + sig for i in range(count))
    code = refused(prefix + header + bytes([count]) + entries + payload, trust)
    if count == 0:
        assert code == "signature_missing"
    elif count <= 8:
        assert code == ("bad_signature" if trusted_id else "unknown_key")


@settings(max_examples=200, deadline=None, suppress_health_check=FIXTURES_OK)
@given(dtype=st.sampled_from(["int8", "fp16", "fp32"]), rank=st.integers(1, 4),
       shape=st.tuples(st.integers(1, 20), st.integers(1, 20)), seed=st.integers(0, 2**32 - 1),
       nasty=st.booleans())
def test_signed_random_payload_decodes_finite_or_is_refused(
        dtype: str, rank: int, shape: tuple[int, int], seed: int, nasty: bool,
        signed_payload_packet: Callable[..., bytes], trust: TrustStore) -> None:
    """A trusted signer over random factor bytes: a finite adapter or non_finite, nothing else."""
    layers = (LayerSpec(name="l", in_features=shape[0], out_features=shape[1]),)
    size = packet_mod.payload_size(layers, rank, dtype)
    rng = np.random.default_rng(seed)
    payload = bytearray(rng.integers(0, 256, size, dtype=np.uint8).tobytes())
    if nasty:  # all-ones exponents: NaN/Inf/huge floats are likely
        for pos in rng.integers(0, size, 4):
            payload[pos] |= 0x7F
    data = signed_payload_packet(bytes(payload), layers=layers, rank=rank, dtype=dtype)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            decoded = decode_packet(data, trust)
    except PacketError as exc:
        assert exc.code == "non_finite", exc
    else:
        assert decoded.adapter.is_finite()


def test_size_cap_is_checked_before_anything_else(small_packet: bytes, trust: TrustStore
                                                  ) -> None:
    assert expect_code(small_packet, trust, max_bytes=len(small_packet) - 1) == "too_large"
    assert decode_packet(small_packet, trust, max_bytes=len(small_packet)).size == \
        len(small_packet)
    huge = b"\0" * (packet_mod.DEFAULT_MAX_PACKET_BYTES + 1)  # not even a magic
    assert expect_code(huge, trust) == "too_large"


def _patch_prefix(data: bytes, **fields: int | bytes) -> bytes:
    names = ["magic", "fmt", "flags", "header_len", "payload_len", "digest"]
    values = dict(zip(names, packet_mod._PREFIX.unpack_from(data)))
    values.update(fields)
    return packet_mod._PREFIX.pack(*(values[n] for n in names)) + data[packet_mod.PREFIX_LEN:]


@pytest.mark.parametrize(("patch", "code"), [
    ({"magic": b"PLSX"}, "bad_magic"),
    ({"magic": b"\x89PNG"}, "bad_magic"),
    ({"fmt": 2}, "unsupported_format"),
    ({"fmt": 0}, "unsupported_format"),
    ({"flags": 1}, "unsupported_format"),
    ({"header_len": 0}, "bad_length"),
    ({"header_len": 1}, "bad_length"),
    ({"header_len": packet_mod.MAX_HEADER_LEN + 1}, "bad_length"),
    ({"header_len": 2**32 - 1}, "bad_length"),
    ({"payload_len": 2**32 - 1}, "truncated"),
])
def test_prefix_fields(patch: dict[str, int | bytes], code: str, small_packet: bytes,
                       trust: TrustStore) -> None:
    assert expect_code(_patch_prefix(small_packet, **patch), trust) == code


@pytest.mark.parametrize("short", [b"", b"P", b"PL", b"PLS", b"PLSM", b"PLSM\x01\x00"])
def test_short_prefixes_are_truncated(short: bytes, trust: TrustStore) -> None:
    assert expect_code(short, trust) == "truncated"


@pytest.mark.parametrize("junk", [b"X", b"{}", b"\x00\x00\x00\x00", b"GET / HTTP/1.1\r\n"])
def test_other_short_junk_is_bad_magic(junk: bytes, trust: TrustStore) -> None:
    assert expect_code(junk, trust) == "bad_magic"


# ---------------------------------------------------------------- tampering and signatures


@pytest.mark.parametrize(("old", "new"), [
    (b'"version":1,', b'"version":2,'),
    (b'"fleet":"fleet-1"', b'"fleet":"fleet-2"'),
    (b'"base_sha256":"abab', b'"base_sha256":"cdab'),
    (b'"priority":5', b'"priority":0'),
    (b'"slot":"fleet"', b'"slot":"fleey"'),
])
def test_tampered_header_keeps_old_signature(old: bytes, new: bytes, small_packet: bytes,
                                             trust: TrustStore) -> None:
    assert small_packet.count(old) == 1 and len(old) == len(new)
    assert expect_code(small_packet.replace(old, new), trust) == "bad_signature"


def test_tampered_payload_is_digest_mismatch(small_packet: bytes, trust: TrustStore) -> None:
    at = regions(small_packet)["payload"].start
    tampered = small_packet[:at] + bytes(len(small_packet) - at)
    assert expect_code(tampered, trust) == "digest_mismatch"


def test_replaced_payload_with_updated_digest_breaks_the_signature(
        small_packet: bytes, trust: TrustStore) -> None:
    at = regions(small_packet)["payload"].start
    payload = bytes(len(small_packet) - at)
    data = _patch_prefix(small_packet[:at], digest=hashlib.sha256(payload).digest()) + payload
    assert expect_code(data, trust) == "bad_signature"


def test_wrong_key_is_unknown_key(small_packet: bytes, other_key: SigningKey) -> None:
    assert expect_code(small_packet, TrustStore([other_key.public_key])) == "unknown_key"
    assert expect_code(small_packet, TrustStore()) == "unknown_key"


def test_trusted_key_with_bad_signature(small_packet: bytes, trust: TrustStore) -> None:
    sig = regions(small_packet)["signature"]
    forged = small_packet[:sig.start] + bytes(64) + small_packet[sig.stop:]
    assert expect_code(forged, trust) == "bad_signature"


def test_signature_over_other_bytes_is_bad_signature(small_packet: bytes, key: SigningKey,
                                                     trust: TrustStore) -> None:
    sig = regions(small_packet)["signature"]
    spliced = small_packet[:sig.start] + key.sign(b"something else") + small_packet[sig.stop:]
    assert expect_code(spliced, trust) == "bad_signature"


def test_duplicate_signature_entries(make_header: Callable[..., InstructionPacket],
                                     key: SigningKey, other_key: SigningKey, trust: TrustStore
                                     ) -> None:
    header = make_header(layers=())
    for signers in ([key, key], [other_key, other_key], [key, other_key, key]):
        data = packet_mod.assemble_packet(header, b"", signers)
        assert expect_code(data, trust) == "signature_duplicate"


def test_zero_signatures_is_signature_missing(small_packet: bytes, trust: TrustStore,
                                              raw_packet: Callable[..., bytes],
                                              make_header: Callable[..., InstructionPacket]
                                              ) -> None:
    layout = regions(small_packet)
    stripped = small_packet[:layout["count"].start] + b"\0" + \
        small_packet[layout["payload"].start:]
    assert expect_code(stripped, trust) == "signature_missing"
    header = make_header(layers=()).model_dump_json().encode()
    assert expect_code(raw_packet(header, b"", []), trust) == "signature_missing"
    with pytest.raises(ValueError):
        packet_mod.assemble_packet(make_header(layers=()), b"", [])


def test_more_than_eight_signatures_is_bad_length(raw_packet: Callable[..., bytes],
                                                  make_header: Callable[..., InstructionPacket],
                                                  key: SigningKey, trust: TrustStore) -> None:
    signers = [key] + [SigningKey.generate() for _ in range(8)]
    header = make_header(layers=()).model_dump_json().encode()
    assert expect_code(raw_packet(header, b"", signers), trust) == "bad_length"
    with pytest.raises(ValueError):
        packet_mod.assemble_packet(make_header(layers=()), b"", signers)


def test_untrusted_extra_signer_is_ignored(key: SigningKey, other_key: SigningKey,
                                           trust: TrustStore) -> None:
    data = encode(None, key, extra_signers=[other_key])
    assert decode_packet(data, trust).signers == (key.key_id,)
    both = TrustStore([key.public_key, other_key.public_key])
    assert decode_packet(data, both).signers == (key.key_id, other_key.key_id)


def test_one_bad_trusted_signature_spoils_a_good_one(key: SigningKey, other_key: SigningKey
                                                     ) -> None:
    data = bytearray(encode(None, key, extra_signers=[other_key]))
    second_sig = regions(bytes(data))["signature"].stop + 16  # entry 2: key id, then sig
    data[second_sig] ^= 1
    both = TrustStore([key.public_key, other_key.public_key])
    assert expect_code(bytes(data), both) == "bad_signature"
    assert decode_packet(bytes(data), TrustStore([key.public_key])).signers == (key.key_id,)


def test_header_naming_a_key_that_did_not_sign(signed_payload_packet: Callable[..., bytes],
                                               key: SigningKey, other_key: SigningKey,
                                               trust: TrustStore) -> None:
    data = signed_payload_packet(b"", layers=(), rank=1, dtype="int8", key_id=other_key.key_id)
    assert expect_code(data, trust) == "bad_header"
    both_signed = signed_payload_packet(b"", layers=(), rank=1, dtype="int8",
                                        key_id=other_key.key_id, signers=[key, other_key])
    assert expect_code(both_signed, trust) == "bad_header"  # other_key is not trusted


@pytest.mark.parametrize("header", [
    b"{}", b"[]", b"not json", b"\xff\xfe", b'{"schema_version": 1}', b"null",
    b'{"a":' * 200 + b"1" + b"}" * 200,
])
def test_signed_garbage_header_is_bad_header(header: bytes, raw_packet: Callable[..., bytes],
                                             key: SigningKey, trust: TrustStore) -> None:
    assert expect_code(raw_packet(header, b"", [key]), trust) == "bad_header"


def test_signed_header_disagreeing_with_prefix_is_bad_header(
        make_header: Callable[..., InstructionPacket], raw_packet: Callable[..., bytes],
        key: SigningKey, trust: TrustStore) -> None:
    payload = b"\0" * 8
    header = make_header(layers=(), payload_len=8,
                         payload_sha256=hashlib.sha256(b"other").hexdigest())
    data = raw_packet(header.model_dump_json().encode(), payload, [key])
    assert expect_code(data, trust) == "bad_header"
    header = make_header(layers=(), payload_len=7,
                         payload_sha256=hashlib.sha256(payload).hexdigest())
    assert expect_code(raw_packet(header.model_dump_json().encode(), payload, [key]),
                       trust) == "bad_header"


# ---------------------------------------------------------------- numerics of the payload

L23 = (LayerSpec(name="l", in_features=2, out_features=3),)  # rank 2: rows of 2, then of 3


def _int8_payload(scales: list[float], q: int = 1) -> bytes:
    return np.array(scales, "<f4").tobytes() + np.full(2 * 2 + 2 * 3, q, np.int8).tobytes()


def _float_payload(dtype: str, poison: float, at: int = 3) -> bytes:
    values = np.linspace(-1, 1, 2 * 2 + 2 * 3)
    values[at] = poison
    return values.astype("<f2" if dtype == "fp16" else "<f4").tobytes()


@pytest.mark.parametrize(("dtype", "payload"), [
    ("fp32", _float_payload("fp32", np.nan)),
    ("fp32", _float_payload("fp32", np.inf)),
    ("fp32", _float_payload("fp32", -np.inf, at=9)),
    ("fp16", _float_payload("fp16", np.nan)),
    ("fp16", _float_payload("fp16", np.inf, at=0)),
    ("fp16", _float_payload("fp16", -np.inf, at=9)),
    ("int8", _int8_payload([0.1, np.nan, 0.1, 0.1])),
    ("int8", _int8_payload([0.1, 0.1, 0.1, -0.5])),
    ("int8", _int8_payload([0.1, 0.1, np.inf, 0.1])),
    ("int8", _int8_payload([0.1, -np.inf, 0.1, 0.1])),
    # finite scales whose product with q overflows float32: must not smuggle Inf through
    ("int8", _int8_payload([3e38, 0.1, 0.1, 0.1], q=127)),
    ("int8", _int8_payload([0.1, 0.1, 0.1, 2.7e36], q=-128)),
], ids=["fp32-nan", "fp32-inf", "fp32-neginf", "fp16-nan", "fp16-inf", "fp16-neginf",
        "int8-nan-scale", "int8-negative-scale", "int8-inf-scale", "int8-neginf-scale",
        "int8-overflowing-scale", "int8-overflowing-scale-q-128"])
def test_non_finite_factors_are_refused(dtype: str, payload: bytes,
                                        signed_payload_packet: Callable[..., bytes],
                                        trust: TrustStore) -> None:
    data = signed_payload_packet(payload, layers=L23, rank=2, dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert expect_code(data, trust) == "non_finite"


def test_hand_made_int8_payload_decodes_exactly(signed_payload_packet: Callable[..., bytes],
                                                trust: TrustStore) -> None:
    """Control for the table above: same builder, sane numbers, q = -128 allowed."""
    data = signed_payload_packet(_int8_payload([0.5, 0.0, 0.25, 1.0], q=-128), layers=L23,
                                 rank=2, dtype="int8")
    a, b = decode_packet(data, trust).adapter.layers["l"]
    np.testing.assert_array_equal(a, [[-64, -64], [0, 0]])
    np.testing.assert_array_equal(b.T, [[-32, -32, -32], [-128, -128, -128]])


@pytest.mark.parametrize(("layers", "dtype", "payload_len"), [
    ((LayerSpec(name="l", in_features=3, out_features=3),), "int8", 26),  # wants 28
    ((LayerSpec(name="l", in_features=2, out_features=3),), "fp32", 41),  # wants 40
    ((LayerSpec(name="l", in_features=2, out_features=3),), "fp16", 0),
    ((LayerSpec(name="l", in_features=2, out_features=3),
      LayerSpec(name="m", in_features=1, out_features=1)), "fp16", 20),
    ((), "fp32", 4),
])
def test_layer_shapes_not_matching_payload_length(layers: tuple[LayerSpec, ...], dtype: str,
                                                  payload_len: int,
                                                  signed_payload_packet: Callable[..., bytes],
                                                  trust: TrustStore) -> None:
    data = signed_payload_packet(b"\0" * payload_len, layers=layers, rank=2, dtype=dtype)
    assert expect_code(data, trust) == "bad_payload"


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
def test_encode_refuses_bad_inputs(key: SigningKey, make_adapter: Callable[..., Adapter]
                                   ) -> None:
    good = make_adapter({"l": (3, 2)}, rank=2)
    a, b = good.layers["l"]
    nan = Adapter(alpha=1.0, rank=2, layers={"l": (np.where(a > 0, np.nan, a), b)})
    huge = Adapter(alpha=1.0, rank=2, layers={"l": (a * 1e6, b)})
    with pytest.raises(ValueError, match="finite"):
        encode(nan, key)
    with pytest.raises(ValueError, match="overflow"):
        encode(huge, key, dtype="fp16")
    encode(huge, key, dtype="fp32")  # fp32 and int8 carry it
    with pytest.raises(ValueError, match="dtype"):
        encode(good, key, dtype="int4")
    for bad in ({"slot": "device"}, {"device": "d1"}, {"version": 0}, {"fleet": "a/b"},
                {"base_sha256": "AB" * 32}, {"priority": 10}, {"expires_in": 0.0},
                {"expires_in": float("nan")}):
        with pytest.raises(ValueError):
            encode(good, key, **bad)


def test_peek_header_reads_without_verifying(small_packet: bytes, trust: TrustStore,
                                             other_key: SigningKey) -> None:
    header = peek_header(small_packet)
    assert header == decode_packet(small_packet, trust).header
    at = regions(small_packet)["payload"].start
    assert peek_header(small_packet[:at] + b"junk") == header  # not verified: by design
    for junk in (b"", b"nope", small_packet[:60]):
        with pytest.raises(PacketError):
            peek_header(junk)
    with pytest.raises(PacketError) as info:
        peek_header(small_packet.replace(b'"slot":"fleet"', b'"slot":"fleey"'))
    assert info.value.code == "bad_header"


# ---------------------------------------------------------------- semantic checks (tables)


@pytest.mark.parametrize(("created", "expires", "now", "code"), [
    (T0 - 60, T0 + 3600, T0, None),
    (T0 - 60, T0 + 3600, T0 + 3599.9, None),
    (T0 - 60, T0 + 3600, T0 + 3600, "expired"),
    (T0 - 60, T0 + 3600, T0 + 86400, "expired"),
    (T0 + 200, T0 + 3600, T0, None),  # within the 300 s clock skew
    (T0 + 1000, T0 + 3600, T0, "not_yet_valid"),
    (T0 + 1000, T0 + 3600, T0 + 3600, "expired"),
])
def test_check_expiry(created: float, expires: float, now: float, code: str | None,
                      make_header: Callable[..., InstructionPacket]) -> None:
    reason = check_expiry(make_header(created_at=created, expires_at=expires), now)
    assert (reason.code if reason else None) == code
    assert reason is None or (reason.check == "expiry" and reason.message)


@pytest.mark.parametrize(("version", "highest", "code"), [
    (3, 0, None), (3, 2, None), (2**53 - 1, 2**53 - 2, None),
    (3, 3, "replayed_version"),
    (3, 4, "rollback_version"), (1, 2**40, "rollback_version"),
])
def test_check_version(version: int, highest: int, code: str | None,
                       make_header: Callable[..., InstructionPacket]) -> None:
    reason = check_version(make_header(version=version), highest)
    assert (reason.code if reason else None) == code


@pytest.mark.parametrize(("packet_base", "device_base", "code"), [
    ("ab" * 32, "ab" * 32, None),
    ("ab" * 32, "cd" * 32, "wrong_base_model"),
    ("ab" * 32, "ab" * 31 + "ac", "wrong_base_model"),
])
def test_check_base_model(packet_base: str, device_base: str, code: str | None,
                          make_header: Callable[..., InstructionPacket]) -> None:
    reason = check_base_model(make_header(base_sha256=packet_base), device_base)
    assert (reason.code if reason else None) == code


@pytest.mark.parametrize(("slot", "device", "my_fleet", "my_device", "slots", "code"), [
    ("fleet", None, "fleet-1", "d1", ("fleet", "device"), None),
    ("fleet", None, "fleet-2", "d1", ("fleet", "device"), "wrong_fleet"),
    ("fleet", None, None, None, ("fleet", "device"), None),
    ("device", "d1", "fleet-1", "d1", ("fleet", "device"), None),
    ("device", "d1", "fleet-1", "d2", ("fleet", "device"), "wrong_device"),
    ("device", "d1", "fleet-2", "d1", ("fleet", "device"), "wrong_fleet"),
    ("device", "d1", "fleet-1", None, ("fleet", "device"), None),
    ("device", "d1", "fleet-1", "d1", ("fleet",), "wrong_slot"),
    ("fleet", None, "fleet-1", "d1", ("device",), "wrong_slot"),
])
def test_check_target(slot: str, device: str | None, my_fleet: str | None,
                      my_device: str | None, slots: tuple[str, ...], code: str | None,
                      make_header: Callable[..., InstructionPacket]) -> None:
    reason = check_target(make_header(slot=slot, device=device), my_fleet, my_device,
                          slots)  # type: ignore[arg-type]
    assert (reason.code if reason else None) == code


@pytest.mark.parametrize(("model_layers", "rank", "max_rank", "code"), [
    ({"net.0": (4, 3)}, 2, 16, None),
    ({"net.0": (4, 3), "net.2": (3, 3)}, 16, 16, None),
    ({"net.2": (4, 3)}, 2, 16, "unknown_layer"),
    ({}, 2, 16, "unknown_layer"),
    ({"net.0": (3, 4)}, 2, 16, "shape_mismatch"),
    ({"net.0": (4, 4)}, 2, 16, "shape_mismatch"),
    ({"net.0": (4, 3)}, 17, 16, "rank_too_high"),
    ({"net.0": (4, 3)}, 2, 1, "rank_too_high"),
])
def test_check_layers(model_layers: dict[str, tuple[int, int]], rank: int, max_rank: int,
                      code: str | None, make_header: Callable[..., InstructionPacket]) -> None:
    reason = check_layers(make_header(rank=rank), model_layers, max_rank)
    assert (reason.code if reason else None) == code
    assert reason is None or reason.check == "shapes"


def test_check_layers_accepts_a_clear_packet(make_header: Callable[..., InstructionPacket]
                                             ) -> None:
    assert check_layers(make_header(layers=()), {}, 16) is None


def test_struct_layout_is_48_bytes() -> None:
    assert packet_mod.PREFIX_LEN == 48 == struct.calcsize("<4sHHII32s")
