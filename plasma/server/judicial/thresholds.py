"""The judicial thresholds, kept in one file that only calibration writes.

``thresholds.json`` (beside this module, shipped as package data) holds every threshold of the
audit (``THRESHOLDS``: the ``JudicialConfig`` fields that decide, not the budgets that say how much
evidence to gather) with when and on what it was calibrated. ``JudicialConfig``'s defaults are
read from it, so the product, ``bench audit`` and the tests judge with the same values.

Who writes it: ``plasma-server bench audit --split calibration --write-thresholds`` and nothing
else (``write_thresholds``). Who reads it: everything else, among them the held-out split of
``bench audit``, which also refuses to run when the file was written after its last held-out
result (``bench.heldout``): a threshold changed after looking at held-out figures would make them
calibration figures.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import Any

from plasma.protocol.errors import ConfigError

__all__ = ["SHIPPED", "THRESHOLDS", "Thresholds", "ThresholdsError", "load_thresholds",
           "write_thresholds"]

THRESHOLDS: tuple[str, ...] = (
    "min_gain", "disagreement_quantile", "max_disagreement_ratio", "max_disagreement_increase",
    "support_quantile", "max_out_of_support", "min_penalized_share", "spike_sigmas",
    "max_spike_frac", "max_reward_error", "max_model_error", "max_contradicted", "min_fit_error",
    "max_fit_ratio", "min_heldout_share", "probe_sigma", "min_probe_share", "max_action_rms",
    "max_action_p99", "max_relative_norm", "drop_support", "max_prior_contradicted",
    "max_prior_increase", "min_reward_support_share", "max_device_contradicted",
    "device_model_error", "max_device_loss", "max_prior_loss",
)
"""The ``JudicialConfig`` fields that are thresholds (every one is in the file)."""

SHIPPED = Path(str(resources.files("plasma.server.judicial") / "thresholds.json"))
"""The thresholds the product judges with."""

KIND = "plasma-judicial-thresholds"


class ThresholdsError(ConfigError):
    """A thresholds file that is missing, malformed, or lacks a threshold."""

    code = "bad_thresholds"


@dataclass(frozen=True)
class Thresholds:
    """A thresholds file as read: the values and where they came from."""

    values: Mapping[str, float]
    written_at: datetime
    """When calibration wrote the file (UTC)."""
    calibration: Mapping[str, Any]
    """What the values were calibrated on (split, seeds, budget, summary)."""
    sha256: str
    """Of the file's bytes: names exactly which thresholds a held-out result was judged with."""
    path: Path


def load_thresholds(path: Path | None = None) -> Thresholds:
    """Read a thresholds file (the shipped one by default); every threshold must be present."""
    path = path or SHIPPED
    try:
        raw = path.read_bytes()
        doc = json.loads(raw)
    except (OSError, ValueError) as exc:
        raise ThresholdsError(f"cannot read judicial thresholds {path}: {exc}") from exc
    if not isinstance(doc, dict) or doc.get("kind") != KIND:
        raise ThresholdsError(f"{path} is not a judicial thresholds file (kind {KIND!r})")
    values = doc.get("thresholds")
    if not isinstance(values, dict):
        raise ThresholdsError(f"{path}: no 'thresholds' object")
    missing = [k for k in THRESHOLDS if k not in values]
    unknown = [k for k in values if k not in THRESHOLDS]
    if missing or unknown:
        raise ThresholdsError(f"{path}: missing thresholds {missing}, unknown {unknown}")
    bad = [k for k, v in values.items() if not isinstance(v, (int, float)) or isinstance(v, bool)]
    if bad:
        raise ThresholdsError(f"{path}: thresholds must be numbers: {bad}")
    try:
        written = datetime.fromisoformat(str(doc["written_at"]))
    except (KeyError, ValueError) as exc:
        raise ThresholdsError(f"{path}: no valid 'written_at'") from exc
    return Thresholds({k: float(values[k]) for k in THRESHOLDS}, written,
                      dict(doc.get("calibration") or {}), hashlib.sha256(raw).hexdigest(), path)


def write_thresholds(path: Path, values: Mapping[str, float], calibration: Mapping[str, Any],
                     *, now: datetime | None = None) -> Thresholds:
    """Write a thresholds file (calibration only). ``values`` must name every threshold."""
    missing = [k for k in THRESHOLDS if k not in values]
    if missing:
        raise ThresholdsError(f"cannot write thresholds without {missing}")
    doc = {"kind": KIND, "schema": 1,
           "written_at": (now or datetime.now(timezone.utc)).isoformat(timespec="seconds"),
           "written_by": "plasma-server bench audit --split calibration --write-thresholds",
           "calibration": dict(calibration),
           "thresholds": {k: float(values[k]) for k in THRESHOLDS}}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    tmp.replace(path)
    return load_thresholds(path)
