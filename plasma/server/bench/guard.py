"""``plasma-server bench guard``: every quick bench in one run, one JSON, and a comparison with the
last accepted figures (``docs/benchmarks.json``).

Each bench runs as a child process of its own command line (``plasma-edge bench merge``...), with
the command's defaults, exactly as docs/benchmarks.md reports it: a timing bench then measures a
fresh interpreter (no heap, threads or imports left by the bench before it), a figure the guard
flags is reproduced by running the command it names, and a bench that crashes costs its own
figures only. ``rss`` and ``e2e`` share one broker (Mosquitto with the shipped
``set_tcp_nodelay`` when installed, else the embedded amqtt; or ``--broker``); ``live`` starts
its own per seed.

``FIGURES`` is the one table of what is guarded: a figure's name, the bench and result key it
comes from, its unit and whether lower or higher is better. ``compare`` divides each figure by
the accepted one and flags it WORSE when it moved more than ``threshold`` (15 %) the wrong way.
Timing figures depend on the machine and its load: the run records both (cores, load average at
the start and end, per bench at its start) and the guard is a command, never a test: CI stays
free of timing assertions.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .guard_compare import HIGHER, LOWER, THRESHOLD, Row, compare_runs, format_table

__all__ = ["BENCHES", "DEFAULT_BASELINE", "FIGURES", "HIGHER", "LOWER", "THRESHOLD", "Bench", "Figure", "Row",
           "compare", "figures_of", "format_table", "machine_info", "register", "run_guard"]

log = logging.getLogger(__name__)

SCHEMA = 1

_REPO = Path(__file__).resolve().parents[3]
DEFAULT_BASELINE = (_REPO / "docs" / "benchmarks.json" if (_REPO / "docs").is_dir()
                    else Path("docs") / "benchmarks.json")
"""The accepted figures: the source checkout's docs/benchmarks.json (else ./docs/...)."""


@dataclass(frozen=True)
class Bench:
    """One bench as the guard runs it: its command line with the product's defaults."""

    name: str
    command: tuple[str, ...]
    """As a user types it (``plasma-edge bench packet``); run as ``python -m <module> ...``."""
    settings: tuple[str, ...]
    """Keys of its result that say what it measured with (copied into the run's ``settings``)."""
    extra: tuple[str, ...] = ()
    """Flags beyond the command's defaults."""
    broker: bool = False
    """Needs ``--broker URL``."""
    model: bool = False
    """Needs ``--model BUNDLE`` (the shipped nominal Pendulum bundle, as the docs' figure)."""
    quick: bool = True
    """Part of ``--quick`` (only the live run is not: a minute and a half of the product loop)."""
    timeout_s: float = 600.0


BENCHES: tuple[Bench, ...] = (
    Bench("packet", ("plasma-edge", "bench", "packet"), ("model", "rank", "dtype", "n", "packet_bytes")),
    Bench("inference", ("plasma-edge", "bench", "inference"), ("model", "swap", "n")),
    Bench("merge", ("plasma-edge", "bench", "merge"),
          ("swap", "tiered", "rank", "n", "loop_hz", "stall_merge_spacing_ms")),
    Bench("phantom", ("plasma-server", "bench", "phantom"),
          ("paths", "horizon", "members", "physics_model", "physics_members")),
    Bench("e2e", ("plasma-server", "bench", "e2e"),
          ("packets", "full_model_pushes", "rank", "swap", "link_kbps", "packet_bytes",
           "full_model_bytes"), broker=True),
    Bench("rss", ("plasma-edge", "bench", "rss"), ("env", "seconds", "samples"), broker=True,
          model=True, timeout_s=180.0),
    Bench("live", ("plasma-server", "bench", "live"),
          ("env", "budget", "rate_hz", "duration_s", "seeds", "model", "reach", "rounds"),
          extra=("--physics", "m=1.6,g=12", "--seeds", "0", "--duration", "60"), quick=False,
          timeout_s=900.0),
)

_MODULES = {"plasma-edge": "plasma.edge.cli", "plasma-server": "plasma.server.cli"}


@dataclass(frozen=True)
class Figure:
    """One guarded figure: ``bench``'s result at ``key`` (``a/0/b`` walks dicts and lists)."""

    name: str
    bench: str
    key: str
    unit: str
    direction: str
    what: str


