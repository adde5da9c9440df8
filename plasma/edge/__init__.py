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

if TYPE_CHECKING:  # `X as X`: explicit re-exports for type checkers (__all__ is computed)
    from .audit import AuditContext as AuditContext
    from .audit import audit_packet as audit_packet
    from .canary import Canary as Canary
    from .canary import CanaryConfig as CanaryConfig
    from .config import DaemonConfig as DaemonConfig
    from .config import load_config as load_config
    from .daemon import Daemon as Daemon
    from .device import DeviceConfig as DeviceConfig
    from .device import EdgeDevice as EdgeDevice
    from .envs import Env as Env
    from .envs import make_env as make_env
    from .journal import Journal as Journal
    from .journal import Restored as Restored
    from .merge import MergeEngine as MergeEngine
    from .pipeline import AdapterPipeline as AdapterPipeline
    from .pipeline import Outcome as Outcome
    from .probes import AuditThresholds as AuditThresholds
    from .probes import ObservationRing as ObservationRing
    from .runtime import PolicyRuntime as PolicyRuntime
    from .telemetry import TelemetryBuffer as TelemetryBuffer
    from .telemetry import TelemetryConfig as TelemetryConfig


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
