"""``plasma.baselines.sb3``: evaluation checkpoints, the same evaluation episodes as the live
bench's watcher, and a short real SAC fine-tuning (the ``[baselines]`` extra; skipped without
it)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("gymnasium")

from plasma.baselines import sb3  # noqa: E402
from plasma.protocol import ConfigError  # noqa: E402

DELAY = "plasma.edge.wrappers:ActionDelay"


@pytest.mark.parametrize("steps, every, at, expected", [
    (1000, 500, (), [500, 1000]),
    (1200, 500, (), [500, 1000, 1200]),
    (1200, 500, (711,), [500, 711, 1000, 1200]),
    (1200, 500, (500, 0, 1200, 5000, -3), [500, 1000, 1200]),  # outside or already there
    (300, 500, (), [300]),
    (0, 500, (), []),
])
def test_checkpoints(steps: int, every: int, at: tuple[int, ...], expected: list[int]) -> None:
    assert sb3.checkpoints(steps, every, at) == expected


def test_checkpoints_refuse_a_zero_interval() -> None:
    with pytest.raises(ConfigError):
        sb3.checkpoints(100, 0)


def _policy(obs: np.ndarray) -> np.ndarray:
    """A fixed linear Pendulum controller; batch (n, 3) -> (n, 1), single (3,) -> (1,)."""
    return np.clip(-2.0 * obs[..., 2:3] - 3.0 * obs[..., 1:2], -2.0, 2.0).astype(np.float32)


@pytest.mark.parametrize("wrapper", [None, DELAY])
def test_evaluation_matches_the_watchers(wrapper: str | None) -> None:
    """The baseline's evaluation and the watcher's (``basepolicy.evaluate``, what
    ``edge_return`` calls) play the same episodes: one seed constant, same physics, same
    wrapper."""
    from plasma.server import basepolicy
    from plasma.server.tools.watch import parse_physics

    assert sb3.EVAL_SEED0 is basepolicy.EVAL_SEED0
    text = "m=1.6,g=12"
    ours = sb3.evaluate(_policy, "Pendulum-v1", text, wrapper, episodes=3)["mean"]
    watcher = basepolicy.evaluate(_policy, "Pendulum-v1", parse_physics(text, "Pendulum-v1"), 3,
                                  basepolicy.EVAL_SEED0, wrapper)["mean"]
    assert ours == pytest.approx(watcher, rel=1e-6)
    other = sb3.evaluate(_policy, "Pendulum-v1", text, None if wrapper else DELAY, episodes=3)
    assert other["mean"] != pytest.approx(ours, rel=1e-6)  # the wrapper changes the world


def test_a_bad_wrapper_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="has no Missing"):
        sb3.make_env("Pendulum-v1", "", "plasma.edge.wrappers:Missing")


@pytest.mark.slow
def test_fine_tune_returns_a_curve(tmp_path: Path) -> None:
    """SB3's SAC fine-tuning for 300 real steps on a shifted InvertedPendulum behind the action
    delay: evaluated at 0, every 150 steps and at an extra checkpoint."""
    pytest.importorskip("stable_baselines3")
    pytest.importorskip("mujoco")
    from stable_baselines3 import SAC

    physics = "body_mass.pole=*3"
    zip_path = tmp_path / "sac.zip"
    SAC("MlpPolicy", sb3.make_env("InvertedPendulum-v5"), seed=0).save(str(zip_path))
    lines: list[str] = []
    run = sb3.fine_tune(zip_path, "InvertedPendulum-v5", 300, physics=physics, wrapper=DELAY,
                        seed=0, eval_every=150, episodes=2, at=[220], progress=lines.append)
    assert [s for s, _ in run.curve] == [0, 150, 220, 300]
    assert all(np.isfinite(r) and r > 0 for _, r in run.curve)  # +1 per step alive
    assert run.steps == 300 and run.wrapper == DELAY and run.physics == physics
    assert len(lines) == 3 and "300 steps" in lines[-1]
    assert run.to_json()["curve"][-1][0] == 300
