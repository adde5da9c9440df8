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

import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

from plasma.protocol.catalog import list_bundles, searched
from plasma.protocol.errors import BundleNotFound, ConfigError

from .basepolicy import EVAL_SEED0, cached_policy, evaluate, train_config
from .policy_net import MLPPolicy
from .tasks import get_task

__all__ = ["find_model", "oracle_return"]

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


def oracle_return(env_id: str, physics: Mapping[str, float], episodes: int,
                  wrapper: str | None = None, models_dirs: Dirs = ()) -> float:
    """Noise-free fp32 return of a policy trained for ``physics`` (a bundle, else cached), in the
    device's world: inside ``wrapper`` (``module:Class``) when the device has one."""
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
