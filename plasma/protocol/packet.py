"""The instruction packet: a signed header plus LoRA factor bytes (docs/design.md section 3).

Wire layout (little-endian)::

    prefix   48 bytes  magic b"PLSM" | format u16 = 1 | flags u16 = 0 |
                       header_len u32 | payload_len u32 | payload sha256 (32 bytes)
    header   header_len bytes of JSON: an InstructionPacket
    sigs     count u8 (1..8), then count x (key id 16 bytes | Ed25519 signature 64 bytes)
    payload  payload_len bytes: per header layer, in order, factor A (rank x in) then
             factor B transposed (rank x out), by header dtype: int8 with one float32
             scale per row (all scales first, in factor order, then all int8 rows),
             or raw fp16 / fp32 rows

The signatures cover prefix + header, so the payload digest, the lengths and every
header field are signed.  Decoding checks, in order: size cap, structure and lengths,
signatures, payload digest, then parses the header and the factors.  Nothing is
parsed before the signature verifies; no pickle, no eval.

Decoding parses the header into the msgspec ``wire.PacketHeader`` (the device never imports
pydantic); encoding builds the pydantic ``InstructionPacket``, imported when first needed.
"""

from __future__ import annotations

import hashlib
import struct
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Union

import numpy as np

from .adapter import Adapter
from .errors import (
    HeaderInvalid,
    MessageInvalid,
    PacketBadLength,
    PacketBadMagic,
    PacketTooLarge,
    PacketTruncated,
    PacketUnsupported,
    PayloadDigestMismatch,
    PayloadInvalid,
    SignatureDuplicate,
    SignatureInvalid,
    SignatureMissing,
    SignatureUnknownKey,
)
from .signing import KEY_ID_BYTES, SigningKey, TrustStore
from .slots import SLOTS, Slot, slot_kind
from .wire import LayerSpec as WireLayerSpec
from .wire import PacketHeader, Reason

__all__ = ["assemble_packet", "check_base_model", "check_expiry", "check_layers", "check_target",
           "check_version", "CLOCK_SKEW_S", "decode_packet", "decode_payload", "DecodedPacket",
           "DEFAULT_EXPIRES_IN", "DEFAULT_MAX_PACKET_BYTES", "encode_packet", "encode_payload",
           "FORMAT_VERSION", "Header", "LayerLike", "MAGIC", "MAX_HEADER_LEN", "MAX_SIGNATURES",
           "payload_size", "peek_header", "PREFIX_LEN", "SIG_ENTRY_LEN", "SIG_LEN"]

if TYPE_CHECKING:
    from . import messages

Header = Union[PacketHeader, "messages.InstructionPacket"]
"""What the semantic checks take: the wire header, or the pydantic model (same fields)."""

MAGIC = b"PLSM"
FORMAT_VERSION = 1
_PREFIX = struct.Struct("<4sHHII32s")
PREFIX_LEN = _PREFIX.size  # 48
SIG_LEN = 64
SIG_ENTRY_LEN = KEY_ID_BYTES + SIG_LEN
MAX_SIGNATURES = 8
MAX_HEADER_LEN = 32 * 1024
DEFAULT_MAX_PACKET_BYTES = 256 * 1024
"""Size cap before anything is read; a rank-64 adapter of a 256-wide MLP fits easily."""
DEFAULT_EXPIRES_IN = 7 * 24 * 3600.0
CLOCK_SKEW_S = 300.0

_ITEMSIZE = {"int8": 1, "fp16": 2, "fp32": 4}
_NP_DTYPE: dict[str, np.dtype[np.floating]] = {"fp16": np.dtype("<f2"), "fp32": np.dtype("<f4")}
_MAX_INT8_SCALE = np.float32(np.finfo(np.float32).max / 128)


@dataclass(frozen=True)
class DecodedPacket:
    """A packet whose signature and digest verified and whose contents parsed."""

    header: PacketHeader
    adapter: Adapter
    """Empty ``layers`` means the packet clears its slot."""
    signers: tuple[str, ...]
    size: int


# ---------------------------------------------------------------- payload

LayerLike = Union["messages.LayerSpec", WireLayerSpec]


def payload_size(layers: Iterable[LayerLike], rank: int, dtype: str) -> int:
    """Bytes of the payload the header describes."""
    size = 0
    for layer in layers:
        size += rank * (layer.in_features + layer.out_features) * _ITEMSIZE[dtype]
        size += 2 * 4 * rank if dtype == "int8" else 0
    return size


def _factors(adapter: Adapter) -> list[np.ndarray]:
    """The rows the payload stores, in order: per layer A (rank, in), B.T (rank, out)."""
    out: list[np.ndarray] = []
    for a, b in adapter.layers.values():
        out += [a, b.T]
    return out


