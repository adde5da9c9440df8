"""Plasma's contract: messages, packet codec, telemetry frames, signing, topics, slot kinds, errors.

Depends on pydantic, msgspec, numpy, PyNaCl (verifying) and cryptography (signing, imported
only when a private key is made or loaded).

The pydantic models (``AuditRecord``, ``InstructionPacket``...) are loaded on first access
(PEP 562): a device uses their msgspec mirrors in ``plasma.protocol.wire`` and never imports
pydantic.  Decoding a packet or a telemetry frame does not need pydantic either.
"""

from typing import TYPE_CHECKING, Any

from . import topics
from ._limits import SCHEMA_VERSION, new_id
from .adapter import Adapter, adapter_from_arrays, load_adapter_npz, save_adapter_npz
from .bundle import Bundle, BundleError, load_bundle
from .errors import (
    AdapterFileError,
    BundleNotFound,
    BusError,
    ConfigError,
    EnvError,
    HeaderInvalid,
    JournalError,
    KeyFileError,
    MergeError,
    MessageInvalid,
    PacketBadLength,
    PacketBadMagic,
    PacketError,
    PacketTooLarge,
    PacketTruncated,
    PacketUnsupported,
    PayloadDigestMismatch,
    PayloadInvalid,
    PlasmaError,
    ServiceError,
    SignatureDuplicate,
    SignatureInvalid,
    SignatureMissing,
    SignatureUnknownKey,
    StoreError,
    TelemetryError,
    TopicError,
)
from .packet import (
    DEFAULT_MAX_PACKET_BYTES,
    DecodedPacket,
    check_base_model,
    check_expiry,
    check_layers,
    check_target,
    check_version,
    decode_packet,
    encode_packet,
    peek_header,
)
from .signing import PublicKey, SigningKey, TrustStore, key_id_of, load_public_key
from .slots import SLOT_KINDS, SLOTS, Slot, SlotKind, slot_kind, slot_topic
from .telemetry import TraceBatch, decode_traces, encode_traces

_PYDANTIC_NAMES = frozenset({
    "AuditRecord", "InstructionPacket", "LayerSpec", "LiveVersions", "Provenance", "Reason",
    "SimulationResult", "StateTrace", "Status", "Verdict", "WorldState",
})

if TYPE_CHECKING:
    from .messages import (
        AuditRecord,
        InstructionPacket,
        LayerSpec,
        LiveVersions,
        Provenance,
        Reason,
        SimulationResult,
        StateTrace,
        Status,
        Verdict,
        WorldState,
    )


def __getattr__(name: str) -> Any:
    """The pydantic models, imported on first use (the device never asks for them)."""
    if name in _PYDANTIC_NAMES:
        from . import messages

        value = getattr(messages, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | _PYDANTIC_NAMES)

__all__ = [
    "SCHEMA_VERSION", "SLOTS", "DEFAULT_MAX_PACKET_BYTES",
    # slot kinds
    "SLOT_KINDS", "SlotKind", "slot_kind", "slot_topic",
    # messages
    "AuditRecord", "InstructionPacket", "LayerSpec", "LiveVersions", "Provenance", "Reason",
    "SimulationResult", "Slot", "StateTrace", "Status", "Verdict", "WorldState", "new_id",
    # bundles, adapters and packets
    "Bundle", "load_bundle",
    "Adapter", "adapter_from_arrays", "load_adapter_npz", "save_adapter_npz",
    "DecodedPacket", "decode_packet", "encode_packet", "peek_header",
    "check_base_model", "check_expiry", "check_layers", "check_target", "check_version",
    # telemetry
    "TraceBatch", "decode_traces", "encode_traces",
    # signing and topics
    "PublicKey", "SigningKey", "TrustStore", "key_id_of", "load_public_key", "topics",
    # errors
    "PlasmaError", "PacketError", "PacketTooLarge", "PacketTruncated", "PacketBadMagic",
    "PacketUnsupported", "PacketBadLength", "SignatureMissing", "SignatureDuplicate",
    "SignatureUnknownKey", "SignatureInvalid", "PayloadDigestMismatch", "HeaderInvalid",
    "PayloadInvalid", "TelemetryError", "TopicError", "KeyFileError", "AdapterFileError",
    "MessageInvalid", "BundleError", "BundleNotFound", "ConfigError", "BusError", "EnvError", "MergeError",
    "JournalError", "StoreError", "ServiceError",
]
