"""Test helpers: the prebuilt bundles of tests/fixtures/bundles (made by make_bundles.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

BUNDLES = Path(__file__).resolve().parents[1] / "fixtures" / "bundles"

EDGE = "mlp-12-48-48-3"
"""The edge unit tests' bundle: random MLP 12-48-48-3, tanh, off-centre normalisation."""
PENDULUM_SMALL = "pendulum-3-16-16-1"
"""A Pendulum-v1 policy for the edge wire tests."""
PENDULUM = "pendulum-3-32-32-1"
"""A Pendulum-v1 policy for the deploy suites (attacks, faults)."""
ONE_OUTPUT = "mlp-3-16-1"
"""A policy whose last layer has one output."""


def bundle_path(name: str) -> Path:
    """The read-only prebuilt bundle ``name``; copy it before changing any file."""
    path = BUNDLES / name
    if not (path / "manifest.json").exists():
        raise FileNotFoundError(f"{path}: run `python tests/fixtures/make_bundles.py`")
    return path


def copy_bundle(name: str, dest: Path) -> Path:
    """A private copy of the bundle ``name`` at ``dest``, which a test may tamper with."""
    return Path(shutil.copytree(bundle_path(name), dest))
