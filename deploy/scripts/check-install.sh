#!/usr/bin/env bash
# Plasma works wherever it is installed: build the wheel, install it into fresh virtual
# environments outside the checkout, and run from a temporary directory what a new user runs.
#
#   server, `pip install "WHEEL[server,demo]"` (the README's install line, from the wheel):
#     - the README's quick start (docs/examples/quickstart.py, copied out), about 1.5 min;
#     - `plasma-server demo --duration 20` with one device, on an embedded broker of its own
#       (a free port, so it never meets another broker); its summary.json must show a packet
#       the device accepted;
#   device, `pip install "WHEEL[env]"` (no server extras):
#     - `plasma-edge run --model pendulum-nominal` (a shipped bundle, by name) for 300 steps
#       against an embedded broker; it must exit 0 and import no plasma.server module.
#
# run-tests.sh (the README's test command, what CI runs) calls it; alone:
#   bash deploy/scripts/check-install.sh        (KEEP=1 keeps the temporary directory)
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
PY="${PYTHON:-python3}"
START=$SECONDS
WORK=$(mktemp -d "${TMPDIR:-/tmp}/plasma-install.XXXXXX")
BROKER_PID=""
unset PYTHONPATH PLASMA_MODELS  # the installed package alone, with its shipped bundles

cleanup() {
    local t=$SECONDS
    if [ -n "$BROKER_PID" ] && kill "$BROKER_PID" 2>/dev/null; then
        for _ in $(seq 50); do kill -0 "$BROKER_PID" 2>/dev/null || break; sleep 0.2; done
        kill -9 "$BROKER_PID" 2>/dev/null || true
        wait "$BROKER_PID" 2>/dev/null || true
    fi
    if [ "${KEEP:-0}" = 1 ]; then echo "check-install: kept $WORK"; else rm -rf "$WORK"; fi
    echo "check-install: cleaned up in $((SECONDS - t)) s"
}
trap cleanup EXIT

