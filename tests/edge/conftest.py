"""Fixtures for edge tests: the small prebuilt bundle of tests/fixtures/bundles (no ``onnx``)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from plasma.protocol.bundle import Bundle, load_bundle
from tests.helpers.bundles import EDGE, bundle_path, copy_bundle


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
