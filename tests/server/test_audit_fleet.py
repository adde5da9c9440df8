"""Fleet screening and corrupted models of ``bench audit`` (fast: identified physics, no rounds)."""

from __future__ import annotations

import numpy as np

from plasma.server.bench.exploits import CorruptedModel, Corruption, draw_member_corruption, poison_transitions
from plasma.server.judicial import JudicialConfig, RealData, member_view, pool, screen_devices
from plasma.server.sysid import SysIdConfig, identify
from plasma.server.tasks import PENDULUM

CFG = JudicialConfig()


def device(physics: dict[str, float], seed: int, n: int = 400) -> RealData:
    rng = np.random.default_rng(seed)
    th = rng.uniform(-np.pi, np.pi, n)
    obs = np.stack([np.cos(th), np.sin(th), rng.uniform(-4, 4, n)], 1).astype(np.float32)
    act = rng.uniform(-2, 2, (n, 1)).astype(np.float32)
    nxt = PENDULUM.sim_step(obs, act, PENDULUM.physics(physics)).astype(np.float32)  # type: ignore[misc]
    return RealData(obs, act, PENDULUM.reward(obs, act, nxt), nxt)  # type: ignore[misc]


def test_a_flooding_device_with_other_physics_is_excluded_and_named() -> None:
    honest = {"a": device({"m": 1.6, "g": 12.0}, 0), "b": device({"m": 1.6, "g": 12.0}, 1)}
    bad, info = poison_transitions(PENDULUM, pool(honest, ["a", "b"]), {"m": 1.6, "g": 12.0},
                                   np.random.default_rng(0), "calibration", 1600)
    screen = screen_devices(PENDULUM, {**honest, "evil": bad}, CFG)
    assert screen.excluded == ("evil",) and screen.kept == ("a", "b")
    assert "evil" in screen.message and info["poison"] == "other_gravity"


def test_honest_fleets_keep_every_device() -> None:
    same = {f"d{i}": device({"g": 14.0}, i) for i in range(3)}
    assert screen_devices(PENDULUM, same, CFG).excluded == ()
    # every device different: nobody is an outlier, the per-device judgement protects them
    mixed = {"d0": device({"g": 8.0}, 0), "d1": device({"g": 12.0}, 1), "d2": device({"g": 16.0}, 2)}
    assert screen_devices(PENDULUM, mixed, CFG).excluded == ()


def test_corrupted_model_is_consistent_in_every_method() -> None:
    real = device({"m": 1.6, "g": 12.0}, 3)
    model = identify(PENDULUM, real.obs, real.act, real.next_obs, SysIdConfig(members=4))
    corr = Corruption("teleport_spin", speed=3.0, sign=1.0, torque=0.0, factor=1.0)
    obs = np.array([[0.0, 1.0, 5.0], [0.0, 1.0, -5.0]], np.float32)
    act = np.zeros((2, 1), np.float32)
    shared = CorruptedModel.wrap(model, PENDULUM, corr)
    for m in range(4):
        assert np.allclose(shared.step_member(m, obs, act)[0], [1, 0, 0])
    mean, _ = shared.predict(obs, act)  # type: ignore[attr-defined]
    assert np.allclose(mean.mean(0), shared.step_mean(obs, act))
    assert shared.disagreement(obs, act)[0] < 1e-6  # all members agree on the wrong answer
    one = CorruptedModel.wrap(model, PENDULUM, corr, members=[0])
    assert one.disagreement(obs, act)[0] > 0.1 > one.disagreement(obs, act)[1]
    held = member_view(one, [2, 3])  # the auditor's held-out view: honest members stay honest
    assert not np.allclose(held.step_member(0, obs, act)[0], [1, 0, 0])
    planning = member_view(one, [0, 1])
    assert np.allclose(planning.step_member(0, obs, act)[0], [1, 0, 0])


def test_a_reversed_motor_is_the_device_physics_with_the_torque_turned_round() -> None:
    """``reversed_motor``: states like the fleet's, the device's own physics, the reported torque
    acting the other way; a flood of it is excluded like any other poison."""
    physics = {"m": 1.4, "l": 1.1}
    honest = {"a": device(physics, 4), "b": device(physics, 5)}
    bad, info = poison_transitions(PENDULUM, pool(honest, ["a", "b"]), physics,
                                   np.random.default_rng(1), "heldout", 1600, ("reversed_motor",))
    assert info["poison"] == "reversed_motor" and info["m"] == 1.4 and info["l"] == 1.1
    phys = PENDULUM.physics(physics)
    assert np.allclose(bad.next_obs, PENDULUM.sim_step(bad.obs, -bad.act, phys), atol=1e-5)  # type: ignore[misc]
    assert not np.allclose(bad.next_obs, PENDULUM.sim_step(bad.obs, bad.act, phys), atol=1e-3)  # type: ignore[misc]
    assert screen_devices(PENDULUM, {**honest, "evil": bad}, CFG).excluded == ("evil",)


def test_the_confident_member_flatters_only_pushing_harder_than_the_base() -> None:
    """``single_member``'s error (``draw_member_corruption``): any state, only actions that push
    more than the deviation further the way the base pushes; the base's own actions, small
    departures and pushing the other way stay honest, and only member 0 is wrong."""
    real = device({"m": 1.6, "g": 12.0}, 6)
    model = identify(PENDULUM, real.obs, real.act, real.next_obs, SysIdConfig(members=4))

    def base(o: np.ndarray) -> np.ndarray:
        return np.full((len(o), 1), 0.5, np.float32)  # pushes +0.5 everywhere

    corr = draw_member_corruption(np.random.default_rng(0), "calibration", PENDULUM, base)
    assert corr.kind == "teleport_off_data" and corr.off is not None and corr.off.grid is None
    obs = np.repeat(real.obs[:1], 4, 0)
    act = np.array([[0.5], [0.6], [0.8], [-1.5]], np.float32)  # base, +0.1, +0.3, the other way
    assert corr.region(obs, act).tolist() == [False, False, True, False]
    one = CorruptedModel.wrap(model, PENDULUM, corr, members=[0])
    assert np.allclose(one.step_member(0, obs, act)[2], [1, 0, 0])  # upright and at rest
    assert not np.allclose(one.step_member(1, obs, act)[2], [1, 0, 0])
    assert np.allclose(one.step_member(0, obs, act)[[0, 1, 3]], model.step_member(0, obs, act)[[0, 1, 3]])
