"""Tasks: register_task on any Box env, one override syntax on both sides, typed errors, and the
MuJoCo simulator / system identification on real transitions."""

from __future__ import annotations

import numpy as np
import pytest

from plasma.edge.envs import make_env as edge_env
from plasma.protocol.errors import ConfigError, EnvError
from plasma.server.adapt import AdaptConfig, new_model
from plasma.server.sysid import PhysicsModel, SysIdConfig
from plasma.server.tasks import TASKS, get_task, make_env, register_task, resolve_physics
from plasma.server.worldmodel import WorldModel, WorldModelConfig

pytest.importorskip("mujoco")
IP = "InvertedPendulum-v5"


@pytest.fixture
def scratch_registry():  # type: ignore[no-untyped-def]
    before = dict(TASKS)
    yield
    TASKS.clear()
    TASKS.update(before)


def _pendulum_cost(obs: np.ndarray, act: np.ndarray, nxt: np.ndarray) -> np.ndarray:
    return -(np.arctan2(obs[..., 1], obs[..., 0]) ** 2)


def test_register_a_classic_box_env_with_a_given_reward(scratch_registry: None) -> None:
    spec = register_task("Pendulum-v1", reward=_pendulum_cost, physics=("g", "m"), replace=True)
    assert (spec.obs_dim, spec.act_dim, spec.episode_steps) == (3, 1, 200)
    assert dict(spec.default_physics) == {"g": 10.0, "m": 1.0}
    assert spec.reward is _pendulum_cost and spec.sim_step is None  # no simulator was given
    assert get_task("Pendulum-v1") is spec
    np.testing.assert_allclose(spec.obs_high, [1, 1, 8])
    with pytest.raises(ConfigError, match="already registered"):
        register_task("Pendulum-v1", reward=_pendulum_cost)
    with pytest.raises(ConfigError, match="no numeric attribute"):
        register_task("Pendulum-v1", physics=("mass",), replace=True)
    with pytest.raises(ConfigError, match="Discrete"):
        register_task("CartPole-v1")  # a Discrete action space is not a task


def test_register_with_a_learned_reward_gets_a_reward_learning_ensemble(scratch_registry: None
                                                                        ) -> None:
    spec = register_task("MountainCarContinuous-v0", replace=True)  # reward=None: learned
    assert spec.reward is None and spec.sim_step is None
    cfg = AdaptConfig(model=WorldModelConfig(ensemble_size=2, hidden=(32, 32), max_epochs=100))
    model = new_model(spec, cfg)
    assert isinstance(model, WorldModel) and model.cfg.learn_reward
    env = make_env(spec.env_id)
    obs, _ = env.reset(seed=0)
    rng = np.random.default_rng(0)
    rows = []
    for _ in range(600):
        a = rng.uniform(-1, 1, 1).astype(np.float32)
        nxt, r, term, trunc, _ = env.step(a)
        rows.append((obs, a, r, nxt))
        obs = nxt if not (term or trunc) else env.reset()[0]
    o, a, r, n = (np.array([row[i] for row in rows], np.float32) for i in range(4))
    model.fit(o, a, n, r)
    pred = model.step_mean(o, a)[:, spec.obs_dim]
    assert np.mean((pred - r) ** 2) < 0.5 * np.var(r)  # the reward (-0.1 a^2) is learned


def test_register_a_mujoco_env_exposes_its_model_fields(scratch_registry: None) -> None:
    spec = register_task("InvertedDoublePendulum-v5", reward=lambda o, a, n: np.ones(len(o)))
    assert spec.default_physics["opt.gravity.z"] == pytest.approx(-9.81)
    names = {"body_mass.pole", "body_mass.pole2", "actuator_gear.slide", "dof_damping.hinge2"}
    assert names <= set(spec.default_physics)
    assert spec.sim_step is None  # its observation (sin, cos, clipped speeds) is not the state
    assert np.all(np.isfinite(spec.obs_low)) and np.all(spec.obs_high > spec.obs_low)


