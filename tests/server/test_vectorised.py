"""The round's vectorised paths against the straightforward ones they replace: the physics
members stepped in one simulator call, the planner's rewards computed per chunk of steps, and
distillation's one-pass adapter gradients."""

from __future__ import annotations

import numpy as np
import pytest

from plasma.server import phantom
from plasma.server.bench.exploits import CorruptedModel
from plasma.server.distill import DistillConfig, LoRADistiller
from plasma.server.phantom import (
    ModelDynamics,
    PhantomBenchConfig,
    bench_phantom,
    member_blocks,
    step_paths,
)
from plasma.server.policy_net import LoRA, MLPPolicy
from plasma.server.residual import MemberPhysics, ResidualModel
from plasma.server.sysid import PhysicsModel, SysIdConfig
from plasma.server.tasks import MOUNTAINCAR, PENDULUM, TaskSpec
from plasma.server.tasks.classic import pendulum_step
from plasma.server.worldmodel import WorldModel, WorldModelConfig


def _members(task: TaskSpec, n: int, seed: int = 0) -> list[dict[str, float]]:
    """Parameter sets that differ in every identified value (as bootstrap members do, more)."""
    model = PhysicsModel(task, SysIdConfig(members=n))
    rng = np.random.default_rng(seed)
    return [model.physics_of(rng.normal(0.0, 0.2, len(model.names))) for _ in range(n)]


def _batch(task: TaskSpec, n: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    obs = task.project_obs(rng.uniform(task.obs_low, task.obs_high, (n, task.obs_dim)).astype(np.float32))
    act = rng.uniform(1.5 * task.act_low, 1.5 * task.act_high, (n, task.act_dim)).astype(np.float32)
    return obs, act


def _member_by_member(model: PhysicsModel, task: TaskSpec, obs: np.ndarray, act: np.ndarray,
                      blocks: list[tuple[int, slice]]) -> np.ndarray:
    out = np.empty((len(obs), task.obs_dim), np.float32)
    for member, sl in blocks:
        out[sl] = model.step_member(member, obs[sl], act[sl])
    return out


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_pendulum_step_with_stacked_parameter_sets_is_one_call_per_set(dtype: type) -> None:
    sets = _members(PENDULUM, 3)
    obs, act = (a.astype(dtype) for a in _batch(PENDULUM, 300))
    rows = np.repeat(np.arange(3), 100)
    stacked = {k: np.array([p[k] for p in sets])[rows] for k in sets[0]}
    one_by_one = np.concatenate([pendulum_step(obs[rows == i], act[rows == i], sets[i]) for i in range(3)])
    np.testing.assert_array_equal(pendulum_step(obs, act, stacked), one_by_one)


@pytest.mark.parametrize("task", [PENDULUM, MOUNTAINCAR], ids=lambda t: t.env_id)
@pytest.mark.parametrize("paths, members", [(600, 3), (16, 3), (7, 5)])  # equal blocks, unequal, ragged
def test_physics_members_in_one_call_equal_member_by_member(task: TaskSpec, paths: int,
                                                            members: int) -> None:
    model = PhysicsModel(task, SysIdConfig(members=members))
    model.members = _members(task, members)
    obs, act = _batch(task, paths)
    blocks = member_blocks(paths, members)
    one_call = model.step_blocks(obs, act, blocks)
    assert one_call is not None
    np.testing.assert_array_equal(one_call, _member_by_member(model, task, obs, act, blocks))
    # and through the rollout step: next observations and rewards
    straight = np.empty((paths, task.obs_dim), np.float32)
    for member, sl in blocks:
        straight[sl] = model.step_member(member, obs[sl], act[sl])
    nxt, rew = step_paths(ModelDynamics(model), task, obs, act, blocks)  # type: ignore[arg-type]
    np.testing.assert_array_equal(nxt, task.project_obs(straight))
    np.testing.assert_array_equal(rew, task.reward(obs, act, nxt).astype(np.float32))  # type: ignore[misc]


def test_the_stacked_parameters_follow_new_members_and_blocks() -> None:
    model = PhysicsModel(PENDULUM, SysIdConfig(members=3))
    obs, act = _batch(PENDULUM, 30)
    blocks = member_blocks(30, 3)
    model.members = _members(PENDULUM, 3, seed=0)
    first = model.step_blocks(obs, act, blocks)
    model.members = _members(PENDULUM, 3, seed=1)  # a refit: new members, same blocks
    second = model.step_blocks(obs, act, blocks)
    np.testing.assert_array_equal(second, _member_by_member(model, PENDULUM, obs, act, blocks))
    assert not np.array_equal(first, second)
    swapped = [(2 - m, sl) for m, sl in blocks]  # other members on the same rows
    np.testing.assert_array_equal(model.step_blocks(obs, act, swapped),
                                  _member_by_member(model, PENDULUM, obs, act, swapped))


def test_residual_members_in_one_call_equal_member_by_member() -> None:
    model = ResidualModel(PENDULUM, SysIdConfig(members=4))
    model.members = [MemberPhysics(p, i) for i, p in enumerate(_members(PENDULUM, 4))]
    model.residual = WorldModel(3, 1, WorldModelConfig(ensemble_size=4, hidden=(8, 8), seed=3))
    obs, act = _batch(PENDULUM, 40)
    blocks = member_blocks(40, 4)
    one_call = model.step_blocks(obs, act, blocks)
    assert one_call is not None
    np.testing.assert_array_equal(one_call, _member_by_member(model, PENDULUM, obs, act, blocks))


def test_a_subclass_with_its_own_step_is_stepped_member_by_member() -> None:
    def shove(obs: np.ndarray, act: np.ndarray, out: np.ndarray, task: TaskSpec,
              phys: object) -> np.ndarray:
        return out + 1.0

    model = PhysicsModel(PENDULUM, SysIdConfig(members=3))
    model.members = _members(PENDULUM, 3)
    bad = CorruptedModel.wrap(model, PENDULUM, shove, members=[1])  # type: ignore[arg-type]
    obs, act = _batch(PENDULUM, 30)
    blocks = member_blocks(30, 3)
    assert bad.step_blocks(obs, act, blocks) is None  # type: ignore[attr-defined]
    nxt, _ = step_paths(ModelDynamics(bad), PENDULUM, obs, act, blocks)  # type: ignore[arg-type]
    expected = PENDULUM.project_obs(_member_by_member(bad, PENDULUM, obs, act, blocks))  # type: ignore[arg-type]
    np.testing.assert_array_equal(nxt, expected)


def _returns_step_by_step(dyn: ModelDynamics, task: TaskSpec, start: np.ndarray, seqs: np.ndarray,
                          discount: float) -> np.ndarray:
    """The planner's returns as they were computed: one step (with its reward) at a time."""
    n_cand, n_states, horizon, ad = seqs.shape
    obs = np.tile(start, (n_cand, 1)).astype(np.float32)
    blocks = member_blocks(len(obs), min(dyn.n_members, n_cand))
    flat = seqs.reshape(n_cand * n_states, horizon, ad)
    ret, g = np.zeros(len(obs), np.float32), 1.0
    for t in range(horizon):
        obs, rew = step_paths(dyn, task, obs, flat[:, t], blocks)
        ret += g * rew
        g *= discount
    return ret.reshape(n_cand, n_states)


@pytest.mark.parametrize("reward_rows", [1 << 16, 100, 1])  # one chunk, several, a step each
@pytest.mark.parametrize("discount", [1.0, 0.9])
def test_planner_returns_equal_the_step_by_step_sums(monkeypatch: pytest.MonkeyPatch,
                                                     reward_rows: int, discount: float) -> None:
    monkeypatch.setattr(phantom, "_REWARD_ROWS", reward_rows)
    model = PhysicsModel(PENDULUM, SysIdConfig(members=3))
    model.members = _members(PENDULUM, 3)
    dyn = ModelDynamics(model)  # type: ignore[arg-type]
    start, _ = _batch(PENDULUM, 5)
    seqs = np.random.default_rng(2).uniform(-2, 2, (6, 5, 9, 1)).astype(np.float32)
    np.testing.assert_array_equal(
        phantom._sequence_returns(dyn, PENDULUM, start, seqs, discount),
        _returns_step_by_step(dyn, PENDULUM, start, seqs, discount))


def _policy_and_adapter() -> tuple[MLPPolicy, LoRA]:
    policy = MLPPolicy.init(3, 1, (16, 16), obs_mean=PENDULUM.obs_mean, obs_std=PENDULUM.obs_std,
                            act_low=PENDULUM.act_low, act_high=PENDULUM.act_high, seed=0)
    lora = LoRA.init(policy, None, 4, seed=1)
    rng = np.random.default_rng(5)
    for _, b in lora.factors.values():
        b[:] = rng.normal(0.0, 0.3, b.shape)
    return policy, lora


def test_adapter_gradients_without_weight_gradients_equal_backward() -> None:
    policy, lora = _policy_and_adapter()
    obs, _ = _batch(PENDULUM, 64)
    act, cache = policy.forward_cache(obs, lora)
    d_act = np.random.default_rng(3).normal(size=act.shape).astype(np.float32)
    _, expected = policy.backward(cache, d_act)
    got = policy.lora_grads(cache, d_act)
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-6)