FIGURES: tuple[Figure, ...] = (
    Figure("packet.verify_decode_p50_us", "packet", "verify_decode_p50_us", "us", LOWER,
           "verify + decode of a rank-4 int8 packet (7.5 KB), p50"),
    Figure("packet.verify_decode_p99_us", "packet", "verify_decode_p99_us", "us", LOWER,
           "the same, p99"),
    Figure("inference.act_p50_us", "inference", "p50_us", "us", LOWER,
           "act() p50, batch 1, prepacked session"),
    Figure("inference.act_to_bare_ratio", "inference", "overhead_ratio", "x", LOWER,
           "act() p50 / bare session.run p50 in the same run"),
    Figure("inference.tier1_act_p50_us", "inference", "tier1_act_p50_us", "us", LOWER,
           "act() p50 on the non-prepacked session after a swap"),
    Figure("merge.stage_activate_p50_ms", "merge", "merge_activate_p50_ms", "ms", LOWER,
           "stage + activate p50, rank 8, packets 5 ms apart"),
    Figure("merge.stage_activate_p99_ms", "merge", "merge_activate_p99_ms", "ms", LOWER,
           "the same, p99"),
    Figure("merge.max_loop_stall_ms", "merge", "max_loop_stall_ms", "ms", LOWER,
           "longest control-loop gap beyond the period at 50 Hz while merges run"),
    Figure("merge.fidelity_ratio", "merge", "fidelity_ratio", "x", LOWER,
           "merged int8 error / int8 base error"),
    Figure("merge.full_reload_p50_ms", "merge", "full_reload_p50_ms", "ms", LOWER,
           "full model reload (session build), p50"),
    Figure("phantom.model_steps_per_s", "phantom", "model_steps_per_s", "steps/s", HIGHER,
           "5 x (2x200) ensemble, 1,000 paths x 30 steps"),
    Figure("phantom.physics_model_steps_per_s", "phantom", "physics_model_steps_per_s", "steps/s",
           HIGHER, "identified simulator (a round's model with a simulator), 5 members, "
                   "1,000 paths x 30 steps"),
    Figure("e2e.publish_to_active_p50_ms", "e2e", "p50_ms", "ms", LOWER,
           "publish -> swap complete p50, rank 4, loopback broker"),
    Figure("e2e.publish_to_active_p99_ms", "e2e", "p99_ms", "ms", LOWER, "the same, p99"),
    Figure("e2e.full_model_p50_ms", "e2e", "full_model_p50_ms", "ms", LOWER,
           "a whole int8 model pushed the same way, p50"),
    Figure("e2e.full_model_over_packet", "e2e", "speedup_p50", "x", HIGHER,
           "full-model push p50 / packet p50 in the same run"),
    Figure("e2e.rejected", "e2e", "rejected", "count", LOWER, "packets the device rejected"),
    Figure("rss.daemon_rss_mb", "rss", "rss_mb", "MiB", LOWER,
           "resident memory of plasma-edge run (Pendulum-v1, shipped nominal bundle)"),
    Figure("rss.daemon_peak_rss_mb", "rss", "peak_rss_mb", "MiB", LOWER, "its peak (VmHWM)"),
    Figure("live.server_cpu_s_per_round", "live", "server_cpu_s_per_round", "s", LOWER,
           "server CPU per round, default budget (m=1.6,g=12, 60 s, seed 0)"),
    Figure("live.first_packet_steps", "live", "devices/0/first_packet_steps", "steps", LOWER,
           "the device's real steps when its first packet went live"),
    Figure("live.steps_to_reach", "live", "devices/0/steps_to_reach", "steps", LOWER,
           "real steps until an evaluation shows gap closed >= 0.9"),
    Figure("live.gap_closed", "live", "devices/0/gap_closed", "share", HIGHER,
           "gap closed at the end of the run"),
    Figure("live.packet_bytes", "live", "devices/0/packet_bytes", "bytes", LOWER,
           "mean size of the device's accepted packets"),
    Figure("live.rollbacks", "live", "devices/0/rollbacks", "count", LOWER,
           "packets the device rolled back"),
    Figure("live.rejected", "live", "devices/0/rejected", "count", LOWER,
           "packets the device rejected"),
)



# ------------------------------------------------------------------------------ running


def _pick(result: Any, key: str) -> Any:
    for part in key.split("/"):
        if isinstance(result, Mapping):
            result = result.get(part)
        elif isinstance(result, list) and part.isdigit() and int(part) < len(result):
            result = result[int(part)]
        else:
            return None
    return result


