"""The real console scripts: keys -> build -> inspect -> check, and thousands of bad files.

Runs ``plasma-server`` and ``plasma-edge`` as subprocesses (the installed entry points),
always with a timeout, and checks exit statuses: 0 ok, 1 usage error, 2 rejected.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from plasma.protocol import Adapter, save_adapter_npz

TIMEOUT = 120
BASE = "ab" * 32
LINE = re.compile(r"^(?P<file>[^:]+): rejected (?P<code>[a-z0-9_]+): (?P<reason>\S.*)$")


def script(name: str) -> str:
    """The console script next to this interpreter (the venv under test), else on PATH."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    if found is None:
        pytest.fail(f"console script {name} is not installed: pip install -e .")
    return found


def run(tool: str, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([script(tool), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=TIMEOUT, env={**os.environ, "PYTHONWARNINGS": "default"})
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    return proc


@dataclass(frozen=True)
class World:
    root: Path
    keys: Path
    adapter: Path
    fleet_packet: Path
    device_packet: Path
    key_id: str


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    root = tmp_path_factory.mktemp("cli")
    keys = root / "keys"
    gen = run("plasma-server", "keys", "generate", "--out", str(keys))
    assert gen.returncode == 0, gen.stderr
    info = json.loads(gen.stdout)
    assert re.fullmatch(r"[0-9a-f]{32}", info["key_id"])
    assert stat.S_IMODE((keys / "signing.key").stat().st_mode) == 0o600
    assert stat.S_IMODE(keys.stat().st_mode) == 0o700

    rng = np.random.default_rng(0)
    adapter = Adapter(alpha=4.0, rank=2, layers={
        "net.0": (rng.standard_normal((2, 8)).astype(np.float32),
                  rng.standard_normal((6, 2)).astype(np.float32)),
        "net.2": (rng.standard_normal((2, 6)).astype(np.float32),
                  rng.standard_normal((4, 2)).astype(np.float32)),
    })
    npz = save_adapter_npz(adapter, root / "adapter.npz")

    packets = {}
    for slot, extra in (("fleet", []), ("device", ["--device", "dev_7"])):
        out = root / f"{slot}.pkt"
        build = run("plasma-server", "packet", "build", "--adapter", str(npz), "--key",
                    str(keys), "--fleet", "f1", "--slot", slot, "--version", "3",
                    "--base-sha256", BASE, "--out", str(out), *extra)
        assert build.returncode == 0, build.stderr
        built = json.loads(build.stdout)
        assert built["bytes"] == out.stat().st_size and built["key_id"] == info["key_id"]
        assert (built["slot"], built["version"]) == (slot, 3)
        packets[slot] = out
    return World(root, keys, npz, packets["fleet"], packets["device"], info["key_id"])


def test_inspect_prints_the_header_as_json(world: World) -> None:
    proc = run("plasma-server", "packet", "inspect", str(world.device_packet))
    assert proc.returncode == 0, proc.stderr
    header = json.loads(proc.stdout)
    assert (header["fleet"], header["slot"], header["device"], header["version"]) == \
        ("f1", "device", "dev_7", 3)
    assert header["key_id"] == world.key_id and header["base_sha256"] == BASE
    assert header["dtype"] == "int8" and header["rank"] == 2 and header["alpha"] == 4.0
    assert [(layer["name"], layer["in_features"], layer["out_features"])
            for layer in header["layers"]] == [("net.0", 8, 6), ("net.2", 6, 4)]
    assert header["expires_at"] - header["created_at"] == pytest.approx(7 * 24 * 3600)


def test_check_packet_accepts_valid_packets(world: World) -> None:
    proc = run("plasma-edge", "check-packet", str(world.fleet_packet), str(world.device_packet),
               "--trust", str(world.keys), "--fleet", "f1", "--device", "dev_7")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.splitlines() == [
        f"{world.fleet_packet}: accepted version=3 slot=fleet",
        f"{world.device_packet}: accepted version=3 slot=device",
    ]


@pytest.mark.parametrize(("args", "code"), [
    (["--fleet", "f1", "--device", "dev_8"], "wrong_device"),
    (["--fleet", "f2", "--device", "dev_7"], "wrong_fleet"),
    (["--fleet", "f2"], "wrong_fleet"),
])
def test_device_packet_for_another_target_is_rejected(world: World, args: list[str],
                                                      code: str) -> None:
    proc = run("plasma-edge", "check-packet", str(world.device_packet), "--trust",
               str(world.keys), *args)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    match = LINE.match(proc.stdout.strip())
    assert match and match["code"] == code, proc.stdout


def test_one_rejection_among_accepted_gives_exit_2(world: World) -> None:
    bad = world.root / "empty.pkt"
    bad.write_bytes(b"")
    proc = run("plasma-edge", "check-packet", str(world.fleet_packet), str(bad), "--trust",
               str(world.keys))
    assert proc.returncode == 2
    first, second = proc.stdout.splitlines()
    assert first.endswith("accepted version=3 slot=fleet")
    assert second == f"{bad}: rejected truncated: packet is 0 bytes, shorter than its prefix"


def test_untrusted_key_is_rejected(world: World, tmp_path: Path) -> None:
    other = tmp_path / "other"
    assert run("plasma-server", "keys", "generate", "--out", str(other)).returncode == 0
    proc = run("plasma-edge", "check-packet", str(world.fleet_packet), "--trust", str(other))
    assert proc.returncode == 2
    assert LINE.match(proc.stdout.strip())["code"] == "unknown_key"  # type: ignore[index]


def _mutants(packet: bytes, out: Path) -> dict[str, set[str]]:
    """Write >= 3,000 broken copies; name -> the codes each may be rejected with."""
    rng = np.random.default_rng(1234)
    expected: dict[str, set[str]] = {}

    def put(name: str, data: bytes, codes: set[str]) -> None:
        (out / name).write_bytes(data)
        expected[name] = codes

    signed_or_structural = {"bad_magic", "unsupported_format", "bad_length", "truncated",
                            "bad_signature", "unknown_key", "digest_mismatch",
                            "signature_missing"}
    for pos in range(len(packet)):  # every byte, two different bits each
        for bit in (pos % 8, (pos + 3) % 8):
            buf = bytearray(packet)
            buf[pos] ^= 1 << bit
            put(f"flip-{pos}-{bit}.pkt", bytes(buf), signed_or_structural)
    for n in range(len(packet)):  # every truncation
        put(f"trunc-{n}.pkt", packet[:n], {"truncated"})
    for i in range(200):  # appended bytes
        put(f"append-{i}.pkt", packet + rng.bytes(1 + i), {"bad_length"})
    for i in range(300):  # random files, some with a valid magic
        data = rng.bytes(int(rng.integers(0, 3000)))
        if i % 3 == 0:
            data = b"PLSM\x01\x00\x00\x00" + data
        put(f"random-{i}.bin", data, signed_or_structural | {"bad_header"})
    put("empty.pkt", b"", {"truncated"})
    put("huge.pkt", b"PLSM" + bytes(300 * 1024), {"too_large"})
    (out / "a-directory").mkdir()
    expected["a-directory"] = {"unreadable"}
    expected["missing.pkt"] = {"unreadable"}
    return expected


def test_thousands_of_broken_files_in_one_call(world: World, tmp_path: Path) -> None:
    expected = _mutants(world.fleet_packet.read_bytes(), tmp_path)
    names = list(expected)
    assert len(names) >= 3000, len(names)
    start = time.monotonic()
    proc = run("plasma-edge", "check-packet", *names, "--trust", str(world.keys), "--fleet",
               "f1", "--device", "dev_7", cwd=tmp_path)
    elapsed = time.monotonic() - start
    assert proc.returncode == 2, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == len(names)
    seen: dict[str, int] = {}
    for name, line in zip(names, lines):
        match = LINE.match(line)
        assert match, line
        assert match["file"] == name, line
        assert match["code"] in expected[name], line
        seen[match["code"]] = seen.get(match["code"], 0) + 1
    print(f"\n{len(names)} broken files checked in {elapsed:.1f} s: {sorted(seen.items())}")
    assert {"bad_magic", "truncated", "bad_length", "bad_signature", "unknown_key",
            "digest_mismatch", "too_large", "unreadable"} <= set(seen)
    assert elapsed < 60


# ---------------------------------------------------------------- usage errors and help


def _usage_cases(w: World) -> list[tuple[str, list[str]]]:
    build = ["packet", "build", "--adapter", str(w.adapter), "--key", str(w.keys), "--fleet",
             "f1", "--out", str(w.root / "never.pkt")]
    return [
        ("plasma-edge", []),
        ("plasma-edge", ["check-packet", str(w.fleet_packet)]),  # no --trust
        ("plasma-edge", ["check-packet", "--trust", str(w.keys)]),  # no file
        ("plasma-edge", ["check-packet", str(w.fleet_packet), "--trust", str(w.root / "no")]),
        ("plasma-edge", ["check-packet", str(w.fleet_packet), "--trust", str(w.adapter)]),
        ("plasma-edge", ["check-packet", str(w.fleet_packet), "--trust", str(w.keys),
                         "--fleet", "a/b"]),
        ("plasma-edge", ["check-packet", str(w.fleet_packet), "--trust", str(w.keys),
                         "--device", "+"]),
        ("plasma-server", []),
        ("plasma-server", ["keys", "generate", "--out", str(w.keys)]),  # already holds a key
        ("plasma-server", ["packet", "inspect", str(w.root / "missing.pkt")]),
        ("plasma-server", ["packet", "inspect", str(w.adapter)]),  # not a packet
        ("plasma-server", [*build, "--slot", "fleet", "--version", "4"]),  # no base digest
        ("plasma-server", [*build, "--slot", "device", "--version", "4", "--base-sha256",
                           BASE]),
        ("plasma-server", [*build, "--slot", "fleet", "--device", "d", "--version", "4",
                           "--base-sha256", BASE]),
        ("plasma-server", [*build, "--slot", "fleet", "--version", "0", "--base-sha256",
                           BASE]),
        ("plasma-server", [*build, "--slot", "edge", "--version", "4", "--base-sha256",
                           BASE]),
        ("plasma-server", [*build, "--slot", "fleet", "--version", "4", "--base-sha256",
                           "nothex"]),
        ("plasma-server", [*build[:2], "--adapter", str(w.fleet_packet), *build[4:],
                           "--slot", "fleet", "--version", "4", "--base-sha256", BASE]),
    ]


def test_usage_errors_exit_1_without_traceback(world: World) -> None:
    cases = _usage_cases(world)
    procs = [(tool, args, subprocess.Popen([script(tool), *args], stdout=subprocess.PIPE,
                                           stderr=subprocess.PIPE, text=True))
             for tool, args in cases]  # run side by side: each start costs ~0.4 s
    for tool, args, proc in procs:
        out, err = proc.communicate(timeout=TIMEOUT)
        assert proc.returncode == 1, (tool, args, proc.returncode, out, err)
        assert "Traceback" not in out + err, (tool, args, err)
        assert "error" in err, (tool, args, err)
    assert not (world.root / "never.pkt").exists()


def test_private_key_readable_by_others_is_a_usage_error(world: World, tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    shutil.copytree(world.keys, keys)
    (keys / "signing.key").chmod(0o644)
    proc = run("plasma-server", "packet", "build", "--adapter", str(world.adapter), "--key",
               str(keys), "--fleet", "f1", "--slot", "fleet", "--version", "4",
               "--base-sha256", BASE, "--out", str(tmp_path / "x.pkt"))
    assert proc.returncode == 1 and "chmod 600" in proc.stderr
    assert not (tmp_path / "x.pkt").exists()


@pytest.mark.parametrize(("tool", "args", "words"), [
    ("plasma-server", ["--help"], ["keys", "packet", "generate", "build", "inspect"]),
    ("plasma-server", ["packet", "--help"], ["build", "inspect"]),
    ("plasma-server", ["keys", "--help"], ["generate"]),
    ("plasma-server", ["packet", "build", "--help"], ["--adapter", "--slot", "--dtype"]),
    ("plasma-edge", ["--help"], ["check-packet", "Exit status"]),
    ("plasma-edge", ["check-packet", "--help"], ["--trust", "--fleet", "--device"]),
])
def test_help_exits_0_and_names_the_subcommands(tool: str, args: list[str],
                                                words: list[str]) -> None:
    proc = run(tool, *args)
    assert proc.returncode == 0, proc.stderr
    for word in words:
        assert word in proc.stdout, (word, proc.stdout)
