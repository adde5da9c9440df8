"""The comparing half of ``plasma-server bench guard``: a run's figures against the accepted ones.

A figure is ``{value, unit, direction, bench}`` (``guard.figures_of``); ``compare_runs`` gives
each one's ratio now / accepted and flags it WORSE when it moved more than ``threshold`` the wrong
way for its direction; ``format_table`` prints the rows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["HIGHER", "LOWER", "THRESHOLD", "Row", "compare_runs", "format_table"]

LOWER, HIGHER = "lower_is_better", "higher_is_better"
THRESHOLD = 0.15
"""A figure more than this share worse than the accepted one (in its direction) is WORSE."""


@dataclass(frozen=True)
class Row:
    """One figure in a comparison. ``status``: ok, WORSE, better (more than the threshold the
    right way), MISSING (accepted, not measured by a bench that ran), skipped (its bench did not
    run), new (no accepted value)."""

    name: str
    unit: str
    direction: str
    accepted: float | None
    now: float | None
    ratio: float | None
    """now / accepted."""
    status: str


def _worse_by(accepted: float, now: float, direction: str) -> tuple[float | None, float]:
    """(ratio now / accepted, how much worse in the figure's direction as a share; negative is
    better). An accepted 0 (a count): any increase is infinitely worse (or better)."""
    sign = 1.0 if direction == LOWER else -1.0
    if accepted == 0:
        return (1.0, 0.0) if now == 0 else (None, sign * float("inf") * (1 if now > 0 else -1))
    ratio = now / accepted
    return ratio, sign * (ratio - 1.0)


def compare_runs(accepted: Mapping[str, Any], run: Mapping[str, Any],
                 threshold: float = THRESHOLD, order: Sequence[str] = ()) -> list[Row]:
    """Each figure of either run, named in ``order`` first, then any other by name. A figure's
    unit, direction and bench are those recorded with it (this run's, else the accepted run's)."""
    old, new = accepted.get("figures", {}), run.get("figures", {})
    skipped = set(run.get("skipped", ()))
    names = [n for n in order if n in old or n in new]
    names += sorted((set(old) | set(new)) - set(names))
    rows = []
    for name in names:
        meta = new.get(name) or old[name]
        direction = meta.get("direction", LOWER)
        a = old[name]["value"] if name in old else None
        b = new[name]["value"] if name in new else None
        ratio = None
        if a is None:
            status = "new"
        elif b is None:
            status = "skipped" if meta.get("bench") in skipped else "MISSING"
        else:
            ratio, worse = _worse_by(float(a), float(b), direction)
            status = "WORSE" if worse > threshold else "better" if worse < -threshold else "ok"
        rows.append(Row(name, meta.get("unit", ""), direction, a, b, ratio, status))
    return rows


def _num(value: float | None) -> str:
    if value is None:
        return "-"
    if abs(value) >= 1e4:
        return f"{value:,.0f}"
    return f"{value:.4g}"


def _when(doc: Mapping[str, Any]) -> str:
    load = doc.get("machine", {})
    return (f"{doc.get('date', '?')} ({load.get('cores', '?')} cores, load "
            f"{(load.get('load_start') or ['?'])[0]} -> {(load.get('load_end') or ['?'])[0]})")


def format_table(rows: Sequence[Row], accepted: Mapping[str, Any], run: Mapping[str, Any],
                 threshold: float = THRESHOLD) -> str:
    """The comparison as text: one line per figure, then the WORSE and MISSING names."""
    lines = [f"accepted: {_when(accepted)}", f"now:      {_when(run)}",
             f"WORSE: more than {threshold:.0%} worse in the figure's direction (ratio = now / "
             "accepted; lower is better unless marked ^)", ""]
    width = max([len(r.name) + (2 if r.direction == HIGHER else 0) for r in rows] + [6])
    lines.append(f"{'figure':<{width}}  {'unit':<7} {'accepted':>10} {'now':>10} {'ratio':>6}  flag")
    for r in rows:
        name = r.name + (" ^" if r.direction == HIGHER else "")
        ratio = "-" if r.ratio is None else f"{r.ratio:.2f}"
        flag = "" if r.status == "ok" else r.status
        lines.append(f"{name:<{width}}  {r.unit:<7} {_num(r.accepted):>10} {_num(r.now):>10} "
                     f"{ratio:>6}  {flag}".rstrip())
    worse = [r.name for r in rows if r.status == "WORSE"]
    missing = [r.name for r in rows if r.status == "MISSING"]
    lines.append("")
    lines.append(f"{len(worse)} of {len(rows)} figures more than {threshold:.0%} worse"
                 + (f": {', '.join(worse)}" if worse else ""))
    if missing:
        lines.append(f"missing (bench ran, figure absent): {', '.join(missing)}")
    errors = {n: e["error"] for n, e in run.get("benches", {}).items() if e.get("error")}
    for name, error in errors.items():
        lines.append(f"bench {name} failed: {error}")
    return "\n".join(lines)
