"""``plasma-edge bench rss``: resident memory of a real ``plasma-edge run`` process.

Starts the daemon as a child process exactly as an operator would (same entry point, the
given bundle, environment and broker), lets it act for ``seconds``, reads
``/proc/PID/status`` a few times and stops it with SIGTERM. The trust store holds one
random 32-byte public key (the daemon only needs a valid store to start); the state
directory is a fresh temporary one. Linux only (``/proc``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["bench_rss", "read_status"]

_FIELDS = ("VmRSS", "VmHWM", "RssAnon", "RssFile")


def read_status(pid: int) -> dict[str, float]:
    """MB figures of ``_FIELDS`` from /proc/PID/status."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in _FIELDS:
            out[key] = int(value.split()[0]) / 1024.0
    return out


def bench_rss(broker: str, model: str, env: str = "Pendulum-v1", seconds: float = 12.0,
              samples: int = 5, extra: tuple[str, ...] = ()) -> dict[str, Any]:
    if not Path("/proc/self/status").exists():
        raise RuntimeError("bench rss reads /proc/PID/status: Linux only")
    with tempfile.TemporaryDirectory(prefix="plasma-rss-") as tmp:
        trust = Path(tmp) / "trust"
        trust.mkdir()
        (trust / "bench.pub").write_text(os.urandom(32).hex() + "\n")
        argv = [sys.executable, "-m", "plasma.edge.cli", "run", "--broker", broker,
                "--fleet", "rssbench", "--device", f"d{os.getpid()}", "--model", model,
                "--trust", str(trust), "--state", str(Path(tmp) / "state"), "--env", env,
                *extra]
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True)
        readings = []
        try:
            time.sleep(seconds / 2)
            for _ in range(samples):
                if proc.poll() is not None:
                    break
                readings.append(read_status(proc.pid))
                time.sleep(seconds / 2 / samples)
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                _, err = proc.communicate(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                _, err = proc.communicate()
        if not readings or proc.returncode != 0:
            tail = (err or "").strip().splitlines()[-3:]
            raise RuntimeError(f"the daemon stopped (exit {proc.returncode}): {' | '.join(tail)}")
    med = {k: round(float(np.median([r[k] for r in readings])), 1) for k in _FIELDS}
    return {"env": env, "seconds": seconds, "samples": len(readings),
            "rss_mb": med["VmRSS"], "peak_rss_mb": round(max(r["VmHWM"] for r in readings), 1),
            "rss_anon_mb": med["RssAnon"], "rss_file_mb": med["RssFile"],
            "exit_code": proc.returncode}
