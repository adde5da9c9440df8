"""Edge seam: --env parsing, physics overrides, user classes, and no gymnasium at import time."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from plasma.edge.envs import EnvError, make_env, parse_env


@pytest.mark.parametrize("text, kind, target, physics", [
    ("Pendulum-v1", "gym", "Pendulum-v1", {}),
    ("Pendulum-v1:m=1.6,g=12", "gym", "Pendulum-v1", {"m": 1.6, "g": 12.0}),
    (" Pendulum-v1:m=1.6, g=12 ", "gym", "Pendulum-v1", {"m": 1.6, "g": 12.0}),
    ("ALE/Pong-v5:dt=0.1", "gym", "ALE/Pong-v5", {"dt": 0.1}),
    ("mypkg.robot:RobotEnv", "class", "mypkg.robot:RobotEnv", {}),
    ("robot:Env2", "class", "robot:Env2", {}),
])
def test_parse(text: str, kind: str, target: str, physics: dict[str, float]) -> None:
    spec = parse_env(text)
    assert (spec.kind, spec.target, spec.physics) == (kind, target, physics)


@pytest.mark.parametrize("text", ["", ":m=1", "Pendulum-v1:", "Pendulum-v1:m=heavy",
                                  "Pendulum-v1:m", "Pendulum-v1:=3"])
def test_parse_errors(text: str) -> None:
    with pytest.raises(EnvError):
        parse_env(text)


def test_pendulum_physics_overrides() -> None:
    env = make_env("Pendulum-v1:m=1.6,g=12,max_torque=3")
    assert (env.unwrapped.m, env.unwrapped.g, env.unwrapped.max_torque) == (1.6, 12.0, 3.0)
    obs, _ = env.reset(seed=0)
    assert obs.shape == (3,)
    assert len(env.step(obs[:1] * 0)) == 5


def test_unknown_physics_attribute_is_a_clear_error() -> None:
    with pytest.raises(EnvError, match="no numeric physics attribute 'mass'.*known: .*g"):
        make_env("Pendulum-v1:mass=2")


def test_unknown_gym_id() -> None:
    with pytest.raises(EnvError, match="NoSuchEnv"):
        make_env("NoSuchEnv-v0")


def test_user_class(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "plasma_test_world.py").write_text(
        "class World:\n"
        "    def reset(self, *, seed=None):\n        return [0.0], {}\n"
        "    def step(self, action):\n        return [1.0], 0.5, False, False, {}\n"
        "class NotAnEnv:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    env = make_env("plasma_test_world:World")
    assert env.step([0.0])[1] == 0.5
    with pytest.raises(EnvError, match="reset"):
        make_env("plasma_test_world:NotAnEnv")
    with pytest.raises(EnvError, match="has no Missing"):
        make_env("plasma_test_world:Missing")
    with pytest.raises(EnvError, match="cannot import"):
        make_env("plasma_no_such_module:World")


def test_missing_gymnasium_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "gymnasium", None)  # makes `import gymnasium` fail
    with pytest.raises(EnvError, match=r"pip install 'plasma\[env\]'"):
        make_env("Pendulum-v1")


def test_daemon_imports_no_server_only_module() -> None:
    code = ("import sys, plasma.edge.daemon, plasma.edge.cli, plasma.edge.envs\n"
            "bad = [m for m in ('gymnasium', 'onnx', 'onnxruntime.quantization', 'plasma.server')"
            " if m in sys.modules]\nprint(','.join(bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
