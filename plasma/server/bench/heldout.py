"""The held-out gate of ``bench audit``: held-out figures are only reported for thresholds that were
fixed before the held-out split was last looked at.

Every held-out run is appended to a ledger (``heldout.json`` beside the thresholds file) with the
sha256 and the write time of the thresholds it judged with. A held-out run refuses to start when
the thresholds file was written after the ledger's last run: the thresholds may have been changed
after seeing held-out figures. ``allow_recalibrated`` runs anyway and records that it did
(``recalibrated_after_heldout``), in the run's JSON and in the ledger.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from plasma.protocol.errors import ConfigError

from ..judicial.thresholds import Thresholds
from .guard import write_json

__all__ = ["HeldoutRefused", "check_heldout", "ledger_for", "record_heldout"]

KIND = "plasma-audit-heldout-ledger"


class HeldoutRefused(ConfigError):
    """The thresholds were written after the last held-out result."""

    code = "heldout_after_recalibration"


def ledger_for(thresholds: Thresholds) -> Path:
    """The ledger kept beside a thresholds file."""
    return thresholds.path.with_name("heldout.json")


def _runs(ledger: Path) -> list[dict[str, Any]]:
    if not ledger.exists():
        return []
    try:
        doc = json.loads(ledger.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read the held-out ledger {ledger}: {exc}") from exc
    if not isinstance(doc, dict) or doc.get("kind") != KIND or not isinstance(doc.get("runs"), list):
        raise ConfigError(f"{ledger} is not a held-out ledger (kind {KIND!r})")
    return list(doc["runs"])


def check_heldout(thresholds: Thresholds, ledger: Path, *, allow_recalibrated: bool = False,
                  heldout_set: str = "") -> dict[str, Any]:
    """Provenance of a held-out run about to start with ``thresholds``; raises ``HeldoutRefused``
    when they were written after the ledger's last held-out run on the same ``heldout_set`` (a
    digest of the held-out instances' definition: retiring seen shifts for fresh ones starts a
    new set, whose figures no earlier threshold was chosen after) unless ``allow_recalibrated``."""
    runs = [r for r in _runs(ledger) if r.get("heldout_set", "") == heldout_set]
    last = datetime.fromisoformat(runs[-1]["ran_at"]) if runs else None
    after = last is not None and thresholds.written_at > last
    if after and not allow_recalibrated:
        raise HeldoutRefused(
            f"the judicial thresholds {thresholds.path} were written at "
            f"{thresholds.written_at.isoformat()}, after the last held-out result "
            f"({last.isoformat() if last else '-'}, ledger {ledger}): held-out figures for them "
            "would be calibration figures. Pass --allow-recalibrated to run anyway; the run and "
            "the ledger then record it")
    return {"thresholds_path": str(thresholds.path), "thresholds_sha256": thresholds.sha256,
            "thresholds_written_at": thresholds.written_at.isoformat(),
            "heldout_set": heldout_set,
            "previous_heldout_at": last.isoformat() if last else None,
            "recalibrated_after_heldout": after}


def record_heldout(ledger: Path, provenance: Mapping[str, Any], summary: Mapping[str, Any],
                   *, now: datetime | None = None) -> dict[str, Any]:
    """Append a finished held-out run to the ledger; returns the entry."""
    runs = _runs(ledger)
    entry = {"ran_at": (now or datetime.now(timezone.utc)).isoformat(timespec="seconds"),
             **provenance, "summary": dict(summary)}
    runs.append(entry)
    write_json({"kind": KIND, "runs": runs}, ledger)
    return entry
