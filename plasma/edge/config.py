"""Edge entry point: flags, environment variables and a TOML file -> one frozen ``DaemonConfig``.

Parsed once, in ``plasma-edge run``; each stage then receives only its own part. Precedence:
command-line flag > ``PLASMA_EDGE_<NAME>`` environment variable > ``--config`` file > default.
The TOML file holds the same names as the flags (``rate_hz = 50``, ``broker = "mqtt://..."``)
at top level, plus the tables ``[audit]`` (``AuditThresholds``), ``[canary]`` (``CanaryConfig``)
and ``[telemetry]`` (``TelemetryConfig``). Prefer the environment or a 0600 file for
``password`` over the command line, where other users can read it in the process list.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from plasma.protocol import DEFAULT_MAX_PACKET_BYTES, TopicError
from plasma.protocol._cli import coerce, layered, read_toml
from plasma.protocol.bus import BrokerConfig, BusError
from plasma.protocol.errors import ConfigError
from plasma.protocol.topics import validate_id

from .canary import CanaryConfig
from .probes import AuditThresholds
from .telemetry import TelemetryConfig

__all__ = ["DaemonConfig", "load_config", "SCALARS", "REQUIRED"]

SCALARS: dict[str, type] = {
    "broker": str, "username": str, "password": str, "ca_file": str, "cert_file": str,
    "key_file": str, "fleet": str, "device": str, "model": str, "trust": str, "state": str,
    "env": str, "rate_hz": float, "metrics_port": int, "episodes": int, "max_steps": int,
    "status_interval": float, "max_packet_bytes": int, "queue_size": int, "seed": int,
    "max_rank": int, "explore_noise": float, "wrapper": str,
}
REQUIRED = ("broker", "fleet", "device", "model", "trust", "state", "env")
_SECTIONS: dict[str, type] = {"audit": AuditThresholds, "canary": CanaryConfig,
                              "telemetry": TelemetryConfig}


@dataclass(frozen=True)
class DaemonConfig:
    broker: BrokerConfig
    fleet: str
    device: str
    model: Path
    trust: Path
    state: Path
    env: str
    rate_hz: float = 50.0
    """Control steps per second; 0 runs as fast as the policy and environment allow."""
    metrics_port: int | None = None
    episodes: int | None = None
    """Stop (exit 0) after this many episodes; None runs until SIGTERM."""
    max_steps: int | None = None
    """Stop (exit 0) after this many control steps."""
    status_interval: float = 5.0
    """Seconds between retained status messages."""
    max_packet_bytes: int = DEFAULT_MAX_PACKET_BYTES
    queue_size: int = 8
    """Packets waiting for the worker; more are rejected with ``queue_full``."""
    seed: int | None = None
    """Seed of the first env.reset and of the exploration noise."""
    max_rank: int = 16
    explore_noise: float = 0.0
    """Gaussian action noise while acting, as a fraction of the half action range (clipped to the
    action bounds; telemetry records the action actually applied). 0 acts deterministically. A
    little noise widens the states the server's world model sees (bench adapt collects with it)."""
    wrapper: str | None = None
    """``module:Class`` wrapping the env in a device-side effect (``plasma.edge.wrappers``);
    constructed with the env, it gives ``reset``/``step`` back. None: the env as it is."""
    audit: AuditThresholds = AuditThresholds()
    canary: CanaryConfig = CanaryConfig()
    telemetry: TelemetryConfig = TelemetryConfig()


def load_config(flags: Mapping[str, Any], environ: Mapping[str, str] | None = None
                ) -> DaemonConfig:
    """Merge the three sources; raises ConfigError with one line an operator can act on."""
    environ = os.environ if environ is None else environ
    file_values, sections = read_toml(flags.get("config"), SCALARS, _SECTIONS)
    values = layered(flags, environ, "PLASMA_EDGE_", SCALARS, file_values, REQUIRED)
    return _build(values, sections)


def _section(name: str, table: Any) -> Any:
    cls = _SECTIONS[name]
    if not isinstance(table, dict):
        raise ConfigError(f"config [{name}] must be a table")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(table) - set(fields))
    if unknown:
        raise ConfigError(f"config [{name}]: unknown keys {', '.join(unknown)}")
    kwargs = {}
    for key, value in table.items():
        default = fields[key].default
        kind = type(default) if default is not dataclasses.MISSING else float
        if kind is bool:
            if not isinstance(value, bool):
                raise ConfigError(f"{name}.{key}: expected true or false, got {value!r}")
            kwargs[key] = value
        else:
            kwargs[key] = coerce(f"{name}.{key}", value, kind)
    try:
        return cls(**kwargs)
    except ValueError as exc:
        raise ConfigError(f"config [{name}]: {exc}") from None


def _build(values: dict[str, Any], sections: dict[str, Any]) -> DaemonConfig:
    try:
        broker = BrokerConfig.from_url(values.pop("broker"), **{
            k: values.pop(k, None) for k in ("username", "password", "ca_file", "cert_file",
                                             "key_file")})
        validate_id(values["fleet"], "fleet")
        validate_id(values["device"], "device")
    except (BusError, TopicError) as exc:
        raise ConfigError(str(exc)) from None
    for key in ("model", "trust", "state"):
        values[key] = Path(values[key])
    if values.get("rate_hz", 0) < 0:
        raise ConfigError("rate_hz must be >= 0")
    if not 0.0 <= values.get("explore_noise", 0.0) <= 2.0:
        raise ConfigError("explore_noise must be between 0 and 2 (fraction of the half action range)")
    extra = {name: _section(name, table) for name, table in sections.items()}
    return DaemonConfig(broker=broker, **values, **extra)
