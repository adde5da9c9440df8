"""The product loop learns: a ``plasma-server run`` process and a ``plasma-edge run`` daemon over
a real Mosquitto, the device in heavier, stronger-gravity physics than its policy was trained
for. The noise-free return of the policy active on the device (evaluated outside it, int8,
fixed seeds) must close at least half of the gap to a policy trained for that physics.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("gymnasium")

from plasma.server.bench.live import LiveBenchConfig, bench_live  # noqa: E402


@pytest.mark.slow
@pytest.mark.broker
def test_live_loop_closes_half_the_gap(tmp_path: Path) -> None:
    result = bench_live(LiveBenchConfig(physics=("m=1.6,g=12",), seeds=(0,), duration_s=45.0,
                                        budget="small", eval_episodes=5, out_dir=str(tmp_path),
                                        progress_s=15.0))
    (dev,) = result["devices"]
    assert dev["oracle_return"] > dev["base_return"] + 300, dev  # the shift opens a real gap
    assert dev["packets"] >= 1, dev
    assert dev["gap_closed"] is not None and dev["gap_closed"] >= 0.5, dev
    assert result["rounds"] >= 1 and dev["real_steps"] > 1000
