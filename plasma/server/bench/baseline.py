"""``bench live --baseline sb3-sac``: SB3's own SAC fine-tuning beside Plasma, on the same device.

After the Plasma runs, for each seed and each physics of the run: load the SAC zip the base
policy came from (``sac.zip`` in the base bundle, or ``--baseline-zip``), and keep training it
with SB3's defaults on the same shifted physics and device-side wrapper, for the real steps the
Plasma device got in that seed (or ``--baseline-steps``). It is evaluated noise-free every
``--baseline-eval-every`` steps and at the step Plasma first reached, on the watcher's episodes
(same count, same seeds: ``plasma.server.basepolicy.EVAL_SEED0``), and scored with the same
``gap_figures`` against the same base and oracle returns as Plasma's device.

PyTorch and SB3 (the ``[baselines]`` extra) are imported here, inside the functions, and only
when the flag is given: the server's round never loads them.
"""

from __future__ import annotations

import logging
import statistics
import sys
from pathlib import Path
from typing import Any, TextIO

from plasma.protocol import ConfigError

from .live import LiveBenchConfig, gap_at, gap_figures, median_steps

__all__ = ["BASELINES", "baseline_result", "check_baseline", "curve_table", "run_baseline"]

log = logging.getLogger(__name__)
BASELINES = ("sb3-sac",)
"""What ``--baseline`` accepts."""
ZIP_NAME = "sac.zip"
"""The SAC model a base bundle made from SB3 keeps beside its ONNX policy."""


def check_baseline(cfg: LiveBenchConfig, model: Path) -> Path:
    """The zip to fine-tune; ConfigError, before any run starts, on an unknown baseline, a
    missing zip, a bad step count or a missing ``[baselines]`` extra."""
    if cfg.baseline not in BASELINES:
        raise ConfigError(f"--baseline {cfg.baseline!r}: expected one of {', '.join(BASELINES)}")
    if cfg.baseline_eval_every < 1:
        raise ConfigError(f"--baseline-eval-every must be >= 1, got {cfg.baseline_eval_every}")
    if cfg.baseline_steps is not None and cfg.baseline_steps < 1:
        raise ConfigError(f"--baseline-steps must be >= 1, got {cfg.baseline_steps}")
    path = Path(cfg.baseline_zip) if cfg.baseline_zip else model / ZIP_NAME
    if not path.is_file():
        where = "--baseline-zip" if cfg.baseline_zip else f"the base bundle {model}"
        raise ConfigError(f"--baseline {cfg.baseline}: no SAC zip at {path} ({where}); pass "
                          "--baseline-zip PATH, or train one with python -m plasma.baselines "
                          "train --env ENV --steps N --out BUNDLE/sac.zip")
    from plasma.baselines import sb3

    sb3._sb3()  # ConfigError naming the extra when PyTorch or SB3 is missing
    return path


def run_baseline(cfg: LiveBenchConfig, zip_path: Path, devices: list[dict[str, Any]],
                 medians: dict[str, dict[str, Any]], out: TextIO | None = None
                 ) -> dict[str, Any]:
    """Fine-tune ``zip_path`` once per seed and physics of ``devices`` (``device_result``
    entries); the per-physics result, with both curves printed to ``out`` (stderr)."""
    from plasma.baselines.sb3 import fine_tune

    runs: list[dict[str, Any]] = []
    for seed in cfg.seeds:
        for text in dict.fromkeys(d["physics"] for d in devices):
            ref = next((d for d in devices if d["seed"] == seed and d["physics"] == text), None)
            if ref is None:
                continue
            steps = cfg.baseline_steps or ref["real_steps"]
            if steps < 1:
                log.warning("baseline: seed %d [%s]: the device made no real steps", seed, text)
                continue
            reach_at = ref["steps_to_reach"]
            log.info("baseline %s: seed %d [%s], %d real steps", cfg.baseline, seed, text, steps)
            run = fine_tune(zip_path, cfg.env_id, steps, physics=text,
                            wrapper=cfg.device_wrapper, seed=seed,
                            eval_every=cfg.baseline_eval_every, episodes=cfg.eval_episodes,
                            at=[reach_at] if reach_at else (), progress=log.info)
            entry = baseline_result(run.curve, ref, cfg.reach)
            entry.update(seed=seed, seconds=round(run.seconds, 1))
            runs.append(entry)
            curve_table(ref, run.curve, cfg.baseline or "", out or sys.stderr)
    return {"method": cfg.baseline, "zip": str(zip_path), "eval_every": cfg.baseline_eval_every,
            "eval_episodes": cfg.eval_episodes, "steps": cfg.baseline_steps,
            "physics": _summary(runs, medians)}


