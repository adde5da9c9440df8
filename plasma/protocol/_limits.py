"""Constants shared by the pydantic contract (``messages``) and its msgspec mirror (``wire``).

Standard library only: the device imports this without pydantic.
"""

from __future__ import annotations

import uuid
from typing import Final

from .slots import SLOTS, Slot, slot_kind

__all__ = ["header_inconsistency", "HEX32_PATTERN", "ID_PATTERN", "KEY_ID_PATTERN",
           "LAYER_NAME_PATTERN", "MAX_FEATURES", "MAX_LAYERS", "MAX_RANK", "new_id",
           "REASON_CODE_PATTERN", "SCHEMA_VERSION", "SHA256_PATTERN",
           "SLOTS", "Slot"]  # re-exported from .slots for messages and wire

SCHEMA_VERSION: Final = 1  # Final: the type checker reads it as Literal[1], the fields' type

ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
SHA256_PATTERN = r"^[0-9a-f]{64}$"
KEY_ID_PATTERN = r"^[0-9a-f]{32}$"
HEX32_PATTERN = r"^[0-9a-f]{32}$"
REASON_CODE_PATTERN = r"^[a-z0-9_]{1,64}$"
LAYER_NAME_PATTERN = r"^[A-Za-z0-9_.:/-]{1,128}$"

MAX_RANK = 64
MAX_LAYERS = 64
MAX_FEATURES = 65536


def header_inconsistency(slot: str, device: str | None, created_at: float, expires_at: float,
                         layer_names: list[str]) -> str | None:
    """What is wrong across the fields of a packet header (None: nothing); one rule for both
    the pydantic ``InstructionPacket`` and its msgspec mirror ``wire.PacketHeader``."""
    if slot in SLOTS and slot_kind(slot).per_device != (device is not None):
        return "slot 'device' needs a device id; slot 'fleet' must not have one"
    if expires_at <= created_at:
        return "expires_at must be after created_at"
    if len(set(layer_names)) != len(layer_names):
        return "duplicate layer names"
    return None


def new_id() -> str:
    """A random 32-hex-digit id for packets, records and simulations."""
    return uuid.uuid4().hex
