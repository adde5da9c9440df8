"""Child processes of the demo and the live bench: started with their logs, stopped together."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from pathlib import Path

__all__ = ["Processes", "cpu_seconds"]

log = logging.getLogger(__name__)


class Processes:
    """Child processes with their logs; stops them all with SIGTERM, then SIGKILL."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.children: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        logf = (self.log_dir / f"{name}.log").open("ab")
        # one BLAS thread per process: a 2-core machine shared by the server and every device
        env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
        proc = subprocess.Popen(argv, stdout=logf, stderr=subprocess.STDOUT,
                                start_new_session=True, env=env)
        self.children[name] = proc
        log.info("started %s (pid %d), log: %s", name, proc.pid, self.log_dir / f"{name}.log")
        return proc

    def check(self) -> list[str]:
        """Names of children that died (with their exit codes)."""
        return [f"{n} exited with {p.returncode}" for n, p in self.children.items()
                if p.poll() is not None]

    def stop(self, timeout: float = 15.0) -> dict[str, int | None]:
        for proc in self.children.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for proc in self.children.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        return {n: p.returncode for n, p in self.children.items()}


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a running process (Linux ``/proc``), None if unreadable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
