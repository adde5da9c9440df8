"""Fixtures for edge tests: the small prebuilt bundles of tests/fixtures/bundles (no ``onnx``)
and the Pendulum device kit of the daemon tests."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from plasma.protocol.bundle import Bundle, load_bundle
from tests.helpers.bundles import EDGE, PENDULUM_SMALL, bundle_path, copy_bundle
from tests.helpers.daemon import DeviceKit, make_kit


@pytest.fixture
def make_bundle(tmp_path: Path) -> Callable[..., Path]:
    """Factory: make_bundle() -> a private copy of the edge bundle (MLP 12-48-48-3, tanh)."""
    count = iter(range(1000))

    def make() -> Path:
        return copy_bundle(EDGE, tmp_path / f"bundle{next(count)}")

    return make


@pytest.fixture(scope="session")
def shared_bundle_dir() -> Path:
    """One read-only bundle for tests that do not modify files."""
    return bundle_path(EDGE)


@pytest.fixture
def bundle(shared_bundle_dir: Path) -> Bundle:
    return load_bundle(shared_bundle_dir)


@pytest.fixture
def bundle_dir(make_bundle: Callable[..., Path]) -> Path:
    """A fresh bundle directory the test may tamper with."""
    return make_bundle()


@pytest.fixture(scope="module")
def pendulum(tmp_path_factory: pytest.TempPathFactory) -> DeviceKit:
    """The prebuilt random-MLP Pendulum bundle (3-16-16-1), a signing key and a trust store."""
    return make_kit(tmp_path_factory.mktemp("pendulum"), PENDULUM_SMALL,
                    "status_interval = 0.2\nrate_hz = 200\n[canary]\nenabled = false\n"
                    "[telemetry]\nflush_s = 0.5\n")
