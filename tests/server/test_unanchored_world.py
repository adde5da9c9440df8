"""A task with neither a reward formula nor a simulator (``register_task(env_id)``): the world
model learns the dynamics *and* the reward from one log, and nothing outside it can vouch for a
gain. Found in red-team development (docs/auditing.md, Limits): honest rounds on such a task
published packets that were significantly worse on the real device. The auditor now blocks them
(``no_independent_evidence``) unless ``judicial.allow_unanchored`` is set.

One real instance (a Pendulum device at m=2 with 4 real episodes of the shipped base policy,
the product's default budget): the test asserts the harm is real (with the check switched off
the round publishes a packet whose paired real return is significantly worse) and that the
round, as shipped, publishes nothing."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from plasma.server.adapt import adapt_config, adaptation_round, seeded
from plasma.server.basepolicy import TrainBaseConfig, cached_policy, collect, evaluate
from plasma.server.bench.outcome import compare
from plasma.server.judicial import JudicialAuditor, RealData
from plasma.server.phantom import blas_threads
from plasma.server.policy_net import LoRA, MLPPolicy
from plasma.server.tasks import get_task

pytestmark = pytest.mark.slow

ENV, PHYSICS, SEED = "Pendulum-v1", {"m": 2.0}, 100
EPISODES = 100


def _act(base: MLPPolicy, lora: LoRA | None):  # type: ignore[no-untyped-def]
    merged = base.merged(lora)
    return lambda obs: merged.forward(obs.astype(np.float32))


def _round(allow: bool):  # type: ignore[no-untyped-def]
    base = cached_policy(TrainBaseConfig(env_id=ENV))[0]
    world = dataclasses.replace(get_task(ENV), reward=None, sim_step=None)  # register_task(ENV)
    d = collect(_act(base, None), ENV, PHYSICS, 4, seed0=SEED * 1000, noise=0.1,
                rng=np.random.default_rng(SEED * 1000))
    real = RealData(d["obs"], d["act"], d["rew"], d["next_obs"])
    cfg = seeded(adapt_config("default"), SEED).for_task(world)
    cfg = dataclasses.replace(cfg, judicial=dataclasses.replace(cfg.judicial, allow_unanchored=allow))
    assert cfg.world_model == "ensemble"
    with blas_threads(1):
        result = adaptation_round(world, base, real, cfg, JudicialAuditor(world, base, cfg.judicial),
                                  fleet="t", slot="device", device="d")[0]
    return base, result


def test_an_unanchored_world_ships_nothing_its_log_cannot_vouch_for() -> None:
    base, allowed = _round(allow=True)
    assert allowed.verdict == "published", allowed.record.reasons
    before = np.asarray(evaluate(_act(base, None), ENV, PHYSICS, EPISODES)["returns"])
    after = np.asarray(evaluate(_act(base, allowed.adapter), ENV, PHYSICS, EPISODES)["returns"])
    harm = compare(before, after, seed=SEED)
    assert harm.worse, harm.as_dict()  # the exploit is real: the other checks let a harm through
    _, shipped = _round(allow=False)
    assert shipped.verdict == "blocked" and shipped.adapter is None
    assert [r.code for r in shipped.record.reasons] == ["no_independent_evidence"]
