"""plasma-edge bench rss measures a real daemon process and reports its failures in words."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from plasma.edge.bench.rss import read_status

MODEL = "pendulum-nominal"  # a shipped bundle, by name: the daemon resolves it


def _bench(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "plasma.edge.cli", "bench", "rss", *args],
                          capture_output=True, text=True, timeout=120)


def test_read_status_reads_this_process() -> None:
    own = read_status(__import__("os").getpid())
    assert set(own) == {"VmRSS", "VmHWM", "RssAnon", "RssFile"}
    assert 5 < own["VmRSS"] <= own["VmHWM"]
    assert own["RssAnon"] + own["RssFile"] == pytest.approx(own["VmRSS"], abs=2)


@pytest.mark.broker
@pytest.mark.slow
def test_bench_rss_runs_the_daemon_and_prints_json(mosquitto) -> None:
    done = _bench("--broker", mosquitto.url, "--model", MODEL, "--seconds", "3")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["exit_code"] == 0 and result["samples"] >= 1
    assert 30 < result["rss_mb"] <= result["peak_rss_mb"] < 1000


def test_bench_rss_says_why_the_daemon_stopped(mosquitto) -> None:
    done = _bench("--broker", mosquitto.url, "--model", MODEL, "--env", "nosuch:Thing",
                  "--seconds", "2")
    assert done.returncode == 1
    assert "daemon stopped" in done.stderr and "nosuch" in done.stderr
    assert "Traceback" not in done.stderr
