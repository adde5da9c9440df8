"""The bundle catalog: shipped bundles through importlib.resources, the user's directories first
(``models_dirs``, then ``PLASMA_MODELS``), names and paths, and errors that name no flag."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from plasma.protocol import BundleError, BundleNotFound, ConfigError, load_bundle
from plasma.protocol.catalog import (
    MODELS_ENV,
    SHIPPED,
    list_bundles,
    model_dirs,
    resolve_bundle,
    shipped_dir,
    split_dirs,
)

SHIPPED_NAMES = {"pendulum-nominal", "pendulum-g14", "pendulum-m1.6-g12", "inverted-pendulum-nominal",
                 "inverted-pendulum-gear0.2", "inverted-pendulum-pole3-gear0.3"}


def _user_dir(tmp_path: Path, *names: str, src: str = "pendulum-g14") -> Path:
    """A directory of the user's bundles: copies of a shipped one under new names."""
    root = tmp_path / "mine"
    root.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copytree(resolve_bundle(src, environ={}), root / name)
    return root


def test_the_shipped_bundles_are_package_data() -> None:
    root = shipped_dir()
    assert root is not None and root.name == "models" and root.parent.name == "plasma"
    assert (root / "__init__.py").is_file()
    shipped = {b.name: b for b in list_bundles(environ={})}
    assert SHIPPED_NAMES <= set(shipped)
    nominal = shipped["pendulum-nominal"]
    assert (nominal.source, nominal.env_id, nominal.shadowed) == (SHIPPED, "Pendulum-v1", False)
    assert 0 < nominal.int8_bytes < nominal.total_bytes
    assert nominal.mean_return is not None and -200 < nominal.mean_return < -100
    for info in shipped.values():
        assert info.source == SHIPPED and info.env_id
        load_bundle(info.path)  # every shipped bundle is a valid bundle


def test_the_shipped_bundles_are_found_from_any_directory(tmp_path: Path) -> None:
    code = ("import json; from plasma.protocol.catalog import list_bundles, resolve_bundle; "
            "print(json.dumps([str(resolve_bundle('pendulum-nominal')), len(list_bundles())]))")
    env = {k: v for k, v in os.environ.items() if k != MODELS_ENV}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                         text=True, timeout=60, env=env, check=True)
    path, count = json.loads(out.stdout)
    assert Path(path) == shipped_dir() / "pendulum-nominal" and count >= len(SHIPPED_NAMES)


def test_a_name_or_a_path(tmp_path: Path) -> None:
    shipped = shipped_dir()
    assert shipped is not None
    assert resolve_bundle("pendulum-nominal", environ={}) == shipped / "pendulum-nominal"
    assert resolve_bundle(shipped / "pendulum-g14", environ={}) == shipped / "pendulum-g14"
    # written as a path: returned as it is, load_bundle says what is wrong with it
    assert resolve_bundle("./nowhere", environ={}) == Path("nowhere")
    assert resolve_bundle(str(tmp_path / "nowhere"), environ={}) == tmp_path / "nowhere"
    with pytest.raises(BundleError) as err:
        load_bundle(resolve_bundle(str(tmp_path / "nowhere"), environ={}))
    assert err.value.code == "missing_file"


def test_an_unknown_name_is_a_typed_error_naming_no_flag(tmp_path: Path) -> None:
    mine = _user_dir(tmp_path, "mine-a")
    with pytest.raises(BundleNotFound) as err:
        resolve_bundle("pendulum-nominl", [mine], environ={})
    text = str(err.value)
    assert err.value.code == "no_bundle" and isinstance(err.value, BundleError)
    assert "'pendulum-nominl'" in text and str(mine) in text and "the shipped bundles" in text
    assert "pendulum-nominal" in text and "mine-a" in text  # the names it knows
    assert "--" not in text and "policy=" not in text  # each caller adds its own way out


def test_user_directories_come_first_and_shadow_shipped_names(tmp_path: Path) -> None:
    mine = _user_dir(tmp_path, "pendulum-nominal", "my-policy")
    bundles = list_bundles([mine], environ={})
    first = [b for b in bundles if b.name == "pendulum-nominal"]
    assert [(b.source, b.shadowed) for b in first] == [(str(mine), False), (SHIPPED, True)]
    assert resolve_bundle("pendulum-nominal", [mine], environ={}) == mine / "pendulum-nominal"
    assert resolve_bundle("my-policy", str(mine), environ={}) == mine / "my-policy"
    assert resolve_bundle("pendulum-nominal", environ={}) == shipped_dir() / "pendulum-nominal"
    assert bundles.index(first[0]) < min(i for i, b in enumerate(bundles) if b.source == SHIPPED)


def test_plasma_models_after_the_given_directories(tmp_path: Path) -> None:
    a = _user_dir(tmp_path / "a", "same", src="pendulum-g14")
    b = _user_dir(tmp_path / "b", "same", "only-b", src="pendulum-m1.6-g12")
    environ = {MODELS_ENV: os.pathsep.join([str(b), str(a)])}
    assert [d for d, _ in model_dirs((), environ)][:2] == [b, a]
    assert resolve_bundle("same", environ=environ) == b / "same"
    assert resolve_bundle("same", [a], environ=environ) == a / "same"  # --models-dir first
    assert resolve_bundle("only-b", environ=environ) == b / "only-b"
    assert split_dirs(f"{a}{os.pathsep}{b}") == split_dirs([a, str(b)]) == [a, b]


def test_a_missing_user_directory_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a directory"):
        list_bundles([tmp_path / "typo"], environ={})
    with pytest.raises(ConfigError, match=MODELS_ENV):
        resolve_bundle("pendulum-nominal", environ={MODELS_ENV: str(tmp_path / "typo")})


def test_an_unreadable_manifest_is_skipped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    mine = _user_dir(tmp_path, "good")
    (mine / "broken").mkdir()
    (mine / "broken" / "manifest.json").write_text("{not json")
    names = [b.name for b in list_bundles([mine], environ={}) if b.source == str(mine)]
    assert names == ["good"]
    assert "broken" in caplog.text
