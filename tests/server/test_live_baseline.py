"""``bench live``'s figures and flags: the one gap / reach / hold function Plasma's devices and
the SB3 baseline share, the baseline's orchestration (with a stand-in for SB3's fine-tuning),
and the ``--reach``, ``--device-wrapper`` and ``--baseline*`` flags. No broker, no SB3."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("gymnasium")

from plasma.protocol import ConfigError, EnvError  # noqa: E402
from plasma.protocol._cli import UsageError  # noqa: E402
from plasma.protocol.catalog import resolve_bundle  # noqa: E402
from plasma.server.bench import baseline  # noqa: E402
from plasma.server.bench.live import (  # noqa: E402
    LiveBenchConfig,
    _device_argv,
    _medians,
    bench_live,
    device_result,
    gap_at,
    gap_figures,
    median_steps,
)
from plasma.server.tools.watch import DeviceWatch, Evaluation  # noqa: E402

PENDULUM = resolve_bundle("pendulum-nominal")  # shipped (plasma/models)
CURVE = [(0, -800.0), (500, -500.0), (700, -250.0), (900, -300.0), (1100, -240.0)]


@pytest.mark.parametrize("curve, base, oracle, reach, expected", [
    # gaps 0, 0.5, 0.917, 0.833, 0.933: first reached at 700, held only from 1100
    (CURVE, -800.0, -200.0, 0.9, {"steps_to_reach": 700, "steps_to_hold": 1100}),
    (CURVE, -800.0, -200.0, 0.8, {"steps_to_reach": 700, "steps_to_hold": 700}),
    (CURVE, -800.0, -200.0, 0.95, {"steps_to_reach": None, "steps_to_hold": None}),
    (CURVE, -800.0, -900.0, 0.9, {"steps_to_reach": None, "gap_closed": None}),  # no gap
    (CURVE, -800.0, -800.0, 0.9, {"steps_to_reach": None, "gap_closed": None}),
    (CURVE, None, -200.0, 0.9, {"steps_to_hold": None, "gap_closed": None}),
    ([], -800.0, -200.0, 0.9, {"gaps": [], "gap_closed": None, "steps_to_reach": None}),
    ([(0, -100.0)], -800.0, -200.0, 0.9, {"steps_to_reach": 0, "steps_to_hold": 0}),
])
def test_gap_figures(curve: list[tuple[int, float]], base: float | None, oracle: float,
                     reach: float, expected: dict[str, Any]) -> None:
    figures = gap_figures(curve, base, oracle, reach)
    assert {k: figures[k] for k in expected} == expected
    assert len(figures["gaps"]) == len(curve)


def test_gap_figures_values() -> None:
    gaps = gap_figures(CURVE, -800.0, -200.0, 0.9)["gaps"]
    assert gaps == pytest.approx([0.0, 0.5, 550 / 600, 500 / 600, 560 / 600])
    assert gap_figures(CURVE, -800.0, -200.0, 0.9)["gap_closed"] == pytest.approx(560 / 600)


def test_gap_at_takes_the_last_point_at_or_before() -> None:
    assert gap_at(CURVE, -800.0, -200.0, 700) == pytest.approx(550 / 600)
    assert gap_at(CURVE, -800.0, -200.0, 899) == pytest.approx(550 / 600)
    assert gap_at(CURVE, -800.0, -200.0, 5000) == pytest.approx(560 / 600)
    assert gap_at(CURVE[1:], -800.0, -200.0, 100) is None


def test_device_result_uses_the_same_figures() -> None:
    track = DeviceWatch("dev-0", "m=1.6,g=12")
    track.evaluations = [Evaluation(s, {"fleet": 0, "device": i}, r, 0.0)
                         for i, (s, r) in enumerate(CURVE)]
    track.steps = 1234
    result = device_result(track, 0, -200.0, 0.9)
    figures = gap_figures(CURVE, -800.0, -200.0, 0.9)
    assert result["base_return"] == -800.0 and result["real_steps"] == 1234
    for key in ("gap_closed", "steps_to_reach", "steps_to_hold"):
        assert result[key] == figures[key]


def test_median_steps_counts_never_as_the_most() -> None:
    assert median_steps([700, None, 900]) == 900
    assert median_steps([700, None]) is None
    assert median_steps([None]) is None and median_steps([]) is None
    assert median_steps([600, 800]) == 700


def _device(seed: int, physics: str, reach: int | None, real_steps: int = 1500) -> dict[str, Any]:
    return {"device": "dev-0", "physics": physics, "seed": seed, "base_return": -800.0,
            "oracle_return": -200.0, "steps_to_reach": reach, "steps_to_hold": reach,
            "gap_closed": 0.95, "real_steps": real_steps, "first_packet_steps": reach,
            "evaluations": [[0, -800.0], [reach or 1400, -230.0]]}


def test_baseline_result_when_sac_reaches_later() -> None:
    entry = baseline.baseline_result([(0, -790.0), (500, -400.0), (1000, -230.0)],
                                     _device(0, "g=14", 700), 0.9)
    assert entry["steps_to_reach"] == 1000 and entry["plasma_steps_to_reach"] == 700
    assert entry["ratio"] == pytest.approx(1000 / 700)
    assert entry["sac_gap_at_plasma_reach"] == pytest.approx(400 / 600)  # the point at 500
    assert entry["curve"] == [[0, -790.0], [500, -400.0], [1000, -230.0]]


def test_baseline_result_when_sac_never_reaches() -> None:
    entry = baseline.baseline_result([(0, -790.0), (700, -500.0), (1500, -400.0)],
                                     _device(0, "g=14", 700), 0.9)
    assert entry["steps_to_reach"] is None and entry["ratio"] is None
    assert entry["sac_gap_at_plasma_reach"] == pytest.approx(300 / 600)


def test_run_baseline_fine_tunes_each_seed_and_physics(monkeypatch: pytest.MonkeyPatch,
                                                        tmp_path: Path) -> None:
    """Same budget as the device, Plasma's reach step among the evaluations, the device's
    wrapper and physics; medians and ratio per physics; both curves on the table."""
    calls: list[dict[str, Any]] = []

    class Run:
        def __init__(self, curve: list[tuple[int, float]]) -> None:
            self.curve, self.seconds = curve, 1.0

    def fake_fine_tune(zip_path: Path, env_id: str, steps: int, **kw: Any) -> Run:
        calls.append({"zip": zip_path, "env": env_id, "steps": steps, **kw})
        at = list(kw["at"])
        points = sorted({0, *range(kw["eval_every"], steps, kw["eval_every"]), *at, steps})
        return Run([(s, -800.0 + 600.0 * min(1.0, s / 1000)) for s in points])  # reach at 900

    import plasma.baselines.sb3 as sb3

    monkeypatch.setattr(sb3, "fine_tune", fake_fine_tune)
    devices = [_device(0, "m=1.6,g=12", 600), _device(0, "g=14", None, 1800),
               _device(1, "m=1.6,g=12", 450, 1200), _device(1, "g=14", 800)]
    cfg = LiveBenchConfig(physics=("m=1.6,g=12", "g=14"), seeds=(0, 1), eval_episodes=7,
                          device_wrapper="plasma.edge.wrappers:ActionDelay", baseline="sb3-sac")
    out = io.StringIO()
    result = baseline.run_baseline(cfg, tmp_path / "sac.zip", devices, _medians(devices), out)
    assert [(c["physics"], c["seed"], c["steps"], list(c["at"])) for c in calls] == [
        ("m=1.6,g=12", 0, 1500, [600]), ("g=14", 0, 1800, []),
        ("m=1.6,g=12", 1, 1200, [450]), ("g=14", 1, 1500, [800])]
    assert all(c["wrapper"] == cfg.device_wrapper and c["episodes"] == 7 and
               c["eval_every"] == 500 and c["env"] == "Pendulum-v1" for c in calls)
    first = result["physics"]["m=1.6,g=12"]
    assert [r["seed"] for r in first["runs"]] == [0, 1]
    assert [r["steps_to_reach"] for r in first["runs"]] == [1000, 1000]  # 900 not a checkpoint
    assert first["plasma_steps_to_reach"] == 525  # the median of Plasma's 600 and 450
    assert first["ratio"] == pytest.approx(1000 / 525)
    assert first["sac_gap_at_plasma_reach"] == pytest.approx((0.6 + 0.45) / 2)
    second = result["physics"]["g=14"]
    assert second["steps_to_reach"] == 1000
    assert second["plasma_steps_to_reach"] is None and second["ratio"] is None  # one never did
    assert result["method"] == "sb3-sac" and result["eval_every"] == 500
    table = out.getvalue()
    assert "seed 0 [m=1.6,g=12]" in table and "real steps" in table and "sb3-sac" in table
    assert table.count("\n") > 8


def test_curve_table_marks_missing_points() -> None:
    out = io.StringIO()
    baseline.curve_table(_device(0, "g=14", 700), [(0, -790.0), (500, -400.0)], "sb3-sac", out)
    rows = out.getvalue().splitlines()
    assert rows[1].split() == ["real", "steps", "plasma", "sb3-sac"]
    assert rows[2].split() == ["0", "-800.0", "-790.0"]
    assert rows[3].split() == ["500", ".", "-400.0"]
    assert rows[4].split() == ["700", "-230.0", "."]


def test_check_baseline_refuses_what_cannot_run(tmp_path: Path) -> None:
    cfg = LiveBenchConfig(baseline="sb3-sac")
    with pytest.raises(ConfigError, match="no SAC zip at .*sac.zip .*the base bundle"):
        baseline.check_baseline(cfg, tmp_path)
    with pytest.raises(ConfigError, match="no SAC zip at .*nope.zip .*--baseline-zip"):
        baseline.check_baseline(LiveBenchConfig(baseline="sb3-sac",
                                                baseline_zip=str(tmp_path / "nope.zip")), tmp_path)
    with pytest.raises(ConfigError, match="expected one of sb3-sac"):
        baseline.check_baseline(LiveBenchConfig(baseline="ppo"), tmp_path)
    with pytest.raises(ConfigError, match="eval-every"):
        baseline.check_baseline(LiveBenchConfig(baseline="sb3-sac", baseline_eval_every=0),
                                tmp_path)


def test_bench_live_refuses_before_anything_starts(tmp_path: Path) -> None:
    """No sac.zip in the shipped Pendulum bundle, a bad wrapper, a bad reach: refused at once."""
    with pytest.raises(ConfigError, match="no SAC zip"):
        bench_live(LiveBenchConfig(model=str(PENDULUM), baseline="sb3-sac", out_dir=str(tmp_path)))
    with pytest.raises(EnvError, match="cannot import"):
        bench_live(LiveBenchConfig(model=str(PENDULUM), device_wrapper="no_such_mod:W"))
    with pytest.raises(ConfigError, match="reach"):
        bench_live(LiveBenchConfig(model=str(PENDULUM), reach=0.0))
    assert not any(tmp_path.iterdir())


def test_device_argv_carries_the_wrapper(tmp_path: Path) -> None:
    cfg = LiveBenchConfig(device_wrapper="plasma.edge.wrappers:ActionDelay")
    argv = _device_argv(cfg, "mqtt://h:1", "dev-0", "g=14", PENDULUM, tmp_path, tmp_path, 3)
    assert argv[argv.index("--wrapper") + 1] == "plasma.edge.wrappers:ActionDelay"
    assert "--wrapper" not in _device_argv(LiveBenchConfig(), "mqtt://h:1", "dev-0", "g=14",
                                           PENDULUM, tmp_path, tmp_path, 3)


# -- the CLI -------------------------------------------------------------------------------------


def _config(*flags: str) -> LiveBenchConfig:
    from plasma.server.cli import build_parser
    from plasma.server.commands import _live_config

    config: LiveBenchConfig = _live_config(build_parser().parse_args(["bench", "live", *flags]))
    return config


def test_live_flags_defaults() -> None:
    cfg = _config()
    assert (cfg.reach, cfg.device_wrapper, cfg.baseline, cfg.baseline_zip, cfg.baseline_steps,
            cfg.baseline_eval_every) == (0.9, None, None, None, None, 500)


def test_live_flags_parse() -> None:
    cfg = _config("--env", "InvertedPendulum-v5", "--physics", "body_mass.pole=*3;actuator_gear.slide=*0.5",
                  "--reach", "0.8", "--device-wrapper", "plasma.edge.wrappers:ActionDelay",
                  "--baseline", "sb3-sac", "--baseline-zip", "/tmp/x/sac.zip",
                  "--baseline-steps", "1200", "--baseline-eval-every", "250", "--seeds", "0,1")
    assert cfg.env_id == "InvertedPendulum-v5"
    assert cfg.physics == ("body_mass.pole=*3", "actuator_gear.slide=*0.5")
    assert (cfg.reach, cfg.device_wrapper, cfg.baseline, cfg.baseline_zip, cfg.baseline_steps,
            cfg.baseline_eval_every, cfg.seeds) == (
        0.8, "plasma.edge.wrappers:ActionDelay", "sb3-sac", "/tmp/x/sac.zip", 1200, 250, (0, 1))


@pytest.mark.parametrize("flags, message", [
    (("--reach", "1.5"), "--reach must be in"),
    (("--reach", "0"), "--reach must be in"),
    (("--baseline-zip", "a.zip"), "--baseline-zip need --baseline"),
    (("--baseline-steps", "100"), "--baseline-steps need --baseline"),
])
def test_live_flags_refused(flags: tuple[str, ...], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        _config(*flags)


def test_unknown_baseline_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    from plasma.server.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["bench", "live", "--baseline", "ppo"])
    assert exit_.value.code == 1  # EXIT_USAGE
    assert "invalid choice: 'ppo'" in capsys.readouterr().err