def figures_of(bench: str, result: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The guarded figures of one bench result (a missing or non-numeric value is left out)."""
    out = {}
    for fig in FIGURES:
        value = _pick(result, fig.key) if fig.bench == bench else None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[fig.name] = {"value": value, "unit": fig.unit, "direction": fig.direction,
                             "bench": bench, "what": fig.what}
    return out


def argv_of(bench: Bench, broker: str | None, model: str | None) -> list[str]:
    """The bench's command line as run: ``python -m plasma.<side>.cli bench NAME ...``."""
    argv = [sys.executable, "-m", _MODULES[bench.command[0]], *bench.command[1:], *bench.extra]
    if bench.broker:
        argv += ["--broker", broker or ""]
    if bench.model:
        argv += ["--model", model or ""]
    return argv


Runner = Callable[[Bench, Sequence[str]], dict[str, Any]]


def run_subprocess(bench: Bench, argv: Sequence[str]) -> dict[str, Any]:
    """Run one bench command; its JSON result (the last stdout line). RuntimeError with the
    tail of its stderr when it fails."""
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True, timeout=bench.timeout_s)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"timed out after {bench.timeout_s:.0f} s") from None
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    if done.returncode != 0 or not lines:
        tail = " | ".join(done.stderr.strip().splitlines()[-3:])
        raise RuntimeError(f"exit {done.returncode}: {tail or 'no output'}")
    try:
        result = json.loads(lines[-1])
    except json.JSONDecodeError:
        raise RuntimeError(f"not JSON: {lines[-1][:200]}") from None
    if not isinstance(result, dict):
        raise RuntimeError("the bench printed JSON that is not an object")
    return result


def machine_info() -> dict[str, Any]:
    """Cores, CPU model, versions; the load averages are added by ``run_guard``."""
    info: dict[str, Any] = {"cores": os.cpu_count(), "cpu": _cpu_model(),
                            "platform": platform.platform(), "python": platform.python_version()}
    for module in ("numpy", "onnxruntime"):
        try:
            info[module] = __import__(module).__version__
        except ImportError:
            info[module] = None
    return info


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or None


