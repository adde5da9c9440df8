"""The policies the commands default to: which bundle to start from, and what a policy trained
for a physics scores (the oracle of the adaptation benches and the demo).

Bundles are found by ``plasma.protocol.catalog``: the user's directories (``--models-dir``,
``PLASMA_MODELS``) first, then the shipped ones (package data of ``plasma.models``). This module
adds what needs the task registry: matching a manifest's physics. A physics with no bundle is
trained once with ``train-base``'s recipe and cached under ``~/.cache/plasma``.

Errors name no flag: ``find_model`` raises ``BundleNotFound`` saying what it looked for and
where; the library (``PlasmaAgent``) and each command line add their own way out
(``policy=``, ``--model``, ``--models-dir``).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from plasma.protocol.catalog import list_bundles, searched
from plasma.protocol.errors import BundleNotFound, ConfigError

from .basepolicy import EVAL_SEED0, cached_policy, evaluate, train_config
from .policy_net import MLPPolicy
from .tasks import get_task, resolve_physics

__all__ = ["find_model", "oracle_return", "recorded_oracle"]

log = logging.getLogger(__name__)

Dirs = str | os.PathLike[str] | Iterable[str | os.PathLike[str]] | None

def find_model(env_id: str, physics: Mapping[str, float], models_dirs: Dirs = (),
               environ: Mapping[str, str] | None = None) -> Path:
    """The first bundle of ``env_id`` trained at ``physics`` ({} = nominal), in search order
    (``models_dirs``, ``PLASMA_MODELS``, the shipped bundles); ``BundleNotFound`` if none."""
    for info in list_bundles(models_dirs, environ):
        if not info.shadowed and info.env_id == env_id and _same_physics(info.physics, physics, env_id):
            return info.path
    text = ",".join(f"{k}={v:g}" for k, v in physics.items()) or "nominal"
    raise BundleNotFound(f"no bundle for {env_id} at {text} physics in "
                         f"{searched(models_dirs, environ)}")


def recorded_oracle(base: Path | None, env_id: str, physics: Mapping[str, float],
                    wrapper: str | None = None) -> dict[str, Any] | None:
    """The oracle recorded beside a base bundle (its ``ORACLES.json``) for this physics and
    device-side wrapper, or None. A recorded oracle is a policy trained on the shifted device
    (an SB3 SAC run for an imported SB3 base): its noise-free return is kept as data so
    ``gap_closed`` has a fixed reference, with how long it trained."""
    path = base / "ORACLES.json" if base is not None else None
    if path is None or not path.is_file():
        return None
    try:
        entries = json.loads(path.read_text())["oracles"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path}: not an oracles file ({exc})") from None
    task = get_task(env_id)
    want = task.physics(physics)
    for entry in entries:
        if entry.get("env_id") == env_id and (entry.get("wrapper") or None) == (wrapper or None) \
                and task.physics(resolve_physics(env_id, entry.get("physics", ""))) == want:
            return dict(entry)
    return None


def oracle_return(env_id: str, physics: Mapping[str, float], episodes: int,
                  wrapper: str | None = None, models_dirs: Dirs = (),
                  base: Path | None = None) -> float:
    """Noise-free return of a policy trained for ``physics``, in the device's world (inside
    ``wrapper``, ``module:Class``, when the device has one): the oracle recorded beside the
    ``base`` bundle when there is one (``recorded_oracle``), else a bundle trained at that
    physics, else one trained and cached by ``train-base``'s recipe."""
    recorded = recorded_oracle(base, env_id, physics, wrapper)
    if recorded is not None:
        return float(recorded["mean_return"])
    try:
        policy = MLPPolicy.load_npz(find_model(env_id, physics, models_dirs) / "policy.npz")
    except (BundleNotFound, FileNotFoundError):  # no bundle, or one without its policy.npz
        log.info("training an oracle for %s (cached under ~/.cache/plasma)...", dict(physics))
        policy = cached_policy(train_config(env_id, dict(physics)))[0]
    return float(evaluate(lambda o: policy.forward(o.astype(np.float32)), env_id, dict(physics),
                          episodes, EVAL_SEED0, wrapper)["mean"])


def _same_physics(shipped: Mapping[str, float], wanted: Mapping[str, float], env_id: str) -> bool:
    task = get_task(env_id)
    want = task.physics(wanted)  # a name the task does not have is the caller's error: raised
    try:
        return task.physics(shipped) == want
    except ConfigError:  # a manifest naming physics the task does not have: not this bundle
        return False
