"""Plasma's contract: messages, packet codec, telemetry frames, signing, topics, errors.

Depends on pydantic, numpy, PyNaCl (verifying) and cryptography (signing, imported only
when a private key is made or loaded).
"""

from . import topics
from .adapter import Adapter, adapter_from_arrays, load_adapter_npz, save_adapter_npz
from .errors import (
    AdapterFileError,
    HeaderInvalid,
    KeyFileError,
    PacketBadLength,
    PacketBadMagic,
    PacketError,
    PacketTooLarge,
    PacketTruncated,
    PacketUnsupported,
    PayloadDigestMismatch,
    PayloadInvalid,
    PlasmaError,
    SignatureDuplicate,
    SignatureInvalid,
    SignatureMissing,
    SignatureUnknownKey,
    TelemetryError,
    TopicError,
)
from .messages import (
    SCHEMA_VERSION,
    SLOTS,
    AuditRecord,
    InstructionPacket,
    LayerSpec,
    Provenance,
    Reason,
    SimulationResult,
    Slot,
    StateTrace,
    Status,
    Verdict,
    WorldState,
    new_id,
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
from .telemetry import TraceBatch, decode_traces, encode_traces

__all__ = [
    "SCHEMA_VERSION", "SLOTS", "DEFAULT_MAX_PACKET_BYTES",
    # messages
    "AuditRecord", "InstructionPacket", "LayerSpec", "Provenance", "Reason", "SimulationResult",
    "Slot", "StateTrace", "Status", "Verdict", "WorldState", "new_id",
    # adapters and packets
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
]