@pytest.mark.parametrize("text, expect", [
    ("body_mass.pole=*3", {"body_mass.pole": 3 * 5.018591641363306}),
    ("opt.gravity.z=-12,actuator_gear.slide=0.5", {"opt.gravity.z": -12.0,
                                                    "actuator_gear.slide": 0.5}),
    ("geom_friction.cpole=*2,dof_damping.hinge=3", {"geom_friction.cpole": 2.0,
                                                    "dof_damping.hinge": 3.0}),
])
def test_mujoco_overrides_are_the_same_on_device_and_server(text: str, expect: dict[str, float]
                                                            ) -> None:
    from plasma.edge.physics import get_field

    server = resolve_physics(IP, text)
    assert server == pytest.approx(expect)
    device = edge_env(f"{IP}:{text}").unwrapped.model
    made = make_env(IP, server).unwrapped.model
    for name, value in expect.items():
        assert get_field(device, name) == pytest.approx(value)
        assert get_field(made, name) == pytest.approx(value)


def test_classic_overrides_relative_and_absolute_on_both_sides() -> None:
    assert resolve_physics("Pendulum-v1", "m=*2,g=12") == {"m": 2.0, "g": 12.0}
    env = edge_env("Pendulum-v1:m=*2,g=12").unwrapped
    assert (env.m, env.g) == (2.0, 12.0)


@pytest.mark.parametrize("text", ["body_mass.nope=2", "nofield.pole=2", "opt.gravity.w=1",
                                  "mass=3", "body_mass.pole=heavy"])
def test_unknown_names_are_typed_errors_on_both_sides(text: str) -> None:
    with pytest.raises(EnvError):
        edge_env(f"{IP}:{text}")
    with pytest.raises(ConfigError):
        resolve_physics(IP, text)
    with pytest.raises(ConfigError, match="known"):
        get_task(IP).physics({"body_mass.nope": 1.0})
    with pytest.raises(EnvError, match="not a MuJoCo env"):
        edge_env("Pendulum-v1:body_mass.pole=2")


def test_the_mujoco_simulator_is_the_real_env_step_for_step() -> None:
    task = get_task(IP)
    physics = resolve_physics(IP, "body_mass.pole=*3,actuator_gear.slide=*0.7")
    env = make_env(IP, physics)
    obs, _ = env.reset(seed=3)
    rng = np.random.default_rng(0)
    for _ in range(20):
        a = rng.uniform(-1, 1, 1).astype(np.float32)
        nxt, _, term, _, _ = env.step(a)
        pred = task.sim_step(obs[None], a[None], task.physics(physics))  # type: ignore[misc]
        np.testing.assert_allclose(pred[0], nxt, atol=1e-9)
        obs = nxt
        if term:
            break


def _real_transitions(physics: dict[str, float], steps: int) -> tuple[np.ndarray, ...]:
    """Real InvertedPendulum transitions under a crude balancing rule plus noise."""
    env = make_env(IP, physics)
    rng = np.random.default_rng(1)
    obs, _ = env.reset(seed=0)
    rows = []
    for _ in range(steps):
        a = np.clip(np.array([2.0 * obs[1] + 0.5 * obs[3] + 0.3 * obs[2]]) + rng.normal(0, 0.5),
                    -3, 3).astype(np.float32)
        nxt, _, term, trunc, _ = env.step(a)
        rows.append((obs, a, nxt))
        obs = nxt if not (term or trunc) else env.reset()[0]
    return tuple(np.array([row[i] for row in rows]) for i in range(3))


def test_sysid_recovers_a_shifted_pole_mass_from_real_transitions() -> None:
    task = get_task(IP)
    truth = resolve_physics(IP, "body_mass.pole=*3")
    obs, act, nxt = _real_transitions(truth, 300)
    model = PhysicsModel(task, SysIdConfig(members=3))
    model.fit(obs, act, nxt)
    est = model.physics["body_mass.pole"]
    assert est == pytest.approx(truth["body_mass.pole"], rel=0.05), model.physics
    nominal_err = np.abs(task.sim_step(obs, act, task.physics()) - nxt).mean()  # type: ignore[misc]
    fitted_err = np.abs(model.step_mean(obs, act) - nxt).mean()
    assert fitted_err < 0.1 * nominal_err


