"""Smoke runs of the whole closed loop on a tiny budget: ``run_demo`` with one device daemon and
a ``plasma-server run`` process, over a real Mosquitto and over the embedded amqtt broker.

What must hold: telemetry flows (episode returns are logged), the server's judicial audit
approves at least one packet, the device verifies and merges it (an ``accepted`` record) and
every process exits cleanly. Each run is about 80 s of wall time.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.ports import free_port

pytest.importorskip("gymnasium")
pytest.importorskip("matplotlib")

from plasma.server.tools.demo import DemoConfig, run_demo

DURATION_S = 40.0
"""The first round runs after 200 real steps (4 s at 50 Hz) and takes 5-10 s; 40 s leaves room
for a slow machine and the evaluations."""


def small_demo(broker: str, out: Path) -> dict[str, Any]:
    # m=1.6,g=12: the base policy loses about 550 there, so an honest first round has a gain
    return run_demo(DemoConfig(broker=broker, devices=1, physics=("m=1.6,g=12",),
                               duration_s=DURATION_S, out_dir=str(out), fleet="smoke",
                               budget="small", eval_episodes=5, rate_hz=100.0))


def check(summary: dict[str, Any], out: Path) -> None:
    assert not summary["interrupted"], summary
    assert all(code == 0 for code in summary["exit_codes"].values()), summary["exit_codes"]
    dev = summary["devices"]["dev-0"]
    assert dev["episodes"] >= 10, dev  # 100 Hz x 40 s / 200 steps per episode, about 20
    assert dev["return_first_episodes"] is not None
    assert dev["packets"].get("accepted", 0) >= 1, dev
    assert dev["active_versions"]["device"] >= 1, dev
    assert dev["noise_free_final"] > dev["noise_free_base"] + 100, dev  # the packet helped
    assert json.loads((out / "summary.json").read_text())["devices"]["dev-0"]["episodes"] >= 10
    assert (out / "returns.png").stat().st_size > 1000


@pytest.mark.slow
@pytest.mark.broker
def test_demo_loop_over_mosquitto(mosquitto: Any, tmp_path: Path) -> None:
    out = tmp_path / "demo"
    check(small_demo(mosquitto.url, out), out)


@pytest.mark.slow
def test_demo_loop_over_the_embedded_broker(tmp_path: Path) -> None:
    pytest.importorskip("amqtt")
    port = free_port()  # nothing answers there, so the demo starts amqtt
    out = tmp_path / "demo"
    check(small_demo(f"mqtt://127.0.0.1:{port}", out), out)
