"""Policy MLP and LoRA: exact gradients against finite differences, merge equivalence, npz round trip."""

from __future__ import annotations

import numpy as np
import pytest

from plasma.server.policy_net import LoRA, MLPPolicy
from plasma.server.tasks import PENDULUM, make_env, pendulum_reward, pendulum_step


def _policy64(seed: int = 0) -> MLPPolicy:
    p = MLPPolicy.init(3, 2, (5, 4), obs_mean=np.zeros(3), obs_std=np.array([1.0, 1.0, 4.0]),
                       act_low=np.array([-2.0, -1.0]), act_high=np.array([2.0, 3.0]), seed=seed)
    rng = np.random.default_rng(seed)
    # float64 copies so that finite differences are exact to ~1e-9
    p.layers = [(rng.standard_normal(w.shape) * 0.7, rng.standard_normal(b.shape) * 0.1) for w, b in p.layers]
    for k in ("obs_mean", "obs_std", "act_low", "act_high"):
        setattr(p, k, getattr(p, k).astype(np.float64))
    return p


def _loss(p: MLPPolicy, obs: np.ndarray, target: np.ndarray, lora: LoRA | None) -> float:
    return float(np.sum((p.forward(obs, lora) - target) ** 2))


def _fd_check(p: MLPPolicy, params: list[np.ndarray], grads: list[np.ndarray], f) -> float:
    worst = 0.0
    for prm, g in zip(params, grads):
        for i in range(prm.size):
            idx = np.unravel_index(i, prm.shape)
            old = prm[idx]
            prm[idx] = old + 1e-6
            up = f()
            prm[idx] = old - 1e-6
            down = f()
            prm[idx] = old
            worst = max(worst, abs((up - down) / 2e-6 - g[idx]))
    return worst


def test_policy_gradients_match_finite_differences() -> None:
    p = _policy64()
    rng = np.random.default_rng(1)
    obs, target = rng.standard_normal((6, 3)), rng.standard_normal((6, 2))
    act, cache = p.forward_cache(obs)
    grads, lora_grads = p.backward(cache, 2 * (act - target))
    assert lora_grads == []
    assert _fd_check(p, p.params(), grads, lambda: _loss(p, obs, target, None)) < 1e-6


def test_lora_gradients_match_finite_differences() -> None:
    p = _policy64()
    lora = LoRA.init(p, ["l0", "l2"], rank=2, alpha=3.0, seed=2)
    rng = np.random.default_rng(3)
    lora.factors = {k: (a.astype(np.float64), rng.standard_normal(b.shape) * 0.3) for k, (a, b) in lora.factors.items()}
    obs, target = rng.standard_normal((6, 3)), rng.standard_normal((6, 2))
    act, cache = p.forward_cache(obs, lora)
    _, lora_grads = p.backward(cache, 2 * (act - target))
    assert len(lora_grads) == 4
    assert _fd_check(p, lora.params(), lora_grads, lambda: _loss(p, obs, target, lora)) < 1e-6


def test_lora_init_is_identity_and_merge_matches_adapted_forward(tmp_path) -> None:
    p = MLPPolicy.init(3, 1, (16, 16), obs_mean=PENDULUM.obs_mean, obs_std=PENDULUM.obs_std,
                       act_low=PENDULUM.act_low, act_high=PENDULUM.act_high)
    obs = np.random.default_rng(0).standard_normal((32, 3)).astype(np.float32)
    lora = LoRA.init(p, rank=4)
    np.testing.assert_array_equal(p.forward(obs, lora), p.forward(obs))
    for _, b in lora.factors.values():
        b += 0.1
    np.testing.assert_allclose(p.merged(lora).forward(obs), p.forward(obs, lora), atol=1e-5)
    back = LoRA.load_npz(lora.save_npz(tmp_path / "a.npz"))
    assert back.rank == 4 and back.alpha == lora.alpha and set(back.factors) == {"l0", "l1", "l2"}
    with np.load(tmp_path / "a.npz") as z:
        assert set(z.files) == {"alpha", "l0.A", "l0.B", "l1.A", "l1.B", "l2.A", "l2.B"}
        assert z["l1.A"].shape == (4, 16) and z["l1.B"].shape == (16, 4) and z["l0.A"].dtype == np.float32
    q = MLPPolicy.load_npz(p.save_npz(tmp_path / "p.npz"))
    np.testing.assert_array_equal(q.forward(obs), p.forward(obs))


