"""Plasma's device side: audit, journal, merge, int8 runtime, canary, telemetry and the daemon.

The public names load on first access (PEP 562), so ``import plasma.edge`` stays light: the
onnxruntime-backed runtime is imported only when ``PolicyRuntime`` (or what builds on it) is
asked for. See docs/library.md for the in-process recipe.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_WHERE = {
    # assembling a device runtime
    "AuditContext": "audit", "audit_packet": "audit", "AuditThresholds": "probes",
    "ObservationRing": "probes", "Journal": "journal", "Restored": "journal",
    "PolicyRuntime": "runtime", "MergeEngine": "merge", "AdapterPipeline": "pipeline",
    "Outcome": "pipeline", "Canary": "canary", "CanaryConfig": "canary",
    "TelemetryBuffer": "telemetry", "TelemetryConfig": "telemetry",
    "EdgeDevice": "device", "DeviceConfig": "device",
    # the daemon
    "Daemon": "daemon", "DaemonConfig": "config", "load_config": "config",
    "Env": "envs", "make_env": "envs",
}

__all__ = sorted(_WHERE)

if TYPE_CHECKING:
    from .audit import AuditContext, audit_packet
    from .canary import Canary, CanaryConfig
    from .config import DaemonConfig, load_config
    from .daemon import Daemon
    from .device import DeviceConfig, EdgeDevice
    from .envs import Env, make_env
    from .journal import Journal, Restored
    from .merge import MergeEngine
    from .pipeline import AdapterPipeline, Outcome
    from .runtime import PolicyRuntime
    from .probes import AuditThresholds, ObservationRing
    from .telemetry import TelemetryBuffer, TelemetryConfig


def __getattr__(name: str) -> Any:
    """A public name, imported from its module on first use."""
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))
