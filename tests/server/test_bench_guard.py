"""plasma-server bench guard: the figure table, the run document, the comparison and its command
line; bench profile-round's stage accounting. No timing assertions: the benches themselves run
only in the one smoke test (the packet bench, about a second)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from plasma.server.bench import guard
from plasma.server.bench.guard import (
    BENCHES,
    DEFAULT_BASELINE,
    FIGURES,
    HIGHER,
    LOWER,
    compare,
    figures_of,
    format_table,
    run_guard,
    select,
)
from plasma.server.bench.profile import STAGES, StageTimers, _Done, _RoundProfiler, stage_rows
from plasma.server.cli import build_parser, main


def _doc(values: dict[str, float], **extra: Any) -> dict[str, Any]:
    figures = {}
    for name, value in values.items():
        fig = next(f for f in FIGURES if f.name == name)
        figures[name] = {"value": value, "unit": fig.unit, "direction": fig.direction,
                         "bench": fig.bench, "what": fig.what}
    return {"schema": 1, "date": "2026-12-02T00:00:00+00:00", "machine": {"cores": 2},
            "benches": {}, "skipped": [], "figures": figures, **extra}


# ------------------------------------------------------------------------------ the table


def test_figure_table_is_consistent() -> None:
    names = [f.name for f in FIGURES]
    assert len(names) == len(set(names))
    benches = {b.name for b in BENCHES}
    assert {f.bench for f in FIGURES} == benches  # every bench guards something
    for f in FIGURES:
        assert f.direction in (LOWER, HIGHER) and f.unit and f.what
        assert f.name.startswith(f.bench + ".")
    assert [b.name for b in BENCHES if not b.quick] == ["live"]


def test_figures_of_walks_nested_keys_and_skips_non_numbers() -> None:
    live = {"server_cpu_s_per_round": 6.5, "devices": [{"steps_to_reach": None, "gap_closed": 0.99,
                                                         "first_packet_steps": 700, "rollbacks": 0,
                                                         "rejected": False, "packet_bytes": 3200}]}
    got = figures_of("live", live)
    assert got["live.server_cpu_s_per_round"]["value"] == 6.5
    assert got["live.gap_closed"] == {"value": 0.99, "unit": "share", "direction": HIGHER,
                                      "bench": "live", "what": got["live.gap_closed"]["what"]}
    assert got["live.rollbacks"]["value"] == 0
    assert "live.steps_to_reach" not in got  # None: never reached, left out (then MISSING)
    assert "live.rejected" not in got  # a bool is not a figure
    assert figures_of("packet", live) == {}
    assert figures_of("live", {"devices": []}) == {}


def test_select_quick_only_and_unknown() -> None:
    run, skipped = select(quick=True)
    assert "live" not in [b.name for b in run] and skipped == ["live"]
    run, skipped = select(only=["packet", "rss"])
    assert [b.name for b in run] == ["packet", "rss"] and "merge" in skipped
    with pytest.raises(ValueError, match="nosuch"):
        select(only=["nosuch"])


def test_argv_runs_the_documented_command_with_defaults() -> None:
    by = {b.name: b for b in BENCHES}
    argv = guard.argv_of(by["merge"], None, None)
    assert argv[1:] == ["-m", "plasma.edge.cli", "bench", "merge"]  # nothing but the defaults
    argv = guard.argv_of(by["rss"], "mqtt://h:1", "bundle")
    assert argv[2:] == ["plasma.edge.cli", "bench", "rss", "--broker", "mqtt://h:1", "--model",
                        "bundle"]
    argv = guard.argv_of(by["live"], None, None)
    assert argv[2:5] == ["plasma.server.cli", "bench", "live"]
    assert argv[5:] == ["--physics", "m=1.6,g=12", "--seeds", "0", "--duration", "60"]


# ------------------------------------------------------------------------------ comparing


def _rows(accepted: dict[str, float], now: dict[str, float], **kw: Any) -> dict[str, guard.Row]:
    return {r.name: r for r in compare(_doc(accepted), _doc(now, **kw))}


def test_compare_ratio_direction_and_the_15_percent_flag() -> None:
    rows = _rows({"merge.stage_activate_p50_ms": 1.0, "merge.max_loop_stall_ms": 2.0,
                  "merge.full_reload_p50_ms": 1.0, "phantom.model_steps_per_s": 1000.0,
                  "e2e.full_model_over_packet": 2.0, "packet.verify_decode_p50_us": 100.0},
                 {"merge.stage_activate_p50_ms": 1.16, "merge.max_loop_stall_ms": 2.2,
                  "merge.full_reload_p50_ms": 0.5, "phantom.model_steps_per_s": 840.0,
                  "e2e.full_model_over_packet": 1.8, "packet.verify_decode_p50_us": 100.0})
    assert rows["merge.stage_activate_p50_ms"].ratio == pytest.approx(1.16)
    assert rows["merge.stage_activate_p50_ms"].status == "WORSE"  # lower is better: 16 % up
    assert rows["merge.max_loop_stall_ms"].status == "ok"  # 10 % up
    assert rows["merge.full_reload_p50_ms"].status == "better"
    assert rows["phantom.model_steps_per_s"].ratio == pytest.approx(0.84)
    assert rows["phantom.model_steps_per_s"].status == "WORSE"  # higher is better: 16 % down
    assert rows["e2e.full_model_over_packet"].status == "ok"  # 10 % down
    assert rows["packet.verify_decode_p50_us"].status == "ok"
    assert rows["packet.verify_decode_p50_us"].ratio == 1.0


def test_compare_just_inside_the_threshold_is_not_flagged() -> None:
    rows = _rows({"rss.daemon_rss_mb": 100.0, "phantom.model_steps_per_s": 100.0},
                 {"rss.daemon_rss_mb": 114.9, "phantom.model_steps_per_s": 85.1})
    assert rows["rss.daemon_rss_mb"].status == "ok"
    assert rows["phantom.model_steps_per_s"].status == "ok"
    rows = {r.name: r for r in compare(_doc({"rss.daemon_rss_mb": 100.0}),
                                       _doc({"rss.daemon_rss_mb": 112.0}), threshold=0.1)}
    assert rows["rss.daemon_rss_mb"].status == "WORSE"


def test_compare_counts_from_zero() -> None:
    rows = _rows({"e2e.rejected": 0, "live.rollbacks": 0}, {"e2e.rejected": 0, "live.rollbacks": 2})
    assert rows["e2e.rejected"].status == "ok" and rows["e2e.rejected"].ratio == 1.0
    assert rows["live.rollbacks"].status == "WORSE" and rows["live.rollbacks"].ratio is None


def test_compare_reports_missing_skipped_and_new_figures() -> None:
    accepted = {"packet.verify_decode_p50_us": 100.0, "live.steps_to_reach": 550,
                "rss.daemon_rss_mb": 80.0}
    now = {"packet.verify_decode_p50_us": 90.0, "merge.stage_activate_p50_ms": 1.0}
    rows = _rows(accepted, now, skipped=["rss"])
    assert rows["live.steps_to_reach"].status == "MISSING"  # live ran, no figure (never reached)
    assert rows["live.steps_to_reach"].now is None and rows["live.steps_to_reach"].ratio is None
    assert rows["rss.daemon_rss_mb"].status == "skipped"
    assert rows["merge.stage_activate_p50_ms"].status == "new"
    assert [r.name for r in compare(_doc(accepted), _doc(now))] == [  # FIGURES order
        "packet.verify_decode_p50_us", "merge.stage_activate_p50_ms", "rss.daemon_rss_mb",
        "live.steps_to_reach"]


def test_format_table_names_worse_and_missing() -> None:
    accepted = _doc({"merge.stage_activate_p50_ms": 1.0, "phantom.model_steps_per_s": 666000.0,
                     "live.steps_to_reach": 550})
    run = _doc({"merge.stage_activate_p50_ms": 7.19, "phantom.model_steps_per_s": 700000.0},
               benches={"live": {"error": "exit 1: boom"}})
    text = format_table(compare(accepted, run), accepted, run)
    line = next(x for x in text.splitlines() if x.startswith("merge.stage_activate_p50_ms"))
    assert "7.19" in line and "WORSE" in line
    assert "phantom.model_steps_per_s ^" in text and "666,000" in text
    assert "1 of 3 figures more than 15% worse: merge.stage_activate_p50_ms" in text
    assert "missing (bench ran, figure absent): live.steps_to_reach" in text
    assert "bench live failed: exit 1: boom" in text


def test_a_figure_the_accepted_run_lacks_is_new_not_a_failure() -> None:
    accepted = _doc({"phantom.model_steps_per_s": 666000.0})  # accepted before the figure existed
    run = _doc({"phantom.model_steps_per_s": 700000.0,
                "phantom.physics_model_steps_per_s": 2500000.0})
    rows = {r.name: r for r in compare(accepted, run)}
    new = rows["phantom.physics_model_steps_per_s"]
    assert (new.status, new.accepted, new.ratio) == ("new", None, None)
    text = format_table(list(rows.values()), accepted, run)
    line = next(x for x in text.splitlines() if x.startswith("phantom.physics_model_steps_per_s ^"))
    assert line.split()[-1] == "new" and " - " in line and "2,500,000" in line
    header = next(x for x in text.splitlines() if x.startswith("figure"))
    assert line.index("steps/s") == header.index("unit")  # the "^" mark keeps the columns
    assert "0 of 2 figures more than 15% worse" in text


# ------------------------------------------------------------------------------ the run document


def _fake_runner(bench: guard.Bench, argv: Sequence[str]) -> dict[str, Any]:
    if bench.name == "merge":
        raise RuntimeError("exit 1: no merge today")
    return {"packet": {"model": "64-256-256-256-8", "rank": 4, "dtype": "int8", "n": 5000,
                       "packet_bytes": 7479, "verify_decode_p50_us": 80.0,
                       "verify_decode_p99_us": 120.0},
            "rss": {"env": "Pendulum-v1", "seconds": 12.0, "samples": 5, "rss_mb": 79.4,
                    "peak_rss_mb": 80.0, "argv": argv}}[bench.name]


def test_run_document_shape() -> None:
    benches, skipped = select(only=["packet", "merge", "rss"])
    doc = run_guard(benches, skipped, broker="mqtt://127.0.0.1:1", model="bundle",
                    runner=_fake_runner)
    json.dumps(doc)  # plain JSON
    assert doc["schema"] == 1 and doc["kind"] == "plasma-bench-guard" and doc["date"]
    machine = doc["machine"]
    for key in ("cores", "cpu", "python", "onnxruntime", "numpy", "platform"):
        assert key in machine
    assert machine["cores"] == os.cpu_count() and machine["onnxruntime"]
    assert len(machine["load_start"]) == 3 and len(machine["load_end"]) == 3
    assert doc["skipped"] == ["inference", "phantom", "e2e", "live"]
    assert set(doc["benches"]) == {"packet", "merge", "rss"}
    packet = doc["benches"]["packet"]
    assert packet["command"] == "plasma-edge bench packet" and packet["error"] is None
    assert packet["settings"] == {"model": "64-256-256-256-8", "rank": 4, "dtype": "int8",
                                  "n": 5000, "packet_bytes": 7479}
    assert isinstance(packet["wall_s"], float) and isinstance(packet["load_start"], float)
    rss = doc["benches"]["rss"]
    assert rss["command"] == "plasma-edge bench rss --broker mqtt://127.0.0.1:1 --model bundle"
    assert rss["settings"]["broker"] == "given: mqtt://127.0.0.1:1"
    assert doc["benches"]["merge"]["error"] == "exit 1: no merge today"
    assert doc["benches"]["merge"]["result"] is None
    assert set(doc["figures"]) == {"packet.verify_decode_p50_us", "packet.verify_decode_p99_us",
                                   "rss.daemon_rss_mb", "rss.daemon_peak_rss_mb"}
    assert doc["figures"]["rss.daemon_rss_mb"] == {
        "value": 79.4, "unit": "MiB", "direction": LOWER, "bench": "rss",
        "what": next(f.what for f in FIGURES if f.name == "rss.daemon_rss_mb")}
    rows = {r.name: r.status for r in compare(_doc({"merge.stage_activate_p50_ms": 1.0}), doc)}
    assert rows["merge.stage_activate_p50_ms"] == "MISSING"  # its bench failed


@pytest.mark.timeout(60)
def test_smoke_the_packet_bench_through_its_command() -> None:
    benches, skipped = select(only=["packet"])
    doc = run_guard(benches, skipped)
    entry = doc["benches"]["packet"]
    assert entry["error"] is None, entry["error"]
    assert entry["settings"]["rank"] == 4 and entry["settings"]["dtype"] == "int8"
    assert doc["figures"]["packet.verify_decode_p50_us"]["value"] > 0


# ------------------------------------------------------------------------------ command line


def test_cli_parsing() -> None:
    parser = build_parser()
    args = parser.parse_args(["bench", "guard"])
    assert (args.compare, args.accept, args.quick, args.out, args.fail_on_regression) == \
        (None, False, False, None, False)
    assert args.threshold == 0.15
    args = parser.parse_args(["bench", "guard", "--compare", "--quick"])
    assert args.compare == str(DEFAULT_BASELINE) and args.quick
    assert DEFAULT_BASELINE.name == "benchmarks.json" and DEFAULT_BASELINE.parent.name == "docs"
    args = parser.parse_args(["bench", "guard", "--compare", "old.json", "--accept", "--out",
                              "run.json", "--fail-on-regression", "--only", "packet,merge",
                              "--from", "saved.json", "--broker", "mqtt://h:1"])
    assert (args.compare, args.accept, args.out, args.fail_on_regression, args.only,
            args.run_file, args.broker) == ("old.json", True, "run.json", True, "packet,merge",
                                             "saved.json", "mqtt://h:1")
    args = parser.parse_args(["bench", "profile-round", "--transitions", "800", "--markdown"])
    assert args.transitions == 800 and args.markdown and args.physics == "m=1.6,g=12"


def _write(path: Path, doc: dict[str, Any]) -> str:
    path.write_text(json.dumps(doc))
    return str(path)


def test_cli_compare_exit_status_and_accept(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                            ) -> None:
    base = _write(tmp_path / "accepted.json", _doc({"merge.stage_activate_p50_ms": 1.0,
                                                     "rss.daemon_rss_mb": 80.0}))
    run = _write(tmp_path / "run.json", _doc({"merge.stage_activate_p50_ms": 1.5,
                                              "rss.daemon_rss_mb": 80.0}))
    assert main(["bench", "guard", "--from", run, "--compare", base]) == 0  # informative only
    out = capsys.readouterr().out
    assert "WORSE" in out and "1 of 2 figures more than 15% worse" in out
    assert main(["bench", "guard", "--from", run, "--compare", base, "--fail-on-regression"]) == 1
    capsys.readouterr()
    fine = _write(tmp_path / "fine.json", _doc({"merge.stage_activate_p50_ms": 1.1,
                                               "rss.daemon_rss_mb": 80.0}))
    assert main(["bench", "guard", "--from", fine, "--compare", base, "--fail-on-regression"]) == 0
    capsys.readouterr()
    # accept: the run becomes the accepted figures
    assert main(["bench", "guard", "--from", run, "--compare", base, "--accept"]) == 0
    accepted = json.loads(Path(base).read_text())
    assert accepted["figures"]["merge.stage_activate_p50_ms"]["value"] == 1.5 and accepted["accepted"]
    capsys.readouterr()
    # without --compare: the run is printed (or written with --out)
    assert main(["bench", "guard", "--from", run, "--out", str(tmp_path / "copy.json")]) == 0
    assert json.loads((tmp_path / "copy.json").read_text())["figures"] == json.loads(
        Path(run).read_text())["figures"]


def test_cli_refuses_to_accept_an_incomplete_run(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    base = tmp_path / "accepted.json"
    quick = _write(tmp_path / "quick.json", _doc({"rss.daemon_rss_mb": 80.0}, skipped=["live"]))
    assert main(["bench", "guard", "--from", quick, "--compare", str(base), "--accept"]) == 1
    assert "no accepted figures" in capsys.readouterr().err and not base.exists()
    assert main(["bench", "guard", "--from", quick, "--accept", "--out",
                 str(tmp_path / "x.json")]) == 1
    assert "only a complete run is accepted: skipped live" in capsys.readouterr().err
    failed = _write(tmp_path / "failed.json", _doc({}, benches={"merge": {"error": "boom"}}))
    assert main(["bench", "guard", "--from", failed, "--compare", quick, "--accept"]) == 1
    assert "failed merge" in capsys.readouterr().err
    assert main(["bench", "guard", "--from", str(tmp_path / "none.json")]) == 1
    assert main(["bench", "guard", "--only", "nosuch"]) == 1
    assert "unknown bench nosuch" in capsys.readouterr().err


# ------------------------------------------------------------------------------ profile-round


def test_stage_timers_wrap_while_installed_and_split_by_the_stages_around_a_call() -> None:
    from plasma.server import adapt
    from plasma.server.judicial import JudicialAuditor

    timers = StageTimers()
    dagger, review = adapt.phantom_dagger, vars(JudicialAuditor)["review"]
    with timers.installed():
        assert adapt.phantom_dagger is not dagger and vars(JudicialAuditor)["review"] is not review
    assert adapt.phantom_dagger is dagger and vars(JudicialAuditor)["review"] is review
    timed = timers._wrap("adapt:phantom_dagger", lambda x: x + 1)  # a stand-in for the stage
    assert timed(1) == 2 and timed(2) == 3  # the producer's calls
    timers._stack.append("judicial.auditor:JudicialAuditor.review")
    timed(3)  # the review's redistillation
    timers._stack.pop()
    by = {s.label: s for s in STAGES}
    assert timers.stage(by["producer (phantom_dagger)"])[0] == 2
    assert timers.stage(by["review: redistillation (phantom_dagger)"])[0] == 1
    assert timers.stage(by["the round (Learner.round)"]) == (0, 0.0)
    rows = stage_rows(timers)
    assert [r["stage"] for r in rows] == [s.label for s in STAGES]
    assert rows[0]["share"] is None and "cprofile_cpu_s" not in rows[0]  # no round, no profile


def test_cprofile_rows_split_by_caller() -> None:
    from plasma.server import adapt

    code = adapt.phantom_dagger.__code__
    dagger = (code.co_filename, code.co_firstlineno, code.co_name)
    rnd = vars(adapt.Learner)["round"].__code__
    table = {
        (rnd.co_filename, rnd.co_firstlineno, rnd.co_name): (1, 1, 0.1, 10.0, {}),
        dagger: (2, 2, 0.0, 6.0, {(code.co_filename, 1, "adaptation_round"): (1, 1, 0.0, 4.0),
                                  (code.co_filename, 2, "redistill"): (1, 1, 0.0, 2.0)}),
        ("/elsewhere/bench/adapt.py", 1, "round"): (9, 9, 0.0, 99.0, {}),  # another file's round
    }
    rows = {r["stage"]: r for r in stage_rows(StageTimers(), SimpleNamespace(stats=table))}  # type: ignore[arg-type]
    assert rows["the round (Learner.round)"]["cprofile_cpu_s"] == 10.0
    assert rows["the round (Learner.round)"]["cprofile_share"] == 1.0
    assert rows["producer (phantom_dagger)"]["cprofile_cpu_s"] == 4.0
    assert rows["review: redistillation (phantom_dagger)"]["cprofile_cpu_s"] == 2.0
    assert rows["review: redistillation (phantom_dagger)"]["cprofile_share"] == 0.2
    assert rows["distillation (LoRADistiller.fit)"]["cprofile_cpu_s"] == 0.0


class _FakeLearner:
    def __init__(self) -> None:
        self.labels: list[int] = [1, 2]
        self.adapter = None
        self.model = None


def test_round_profiler_runs_the_round_twice_from_the_same_state() -> None:
    learner = _FakeLearner()
    seen: list[list[int]] = []

    def run() -> Any:
        seen.append(list(learner.labels))
        learner.labels.append(len(learner.labels) + 1)  # a round adds labels
        return SimpleNamespace(verdict="published", model_kind="physics")

    hook = _RoundProfiler(transitions=600)
    real = SimpleNamespace(obs=[0] * 300)
    assert hook(learner, real, run).verdict == "published"  # type: ignore[arg-type]
    assert seen == [[1, 2]] and hook.stats is None  # under 600 transitions: just run
    real = SimpleNamespace(obs=[0] * 650)
    with pytest.raises(_Done):
        hook(learner, real, run)  # type: ignore[arg-type]
    assert seen[1] == seen[2] == [1, 2, 3]  # the profiled run started where the plain one did
    assert learner.labels == [1, 2, 3, 4]
    assert hook.out["round"] == 1 and hook.out["transitions"] == 650
    assert hook.out["labels_before"] == 3 and hook.out["verdict_unprofiled"] == "published"
    assert hook.stats is not None


def test_the_accepted_figures_are_a_complete_guard_run() -> None:
    accepted = json.loads(DEFAULT_BASELINE.read_text())
    assert accepted["kind"] == "plasma-bench-guard" and accepted["accepted"]
    assert not accepted["skipped"] and not any(b["error"] for b in accepted["benches"].values())
    for name, fig in accepted["figures"].items():
        table = next(f for f in FIGURES if f.name == name)
        assert (fig["unit"], fig["direction"], fig["bench"]) == (table.unit, table.direction,
                                                                 table.bench)
