"""``PlasmaAgent``: clear errors for bad input, a blocked or untrusted packet never merges, and
``evolve`` closes at least half the gap on a shifted Pendulum (noise-free, real returns)."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("gymnasium")

from plasma import AgentError, LoRADistiller, PlasmaAgent
from plasma.protocol import SigningKey
from plasma.server.catalog import oracle_return


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_state_dim_must_agree_with_the_env() -> None:
    with pytest.raises(AgentError) as err:
        PlasmaAgent(env="Pendulum-v1", state_dim=4)
    assert err.value.code == "state_dim_mismatch" and "3 dimensions" in str(err.value)


@pytest.mark.parametrize("env, code", [("CartPole-v1", "bad_env"), ("NoSuchEnv-v0", "bad_env"),
                                       ("Pendulum-v1:mass=2", "bad_env"),
                                       ("MountainCarContinuous-v0:nope=1", "bad_env")])
def test_bad_envs_are_typed_errors(env: str, code: str) -> None:
    with pytest.raises(AgentError) as err:
        PlasmaAgent(env=env)
    assert err.value.code == code, err.value


def test_a_gymnasium_env_object_and_a_missing_policy() -> None:
    import gymnasium as gym

    agent = PlasmaAgent(env=gym.make("Pendulum-v1", g=12.0))
    assert agent.env_id == "Pendulum-v1" and agent.physics == {"g": 12.0}
    agent.close()
    with pytest.raises(AgentError) as err:
        PlasmaAgent(env="Pendulum-v1", policy="/nonexistent/bundle")
    assert err.value.code == "bad_policy"


def test_a_policy_by_name_and_errors_in_the_library_s_words(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """``policy=`` takes a bundle's name (shipped or in PLASMA_MODELS); a missing one names
    ``policy=`` and PLASMA_MODELS, never a command-line flag."""
    from plasma.protocol.catalog import MODELS_ENV, resolve_bundle, shipped_dir

    monkeypatch.delenv(MODELS_ENV, raising=False)
    agent = PlasmaAgent(env="Pendulum-v1", policy="pendulum-g14")
    assert agent.bundle.root == shipped_dir() / "pendulum-g14"
    agent.close()
    for kwargs in ({"env": "Pendulum-v1", "policy": "no-such-policy"},
                   {"env": "MountainCarContinuous-v0"}):  # no bundle for its default policy
        with pytest.raises(AgentError) as err:
            PlasmaAgent(**kwargs)
        text = str(err.value)
        assert err.value.code == "no_policy", text
        assert "policy=" in text and MODELS_ENV in text and "--model" not in text, text
    shutil.copytree(resolve_bundle("pendulum-g14"), tmp_path / "mine" / "my-policy")
    monkeypatch.setenv(MODELS_ENV, str(tmp_path / "mine"))
    agent = PlasmaAgent(env="Pendulum-v1", policy="my-policy")
    assert agent.bundle.root == tmp_path / "mine" / "my-policy"
    agent.close()


def test_think_act_and_an_untrusted_packet_never_merges() -> None:
    agent = PlasmaAgent(env="Pendulum-v1:m=1.3")
    agent.initialize_state()
    sim = run(agent.think())
    assert len(sim.paths) == 1 + agent.num_simulations and 0.0 <= sim.success_probability <= 1.0
    assert sim.paths[0].obs.shape == (agent.horizon + 1, 3)
    trace = run(agent.act(sim))
    assert len(trace.action_taken) == 1 and np.isfinite(trace.reward)
    stranger = LoRADistiller(agent.policy, SigningKey.generate(), agent.bundle.base_sha256,
                             fleet=agent.fleet, device=agent.device_id)
    packet = stranger.distill_from_simulation(sim)
    record = stranger.inject_to_edge_agent(packet, agent.device)
    assert record is not None and record.verdict == "rejected"
    assert record.reasons[0].code == "unknown_key" and agent.device.versions == (0, 0)
    too_early = run(agent.learn(sim))  # one transition: a clear refusal, nothing merged
    assert too_early.verdict == "blocked" and too_early.target_layers == ()
    assert too_early.record.reasons[0].code == "too_few_transitions"
    agent.close()


def test_a_blocked_candidate_does_not_merge(monkeypatch: pytest.MonkeyPatch) -> None:
    agent = PlasmaAgent(env="Pendulum-v1:m=1.3", budget="small")
    run(agent.evolve(steps=0))
    for _ in range(120):
        run(agent.act())
    real_round = agent.learner.round

    def blocked(*args: Any, **kwargs: Any) -> Any:
        result = real_round(*args, **kwargs)
        result.adapter = None  # what a judicial block returns
        return result

    monkeypatch.setattr(agent.learner, "round", blocked)
    result = run(agent.learn())
    assert result.packet is None and not result.merged and agent.device.versions == (0, 0)
    agent.close()


@pytest.mark.slow
def test_evolve_closes_half_the_gap() -> None:
    agent = PlasmaAgent(env="Pendulum-v1:m=1.6,g=12", seed=0)
    agent.initialize_state()
    base = run(agent.evaluate(episodes=5))
    oracle = oracle_return("Pendulum-v1", {"m": 1.6, "g": 12.0}, 5)
    run(agent.evolve(steps=4))  # 800 real steps, four learning rounds
    final = run(agent.evaluate(episodes=5))
    assert oracle - base > 300
    assert final - base >= 0.5 * (oracle - base), (base, final, oracle, agent.records)
    assert any(r.auditor == "edge" and r.verdict == "accepted" for r in agent.records)
    agent.close()
