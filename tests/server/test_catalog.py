"""The policies the commands default to: a task's bundle by physics (user directories first),
``plasma-server models list``, and a missing bundle in the words of each caller."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from plasma.protocol import BundleNotFound, SigningKey
from plasma.protocol.catalog import MODELS_ENV, resolve_bundle, shipped_dir
from plasma.server.catalog import find_model
from plasma.server.cli import main


@pytest.fixture(autouse=True)
def _no_user_models(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(MODELS_ENV, raising=False)


def _mine(tmp_path: Path, **copies: str) -> Path:
    """A directory of the user's bundles: ``name=shipped_name`` copies."""
    root = tmp_path / "mine"
    root.mkdir(parents=True, exist_ok=True)
    for name, src in copies.items():
        shutil.copytree(resolve_bundle(src), root / name)
    return root


def test_find_model_matches_the_physics_of_the_shipped_bundles() -> None:
    shipped = shipped_dir()
    assert shipped is not None
    assert find_model("Pendulum-v1", {}) == shipped / "pendulum-nominal"
    assert find_model("Pendulum-v1", {"g": 12.0, "m": 1.6}) == shipped / "pendulum-m1.6-g12"
    assert find_model("Pendulum-v1", {"g": 14}) == shipped / "pendulum-g14"


def test_a_user_bundle_comes_before_the_shipped_one(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    mine = _mine(tmp_path, my_base="pendulum-nominal")
    assert find_model("Pendulum-v1", {}, [mine]) == mine / "my_base"
    assert find_model("Pendulum-v1", {}, environ={MODELS_ENV: str(mine)}) == mine / "my_base"
    monkeypatch.setenv(MODELS_ENV, str(mine))
    assert find_model("Pendulum-v1", {}) == mine / "my_base"
    assert find_model("Pendulum-v1", {"g": 14}) == shipped_dir() / "pendulum-g14"


def test_no_bundle_is_a_typed_error_that_names_no_flag() -> None:
    with pytest.raises(BundleNotFound) as err:
        find_model("MountainCarContinuous-v0", {})
    text = str(err.value)
    assert "MountainCarContinuous-v0 at nominal physics" in text and "the shipped bundles" in text
    assert "--" not in text and "policy=" not in text and "deploy/models" not in text


def test_models_list(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    mine = _mine(tmp_path, **{"pendulum-nominal": "pendulum-g14", "mine-b": "pendulum-m1.6-g12"})
    assert main(["models", "list", "--json", "--models-dir", str(mine)]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows[:2]] == ["mine-b", "pendulum-nominal"]
    assert {r["source"] for r in rows[:2]} == {str(mine)}
    by = {(r["name"], r["source"]): r for r in rows}
    shipped = by["pendulum-nominal", "shipped"]
    assert shipped["shadowed"] and not by["pendulum-nominal", str(mine)]["shadowed"]
    assert (shipped["env_id"], shipped["physics"]) == ("Pendulum-v1", "nominal")
    assert 0 < shipped["int8_bytes"] < shipped["total_bytes"] and shipped["mean_return"] < -100
    assert by["pendulum-g14", "shipped"]["physics"] == "g=14"
    assert by["inverted-pendulum-gear0.2", "shipped"]["physics"] == "actuator_gear.slide=*0.2"
    assert set(shipped) == {"name", "env_id", "physics", "source", "int8_bytes", "total_bytes",
                            "mean_return", "shadowed", "path"}

    assert main(["models", "list"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["NAME", "TASK", "PHYSICS", "SOURCE", "INT8", "KB", "TOTAL", "KB",
                                "RETURN"]
    line = next(t for t in table if t.startswith("pendulum-nominal "))
    assert line.split()[:4] == ["pendulum-nominal", "Pendulum-v1", "nominal", "shipped"]


def test_a_bundle_without_a_score_shows_its_physics_against_the_task(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]
                                                                    ) -> None:
    mine = _mine(tmp_path, bare="pendulum-m1.6-g12")
    (mine / "bare" / "SCORE.json").unlink()
    assert main(["models", "list", "--json", "--models-dir", str(mine)]) == 0
    row = json.loads(capsys.readouterr().out)[0]
    assert (row["name"], row["physics"], row["mean_return"]) == ("bare", "g=12,m=1.6", None)


def test_commands_name_their_flags(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("gymnasium")
    assert main(["demo", "--model", "no-such-policy", "--out", str(tmp_path / "demo")]) == 1
    err = capsys.readouterr().err
    assert "'no-such-policy'" in err and "--model" in err and "--models-dir" in err
    assert "pendulum-nominal" in err and "policy=" not in err
    SigningKey.generate().save(tmp_path / "keys")
    run = ["run", "--broker", "mqtt://127.0.0.1:1", "--fleet", "f", "--key", str(tmp_path / "keys"),
           "--env", "Pendulum-v1", "--store", str(tmp_path / "s.sqlite")]
    assert main([*run, "--model", "no-such-policy"]) == 1
    err = capsys.readouterr().err
    assert "--model" in err and "--models-dir" in err and "policy=" not in err


def test_run_takes_a_name_from_models_dir(tmp_path: Path) -> None:
    from plasma.server.run import Server
    from plasma.server.service_config import load_service_config

    a = _mine(tmp_path / "a", base="pendulum-nominal")
    b = _mine(tmp_path / "b", other="pendulum-nominal")
    SigningKey.generate().save(tmp_path / "keys")
    cfg = load_service_config({"broker": "mqtt://127.0.0.1:1", "fleet": "f", "env": "Pendulum-v1",
                               "key": str(tmp_path / "keys"), "model": "other",
                               "models_dir": os.pathsep.join([str(a), str(b)]),
                               "store": str(tmp_path / "s.sqlite")}, environ={})
    server = Server(cfg)
    try:
        assert server.model == b / "other"
    finally:
        server.store.close()


def test_a_recorded_oracle_beside_the_base_is_the_fixed_reference(tmp_path: Path) -> None:
    from plasma.server.catalog import oracle_return, recorded_oracle

    (tmp_path / "ORACLES.json").write_text(json.dumps({"oracles": [
        {"env_id": "InvertedPendulum-v5", "physics": "actuator_gear.slide=*0.2", "wrapper": None,
         "mean_return": 987.5},
        {"env_id": "InvertedPendulum-v5", "physics": "actuator_gear.slide=*0.2",
         "wrapper": "plasma.edge.wrappers:ActionDelay", "mean_return": 12.5}]}))
    gear = {"actuator_gear.slide": 20.0}  # *0.2 of the nominal 100, written as a value
    assert recorded_oracle(tmp_path, "InvertedPendulum-v5", gear)["mean_return"] == 987.5
    assert oracle_return("InvertedPendulum-v5", gear, 10, "plasma.edge.wrappers:ActionDelay",
                         base=tmp_path) == 12.5
    assert recorded_oracle(tmp_path, "InvertedPendulum-v5", {}) is None
    assert recorded_oracle(None, "InvertedPendulum-v5", gear) is None
