"""Package-level contracts: public names are pinned; the edge stays light."""

from __future__ import annotations

import importlib
import json
import pkgutil
import subprocess
import sys

import pytest

import plasma
import plasma.edge
import plasma.protocol
import plasma.server
from plasma.protocol import errors

PROTOCOL_NAMES = {
    "SCHEMA_VERSION", "SLOTS", "DEFAULT_MAX_PACKET_BYTES",
    "SLOT_KINDS", "SlotKind", "slot_kind", "slot_topic", "Bundle", "load_bundle",
    "AuditRecord", "InstructionPacket", "LayerSpec", "LiveVersions", "Provenance", "Reason",
    "SimulationResult", "Slot", "StateTrace", "Status", "Verdict", "WorldState", "new_id",
    "Adapter", "adapter_from_arrays", "load_adapter_npz", "save_adapter_npz",
    "DecodedPacket", "decode_packet", "encode_packet", "peek_header",
    "check_base_model", "check_expiry", "check_layers", "check_target", "check_version",
    "TraceBatch", "decode_traces", "encode_traces",
    "PublicKey", "SigningKey", "TrustStore", "key_id_of", "load_public_key", "topics",
    "PlasmaError", "PacketError", "PacketTooLarge", "PacketTruncated", "PacketBadMagic",
    "PacketUnsupported", "PacketBadLength", "SignatureMissing", "SignatureDuplicate",
    "SignatureUnknownKey", "SignatureInvalid", "PayloadDigestMismatch", "HeaderInvalid",
    "PayloadInvalid", "TelemetryError", "TopicError", "KeyFileError", "AdapterFileError",
    "MessageInvalid", "BundleError", "BundleNotFound", "ConfigError", "BusError", "EnvError", "MergeError",
    "JournalError", "StoreError", "ServiceError",
}

EDGE_NAMES = {
    "AuditContext", "audit_packet", "AuditThresholds", "ObservationRing", "Journal", "Restored",
    "PolicyRuntime", "MergeEngine", "AdapterPipeline", "Outcome", "Canary", "CanaryConfig",
    "TelemetryBuffer", "TelemetryConfig", "Daemon", "DaemonConfig", "load_config", "Env",
    "make_env", "EdgeDevice", "DeviceConfig",
}

SERVER_NAMES = {
    "TraceStore", "Ingest", "IngestConfig", "WorldModel", "WorldModelConfig",
    "PhantomPathSimulator", "PhantomConfig", "LoRADistiller", "DistillConfig",
    "JudicialAuditor", "JudicialConfig", "Publisher", "PublisherConfig", "Server", "run_server",
    "ServiceConfig", "load_service_config", "TaskSpec", "get_task", "MLPPolicy",
}


def test_protocol_public_names_are_pinned() -> None:
    assert set(plasma.protocol.__all__) == PROTOCOL_NAMES
    for name in PROTOCOL_NAMES:
        assert hasattr(plasma.protocol, name), name


def test_edge_public_names_are_pinned() -> None:
    assert set(plasma.edge.__all__) == EDGE_NAMES and len(plasma.edge.__all__) == len(EDGE_NAMES)
    for name in EDGE_NAMES:
        assert hasattr(plasma.edge, name), name
    assert "PolicyRuntime" in dir(plasma.edge)
    with pytest.raises(AttributeError):
        plasma.edge.NoSuchName  # noqa: B018


def test_server_public_names_are_pinned() -> None:
    assert set(plasma.server.__all__) == SERVER_NAMES
    assert len(plasma.server.__all__) == len(SERVER_NAMES)
    for name in SERVER_NAMES:
        assert hasattr(plasma.server, name), name


def test_every_module_declares_all() -> None:
    """Every module says what it exports, and exports only names it has."""
    missing, dangling = [], []
    for info in pkgutil.walk_packages(plasma.__path__, "plasma."):
        if info.name.endswith(".__main__"):  # runs its command line when imported
            continue
        module = importlib.import_module(info.name)
        names = getattr(module, "__all__", None)
        if names is None:
            missing.append(info.name)
            continue
        dangling += [f"{info.name}.{n}" for n in names if not hasattr(module, n)]
    assert not missing, f"modules without __all__: {missing}"
    assert not dangling, f"__all__ names a module does not have: {dangling}"


def test_every_library_error_is_in_the_tree_and_drawn() -> None:
    """One base, a stable code per class, and the docstring draws every class."""
    classes = [getattr(errors, n) for n in errors.__all__]
    for cls in classes:
        assert issubclass(cls, errors.PlasmaError), cls
        assert cls.code and cls.code == cls.code.lower(), cls
        assert cls.__name__ in (errors.__doc__ or ""), f"{cls.__name__} is not drawn"
    assert len({cls.code for cls in classes}) == len(classes), "codes are unique"
    from plasma.edge import journal, merge
    from plasma.protocol import bundle
    from plasma.protocol.bus import base
    assert journal.JournalError is errors.JournalError and merge.MergeError is errors.MergeError
    assert bundle.BundleError is errors.BundleError and base.BusError is errors.BusError


