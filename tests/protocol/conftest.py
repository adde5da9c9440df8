"""Fixtures for the protocol tests: keys, trust stores, adapters, headers and packets.

Helpers are handed out as fixtures (factories) because tests run with
``--import-mode=importlib``, where a conftest is not importable as a module.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import Any

import pytest

from plasma.protocol import Adapter, InstructionPacket, LayerSpec, SigningKey, TrustStore
from plasma.protocol import packet as packet_mod
from tests.helpers.adapters import random_adapter

BASE_SHA = "ab" * 32
OTHER_SHA = "cd" * 32
T0 = 1_700_000_000.0
"""A fixed 'now' for semantic checks (Nov 2023), so tables do not depend on the clock."""


@pytest.fixture(scope="session")
def key() -> SigningKey:
    return SigningKey.generate()


@pytest.fixture(scope="session")
def other_key() -> SigningKey:
    """A valid key the device does not trust."""
    return SigningKey.generate()


@pytest.fixture(scope="session")
def trust(key: SigningKey) -> TrustStore:
    return TrustStore([key.public_key])


@pytest.fixture(scope="session")
def base_sha() -> str:
    return BASE_SHA


AdapterFactory = Callable[..., Adapter]


@pytest.fixture(scope="session")
def make_adapter() -> AdapterFactory:
    return random_adapter


@pytest.fixture(scope="session")
def make_header(key: SigningKey) -> Callable[..., InstructionPacket]:
    """An InstructionPacket with sane defaults (fleet slot, version 3, int8, one 4->3 layer)."""

    def build(**overrides: Any) -> InstructionPacket:
        fields: dict[str, Any] = dict(
            key_id=key.key_id, fleet="fleet-1", slot="fleet", device=None, version=3,
            base_sha256=BASE_SHA, created_at=T0 - 60, expires_at=T0 + 3600, rank=2,
            alpha=4.0, dtype="int8",
            layers=(LayerSpec(name="net.0", in_features=4, out_features=3),),
            payload_len=0, payload_sha256=hashlib.sha256(b"").hexdigest(),
        )
        fields.update(overrides)
        return InstructionPacket(**fields)

    return build


def header_for_payload(key: SigningKey, payload: bytes, *, layers: Sequence[LayerSpec],
                       rank: int, dtype: str, **overrides: Any) -> InstructionPacket:
    fields: dict[str, Any] = dict(
        key_id=key.key_id, fleet="fleet-1", slot="fleet", version=1, base_sha256=BASE_SHA,
        created_at=T0, expires_at=T0 + 3600, rank=rank, alpha=1.0, dtype=dtype,
        layers=tuple(layers), payload_len=len(payload),
        payload_sha256=hashlib.sha256(payload).hexdigest(),
    )
    fields.update(overrides)
    return InstructionPacket(**fields)


@pytest.fixture(scope="session")
def signed_payload_packet(key: SigningKey) -> Callable[..., bytes]:
    """A correctly signed packet around a hand-made payload: only the numerics can be wrong."""

    def build(payload: bytes, *, layers: Sequence[LayerSpec], rank: int, dtype: str,
              signers: Sequence[SigningKey] | None = None, **overrides: Any) -> bytes:
        header = header_for_payload(key, payload, layers=layers, rank=rank, dtype=dtype,
                                    **overrides)
        return packet_mod.assemble_packet(header, payload, signers or [key])

    return build


@pytest.fixture(scope="session")
def raw_packet() -> Callable[..., bytes]:
    """Assemble a packet from raw header bytes, bypassing the InstructionPacket model."""

    def build(header_bytes: bytes, payload: bytes, signers: Sequence[SigningKey],
              payload_len: int | None = None) -> bytes:
        prefix = packet_mod._PREFIX.pack(
            packet_mod.MAGIC, packet_mod.FORMAT_VERSION, 0, len(header_bytes),
            len(payload) if payload_len is None else payload_len,
            hashlib.sha256(payload).digest())
        signed = prefix + header_bytes
        entries = b"".join(bytes.fromhex(k.key_id) + k.sign(signed) for k in signers)
        return signed + bytes([len(signers)]) + entries + payload

    return build


@pytest.fixture(scope="session")
def small_packet(key: SigningKey) -> bytes:
    """A valid int8 packet of about 1 KB (rank 2, one 24 -> 16 layer)."""
    adapter = random_adapter({"net.0": (24, 16)}, rank=2, seed=7)
    data = packet_mod.encode_packet(adapter, key=key, fleet="fleet-1", slot="fleet", version=1,
                                    base_sha256=BASE_SHA, created_at=T0, expires_in=3600.0)
    assert 800 <= len(data) <= 1300, len(data)
    return data
