#!/usr/bin/env bash
# The main job on a fresh machine: a virtual environment with the demo extras, then
# `plasma-server demo` (it uses a broker answering at --broker, default
# mqtt://127.0.0.1:1883, and otherwise starts the embedded amqtt broker there).
# Extra arguments go to `plasma-server demo`, e.g. --devices 5 --duration 300.
set -euo pipefail
cd "$(dirname "$0")/../.."

PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -e ".[demo]"
exec .venv/bin/plasma-server demo "$@"
