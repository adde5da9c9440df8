"""Package-level contracts: public names are pinned; the edge stays light."""

from __future__ import annotations

import json
import subprocess
import sys

import plasma.protocol

PROTOCOL_NAMES = {
    "SCHEMA_VERSION", "SLOTS", "DEFAULT_MAX_PACKET_BYTES",
    "AuditRecord", "InstructionPacket", "LayerSpec", "Provenance", "Reason", "SimulationResult",
    "Slot", "StateTrace", "Status", "Verdict", "WorldState", "new_id",
    "Adapter", "adapter_from_arrays", "load_adapter_npz", "save_adapter_npz",
    "DecodedPacket", "decode_packet", "encode_packet", "peek_header",
    "check_base_model", "check_expiry", "check_layers", "check_target", "check_version",
    "TraceBatch", "decode_traces", "encode_traces",
    "PublicKey", "SigningKey", "TrustStore", "key_id_of", "load_public_key", "topics",
    "PlasmaError", "PacketError", "PacketTooLarge", "PacketTruncated", "PacketBadMagic",
    "PacketUnsupported", "PacketBadLength", "SignatureMissing", "SignatureDuplicate",
    "SignatureUnknownKey", "SignatureInvalid", "PayloadDigestMismatch", "HeaderInvalid",
    "PayloadInvalid", "TelemetryError", "TopicError", "KeyFileError", "AdapterFileError",
}


def test_protocol_public_names_are_pinned() -> None:
    assert set(plasma.protocol.__all__) == PROTOCOL_NAMES
    for name in PROTOCOL_NAMES:
        assert hasattr(plasma.protocol, name), name


FORBIDDEN_ON_EDGE = ("plasma.server", "onnx", "onnxruntime.quantization", "gymnasium", "torch",
                     "matplotlib", "amqtt",
                     "cryptography",  # the device verifies with PyNaCl
                     "pydantic", "pydantic_core",  # the device speaks plasma.protocol.wire
                     "plasma.protocol.messages")


def test_edge_import_stays_light() -> None:
    """Importing every edge module must not load server code, onnx or gymnasium."""
    code = (
        "import importlib, json, pkgutil, sys\n"
        "import plasma.edge\n"
        "for m in pkgutil.walk_packages(plasma.edge.__path__, 'plasma.edge.'):\n"
        "    importlib.import_module(m.name)\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True)
    loaded = set(json.loads(out.stdout))
    bad = sorted(m for m in loaded for f in FORBIDDEN_ON_EDGE if m == f or m.startswith(f + "."))
    assert not bad, f"plasma.edge loaded server-only modules: {bad}"
    assert "onnxruntime" in loaded or "plasma.edge.runtime" not in loaded
    assert "msgspec" in loaded


def test_daemon_path_does_not_load_pydantic() -> None:
    """What ``plasma-edge run`` imports (cli, daemon) and touches at start leaves pydantic out."""
    code = (
        "import json, sys\n"
        "import plasma.edge.cli, plasma.edge.daemon\n"
        "from plasma.protocol.bundle import load_bundle\n"
        "from plasma.protocol import decode_traces, encode_traces, peek_header, wire\n"
        "wire.Status(fleet='f', device='d', state='online').model_dump_json()\n"
        "wire.AuditRecord(auditor='edge', subject='s', verdict='accepted').model_dump_json()\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True)
    loaded = set(json.loads(out.stdout))
    assert not {m for m in loaded if m.split(".")[0] in ("pydantic", "pydantic_core")}
    assert "plasma.protocol.messages" not in loaded


def test_pydantic_names_still_load_lazily() -> None:
    """The pinned pydantic names resolve on access (PEP 562) to the contract's models."""
    from plasma.protocol import messages

    for name in ("AuditRecord", "InstructionPacket", "LayerSpec", "Provenance", "Reason",
                 "SimulationResult", "StateTrace", "Status", "Verdict", "WorldState"):
        assert getattr(plasma.protocol, name) is getattr(messages, name)
    assert "AuditRecord" in dir(plasma.protocol)