def encode_payload(adapter: Adapter, dtype: str) -> bytes:
    """int8: all row scales first (one block, checked at once), then the int8 rows."""
    if dtype not in _ITEMSIZE:
        raise ValueError(f"dtype must be one of {sorted(_ITEMSIZE)}, got {dtype!r}")
    if not adapter.is_finite():
        raise ValueError("adapter factors must be finite")
    factors = _factors(adapter)
    if dtype != "int8":
        rows = [np.asarray(f, dtype=_NP_DTYPE[dtype]) for f in factors]
        if not all(np.isfinite(r).all() for r in rows):
            raise ValueError(f"factor values overflow {dtype}; use fp32 or int8")
        return b"".join(r.tobytes() for r in rows)
    scales, quantized = [], []
    for factor in factors:  # (rank, cols)
        scale = (np.abs(factor).max(axis=1) / 127.0).astype("<f4")  # (rank,)
        safe = np.where(scale > 0, scale, 1.0).astype(np.float32)
        quantized.append(np.clip(np.rint(factor / safe[:, None]), -127, 127).astype(np.int8))
        scales.append(scale)
    return b"".join(s.tobytes() for s in scales) + b"".join(q.tobytes() for q in quantized)


def decode_payload(payload: bytes, header: Header) -> Adapter:
    """Factors from payload bytes; every length was checked against the header first."""
    expected = payload_size(header.layers, header.rank, header.dtype)
    if len(payload) != expected:
        raise PayloadInvalid(f"payload is {len(payload)} bytes, layers need {expected}")
    r, dtype = header.rank, header.dtype
    np_dtype: np.dtype[np.number]
    cols = [c for spec in header.layers for c in (spec.in_features, spec.out_features)]
    if dtype == "int8":
        n_scales = r * len(cols)
        scales = np.frombuffer(payload, dtype="<f4", count=n_scales).reshape(len(cols), r, 1)
        # |q| <= 128, so a scale up to max/128 keeps every q * scale finite in float32
        if not ((scales >= 0) & (scales <= _MAX_INT8_SCALE)).all():
            raise PayloadInvalid("int8 row scales must be finite, non-negative and small "
                                 "enough that q * scale stays finite", code="non_finite")
        offset, itemsize, np_dtype = 4 * n_scales, 1, np.dtype(np.int8)
    else:
        np_dtype = _NP_DTYPE[dtype]
        if not np.isfinite(np.frombuffer(payload, dtype=np_dtype)).all():
            raise PayloadInvalid("factor values must be finite (NaN or Inf found)",
                                 code="non_finite")
        offset, itemsize = 0, np_dtype.itemsize
    rows = []
    for i, c in enumerate(cols):
        raw = np.frombuffer(payload, dtype=np_dtype, count=r * c, offset=offset).reshape(r, c)
        offset += r * c * itemsize
        f = np.multiply(raw, scales[i], dtype=np.float32) if dtype == "int8" \
            else raw.astype(np.float32)
        f.flags.writeable = False  # owned here: Adapter keeps it without a copy
        rows.append(f)
    specs: tuple[LayerLike, ...] = header.layers
    layers = {spec.name: (rows[2 * i], rows[2 * i + 1].T) for i, spec in enumerate(specs)}
    return Adapter(alpha=header.alpha, rank=r, layers=layers)


# ---------------------------------------------------------------- encode


def encode_packet(
    adapter: Adapter | None,
    *,
    key: SigningKey,
    fleet: str,
    slot: Slot,
    version: int,
    base_sha256: str,
    device: str | None = None,
    dtype: str = "int8",
    expires_in: float = DEFAULT_EXPIRES_IN,
    priority: int = 5,
    provenance: messages.Provenance | None = None,
    created_at: float | None = None,
    packet_id: str | None = None,
    extra_signers: Iterable[SigningKey] = (),
) -> bytes:
    """Build and sign a packet; ``adapter=None`` builds a packet that clears the slot.

    Raises ``ValueError`` (or pydantic's ValidationError, a ValueError) on bad fields.
    ``provenance`` may be the pydantic model or its ``wire.Provenance`` mirror.
    """
    from .messages import InstructionPacket, LayerSpec, Provenance  # the server's path

    if provenance is not None and not isinstance(provenance, Provenance):
        provenance = Provenance(**provenance.model_dump())
    if adapter is None:
        adapter = Adapter(alpha=1.0, rank=1, layers={})
    payload = encode_payload(adapter, dtype)
    created = time.time() if created_at is None else created_at
    fields: dict[str, object] = dict(
        key_id=key.key_id, fleet=fleet, slot=slot, device=device, version=version,
        base_sha256=base_sha256, created_at=created, expires_at=created + expires_in,
        priority=priority, rank=adapter.rank, alpha=adapter.alpha, dtype=dtype,
        layers=tuple(LayerSpec(name=n, in_features=i, out_features=o)
                     for n, (i, o) in adapter.shapes().items()),
        payload_len=len(payload), payload_sha256=hashlib.sha256(payload).hexdigest(),
        provenance=provenance or Provenance(),
    )
    if packet_id is not None:
        fields["packet_id"] = packet_id
    header = InstructionPacket.model_validate(fields)
    return assemble_packet(header, payload, [key, *extra_signers])


