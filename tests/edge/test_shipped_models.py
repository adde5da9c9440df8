"""A device names a shipped bundle (``--model pendulum-nominal``) as well as a directory; an
unknown name is an error that says which flag and which names (no server code involved)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from plasma.edge.cli import main
from plasma.protocol import BundleNotFound, SigningKey
from plasma.protocol.catalog import MODELS_ENV, shipped_dir


def _flags(tmp_path: Path, model: str) -> dict[str, str]:
    SigningKey.generate().save(tmp_path / "keys")
    (tmp_path / "trust").mkdir()
    shutil.copyfile(tmp_path / "keys" / "signing.pub", tmp_path / "trust" / "server.pub")
    return {"broker": "mqtt://h:1", "fleet": "f", "device": "d", "model": model,
            "trust": str(tmp_path / "trust"), "state": str(tmp_path / "state"), "env": "Pendulum-v1"}


def test_model_info_takes_a_shipped_name(capsys: pytest.CaptureFixture[str],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(MODELS_ENV, raising=False)
    assert main(["model", "info", "pendulum-nominal"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["env_id"] == "Pendulum-v1" and info["model_bytes"] > 0


def test_an_unknown_name_names_the_flag_and_the_known_names(tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(MODELS_ENV, raising=False)
    trust = _flags(tmp_path, "")["trust"]
    assert main(["check-packet", "x.pkt", "--trust", trust, "--model", "pendulum-nominl"]) == 1
    err = capsys.readouterr().err
    assert "--model" in err and "pendulum-nominal" in err and MODELS_ENV in err
    assert "policy=" not in err


def test_the_daemon_resolves_a_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from plasma.edge.config import load_config
    from plasma.edge.daemon import Daemon
    from plasma.protocol.bus import MemoryBroker, MemoryBus

    monkeypatch.delenv(MODELS_ENV, raising=False)
    flags = _flags(tmp_path, "pendulum-nominal")
    with pytest.raises(BundleNotFound) as err:
        Daemon(load_config({**flags, "model": "no-such-policy"}, {}), bus=MemoryBus(MemoryBroker()))
    assert "--model" in str(err.value) and "pendulum-nominal" in str(err.value)
    pytest.importorskip("gymnasium")
    daemon = Daemon(load_config(flags, {}), bus=MemoryBus(MemoryBroker()))
    assert daemon.bundle.root == shipped_dir() / "pendulum-nominal"
