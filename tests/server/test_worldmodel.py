"""World model: exact NLL gradients, held-out error falls as data grows, shapes of predictions."""

from __future__ import annotations

import numpy as np

from plasma.server.tasks import PENDULUM
from plasma.server.worldmodel import Member, WorldModel, WorldModelConfig


def _transitions(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    th, thdot = rng.uniform(-np.pi, np.pi, n), rng.uniform(-8, 8, n)
    obs = np.stack([np.cos(th), np.sin(th), thdot], 1).astype(np.float32)
    act = rng.uniform(-2, 2, (n, 1)).astype(np.float32)
    return obs, act, PENDULUM.sim_step(obs, act, PENDULUM.physics({"m": 1.6, "g": 12.0}))  # type: ignore[misc]


def test_member_gradients_match_finite_differences() -> None:
    rng = np.random.default_rng(0)
    m = WorldModel(3, 1, WorldModelConfig(ensemble_size=1, hidden=(6, 5))).members[0]
    member = Member([(w.astype(np.float64), rng.standard_normal(b.shape) * 0.1) for w, b in m.layers],
                    np.full(3, 0.3), np.full(3, -1.0))
    x, y = rng.standard_normal((7, 4)), rng.standard_normal((7, 3))
    _, grads = member.loss_and_grads(x, y, weight_decay=1e-3)
    worst = 0.0
    for p, g in zip(member.params(), grads):
        for i in range(p.size):
            idx = np.unravel_index(i, p.shape)
            old = p[idx]
            p[idx] = old + 1e-6
            up, _ = member.loss_and_grads(x, y, 1e-3)
            p[idx] = old - 1e-6
            down, _ = member.loss_and_grads(x, y, 1e-3)
            p[idx] = old
            worst = max(worst, abs((up - down) / 2e-6 - g[idx]))
    assert worst < 1e-6


def test_heldout_error_falls_as_data_grows() -> None:
    test_obs, test_act, test_next = _transitions(500, seed=99)
    errors = []
    for n in (60, 600):
        obs, act, nxt = _transitions(n, seed=n)
        model = WorldModel(3, 1, WorldModelConfig(ensemble_size=3, hidden=(32, 32), max_epochs=60, seed=0))
        report = model.fit(obs, act, nxt)
        assert np.isfinite(report.val_mse) and report.n_holdout > 0
        mean, _ = model.predict(test_obs, test_act)
        errors.append(float(np.mean((mean.mean(0) - test_next) ** 2)))
    assert errors[1] < 0.5 * errors[0]


def test_prediction_shapes_and_disagreement() -> None:
    obs, act, nxt = _transitions(200, seed=1)
    model = WorldModel(3, 1, WorldModelConfig(ensemble_size=4, hidden=(16, 16), max_epochs=5))
    model.fit(obs, act, nxt)
    mean, var = model.predict(obs[:10], act[:10])
    assert mean.shape == var.shape == (4, 10, 3) and (var > 0).all()
    dis = model.disagreement(obs[:10], act[:10])
    assert dis.shape == (10,) and (dis >= 0).all()
    one = model.step_member(2, obs[:10], act[:10])
    np.testing.assert_allclose(one, mean[2], atol=1e-4)


def test_learned_reward_adds_a_target() -> None:
    obs, act, nxt = _transitions(100, seed=2)
    rew = PENDULUM.reward(obs, act, nxt)  # type: ignore[misc]
    model = WorldModel(3, 1, WorldModelConfig(ensemble_size=2, hidden=(8,), max_epochs=3, learn_reward=True))
    model.fit(obs, act, nxt, rew)
    mean, _ = model.predict(obs[:5], act[:5])
    assert mean.shape == (2, 5, 4)