def assemble_packet(header: Header, payload: bytes, signers: Iterable[SigningKey]
                    ) -> bytes:
    """Serialize and sign an already-built header with its payload."""
    header_bytes = header.model_dump_json().encode()
    digest = hashlib.sha256(payload).digest()
    prefix = _PREFIX.pack(MAGIC, FORMAT_VERSION, 0, len(header_bytes), len(payload), digest)
    signed = prefix + header_bytes
    entries = [bytes.fromhex(k.key_id) + k.sign(signed) for k in signers]
    if not 1 <= len(entries) <= MAX_SIGNATURES:
        raise ValueError(f"a packet needs 1..{MAX_SIGNATURES} signatures")
    return signed + bytes([len(entries)]) + b"".join(entries) + payload


# ---------------------------------------------------------------- decode


def decode_packet(
    data: bytes, trust: TrustStore, *, max_bytes: int = DEFAULT_MAX_PACKET_BYTES
) -> DecodedPacket:
    """Verify and decode; raises a PacketError subclass (with ``code``) on anything wrong."""
    if len(data) > max_bytes:
        raise PacketTooLarge(f"packet is {len(data)} bytes, the cap is {max_bytes}")
    header_len, payload_len, digest = _read_prefix(data)
    sig_at = PREFIX_LEN + header_len
    count = data[sig_at]
    payload_at = sig_at + 1 + count * SIG_ENTRY_LEN
    _check_total_length(len(data), payload_at + payload_len)
    signed = memoryview(data)[:sig_at]
    signers = _verify_signatures(bytes(signed), data[sig_at + 1:payload_at], count, trust)
    payload = data[payload_at:]
    if hashlib.sha256(payload).digest() != digest:
        raise PayloadDigestMismatch("payload bytes do not match the signed sha256")
    header = _parse_header(data[PREFIX_LEN:sig_at], payload_len, digest, signers)
    adapter = decode_payload(payload, header)
    return DecodedPacket(header=header, adapter=adapter, signers=signers, size=len(data))


def _read_prefix(data: bytes) -> tuple[int, int, bytes]:
    if len(data) < 4 or data[:4] != MAGIC:
        if len(data) < 4 and MAGIC.startswith(bytes(data)):
            raise PacketTruncated(f"packet is {len(data)} bytes, shorter than its prefix")
        raise PacketBadMagic("not a Plasma packet (bad magic bytes)")
    if len(data) < PREFIX_LEN + 1:
        raise PacketTruncated(f"packet is {len(data)} bytes, shorter than its prefix")
    _, fmt, flags, header_len, payload_len, digest = _PREFIX.unpack_from(data)
    if fmt != FORMAT_VERSION or flags != 0:
        raise PacketUnsupported(f"packet format {fmt} flags {flags}; this build reads format "
                                f"{FORMAT_VERSION} flags 0")
    if not 2 <= header_len <= MAX_HEADER_LEN:
        raise PacketBadLength(f"header length {header_len} outside 2..{MAX_HEADER_LEN}")
    if len(data) < PREFIX_LEN + header_len + 1:
        raise PacketTruncated("packet ends inside its header or signature count")
    return header_len, payload_len, digest


def _check_total_length(actual: int, expected: int) -> None:
    if actual < expected:
        raise PacketTruncated(f"packet is {actual} bytes, its lengths say {expected}")
    if actual > expected:
        raise PacketBadLength(f"{actual - expected} trailing bytes after the payload")


