#!/usr/bin/env bash
# Everything the test suite needs, on a fresh machine: Mosquitto (the wire tests start
# their own broker on a free port), a virtual environment with the dev extras (and postgres,
# cluster, baselines: PyTorch + SB3 for the SB3 baseline tests); then lint (ruff), types (mypy,
# strict on plasma/protocol and plasma/edge), the install check (the wheel in fresh virtual
# environments outside the checkout: check-install.sh) and pytest. Any failure fails the
# script, so CI (.ci/run) fails on a lint or type error before a test runs.
# Arguments go to pytest; with any, the install check is skipped (run it alone:
# bash deploy/scripts/check-install.sh).
set -euo pipefail
cd "$(dirname "$0")/../.."

if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; then
    echo "installing Mosquitto (apt-get)..."
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq mosquitto mosquitto-clients >/dev/null
fi

# PostgreSQL for the shared-store tests (they start their own server with initdb + pg_ctl;
# as root they run it as the postgres user the package creates).
if ! command -v initdb >/dev/null 2>&1 && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
    echo "installing PostgreSQL (apt-get)..."
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq postgresql >/dev/null
fi

PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -e ".[dev,postgres,cluster,baselines]"
echo "ruff check plasma tests"
.venv/bin/python -m ruff check plasma tests
echo "mypy (pyproject.toml [tool.mypy]: strict on plasma/protocol and plasma/edge)"
.venv/bin/python -m mypy
if [ "$#" -eq 0 ]; then
    echo "install check (deploy/scripts/check-install.sh: the wheel, installed outside the checkout)"
    PYTHON="$PY" bash deploy/scripts/check-install.sh
fi
exec .venv/bin/python -m pytest "$@"