def test_one_pass_distillation_gradients_equal_the_two_pass_loss_gradients() -> None:
    policy, lora = _policy_and_adapter()
    distiller = LoRADistiller(policy, DistillConfig(rank=4, anchor=0.3))
    states, _ = _batch(PENDULUM, 50, seed=7)
    targets = np.random.default_rng(8).uniform(-2, 2, (50, 1)).astype(np.float32)
    anchors, _ = _batch(PENDULUM, 30, seed=9)
    anchor_actions = policy.forward(anchors)
    _, _, expected = distiller.loss_and_grads(lora, states, targets, anchors, anchor_actions)
    got = distiller.grads(lora, states, targets, anchors, anchor_actions)
    for g, e in zip(got, expected):
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-7)
    # without anchor states: the imitation term alone
    _, _, expected = distiller.loss_and_grads(lora, states, targets, anchors[:0], anchor_actions[:0])
    for g, e in zip(distiller.grads(lora, states, targets, anchors[:0], anchor_actions[:0]), expected):
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-7)


def test_bench_phantom_reports_the_ensemble_and_the_identified_simulator() -> None:
    from plasma.server.bench.guard import figures_of

    out = bench_phantom(PhantomBenchConfig(members=2, hidden=(16, 16), paths=20, horizon=5,
                                           repeats=1, transitions=100))
    assert out["model_steps_per_s"] > 0 and out["physics_model_steps_per_s"] > 0
    assert out["physics_model"] == "ResidualModel" and out["physics_members"] == 5
    assert {"phantom.model_steps_per_s", "phantom.physics_model_steps_per_s"} <= set(
        figures_of("phantom", out))