step() { printf 'check-install [%3ds] %s\n' "$((SECONDS - START))" "$*"; }
fail() {
    echo "check-install: FAILED: $1" >&2
    [ -n "${2:-}" ] && [ -f "$2" ] && tail -n 40 "$2" >&2
    exit 1
}
free_port() { "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# 1. The wheel, from a copy of the sources: a stale build/ in the checkout cannot leak into it.
step "building the wheel"
mkdir -p "$WORK/src" "$WORK/dist" "$WORK/run"
tar --exclude=__pycache__ -cf - pyproject.toml README.md plasma | tar -xf - -C "$WORK/src"
"$PY" -m venv "$WORK/server"
"$WORK/server/bin/python" -m pip wheel --no-deps -w "$WORK/dist" "$WORK/src" >"$WORK/wheel.log" 2>&1 \
    || fail "pip wheel" "$WORK/wheel.log"
WHEEL=$(ls "$WORK"/dist/plasma-*.whl)
"$PY" - "$WHEEL" <<'EOF' || fail "the wheel lacks the shipped bundles"
import sys, zipfile
names = set(zipfile.ZipFile(sys.argv[1]).namelist())
need = [f"plasma/models/pendulum-nominal/{f}" for f in
        ("manifest.json", "model.int8.onnx", "model.fp32.onnx", "base_weights.npz", "policy.npz")]
missing = [n for n in need if n not in names]
assert not missing, missing
assert not any(n.startswith(("tests/", "deploy/")) for n in names)
print(f"  {sys.argv[1].rsplit('/', 1)[-1]}: {len(names)} files, "
      f"{sum(n.startswith('plasma/models/') for n in names)} under plasma/models")
EOF

# 2. The server and the device environments (the README's install lines, from the wheel).
step "pip install WHEEL[server,demo] into a fresh venv"
"$WORK/server/bin/python" -m pip install "$WHEEL[server,demo]" >"$WORK/pip-server.log" 2>&1 \
    || fail "pip install WHEEL[server,demo]" "$WORK/pip-server.log"
step "pip install WHEEL[env] into a fresh venv (a device)"
"$PY" -m venv "$WORK/device"
"$WORK/device/bin/python" -m pip install "$WHEEL[env]" >"$WORK/pip-device.log" 2>&1 \
    || fail "pip install WHEEL[env]" "$WORK/pip-device.log"

cd "$WORK/run"  # outside the checkout: nothing may come from the current directory
"$WORK/server/bin/python" -c "
import plasma, sys
assert plasma.__file__.startswith('$WORK/server/'), plasma.__file__
" || fail "plasma is not imported from the installed wheel"
"$WORK/server/bin/plasma-server" models list >"$WORK/models.txt" 2>&1 || fail "plasma-server models list" "$WORK/models.txt"
grep -q "^pendulum-nominal .*shipped" "$WORK/models.txt" || fail "models list shows no shipped pendulum-nominal" "$WORK/models.txt"

# 3. The README's quick start.
step "the quick start (docs/examples/quickstart.py), from $WORK/run"
cp "$ROOT/docs/examples/quickstart.py" "$WORK/run/"
timeout 600 "$WORK/server/bin/python" quickstart.py >"$WORK/quickstart.log" 2>&1 \
    || fail "the quick start" "$WORK/quickstart.log"
grep -q "Generated LoRA packet with" "$WORK/quickstart.log" && grep -q "^Completed [0-9]* evolution steps" "$WORK/quickstart.log" \
    || fail "the quick start's output" "$WORK/quickstart.log"
sed 's/^/  /' "$WORK/quickstart.log" | grep -v " INFO \| WARNING " || true

# 4. A short demo on a broker of its own.
PORT=$(free_port)
step "plasma-server demo --duration 20 (embedded broker on port $PORT)"
timeout 300 "$WORK/server/bin/plasma-server" demo --duration 20 --devices 1 --physics "m=1.6,g=12" \
    --broker "mqtt://127.0.0.1:$PORT" --out "$WORK/run/demo" >"$WORK/demo.log" 2>&1 \
    || fail "plasma-server demo" "$WORK/demo.log"
"$WORK/server/bin/python" - "$WORK/run/demo/summary.json" <<'EOF' || fail "the demo's summary" "$WORK/demo.log"
import json, sys
s = json.load(open(sys.argv[1]))
assert s["outcome"] == "completed", s["outcome"]
assert all(code == 0 for code in s["exit_codes"].values()), s["exit_codes"]
accepted = {d: dev["packets"].get("accepted", 0) for d, dev in s["devices"].items()}
assert sum(accepted.values()) >= 1, f"no packet accepted: {s['devices']}"
for d, dev in s["devices"].items():
    print(f"  {d} [{dev['physics']}]: {dev['real_steps']} steps, first packet at step "
          f"{dev['first_packet_steps']}, packets {dev['packets']}, "
          f"noise-free {dev['noise_free_base']} -> {dev['noise_free_final']}, oracle {dev['oracle_return']}")
EOF

# 5. A device-only install: the daemon on a shipped bundle, by name, without server code.
PORT=$(free_port)
step "plasma-edge run --model pendulum-nominal from the device venv (broker on port $PORT)"
"$WORK/server/bin/python" -m plasma.server.tools.broker --host 127.0.0.1 --port "$PORT" >"$WORK/broker.log" 2>&1 &
BROKER_PID=$!
"$WORK/server/bin/plasma-server" keys generate --out "$WORK/keys" >/dev/null
mkdir -p "$WORK/trust" && cp "$WORK/keys/signing.pub" "$WORK/trust/server.pub"
"$WORK/device/bin/plasma-edge" model info pendulum-nominal >"$WORK/model-info.json" 2>&1 \
    || fail "plasma-edge model info pendulum-nominal" "$WORK/model-info.json"
for _ in $(seq 100); do "$PY" -c "import socket; socket.create_connection(('127.0.0.1', $PORT), 0.2)" 2>/dev/null && break; sleep 0.1; done
timeout 120 "$WORK/device/bin/python" - "mqtt://127.0.0.1:$PORT" "$WORK" >"$WORK/device.log" 2>&1 <<'EOF' || fail "the device daemon" "$WORK/device.log"
import importlib.util, sys
from plasma.edge.cli import main  # what the plasma-edge script runs

url, work = sys.argv[1], sys.argv[2]
assert importlib.util.find_spec("onnx") is None, "a device install has onnx"
rc = main(["run", "--broker", url, "--fleet", "install", "--device", "d1", "--model", "pendulum-nominal",
           "--trust", f"{work}/trust", "--state", f"{work}/state", "--env", "Pendulum-v1:m=1.6,g=12",
           "--max-steps", "300", "--rate-hz", "0"])
server = sorted(m for m in sys.modules if m == "plasma.server" or m.startswith("plasma.server."))
assert rc == 0, f"plasma-edge run exited {rc}"
assert not server, f"the device imported server code: {server}"
print(f"device: exit {rc}, {len(sys.modules)} modules, none of plasma.server")
EOF
grep -q "policy .*plasma/models/pendulum-nominal ready" "$WORK/device.log" || fail "the daemon did not load the shipped bundle" "$WORK/device.log"
grep -q "stopped after 300 steps" "$WORK/device.log" || fail "the daemon did not run its 300 steps" "$WORK/device.log"
grep -Eq " [1-9][0-9]* telemetry rows sent" "$WORK/device.log" || fail "no telemetry reached the broker" "$WORK/device.log"
tail -n 1 "$WORK/device.log" | sed 's/^/  /'

step "passed: the wheel installs and runs outside the checkout ($((SECONDS - START)) s)"
