"""Fixtures for edge tests: small random-MLP bundles written by the real exporter."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from plasma.protocol.bundle import Bundle, load_bundle

SIZES = [12, 48, 48, 3]  # small enough that a bundle exports in ~50 ms


def _export(out: Path, sizes: list[int], activation: str, seed: int) -> Path:
    from plasma.server.export import export_bundle, random_mlp_layers

    rng = np.random.default_rng(seed + 1000)
    obs_dim, act_dim = sizes[0], sizes[-1]
    return export_bundle(
        out,
        random_mlp_layers(sizes, seed),
        obs_mean=rng.normal(0, 2, obs_dim),
        obs_std=rng.uniform(0.5, 3, obs_dim),
        act_low=-rng.uniform(0.5, 2, act_dim),
        act_high=rng.uniform(0.5, 2, act_dim),
        hidden_activation=activation,
        obs_low=-10 * np.ones(obs_dim),
        obs_high=10 * np.ones(obs_dim),
        env_id="Test-v0",
        physics={"g": 9.81},
        meta={"seed": seed},
    )


@pytest.fixture
def make_bundle(tmp_path: Path) -> Callable[..., Path]:
    """Factory: make_bundle(sizes=SIZES, activation="tanh", seed=0) -> bundle directory under tmp_path."""
    count = iter(range(1000))

    def make(sizes: list[int] | None = None, activation: str = "tanh", seed: int = 0) -> Path:
        return _export(tmp_path / f"bundle{next(count)}", sizes or SIZES, activation, seed)

    return make


@pytest.fixture(scope="session")
def shared_bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One read-only bundle for tests that do not modify files."""
    return _export(tmp_path_factory.mktemp("shared") / "bundle", SIZES, "tanh", 0)


@pytest.fixture
def bundle(shared_bundle_dir: Path) -> Bundle:
    return load_bundle(shared_bundle_dir)


@pytest.fixture
def bundle_dir(make_bundle: Callable[..., Path]) -> Path:
    """A fresh bundle directory the test may tamper with."""
    return make_bundle()
