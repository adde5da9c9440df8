"""Test helpers: a real PostgreSQL server of the test's own (initdb + pg_ctl in a temp dir).

initdb refuses to run as root, so as root the server runs as the ``postgres`` system user
(``runuser -u postgres``; Debian's ``postgresql`` package creates it). The cluster is
throw-away: trust authentication on 127.0.0.1 only, fsync off, a free port.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from .ports import free_port

__all__ = ["PostgresServer", "postgres_bin"]


def postgres_bin(name: str) -> str | None:
    """``initdb`` / ``pg_ctl`` from PATH or Debian's versioned directory; None if absent."""
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return candidates[-1] if candidates else None


class PostgresServer:
    """Start with ``start()``; ``new_database()`` gives each test an empty database's URL."""

    def __init__(self, durable: bool = False) -> None:
        """``durable``: PostgreSQL's own defaults (fsync, synchronous commits), for
        measurements; otherwise both are off (a throw-away test cluster)."""
        initdb, pg_ctl = postgres_bin("initdb"), postgres_bin("pg_ctl")
        if initdb is None or pg_ctl is None:
            raise FileNotFoundError("PostgreSQL is not installed (no initdb / pg_ctl)")
        self.initdb, self.pg_ctl = initdb, pg_ctl
        self.root = Path(tempfile.mkdtemp(prefix="plasma-pg-"))
        self.port = free_port()
        self._as: list[str] = []
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres", "postgres")
            self._as = ["runuser", "-u", "postgres", "--"]
        self._n = 0
        self.durable = durable

    def _run(self, *argv: str) -> None:
        subprocess.run([*self._as, *argv], check=True, capture_output=True, timeout=60)

    def start(self) -> None:
        data = self.root / "data"
        self._run(self.initdb, "-D", str(data), "-A", "trust", "-U", "plasma", "-E", "UTF8",
                  "--no-sync", "--no-instructions")
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1"
        if not self.durable:
            options += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        self._run(self.pg_ctl, "-D", str(data), "-o", options, "-l", str(self.root / "log"),
                  "-w", "-t", "30", "start")

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://plasma@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        import psycopg

        self._n += 1
        name = f"t{self._n}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def stop(self) -> None:
        try:
            self._run(self.pg_ctl, "-D", str(self.root / "data"), "-m", "immediate", "stop")
        except subprocess.CalledProcessError:
            pass  # not running (start failed): nothing to stop
        shutil.rmtree(self.root, ignore_errors=True)
