"""Phantom paths (batching, shapes), the planner against its prior, and LoRA distillation."""

from __future__ import annotations

import numpy as np

from plasma.server.distill import DistillConfig, LoRADistiller
from plasma.server.phantom import (
    PhantomBenchConfig,
    PhantomConfig,
    PhantomPathSimulator,
    PlannerConfig,
    SimDynamics,
    bench_phantom,
    member_blocks,
    mppi_plan,
    policy_plan,
)
from plasma.server.policy_net import LoRA, MLPPolicy
from plasma.server.tasks import PENDULUM
from plasma.server.worldmodel import WorldModel, WorldModelConfig


def _policy(seed: int = 0) -> MLPPolicy:
    return MLPPolicy.init(3, 1, (16, 16), obs_mean=PENDULUM.obs_mean, obs_std=PENDULUM.obs_std,
                          act_low=PENDULUM.act_low, act_high=PENDULUM.act_high, seed=seed)


def _pool(n: int = 64) -> np.ndarray:
    th = np.random.default_rng(0).uniform(-np.pi, np.pi, n)
    return np.stack([np.cos(th), np.sin(th), np.zeros(n)], 1).astype(np.float32)


def test_member_blocks_cover_paths_contiguously() -> None:
    blocks = member_blocks(10, 3)
    assert [m for m, _ in blocks] == [0, 1, 2]
    assert sum(sl.stop - sl.start for _, sl in blocks) == 10 and blocks[0][1].start == 0 and blocks[-1][1].stop == 10


def test_phantom_rollout_shapes_and_member_assignment() -> None:
    model = WorldModel(3, 1, WorldModelConfig(ensemble_size=3, hidden=(16, 16)))
    sim = PhantomPathSimulator(model, PENDULUM, PhantomConfig(paths=30, horizon=7))
    roll = sim.rollout(_pool(), _policy())
    assert roll.obs.shape == (30, 8, 3) and roll.actions.shape == (30, 7, 1)
    assert roll.rewards.shape == (30, 7) and roll.returns.shape == (30,) and roll.disagreement.shape == (30, 7)
    np.testing.assert_allclose(roll.returns, roll.rewards.sum(1), rtol=1e-5)
    assert sorted(set(roll.members.tolist())) == [0, 1, 2]
    np.testing.assert_allclose(np.hypot(roll.obs[..., 0], roll.obs[..., 1]), 1.0, atol=1e-5)  # projected
    # one path stepped alone through its own member gives the same trajectory as in the batch
    p = 17
    o = roll.obs[p, 0][None]
    for t in range(7):
        nxt = model.step_member(int(roll.members[p]), o, roll.actions[p, t][None])
        o = PENDULUM.project_obs(nxt)
    np.testing.assert_allclose(o[0], roll.obs[p, 7], atol=1e-4)


def test_planner_beats_its_prior_with_the_true_model() -> None:
    dyn = SimDynamics(PENDULUM, {"m": 1.6, "g": 12.0})
    policy = _policy()
    start = _pool(32)
    prior = policy_plan(dyn, PENDULUM, policy, None, start, 20)
    res = mppi_plan(dyn, PENDULUM, start, prior, PlannerConfig(candidates=32, horizon=20, iterations=3))
    assert res.actions.shape == (32, 1) and res.plan.shape == (32, 20, 1)
    assert (res.plan_return >= res.prior_return - 1e-3).all()
    assert res.plan_return.mean() > res.prior_return.mean() + 1.0


def test_distiller_gradients_and_fit() -> None:
    policy = _policy()
    distiller = LoRADistiller(policy, DistillConfig(rank=2, steps=200, anchor=0.1, lr=1e-2))
    rng = np.random.default_rng(0)
    states = rng.standard_normal((40, 3))
    targets = np.clip(policy.forward(states) + 0.5 * np.sign(states[:, :1]), -2, 2)
    lora = distiller.init_adapter()
    lora.factors = {k: (a.astype(np.float64), rng.standard_normal(b.shape) * 0.1) for k, (a, b) in lora.factors.items()}
    anchor = rng.standard_normal((10, 3))
    anchor_act = policy.forward(anchor) + 0.1
    _, _, grads = distiller.loss_and_grads(lora, states, targets, anchor, anchor_act)
    worst = 0.0
    for p, g in zip(lora.params(), grads):
        for i in range(p.size):
            idx = np.unravel_index(i, p.shape)
            old = p[idx]
            p[idx] = old + 1e-6
            up = distiller.loss_and_grads(lora, states, targets, anchor, anchor_act)[0]
            p[idx] = old - 1e-6
            down = distiller.loss_and_grads(lora, states, targets, anchor, anchor_act)[0]
            p[idx] = old
            worst = max(worst, abs((up - down) / 2e-6 - g[idx]))
    assert worst < 1e-6
    result = distiller.fit(states.astype(np.float32), targets.astype(np.float32))
    assert result.imitation_after < 0.5 * result.imitation_before
    assert isinstance(result.adapter, LoRA) and result.adapter.rank == 2


def test_distill_reports_predicted_returns_and_saves(tmp_path) -> None:
    model = WorldModel(3, 1, WorldModelConfig(ensemble_size=2, hidden=(8, 8)))
    sim = PhantomPathSimulator(model, PENDULUM)
    policy = _policy()
    states = _pool(50)
    result = LoRADistiller(policy, DistillConfig(steps=20)).fit(states, np.zeros((50, 1), np.float32),
                                                                simulator=sim, start_pool=states,
                                                                eval_paths=10, eval_horizon=5)
    assert np.isfinite(result.predicted_return_before) and np.isfinite(result.predicted_return_after)
    with np.load(result.save_npz(tmp_path / "adapter.npz")) as z:
        assert "alpha" in z.files and "l0.A" in z.files


def test_bench_phantom_tiny() -> None:
    out = bench_phantom(PhantomBenchConfig(members=2, hidden=(16, 16), paths=20, horizon=5, repeats=1))
    assert out["model_steps_per_s"] > 0 and out["model_steps_per_s_with_disagreement"] > 0


def test_rollout_summary_is_a_simulation_result() -> None:
    from plasma.protocol import SimulationResult
    from plasma.server.phantom import PhantomRollout

    rng = np.random.default_rng(0)
    roll = PhantomRollout(obs=rng.normal(size=(8, 6, 3)), actions=rng.normal(size=(8, 5, 1)),
                          rewards=-np.ones((8, 5)), returns=-5.0 * np.ones(8),
                          disagreement=np.abs(rng.normal(size=(8, 5))), members=np.zeros(8, int))
    result = roll.summary(fleet="f1", device="d1", world_model_version="ens5-x",
                          planner="mppi", planned_return=-3.0)
    assert isinstance(result, SimulationResult)
    assert (result.n_paths, result.horizon) == (8, 5)
    assert result.base_predicted_return == -5.0 and result.planned_predicted_return == -3.0
    assert result.disagreement_max >= result.disagreement_mean > 0
    assert SimulationResult.model_validate_json(result.model_dump_json()) == result