def test_actions_respect_bounds_and_batch_api() -> None:
    p = _policy64()
    obs = np.random.default_rng(0).standard_normal((100, 3)) * 10
    act = p.forward(obs)
    assert act.shape == (100, 2)
    assert (act >= p.act_low).all() and (act <= p.act_high).all()
    assert p.forward(obs[0]).shape == (2,)


@pytest.mark.parametrize("physics", [{}, {"m": 1.6, "g": 12.0}, {"l": 1.3}])
def test_pendulum_task_matches_gym(physics: dict[str, float]) -> None:
    env = make_env("Pendulum-v1", physics)
    full = PENDULUM.physics(physics)
    obs, _ = env.reset(seed=0)
    rng = np.random.default_rng(0)
    for _ in range(50):
        a = rng.uniform(-2, 2, 1).astype(np.float32)
        nxt, r, *_ = env.step(a)
        np.testing.assert_allclose(pendulum_step(obs[None].astype(np.float64), a[None], full)[0], nxt, atol=1e-5)
        assert abs(pendulum_reward(obs[None].astype(np.float64), a[None], None)[0] - r) < 1e-4
        obs = nxt


def test_unknown_physics_is_refused() -> None:
    with pytest.raises(KeyError):
        make_env("Pendulum-v1", {"mass": 2.0})


ACTIVATIONS = [("relu", None, "tanh"), ("elu", None, "clip"), ("elu", 0.5, "tanh"), ("leaky_relu", 0.2, "clip"),
               ("leaky_relu", None, "tanh"), ("tanh", None, "clip")]


@pytest.mark.parametrize(("hidden", "alpha", "output"), ACTIVATIONS)
def test_gradients_match_finite_differences_for_each_activation(hidden: str, alpha: float | None, output: str) -> None:
    """Imported policies (relu / elu / leaky_relu hidden layers, a clip output) get exact gradients too."""
    p = _policy64(4)
    p.hidden_activation, p.activation_alpha, p.output_activation = hidden, alpha, output
    lora = LoRA.init(p, ["l0", "l2"], rank=2, alpha=3.0, seed=2)
    rng = np.random.default_rng(5)
    lora.factors = {k: (a.astype(np.float64), rng.standard_normal(b.shape) * 0.3) for k, (a, b) in lora.factors.items()}
    obs, target = rng.standard_normal((8, 3)), rng.standard_normal((8, 2))
    act, cache = p.forward_cache(obs, lora)
    grads, lora_grads = p.backward(cache, 2 * (act - target))
    assert _fd_check(p, p.params(), grads, lambda: _loss(p, obs, target, lora)) < 1e-5
    assert _fd_check(p, lora.params(), lora_grads, lambda: _loss(p, obs, target, lora)) < 1e-5
    if output == "clip":
        assert np.all(act >= p.act_low) and np.all(act <= p.act_high)
        inside = (act > p.act_low) & (act < p.act_high)
        assert inside.any() and not inside.all()  # both branches of the clip are exercised


def test_activation_fields_survive_copy_merge_and_npz(tmp_path) -> None:
    p = _policy64(6)
    p.hidden_activation, p.activation_alpha, p.output_activation = "leaky_relu", 0.2, "clip"
    lora = LoRA.init(p, rank=2, seed=1)
    for q in (p.copy(), p.merged(lora), MLPPolicy.load_npz(p.save_npz(tmp_path / "p.npz"))):
        assert q.activations == p.activations
    with pytest.raises(ValueError, match="gelu"):
        MLPPolicy(p.layers, p.obs_mean, p.obs_std, p.act_low, p.act_high, hidden_activation="gelu")
