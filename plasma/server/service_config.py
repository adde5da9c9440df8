"""Server entry point: flags, environment and a TOML file -> one frozen ``ServiceConfig``.

Parsed once, in ``plasma-server run``; each stage then receives only its own part. Precedence:
command-line flag > ``PLASMA_SERVER_<NAME>`` environment variable > ``--config`` file > default
(the edge's rule, ``plasma.edge.config``). The TOML file holds the flag names with underscores
at top level (``min_new_transitions = 800``). Prefer ``PLASMA_SERVER_PASSWORD`` or a 0600 file
for the password: command-line flags show in the process list.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from plasma.protocol import TopicError
from plasma.protocol._cli import layered, read_toml
from plasma.protocol.bus import BrokerConfig, BusError
from plasma.protocol.errors import ConfigError
from plasma.protocol.topics import validate_id

__all__ = ["ServiceConfig", "load_service_config", "SCALARS", "REQUIRED", "BUDGETS"]

SCALARS: dict[str, type] = {
    "broker": str, "username": str, "password": str, "ca_file": str, "cert_file": str,
    "key_file": str, "fleet": str, "key": str, "model": str, "store": str, "env": str,
    "min_new_transitions": int, "fleet_every": int, "check_interval": float,
    "publish_interval": float, "max_transitions": int, "metrics_port": int, "budget": str,
    "dtype": str, "expires_in": float, "seed": int,
    "ingest_group": str, "node": str,
    "executor": str, "ray_address": str, "workers": int, "round_timeout": float,
    "fleet_landing_timeout": float,
    "tasks": str, "models_dir": str,
}
REQUIRED = ("broker", "fleet", "key", "model", "env")
BUDGETS = ("default", "small")


@dataclass(frozen=True)
class ServiceConfig:
    """Everything ``plasma-server run`` needs, validated."""

    broker: BrokerConfig
    """Where and how to connect (TLS and credentials like the edge)."""
    fleet: str
    """The fleet this server adapts and publishes for."""
    key: Path
    """Key directory (``signing.key``, mode 0600) packets are signed with."""
    model: Path
    """Base policy bundle the devices run (the adapters are relative to it): a directory, or the
    name of a bundle in ``models_dir``, ``PLASMA_MODELS`` or the shipped ones (resolved by
    ``Server``: ``plasma.protocol.catalog.resolve_bundle``)."""
    env: str
    """Task id of the devices' world, e.g. ``Pendulum-v1`` (physics overrides after ':' ignored)."""
    store: Path | str = Path("plasma-server.sqlite")
    """SQLite trace store (created if missing; WAL files beside it), or a ``postgresql://`` URL
    (a database several server processes share)."""
    min_new_transitions: int = 200
    """A device with at least this many new real transitions gets a device-slot round."""
    fleet_every: int = 0
    """Run a fleet-slot round on every device's data after this many device rounds (0 = never)."""
    check_interval: float = 1.0
    """Seconds between looks at the store for devices due a round."""
    publish_interval: float = 5.0
    """At most one packet per target (device or fleet slot) per this many seconds."""
    max_transitions: int = 20_000
    """Newest real transitions used per round."""
    metrics_port: int | None = None
    """Serve Prometheus /metrics on this port (None = off)."""
    budget: str = "default"
    """Compute per round: ``default`` (seconds per round with the physics prior) or ``small`` (tests, demos)."""
    dtype: str = "int8"
    """Adapter encoding on the wire: int8, fp16 or fp32."""
    expires_in: float = 7 * 24 * 3600.0
    """Packet validity in seconds from creation."""
    seed: int = 0
    """Seed of every round."""
    ingest_group: str | None = "plasma-ingest"
    """MQTT 5 shared-subscription group of telemetry: the servers of one group split the devices'
    frames (each frame to one of them); ``none`` = every server receives every frame."""
    node: str | None = None
    """This server's name among the fleet's servers (its MQTT client id and persistent session;
    default the host name): several servers on one host need distinct names."""
    executor: str = "local"
    """Where rounds compute: ``local`` (this process, one at a time) or ``ray``."""
    ray_address: str | None = None
    """Ray cluster to join (``--executor ray``); None: a local Ray started by the server."""
    workers: int = 0
    """With ``ray``: rounds in flight and a local Ray's CPUs (0 = one per CPU of the cluster)."""
    round_timeout: float = 600.0
    """With ``ray``: a round in flight longer is cancelled and resubmitted (0 = never)."""
    fleet_landing_timeout: float = 600.0
    """Seconds a device's round waits for the newest fleet packet to land on it (the device
    reports running it, or refuses it) before it is fitted on what the device reports running
    anyway, with a warning (0 = wait as long as it takes)."""
    models_dir: str | None = None
    """Directories of the user's bundles (``os.pathsep``-separated), searched for a ``model``
    given by name before ``PLASMA_MODELS`` and the shipped bundles."""
    tasks: str | None = None
    """Comma-separated Python modules imported at start that register tasks
    (``plasma.server.tasks.register_task``), for an ``env`` that Plasma does not ship."""

    @property
    def task_id(self) -> str:
        return self.env.split(":", 1)[0]


