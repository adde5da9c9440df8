"""Edge seam: --env parsing, physics overrides, user classes, and no gymnasium at import time."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

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


def test_relative_and_mujoco_overrides_parse() -> None:
    spec = parse_env("InvertedPendulum-v5:body_mass.pole=*3,opt.gravity.z=-12")
    assert spec.physics == {"opt.gravity.z": -12.0}  # the values set outright
    assert {k: (o.value, o.relative) for k, o in spec.overrides.items()} == {
        "body_mass.pole": (3.0, True), "opt.gravity.z": (-12.0, False)}


def test_mujoco_fields_are_set_on_the_model() -> None:
    pytest.importorskip("mujoco")
    env = make_env("InvertedPendulum-v5:body_mass.pole=*3,opt.gravity.z=-12,actuator_gear.slide=0.5,"
                   "geom_friction.cpole=2,dof_damping.hinge=*4")
    model = env.unwrapped.model
    assert model.body_mass[model.body("pole").id] == pytest.approx(3 * 5.018591641363306)
    assert model.opt.gravity[2] == -12.0 and model.actuator_gear[0, 0] == 0.5
    assert model.geom_friction[model.geom("cpole").id, 0] == 2.0
    assert model.dof_damping[model.joint("hinge").dofadr[0]] == 4.0
    assert env.reset(seed=0)[0].shape == (4,)


@pytest.mark.parametrize("text, message", [
    ("InvertedPendulum-v5:body_mass.nope=2", "no MuJoCo field 'body_mass.nope'; known: .*body_mass.pole"),
    ("InvertedPendulum-v5:opt.gravity.w=2", "no MuJoCo field"),
    ("InvertedPendulum-v5:frame_skips=2", "no numeric physics attribute 'frame_skips'"),
    ("Pendulum-v1:opt.gravity.z=-12", "not a MuJoCo env"),
    ("InvertedPendulum-v5:body_mass.pole=*heavy", "NAME=\\*FACTOR"),
])
def test_unknown_mujoco_names_are_clear_errors(text: str, message: str) -> None:
    pytest.importorskip("mujoco")
    with pytest.raises(EnvError, match=message):
        make_env(text)


@pytest.mark.broker
@pytest.mark.slow
def test_the_daemon_acts_in_a_mujoco_env(mosquitto: Any, tmp_path: Path, capsys: Any) -> None:
    """``plasma-edge run --env InvertedPendulum-v5:...`` on the shipped base bundle, 100 steps."""
    pytest.importorskip("mujoco")
    from plasma.protocol import SigningKey
    from plasma.protocol.catalog import resolve_bundle

    bundle = resolve_bundle("inverted-pendulum-nominal")  # shipped (plasma/models)
    SigningKey.generate().save(tmp_path / "keys")
    (tmp_path / "trust").mkdir()
    shutil.copyfile(tmp_path / "keys" / "signing.pub", tmp_path / "trust" / "server.pub")
    log = tmp_path / "daemon.log"
    argv = [sys.executable, "-m", "plasma.edge.cli", "run", "--broker", mosquitto.url,
            "--fleet", "fmujoco", "--device", "dev1", "--model", str(bundle),
            "--trust", str(tmp_path / "trust"), "--state", str(tmp_path / "state"),
            "--env", "InvertedPendulum-v5:body_mass.pole=*3,actuator_gear.slide=*0.5",
            "--max-steps", "100", "--rate-hz", "0"]
    with log.open("wb") as err:
        assert subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=err, timeout=60).returncode == 0
    from plasma.edge.cli import main

    assert main([*argv[3:-5], "InvertedPendulum-v5:body_mass.nope=2", *argv[-4:]]) == 1  # EXIT_USAGE
    err = capsys.readouterr().err
    assert "no MuJoCo field 'body_mass.nope'" in err and "Traceback" not in err


# -- device-side wrappers (--wrapper module:Class) ----------------------------------------------

DELAY = "plasma.edge.wrappers:ActionDelay"


def test_action_delay_applies_the_previous_action() -> None:
    """Through the seam: the wrapped env behaves as the bare one fed [0, a1, a2, ...]."""
    pytest.importorskip("gymnasium")
    import numpy as np

    from plasma.edge.wrappers import ActionDelay

    actions = [np.array([a], np.float32) for a in (1.5, -2.0, 0.7, 2.0, -0.3)]
    wrapped = make_env("Pendulum-v1:m=1.6,g=12", DELAY)
    bare = make_env("Pendulum-v1:m=1.6,g=12")
    assert isinstance(wrapped, ActionDelay)
    assert np.allclose(wrapped.reset(seed=3)[0], bare.reset(seed=3)[0])
    for i, action in enumerate(actions):
        applied = np.zeros(1, np.float32) if i == 0 else actions[i - 1]
        obs_w, rew_w, *_ = wrapped.step(action)
        obs_b, rew_b, *_ = bare.step(applied)
        assert np.allclose(obs_w, obs_b) and rew_w == pytest.approx(rew_b)
    delayed, immediate = make_env("Pendulum-v1", DELAY), make_env("Pendulum-v1")
    delayed.reset(seed=3)
    immediate.reset(seed=3)
    assert not np.allclose(delayed.step(actions[0])[0], immediate.step(actions[0])[0])
    wrapped.reset(seed=4)  # a new episode starts from a zero action again
    bare.reset(seed=4)
    assert np.allclose(wrapped.step(actions[0])[0], bare.step(np.zeros(1, np.float32))[0])


class _World:
    """A user env for the wrapper tests (no gymnasium)."""

    def reset(self, *, seed: int | None = None) -> tuple[Any, dict[str, Any]]:
        return [0.0], {}

    def step(self, action: Any) -> tuple[Any, float, bool, bool, dict[str, Any]]:
        return [0.0], 1.0, False, False, {}


class _Raises:
    def __init__(self, env: Any) -> None:
        raise RuntimeError("no actuator bus")


class _NoStep:
    def __init__(self, env: Any) -> None:
        self.env = env

    def reset(self, **kw: Any) -> Any:
        return self.env.reset(**kw)


class _NoArgs:
    def __init__(self) -> None:
        pass


@pytest.mark.parametrize("wrapper, message", [
    ("ActionDelay", "expected module:Class"),
    ("plasma.edge.wrappers:", "expected module:Class"),
    ("plasma_no_such_module:Delay", "cannot import plasma_no_such_module"),
    ("plasma.edge.wrappers:Missing", "has no Missing"),
    (f"{__name__}:_Raises", "RuntimeError: no actuator bus"),
    (f"{__name__}:_NoArgs", "constructing it with the env failed: TypeError"),
    (f"{__name__}:_NoStep", r"needs reset\(\) and step\(\)"),
])
def test_bad_wrappers_are_one_line_env_errors(wrapper: str, message: str) -> None:
    assert sys.modules[__name__].__name__ == __name__  # these classes importable by name
    with pytest.raises(EnvError, match=message):
        make_env(f"{__name__}:_World", wrapper)


def test_a_bad_wrapper_is_refused_before_the_env_is_built() -> None:
    """No gymnasium needed to refuse it; the env text is not even parsed first."""
    with pytest.raises(EnvError, match="cannot import"):
        make_env("NoSuchEnv-v0", "plasma_no_such_module:Delay")


def test_plasma_edge_run_reports_a_bad_wrapper_in_one_line(pendulum: Any, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]
                                                            ) -> None:
    pytest.importorskip("gymnasium")
    from plasma.edge.cli import main

    argv = ["run", "--config", str(pendulum.config), "--broker", "mqtt://127.0.0.1:1",
            "--fleet", "f1", "--device", "dev1", "--model", str(pendulum.bundle),
            "--trust", str(pendulum.trust), "--state", str(tmp_path / "state"),
            "--env", "Pendulum-v1", "--wrapper", "plasma.edge.wrappers:Missing"]
    assert main(argv) == 1  # EXIT_USAGE, before any broker connection
    err = capsys.readouterr().err
    assert "--wrapper plasma.edge.wrappers:Missing: plasma.edge.wrappers has no Missing" in err
    assert "Traceback" not in err


def test_the_wrapper_flag_reaches_the_daemon_config() -> None:
    from plasma.edge.config import load_config

    flags = {"broker": "mqtt://127.0.0.1:1883", "fleet": "f", "device": "d", "model": "m",
             "trust": "t", "state": "s", "env": "Pendulum-v1"}
    assert load_config(flags, environ={}).wrapper is None
    assert load_config({**flags, "wrapper": DELAY}, environ={}).wrapper == DELAY
    assert load_config(flags, environ={"PLASMA_EDGE_WRAPPER": DELAY}).wrapper == DELAY