def test_the_server_cli_refuses_an_unknown_physics_name(capsys: pytest.CaptureFixture[str]) -> None:
    from plasma.server.cli import main

    assert main(["bench", "live", "--env", IP, "--physics", "body_mass.nope=*2"]) == 1
    err = capsys.readouterr().err
    assert "no physics name 'body_mass.nope'" in err and "body_mass.pole" in err
    assert "Traceback" not in err


_TASKS_MODULE = '''
import gymnasium
import numpy as np
from plasma.server.tasks import register_task

gymnasium.register(id="PlasmaTasksTest-v0", max_episode_steps=200,
                   entry_point="gymnasium.envs.classic_control.pendulum:PendulumEnv")


def reward(obs, act, next_obs):
    return -np.abs(next_obs[:, 2])


register_task("PlasmaTasksTest-v0", reward=reward, physics=("g",), replace=True)
'''


def test_a_tasks_module_registers_a_users_task_for_the_server(
        tmp_path, monkeypatch, scratch_registry: None, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    from plasma.protocol import SigningKey
    from plasma.server.cli import main
    from plasma.server.service_config import load_service_config
    from plasma.server.tasks import load_task_modules
    from tests.helpers.bundles import PENDULUM_SMALL, bundle_path

    (tmp_path / "my_plasma_tasks.py").write_text(_TASKS_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    base = {"broker": "mqtt://127.0.0.1:1", "fleet": "f", "key": "k", "model": "m",
            "env": "PlasmaTasksTest-v0"}
    cfg = load_service_config({**base, "tasks": "my_plasma_tasks"}, {})
    assert load_task_modules(cfg.tasks) == ["my_plasma_tasks"]
    spec = get_task("PlasmaTasksTest-v0")
    assert (spec.obs_dim, spec.act_dim) == (3, 1) and dict(spec.default_physics) == {"g": 10.0}
    obs = np.zeros((2, 3), np.float32)
    np.testing.assert_allclose(spec.reward(obs, obs[:, :1], obs + 1), [-1.0, -1.0])  # type: ignore[misc]

    SigningKey.generate().save(tmp_path / "key")
    args = ["run", "--broker", "mqtt://127.0.0.1:1", "--fleet", "f", "--key", str(tmp_path / "key"),
            "--model", str(bundle_path(PENDULUM_SMALL)), "--env", "PlasmaTasksTest-v0",
            "--store", str(tmp_path / "s.sqlite")]
    assert main([*args, "--tasks", "no_such_tasks_module"]) == 1
    err = capsys.readouterr().err
    assert "no_such_tasks_module" in err and "Traceback" not in err


def test_half_cheetah_simulator_and_reward_follow_the_real_env() -> None:
    """HalfCheetah-v5's observation drops the root's x: the simulator puts it at 0 (the dynamics do
    not depend on it) and the reward stands the step's displacement in with the mean speed."""
    hc = "HalfCheetah-v5"
    task = get_task(hc)
    assert (task.obs_dim, task.act_dim) == (17, 6) and task.adapt  # the round's budget is scaled
    physics = resolve_physics(hc, "body_mass.torso=*2,actuator_gear.bthigh=*0.3")
    env = make_env(hc, physics)
    obs, _ = env.reset(seed=1)
    rng = np.random.default_rng(0)
    errs, rews = [], []
    for _ in range(30):
        a = np.clip(0.3 * rng.standard_normal(6), -1, 1).astype(np.float32)
        nxt, rew, _, _, _ = env.step(a)
        pred = task.sim_step(obs[None], a[None], task.physics(physics))  # type: ignore[misc]
        np.testing.assert_allclose(pred[0], nxt, atol=1e-8)
        assert task.reward is not None
        errs.append(abs(float(task.reward(obs[None], a[None], nxt[None])[0]) - rew))
        rews.append(rew)
        obs = nxt
    assert np.mean(errs) < 0.25 * np.std(rews) + 0.05, (np.mean(errs), np.std(rews))