def baseline_result(curve: list[tuple[int, float]], ref: dict[str, Any], reach: float
                    ) -> dict[str, Any]:
    """A baseline curve scored like the Plasma device ``ref`` (its base and oracle returns)."""
    base, oracle = ref["base_return"], ref["oracle_return"]
    figures = gap_figures(curve, base, oracle, reach)
    plasma_reach = ref["steps_to_reach"]
    sac_reach = figures["steps_to_reach"]
    return {
        "physics": ref["physics"], "device": ref["device"], "steps": curve[-1][0] if curve else 0,
        "base_return": base, "oracle_return": oracle,
        "final_return": curve[-1][1] if curve else None, "gap_closed": figures["gap_closed"],
        "steps_to_reach": sac_reach, "steps_to_hold": figures["steps_to_hold"],
        "plasma_steps_to_reach": plasma_reach,
        "ratio": sac_reach / plasma_reach if sac_reach is not None and plasma_reach else None,
        "sac_gap_at_plasma_reach": (gap_at(curve, base, oracle, plasma_reach)
                                    if plasma_reach is not None else None),
        "curve": [[s, round(r, 1)] for s, r in curve],
    }


def _summary(runs: list[dict[str, Any]], medians: dict[str, dict[str, Any]]
             ) -> dict[str, dict[str, Any]]:
    """Per physics: the runs, their medians over seeds, and the ratio to Plasma's medians (SAC
    steps to reach / Plasma's; when SAC never reaches, its gap at Plasma's steps to reach)."""
    out: dict[str, dict[str, Any]] = {}
    for text in dict.fromkeys(r["physics"] for r in runs):
        group = [r for r in runs if r["physics"] == text]
        gaps = [r["gap_closed"] for r in group if r["gap_closed"] is not None]
        at_reach = [r["sac_gap_at_plasma_reach"] for r in group
                    if r["sac_gap_at_plasma_reach"] is not None]
        sac_reach = median_steps([r["steps_to_reach"] for r in group])
        plasma_reach = medians.get(text, {}).get("steps_to_reach")
        out[text] = {
            "runs": group,
            "steps_to_reach": sac_reach,
            "steps_to_hold": median_steps([r["steps_to_hold"] for r in group]),
            "gap_closed": statistics.median(gaps) if gaps else None,
            "plasma_steps_to_reach": plasma_reach,
            "ratio": sac_reach / plasma_reach if sac_reach is not None and plasma_reach else None,
            "sac_gap_at_plasma_reach": statistics.median(at_reach) if at_reach else None,
        }
    return out


def curve_table(ref: dict[str, Any], curve: list[tuple[int, float]], name: str,
                out: TextIO) -> None:
    """Both curves, real steps against noise-free return ('.' where one has no evaluation)."""
    plasma = {int(s): r for s, r in ref["evaluations"]}
    sac = {int(s): r for s, r in curve}
    lines = [f"seed {ref['seed']} [{ref['physics']}] noise-free return (base "
             f"{_num(ref['base_return'])}, oracle {_num(ref['oracle_return'])}; Plasma reach at "
             f"{ref['steps_to_reach']}):",
             f"{'real steps':>12} {'plasma':>9} {name:>9}"]
    for step in sorted(plasma.keys() | sac.keys()):
        lines.append(f"{step:>12} {_num(plasma.get(step)):>9} {_num(sac.get(step)):>9}")
    print("\n".join(lines), file=out, flush=True)


def _num(value: float | None) -> str:
    return "." if value is None else f"{value:.1f}"