def _verify_signatures(signed: bytes, block: bytes, count: int, trust: TrustStore
                       ) -> tuple[str, ...]:
    if count == 0:
        raise SignatureMissing("packet carries no signature")
    if count > MAX_SIGNATURES:
        raise PacketBadLength(f"{count} signatures, at most {MAX_SIGNATURES}")
    entries = [block[i * SIG_ENTRY_LEN:(i + 1) * SIG_ENTRY_LEN] for i in range(count)]
    key_ids = [e[:KEY_ID_BYTES].hex() for e in entries]
    if len(set(key_ids)) != len(key_ids):
        raise SignatureDuplicate("the same key signed the packet more than once")
    valid = []
    for key_id, entry in zip(key_ids, entries):
        ok = trust.verify(key_id, entry[KEY_ID_BYTES:], signed)
        if ok is False:
            raise SignatureInvalid(f"signature by trusted key {key_id} does not verify")
        if ok:
            valid.append(key_id)
    if not valid:
        raise SignatureUnknownKey(f"no trusted key among the signers {', '.join(key_ids)}")
    return tuple(valid)


def _parse_header(raw: bytes, payload_len: int, digest: bytes, signers: tuple[str, ...]
                  ) -> PacketHeader:
    try:
        header = PacketHeader.model_validate_json(raw)
    except MessageInvalid as exc:
        raise HeaderInvalid(f"header field {exc.field or 'header'}: {exc.detail}") from None
    if header.payload_len != payload_len or header.payload_sha256 != digest.hex():
        raise HeaderInvalid("header payload length or digest differs from the prefix")
    if header.key_id not in signers:
        raise HeaderInvalid(f"header names key {header.key_id}, which did not sign it")
    return header


def peek_header(data: bytes) -> PacketHeader:
    """Parse the header WITHOUT verifying anything: for ``packet inspect`` only."""
    header_len, payload_len, digest = _read_prefix(data)
    raw = data[PREFIX_LEN:PREFIX_LEN + header_len]
    try:
        return PacketHeader.model_validate_json(raw)
    except MessageInvalid as exc:
        raise HeaderInvalid(f"header does not parse: {exc.detail}") from None


# ---------------------------------------------------------------- semantic checks


def check_expiry(header: Header, now: float, skew: float = CLOCK_SKEW_S
                 ) -> Reason | None:
    """Freeze attacks: an expired packet, or one created implausibly in the future."""
    if now >= header.expires_at:
        return Reason(code="expired", check="expiry",
                      message=f"packet expired {now - header.expires_at:.0f} s ago")
    if header.created_at > now + skew:
        return Reason(code="not_yet_valid", check="expiry",
                      message=f"packet created {header.created_at - now:.0f} s in the future")
    return None


def check_version(header: Header, highest_accepted: int) -> Reason | None:
    """Rollback and replay: the version must exceed the highest ever accepted for the slot."""
    if header.version == highest_accepted:
        return Reason(code="replayed_version", check="version",
                      message=f"version {header.version} of slot {header.slot} was already "
                              "accepted")
    if header.version < highest_accepted:
        return Reason(code="rollback_version", check="version",
                      message=f"version {header.version} is below the highest accepted "
                              f"{highest_accepted} for slot {header.slot}")
    return None


def check_base_model(header: Header, base_sha256: str) -> Reason | None:
    if header.base_sha256 != base_sha256:
        return Reason(code="wrong_base_model", check="base_model",
                      message=f"packet is for base model {header.base_sha256[:12]}..., this "
                              f"device runs {base_sha256[:12]}...")
    return None


def check_target(header: Header, fleet: str | None, device: str | None,
                 slots: Iterable[Slot] = SLOTS) -> Reason | None:
    """Mix-and-match: the packet must be for this fleet, this device and an allowed slot."""
    if header.slot not in tuple(slots):
        return Reason(code="wrong_slot", check="target",
                      message=f"slot {header.slot!r} is not accepted here")
    if fleet is not None and header.fleet != fleet:
        return Reason(code="wrong_fleet", check="target",
                      message=f"packet is for fleet {header.fleet!r}, not {fleet!r}")
    if slot_kind(header.slot).per_device and device is not None and header.device != device:
        return Reason(code="wrong_device", check="target",
                      message=f"packet is for device {header.device!r}, not {device!r}")
    return None


def check_layers(header: Header, layers: Mapping[str, tuple[int, int]],
                 max_rank: int) -> Reason | None:
    """The adapter's layers must exist in the model with the same (in, out) shapes."""
    if header.rank > max_rank:
        return Reason(code="rank_too_high", check="shapes",
                      message=f"rank {header.rank} exceeds the limit {max_rank}")
    for spec in header.layers:
        shape = layers.get(spec.name)
        if shape is None:
            return Reason(code="unknown_layer", check="shapes",
                          message=f"layer {spec.name!r} is not a target layer of this model")
        if shape != (spec.in_features, spec.out_features):
            return Reason(code="shape_mismatch", check="shapes",
                          message=f"layer {spec.name!r} is {shape[0]}->{shape[1]} in the model,"
                                  f" {spec.in_features}->{spec.out_features} in the packet")
    return None