def load_service_config(flags: Mapping[str, Any], environ: Mapping[str, str] | None = None
                        ) -> ServiceConfig:
    """Merge the three sources; raises ConfigError with one line an operator can act on."""
    environ = os.environ if environ is None else environ
    file_values, _ = read_toml(flags.get("config"), SCALARS)
    return _build(layered(flags, environ, "PLASMA_SERVER_", SCALARS, file_values, REQUIRED))


def _build(values: dict[str, Any]) -> ServiceConfig:
    try:
        broker = BrokerConfig.from_url(values.pop("broker"), **{
            k: values.pop(k, None) for k in ("username", "password", "ca_file", "cert_file",
                                             "key_file")})
        validate_id(values["fleet"], "fleet")
    except (BusError, TopicError) as exc:
        raise ConfigError(str(exc)) from None
    if "key" in values:
        values["key"] = Path(values["key"])
    values["model"] = Path(values["model"])
    if "store" in values:
        values["store"] = _store(values["store"])
    if "ingest_group" in values:
        group = values["ingest_group"]
        values["ingest_group"] = None if group.lower() in ("", "none", "off") else group
    for name in ("ingest_group", "node"):
        if values.get(name) is not None:
            try:
                validate_id(values[name], name)
            except TopicError as exc:
                raise ConfigError(str(exc)) from None
    _check_ranges(values)
    return ServiceConfig(broker=broker, **values)


def _store(value: str) -> Path | str:
    """A ``postgresql://`` URL stays a string; anything else with ``://`` is refused."""
    if value.startswith(("postgresql://", "postgres://")):
        return value
    if "://" in value:
        raise ConfigError(f"store {value.split('://', 1)[0]}://...: give a SQLite file path or a "
                          "postgresql://USER@HOST:PORT/DB URL")
    return Path(value)


def _check_ranges(values: dict[str, Any]) -> None:
    if values.get("budget", "default") not in BUDGETS:
        raise ConfigError(f"budget must be one of {', '.join(BUDGETS)}")
    if values.get("executor", "local") not in ("local", "ray"):
        raise ConfigError("executor must be local or ray")
    if values.get("workers", 0) < 0 or values.get("round_timeout", 0) < 0:
        raise ConfigError("workers and round_timeout must be >= 0")
    if values.get("dtype", "int8") not in ("int8", "fp16", "fp32"):
        raise ConfigError("dtype must be int8, fp16 or fp32")
    for name in ("min_new_transitions", "max_transitions"):
        if values.get(name, 1) < 1:
            raise ConfigError(f"{name} must be >= 1")
    for name in ("fleet_every", "check_interval", "publish_interval", "fleet_landing_timeout"):
        if values.get(name, 0) < 0:
            raise ConfigError(f"{name} must be >= 0")
    if values.get("expires_in", 1) <= 0:
        raise ConfigError("expires_in must be > 0")
