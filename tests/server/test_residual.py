"""The world model for what the simulator lacks: the identified simulator plus a residual ensemble
learned on real transitions, used only where it removes held-out error."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from plasma.server.adapt import adapt_config, new_model
from plasma.server.budget import with_fields
from plasma.server.judicial import split_members
from plasma.server.residual import ResidualConfig, ResidualModel
from plasma.server.sysid import PhysicsModel, SysIdConfig
from plasma.server.tasks import get_task, make_env, resolve_physics

PENDULUM = "Pendulum-v1"


class Drag:
    """A Pendulum device whose joint has viscous friction: no Pendulum parameter names it."""

    def __init__(self, env: Any, coeff: float = 0.25) -> None:
        self.env, self.coeff, self.obs = env, coeff, np.zeros(3)

    def reset(self, seed: int | None = None) -> Any:
        self.obs, info = self.env.reset(seed=seed)
        return self.obs, info

    def step(self, action: np.ndarray) -> Any:
        out = self.env.step(np.asarray(action) - self.coeff * self.obs[2])
        self.obs = out[0]
        return out


def _transitions(physics: str, wrap: bool, n: int = 1500) -> tuple[np.ndarray, ...]:
    env = make_env(PENDULUM, resolve_physics(PENDULUM, physics))
    world = Drag(env) if wrap else env
    rng = np.random.default_rng(0)
    obs, _ = world.reset(seed=0)
    rows = []
    for _ in range(n):
        a = rng.uniform(-1, 1, 1).astype(np.float32)
        nxt, _, term, trunc, _ = world.step(a)
        rows.append((obs, a, nxt))
        obs = nxt if not (term or trunc) else world.reset()[0]
    return tuple(np.array([r[i] for r in rows], np.float32) for i in range(3))


def test_the_residual_learns_an_effect_the_simulator_has_no_parameter_for() -> None:
    task = get_task(PENDULUM)
    obs, act, nxt = _transitions("", wrap=True)
    prior = PhysicsModel(task, SysIdConfig(members=3))
    prior.fit(obs, act, nxt)
    model = ResidualModel(task, SysIdConfig(members=3))
    model.fit(obs, act, nxt)
    assert model.residual is not None and model.residual_share > 0.5, model.residual_share
    test_obs, test_act, test_nxt = (a[-300:] for a in _transitions("", wrap=True, n=2000))
    err_prior = np.abs(prior.step_mean(test_obs, test_act) - test_nxt).mean()
    err_model = np.abs(model.step_mean(test_obs, test_act) - test_nxt).mean()
    assert err_model < 0.5 * err_prior, (err_model, err_prior)


def test_inside_the_parameter_space_the_model_is_the_identified_simulator() -> None:
    task = get_task(PENDULUM)
    obs, act, nxt = _transitions("m=1.6,g=12", wrap=False)
    prior = PhysicsModel(task, SysIdConfig(members=3))
    prior.fit(obs, act, nxt)
    model = ResidualModel(task, SysIdConfig(members=3))
    model.fit(obs, act, nxt)
    assert model.residual is None and model.residual_share == 0.0
    np.testing.assert_allclose(model.step_member(1, obs[:50], act[:50]),
                               prior.step_member(1, obs[:50], act[:50]), rtol=1e-6, atol=1e-6)


def test_member_views_keep_their_residual_nets() -> None:
    task = get_task(PENDULUM)
    obs, act, nxt = _transitions("", wrap=True, n=800)
    model = ResidualModel(task, SysIdConfig(members=4))
    model.fit(obs, act, nxt)
    planning, heldout = split_members(model, 2)  # type: ignore[arg-type]
    assert heldout is not None
    for view, first in ((planning, 0), (heldout, 2)):
        for i in range(2):
            np.testing.assert_array_equal(view.step_member(i, obs[:20], act[:20]),
                                          model.step_member(first + i, obs[:20], act[:20]))


def test_the_default_model_of_a_simulated_task_is_the_residual_model() -> None:
    task = get_task(PENDULUM)
    assert isinstance(new_model(task, adapt_config().for_task(task)), ResidualModel)
    off = with_fields(adapt_config(), {"residual.enabled": False})
    assert type(new_model(task, off.for_task(task))) is PhysicsModel
    assert off.residual == ResidualConfig(enabled=False, seed=0)


def test_with_fields_sets_nested_fields_and_names_unknown_ones() -> None:
    cfg = with_fields(adapt_config(), {"planner.horizon": 7, "expert_paths": 1})
    assert cfg.planner.horizon == 7 and cfg.expert_paths == 1
    with pytest.raises(ValueError, match="nope"):
        with_fields(cfg, {"planner.nope": 1})
