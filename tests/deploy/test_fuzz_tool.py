"""plasma-server fuzz (server/tools/fuzz/): a tiny run is clean, and planted bugs are caught."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import pytest

from plasma.protocol import TelemetryError
from plasma.server.tools import fuzz


def test_short_run_prints_a_clean_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                          ) -> None:
    code = fuzz.main(["--inputs", "400", "--seed", "1", "--out", str(tmp_path / "f")])
    summary = json.loads(capsys.readouterr().out)
    assert code == 0
    assert summary["inputs"] == 400 and summary["crashes"] == 0 and summary["hangs"] == 0
    assert {"max_ms", "inputs_per_s"} <= set(summary)
    assert set(summary["outcomes"]) == {"packet", "telemetry"}
    assert not (tmp_path / "f").exists()  # nothing to save, nothing written


def test_planted_crash_hang_and_wrong_output_are_reported(tmp_path: Path) -> None:
    def buggy(data: bytes) -> object:
        if len(data) % 7 == 0:
            raise KeyError("planted")  # not a TelemetryError: a crash
        if len(data) % 7 == 1:
            time.sleep(0.03)  # over the 20 ms limit: a hang
        if len(data) % 7 == 2:
            return "wrong"
        raise TelemetryError("fine")

    seeds = fuzz.frame_seeds()
    target = fuzz.Target("telemetry", seeds, buggy, TelemetryError,
                         lambda r: "planted wrong output" if r == "wrong" else None,
                         lambda rng: fuzz.restructure_frame(rng, seeds))
    summary = fuzz.fuzz([target], 150, seed=3, out_dir=tmp_path, limit_s=0.02)
    assert summary["crashes"] > 0 and summary["hangs"] > 0
    sites = summary["crash_sites"]
    assert any("KeyError" in s for s in sites) and any("oracle" in s for s in sites)
    saved = sorted(p.name for p in tmp_path.iterdir())
    assert any(n.startswith("crash-telemetry-") and n.endswith(".bin") for n in saved)
    assert any(n.startswith("hang-telemetry-") for n in saved)


def test_mutations_stay_bounded() -> None:
    rng = random.Random(0)
    seeds = fuzz.frame_seeds()
    for _ in range(2000):
        assert len(fuzz.mutate(rng, rng.choice(seeds), seeds)) <= fuzz.MAX_INPUT