def test_domain_errors_keep_their_codes_out_of_the_message() -> None:
    exc = errors.BundleError("manifest.json is not JSON", code="bad_manifest")
    assert (exc.code, str(exc)) == ("bad_manifest", "manifest.json is not JSON")
    assert isinstance(exc, ValueError)  # callers that caught the old ValueError still do
    assert errors.MergeError("x", code="stale").code == "stale"
    assert errors.ConfigError("rate_hz must be >= 0").code == "bad_config"


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


def test_edge_and_the_round_never_load_torch_or_sb3() -> None:
    """PyTorch and SB3 (the ``[baselines]`` extra) stay out of every edge module, of the server's
    round (adapt, run, worker) and of ``bench live`` without ``--baseline``."""
    code = (
        "import importlib, json, pkgutil, sys\n"
        "import plasma.edge\n"
        "for m in pkgutil.walk_packages(plasma.edge.__path__, 'plasma.edge.'):\n"
        "    importlib.import_module(m.name)\n"
        "import plasma.server.adapt, plasma.server.run, plasma.server.worker\n"
        "import plasma.server.bench.live, plasma.server.commands\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True)
    loaded = set(json.loads(out.stdout))
    assert "plasma.server.worker" in loaded and "plasma.edge.wrappers" in loaded
    bad = sorted(m for m in loaded if m.split(".")[0] in ("torch", "stable_baselines3")
                 or m.startswith("plasma.baselines"))
    assert not bad, f"the edge or the server's round loaded the baselines' stack: {bad[:10]}"


def test_daemon_path_does_not_load_pydantic() -> None:
    """What ``plasma-edge run`` imports (cli, daemon) and touches at start leaves pydantic out."""
    code = (
        "import json, sys\n"
        "import plasma.edge.cli, plasma.edge.daemon\n"
        "from plasma.protocol.bundle import load_bundle\n"
        "from plasma.protocol import decode_traces, encode_traces, peek_header, wire\n"
        "wire.Status(fleet='f', device='d', state='online').model_dump_json()\n"
        "wire.LiveVersions(fleet='f', device='d', versions={'fleet': 1}).model_dump_json()\n"
        "wire.AuditRecord(auditor='edge', subject='s', verdict='accepted').model_dump_json()\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True)
    loaded = set(json.loads(out.stdout))
    assert not {m for m in loaded if m.split(".")[0] in ("pydantic", "pydantic_core")}
    assert "plasma.protocol.messages" not in loaded


def test_daemon_path_leaves_urllib_request_and_nacl_bindings_unloaded() -> None:
    """What ``plasma-edge run`` touches until it acts (cli, daemon, an MQTT client, a signature
    check) loads neither ``urllib.request`` (paho imports it for proxy settings it reads only
    with PySocks: http.client and email, 1.8 MiB) nor PyNaCl's ``nacl.signing``/``bindings``
    (0.6 MiB); ``urllib.request`` still imports itself on first use."""
    code = (
        "import json, sys\n"
        "import plasma.edge.cli, plasma.edge.daemon\n"
        "from plasma.protocol import TrustStore, key_id_of\n"
        "from plasma.protocol.bus import BrokerConfig, MqttBus\n"
        "MqttBus(BrokerConfig.from_url('mqtt://127.0.0.1:1'))._make_client('5')\n"
        "assert TrustStore([bytes(32)]).verify(key_id_of(bytes(32)), bytes(64), b'x') is False\n"
        "before = sorted(sys.modules)\n"
        "import urllib.request\n"
        "from urllib.request import getproxies\n"
        "assert isinstance(urllib.request.getproxies(), dict) and getproxies is urllib.request.getproxies\n"
        "print(json.dumps([before, sorted(sys.modules), type(sys.modules['urllib.request']).__name__]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True)
    before, after, kind = json.loads(out.stdout)
    assert "paho.mqtt.client" in before and "nacl._sodium" in before
    loaded = {m for m in before if m.split(".")[0] in ("email", "http")
              or m in ("urllib.request", "nacl.signing", "nacl.bindings", "nacl.public")}
    assert loaded == {"urllib.request"}  # the placeholder only
    assert "http.client" in after and "email" in after and kind == "module"


def test_pydantic_names_still_load_lazily() -> None:
    """The pinned pydantic names resolve on access (PEP 562) to the contract's models."""
    from plasma.protocol import messages

    for name in ("AuditRecord", "InstructionPacket", "LayerSpec", "LiveVersions", "Provenance",
                 "Reason", "SimulationResult", "StateTrace", "Status", "Verdict", "WorldState"):
        assert getattr(plasma.protocol, name) is getattr(messages, name)
    assert "AuditRecord" in dir(plasma.protocol)