def _load() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def _commit() -> str | None:
    """The source checkout's commit (``+dirty`` with uncommitted changes), None outside git."""
    try:
        head = subprocess.run(["git", "-C", str(_REPO), "rev-parse", "HEAD"], capture_output=True,
                              text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(_REPO), "status", "--porcelain", "--", "plasma"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def select(quick: bool = False, only: Sequence[str] | None = None) -> tuple[list[Bench], list[str]]:
    """(benches to run, names skipped) for ``--quick`` / ``--only``."""
    names = [b.name for b in BENCHES]
    unknown = sorted(set(only or ()) - set(names))
    if unknown:
        raise ValueError(f"unknown bench {', '.join(unknown)} (benches: {', '.join(names)})")
    run = [b for b in BENCHES if (not quick or b.quick) and (not only or b.name in only)]
    return run, [n for n in names if n not in {b.name for b in run}]


def run_guard(benches: Sequence[Bench], skipped: Sequence[str] = (), *, broker: str | None = None,
              model: str | None = None, runner: Runner = run_subprocess, quick: bool = False
              ) -> dict[str, Any]:
    """Run ``benches`` one after another; the run document (see docs/benchmarks.md)."""
    doc: dict[str, Any] = {
        "schema": SCHEMA, "kind": "plasma-bench-guard",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "commit": _commit(), "quick": quick, "threshold": THRESHOLD,
        "machine": {**machine_info(), "load_start": _load()},
        "benches": {}, "skipped": list(skipped), "figures": {},
    }
    needs_broker = any(b.broker for b in benches)
    local, broker_kind = None, f"given: {broker}" if broker else None
    with tempfile.TemporaryDirectory(prefix="plasma-guard-") as tmp:
        try:
            if needs_broker and broker is None:
                from ..tools.broker import start_local

                broker, local, kind = start_local(Path(tmp) / "broker")
                broker_kind = {"mosquitto": "mosquitto with set_tcp_nodelay (the shipped config)",
                               "amqtt": "amqtt (embedded: Mosquitto is not installed)"}.get(kind, kind)
            if model is None and any(b.model for b in benches):
                from ..catalog import find_model

                model = str(find_model("Pendulum-v1", {}))
            for bench in benches:
                doc["benches"][bench.name] = entry = _run_one(bench, broker, model, runner)
                if bench.broker:
                    entry["settings"]["broker"] = broker_kind
                doc["figures"].update(figures_of(bench.name, entry["result"] or {}))
        finally:
            if local is not None:
                local.terminate()
                local.wait(10)
    doc["machine"]["load_end"] = _load()
    return doc


def _run_one(bench: Bench, broker: str | None, model: str | None, runner: Runner
             ) -> dict[str, Any]:
    argv = argv_of(bench, broker, model)
    shown = " ".join([*bench.command, *argv[2 + len(bench.command):]])
    entry: dict[str, Any] = {"command": shown, "load_start": next(iter(_load()), None), "error": None,
                             "result": None, "settings": {}}
    log.info("guard: %s (load %s)", shown, entry["load_start"])
    t0 = time.monotonic()
    try:
        result = runner(bench, argv)
    except (RuntimeError, OSError) as exc:
        entry["error"] = str(exc)
        log.error("guard: %s failed: %s", bench.name, exc)
    else:
        entry["result"] = result
        entry["settings"] = {k: result[k] for k in bench.settings if k in result}
    entry["wall_s"] = round(time.monotonic() - t0, 1)
    return entry


# ------------------------------------------------------------------------------ comparing


def compare(accepted: Mapping[str, Any], run: Mapping[str, Any], threshold: float = THRESHOLD
            ) -> list[Row]:
    """Each figure of the accepted run against this run, in ``FIGURES`` order then any other
    (``guard_compare.compare_runs``)."""
    return compare_runs(accepted, run, threshold, order=[f.name for f in FIGURES])


# ------------------------------------------------------------------------------ command line


def _load_json(path: Path, what: str) -> dict[str, Any]:
    from plasma.protocol._cli import UsageError

    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        hint = " (accept a run first: plasma-server bench guard --accept)" if what == "accepted" else ""
        raise UsageError(f"no {what} figures at {path}{hint}") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise UsageError(f"cannot read {what} figures {path}: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("figures"), dict):
        raise UsageError(f"{path} is not a bench guard run (no 'figures' object)")
    return doc


def write_json(doc: Mapping[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    tmp.replace(path)


def _cli(args: argparse.Namespace) -> int:
    from plasma.protocol._cli import UsageError

    if args.threshold <= 0:
        raise UsageError("--threshold must be positive")
    only = [n.strip() for n in args.only.split(",") if n.strip()] if args.only else None
    if args.run_file:
        run = _load_json(Path(args.run_file), "run")
    else:
        try:
            benches, skipped = select(args.quick, only)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        run = run_guard(benches, skipped, broker=args.broker, quick=args.quick)
    if args.out:
        write_json(run, Path(args.out))
    baseline = Path(args.compare) if args.compare else DEFAULT_BASELINE
    rows: list[Row] = []
    if args.compare:
        accepted = _load_json(baseline, "accepted")
        rows = compare(accepted, run, args.threshold)
        print(format_table(rows, accepted, run, args.threshold), flush=True)
    elif not args.out:
        print(json.dumps(run), flush=True)
    if args.accept:
        failed = [n for n, e in run.get("benches", {}).items() if e.get("error")]
        if run.get("skipped") or failed:
            raise UsageError("only a complete run is accepted: "
                             + "; ".join(filter(None, [
                                 f"skipped {', '.join(run['skipped'])}" if run.get("skipped") else "",
                                 f"failed {', '.join(failed)}" if failed else ""])))
        write_json({**run, "accepted": datetime.now(timezone.utc).isoformat(timespec="seconds")},
                   baseline)
        print(f"accepted: {baseline}", file=sys.stderr)
    bad = any(r.status in ("WORSE", "MISSING") for r in rows)
    return 1 if args.fail_on_regression and bad else 0


def register(bsub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``plasma-server bench guard``."""
    p = bsub.add_parser(
        "guard", help="every quick bench in one run (one JSON); --compare with the accepted "
                      "figures (docs/benchmarks.json)",
        description="Runs packet, inference, merge, phantom, e2e, rss and a 60 s live run, each "
                    "as its own command with its defaults, and collects their figures in one "
                    "JSON. --compare prints each figure's ratio to the accepted one and flags "
                    "every one more than 15% worse. Exit status 0 unless --fail-on-regression.")
    p.add_argument("--out", default=None, metavar="FILE", help="write the run's JSON here "
                   "(default: printed, unless --compare prints the table)")
    p.add_argument("--compare", nargs="?", const=str(DEFAULT_BASELINE), default=None,
                   metavar="BASELINE_JSON",
                   help=f"compare with accepted figures (default {DEFAULT_BASELINE})")
    p.add_argument("--accept", action="store_true",
                   help="write this run as the accepted figures (the --compare file, default "
                        "docs/benchmarks.json); complete runs only")
    p.add_argument("--quick", action="store_true", help="skip the live run (the rest: ~1 minute)")
    p.add_argument("--only", default=None, metavar="NAMES",
                   help=f"comma-separated subset of {','.join(b.name for b in BENCHES)}")
    p.add_argument("--from", dest="run_file", default=None, metavar="RUN_JSON",
                   help="use a saved run (a --out file) instead of measuring")
    p.add_argument("--broker", default=None, metavar="URL",
                   help="broker for rss and e2e (default: a Mosquitto of the guard's own)")
    p.add_argument("--threshold", type=float, default=THRESHOLD,
                   help="share worse that is flagged (default 0.15)")
    p.add_argument("--fail-on-regression", dest="fail_on_regression", action="store_true",
                   help="exit 1 when a figure is WORSE or MISSING")
    p.set_defaults(handler=_cli)
