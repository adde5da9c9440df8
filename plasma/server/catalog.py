"""The shipped policies: which bundle to start from, and what a policy trained for a physics
scores (the oracle of the adaptation benches and the demo).

Bundles live in ``deploy/models/<name>/`` with a manifest naming their env and physics; a
physics with no shipped bundle is trained once with ``train-base`` and cached under
``~/.cache/plasma``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from .basepolicy import EVAL_SEED0, cached_policy, evaluate, train_config
from .policy_net import MLPPolicy
from .tasks import get_task

__all__ = ["find_model", "model_roots", "oracle_return"]

log = logging.getLogger(__name__)


def model_roots() -> list[Path]:
    """Where shipped bundles are looked for: the repository's deploy/models, then the cwd's."""
    here = Path(__file__).resolve().parents[2] / "deploy" / "models"
    return [p for p in dict.fromkeys((here, Path.cwd() / "deploy" / "models")) if p.is_dir()]


def find_model(env_id: str, physics: dict[str, float]) -> Path:
    """The shipped bundle of ``env_id`` trained at ``physics`` (deploy/models), if any."""
    for root in model_roots():
        for manifest in sorted(root.glob("*/manifest.json")):
            m = json.loads(manifest.read_text())
            if m.get("env_id") == env_id and _same_physics(m.get("physics", {}), physics, env_id):
                return manifest.parent
    raise FileNotFoundError(f"no shipped bundle for {env_id} at {physics or 'nominal'} physics "
                            "in deploy/models: pass --model, or make one with train-base")


def oracle_return(env_id: str, physics: dict[str, float], episodes: int,
                  wrapper: str | None = None) -> float:
    """Noise-free fp32 return of a policy trained for ``physics`` (shipped, else cached), in the
    device's world: inside ``wrapper`` (``module:Class``) when the device has one."""
    try:
        policy = MLPPolicy.load_npz(find_model(env_id, physics) / "policy.npz")
    except FileNotFoundError:
        log.info("training an oracle for %s (cached under ~/.cache/plasma)...", physics)
        policy = cached_policy(train_config(env_id, physics))[0]
    return float(evaluate(lambda o: policy.forward(o.astype(np.float32)), env_id, physics,
                          episodes, EVAL_SEED0, wrapper)["mean"])


def _same_physics(shipped: dict[str, float], wanted: dict[str, float], env_id: str) -> bool:
    task = get_task(env_id)
    return task.physics(shipped) == task.physics(wanted)
