"""The shipped example configs load with the daemons' own parsers (docs match the code)."""

from __future__ import annotations

from pathlib import Path

from plasma.edge.config import load_config
from plasma.server.service_config import load_service_config

CONFIG = Path(__file__).resolve().parents[2] / "deploy" / "config"


def test_edge_toml_loads() -> None:
    cfg = load_config({"config": str(CONFIG / "edge.toml")}, environ={})
    assert cfg.fleet == "f1" and cfg.broker.tls


def test_server_toml_loads() -> None:
    cfg = load_service_config({"config": str(CONFIG / "server.toml")}, environ={})
    assert cfg.fleet == "f1" and cfg.broker.tls and cfg.env == "Pendulum-v1"
