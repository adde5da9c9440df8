"""deploy/scripts/provision.py: idempotent, owner-only secrets, the exact ACL of docs/design.md section 4."""

from __future__ import annotations

import base64
import hashlib
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

PROVISION = Path(__file__).resolve().parents[2] / "deploy" / "scripts" / "provision.py"


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _snapshot(out: Path) -> dict[str, bytes]:
    keep = ("ca.key", "ca.crt", "broker.key", "client.key", "client.crt", "password", "acl")
    return {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*")
            if p.is_file() and p.name in keep}


def test_idempotent_and_additive(tmp_path: Path, run_provision: Callable[..., dict]) -> None:
    out = tmp_path / "pki"
    run_provision("provision", "--out", str(out), "--fleet", "f1", "--device", "a")
    first = _snapshot(out)
    run_provision("provision", "--out", str(out), "--fleet", "f1", "--device", "a")
    assert _snapshot(out) == first  # nothing re-made: same CA, keys, certs, passwords, ACL
    summary = run_provision("provision", "--out", str(out), "--fleet", "f2", "--device", "b")
    assert summary["users"] == ["plasma-server", "f1.a", "f2.b"]
    after = _snapshot(out)
    assert all(after[k] == v for k, v in first.items() if k != "broker/acl")


def test_secrets_are_owner_only(tmp_path: Path, run_provision: Callable[..., dict]) -> None:
    out = tmp_path / "pki"
    run_provision("provision", "--out", str(out), "--fleet", "f1", "--device", "a")
    for name in ("ca/ca.key", "broker/broker.key", "broker/passwd", "clients/f1.a/client.key",
                 "clients/f1.a/password", "clients/f1.a/broker.env"):
        assert _mode(out / name) == 0o600, name
    for name in ("", "ca", "broker", "clients", "clients/f1.a"):
        assert _mode(out / name) == 0o700, name
    env = (out / "clients/f1.a/broker.env").read_text()
    assert "PLASMA_EDGE_USERNAME=f1.a" in env and "PLASMA_EDGE_PASSWORD=" in env


def test_acl_blocks(tmp_path: Path, run_provision: Callable[..., dict]) -> None:
    out = tmp_path / "pki"
    run_provision("provision", "--out", str(out), "--fleet", "f1", "--device", "a",
                  "--admin", "ops")
    blocks = (out / "broker" / "acl").read_text().split("\n\n")
    assert "user f1.a\n" + "\n".join([
        "topic read plasma/v1/f1/adapter/fleet",
        "topic read plasma/v1/f1/device/a/adapter",
        "topic write plasma/v1/f1/device/a/telemetry",
        "topic write plasma/v1/f1/device/a/status",
        "topic write plasma/v1/f1/device/a/versions",
        "topic write plasma/v1/f1/device/a/audit"]) in [b.strip() for b in blocks]
    text = (out / "broker" / "acl").read_text()
    rules = [ln for ln in text.splitlines() if not ln.startswith("#")]
    assert not any(ln.startswith("pattern") for ln in rules)
    device_block = next(b for b in blocks if b.strip().startswith("user f1.a\n"))
    assert "readwrite" not in device_block and "write plasma/v1/f1/device/a/adapter" \
        not in device_block
    # the server publishes adapters and reads its own retained packets back (version floor)
    assert "topic readwrite plasma/v1/+/device/+/adapter" in text
    assert "topic write plasma/v1/+/server/audit" in text
    assert "topic read plasma/v1/+/device/+/versions" in text
    assert "user ops\ntopic read plasma/v1/#\ntopic read $SYS/#" in text


def test_password_file_is_mosquitto_pbkdf2(tmp_path: Path,
                                           run_provision: Callable[..., dict]) -> None:
    out = tmp_path / "pki"
    run_provision("provision", "--out", str(out), "--fleet", "f1", "--device", "a")
    line = next(ln for ln in (out / "broker/passwd").read_text().splitlines()
                if ln.startswith("f1.a:"))
    _, kind, iterations, salt, digest = line.split(":", 1)[1].split("$")
    password = (out / "clients/f1.a/password").read_bytes().strip()
    assert kind == "7"
    assert base64.b64encode(hashlib.pbkdf2_hmac(
        "sha512", password, base64.b64decode(salt), int(iterations))).decode() == digest


def test_broker_host_reissues_only_the_broker_cert(tmp_path: Path,
                                                   run_provision: Callable[..., dict]) -> None:
    out = tmp_path / "pki"
    run_provision("provision", "--out", str(out), "--fleet", "f1", "--device", "a")
    before = _snapshot(out)
    cert = (out / "broker/broker.crt").read_bytes()
    run_provision("provision", "--out", str(out), "--broker-host", "mqtt.example.org",
                  "--broker-host", "10.0.0.5")
    assert (out / "broker/broker.crt").read_bytes() != cert
    assert _snapshot(out) == before  # the broker key, CA and clients are kept
    from cryptography import x509

    san = x509.load_pem_x509_certificate((out / "broker/broker.crt").read_bytes()) \
        .extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "mqtt.example.org" in san.get_values_for_type(x509.DNSName)


def test_bad_ids_and_help() -> None:
    bad = subprocess.run([sys.executable, str(PROVISION), "provision", "--out", "/nonexistent",
                          "--fleet", "f1", "--device", "../etc"], capture_output=True, text=True)
    assert bad.returncode == 2 and "must match" in bad.stderr
    helped = subprocess.run([sys.executable, str(PROVISION), "--help"], capture_output=True,
                            text=True)
    assert helped.returncode == 0 and "render-conf" in helped.stdout
