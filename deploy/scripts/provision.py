#!/usr/bin/env python3
"""Provision a Plasma broker: development PKI, per-device credentials and the Mosquitto ACL.

Idempotent: run it again with more devices (or another fleet) and it keeps the CA, the keys,
the certificates and the passwords it already made, adds what is missing and regenerates the
password file and the ACL from every identity under OUT/clients/.  Secrets are written 0600
in 0700 directories.  Needs only Python 3.10+ and `cryptography` (a Plasma dependency).

Layout of OUT::

    ca/ca.key (0600)  ca/ca.crt                      the development CA
    broker/           ca.crt broker.crt broker.key(0600) passwd(0600) acl
                      -> copy to /etc/mosquitto/plasma/ (owner mosquitto)
    clients/USER/     ca.crt client.crt client.key(0600) password(0600) identity.json
                      broker.env(0600): PLASMA_EDGE_USERNAME/PASSWORD for a device,
                      PLASMA_SERVER_... for a server -> the systemd EnvironmentFile

USER is FLEET.DEVICE for a device (ids are [A-Za-z0-9_-], so the dot cannot collide), the
given name for a server worker or the admin.  The ACL (docs/design.md section 4):

    device FLEET.DEVICE  read  plasma/v1/FLEET/adapter/fleet, plasma/v1/FLEET/device/DEVICE/adapter
                         write plasma/v1/FLEET/device/DEVICE/{telemetry,status,audit}
    server               write plasma/v1/+/adapter/fleet, plasma/v1/+/device/+/adapter
                         read  plasma/v1/+/device/+/{telemetry,status,audit}
    admin                read  plasma/# and $SYS/#  (no writes: adapters come from servers)

Examples::

    provision.py provision --out pki --fleet f1 --device d1 --device d2 \\
        --broker-host mqtt.example.org
    provision.py provision --out pki --fleet f1 --device d2 --remove      # revoke d2
    provision.py render-conf --broker-dir pki/broker --data-dir /tmp/m --tls-port 18883 \\
        --local-port 11883 --out /tmp/m/mosquitto.conf                    # for tests
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import hashlib
import ipaddress
import json
import os
import re
import secrets
import shutil
import sys
from pathlib import Path

ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
USER = re.compile(r"[A-Za-z0-9_.-]{1,129}")
ROOT = "plasma/v1"
SHIPPED_CONF = Path(__file__).resolve().parent.parent / "mosquitto" / "mosquitto.conf"
SHIPPED_DIR = "/etc/mosquitto/plasma"
# Mosquitto 2.0's own format ($7$ = PBKDF2-SHA512, 12-byte salt, 101 iterations is its
# default): checked against `mosquitto_passwd -b` output.  Passwords are 256-bit random
# tokens, so the iteration count does not need to slow down guessing.
PBKDF2_ITERATIONS = 101
CA_DAYS, LEAF_DAYS, RENEW_DAYS = 3650, 825, 30
# The daemons read PLASMA_EDGE_<FLAG> / PLASMA_SERVER_<FLAG> (plasma/edge/config.py).
ENV_PREFIX = {"device": "PLASMA_EDGE", "server": "PLASMA_SERVER", "admin": "PLASMA_ADMIN"}


class ProvisionError(Exception):
    """A usage or state error; printed as one line, exit code 2."""


# ---------------------------------------------------------------- files


def write_secret(path: Path, data: bytes) -> None:
    """Write owner-only (0600) atomically; umask or an older file cannot widen it."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def write_public(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def private_dir(path: Path) -> Path:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


# ---------------------------------------------------------------- PKI


def _x509():  # imported late: `--help` works without cryptography
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    return x509, hashes, serialization, ec, ExtendedKeyUsageOID, NameOID


def load_or_make_key(path: Path):
    x509, hashes, serialization, ec, _, _ = _x509()
    if path.exists():
        return serialization.load_pem_private_key(path.read_bytes(), password=None)
    key = ec.generate_private_key(ec.SECP256R1())
    write_secret(path, key.private_bytes(serialization.Encoding.PEM,
                                         serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption()))
    return key


def _pem(cert) -> bytes:
    _, _, serialization, _, _, _ = _x509()
    return cert.public_bytes(serialization.Encoding.PEM)


def ensure_ca(out: Path):
    """The CA key and self-signed certificate, made once."""
    x509, hashes, _, _, _, NameOID = _x509()
    ca_dir = private_dir(out / "ca")
    key = load_or_make_key(ca_dir / "ca.key")
    cert_path = ca_dir / "ca.crt"
    if cert_path.exists():
        return key, x509.load_pem_x509_certificate(cert_path.read_bytes())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Plasma development CA")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False,
                                         False), critical=True)
            .sign(key, hashes.SHA256()))
    write_public(cert_path, _pem(cert))
    return key, cert


def _san(hosts: list[str]):
    x509 = _x509()[0]
    names = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def _needs_cert(path: Path, ca_cert, hosts: list[str] | None) -> bool:
    """True if the certificate is missing, from another CA, expiring, or lacks a host."""
    x509 = _x509()[0]
    if not path.exists():
        return True
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    if cert.issuer != ca_cert.subject:
        return True
    if cert.not_valid_after_utc < dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=RENEW_DAYS):
        return True
    if hosts is not None:
        have = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        return any(name not in have for name in _san(hosts))
    return False


def issue(path: Path, key, ca_key, ca_cert, common_name: str, hosts: list[str] | None) -> None:
    """A leaf certificate: server auth with SANs when ``hosts`` is given, else client auth."""
    x509, hashes, _, _, EKU, NameOID = _x509()
    now = dt.datetime.now(dt.timezone.utc)
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
               .issuer_name(ca_cert.subject).public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5))
               .not_valid_after(now + dt.timedelta(days=LEAF_DAYS))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(True, False, True, False, False, False, False,
                                            False, False), critical=True))
    if hosts is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName(_san(hosts)), critical=False)
        builder = builder.add_extension(x509.ExtendedKeyUsage([EKU.SERVER_AUTH]), critical=False)
    else:
        builder = builder.add_extension(x509.ExtendedKeyUsage([EKU.CLIENT_AUTH]), critical=False)
    write_public(path, _pem(builder.sign(ca_key, hashes.SHA256())))


# ---------------------------------------------------------------- identities


def password_hash(password: str, salt: bytes | None = None) -> str:
    """One password-file value in Mosquitto 2.0's ``$7$`` (PBKDF2-SHA512) format."""
    salt = salt if salt is not None else secrets.token_bytes(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, PBKDF2_ITERATIONS)
    return (f"$7${PBKDF2_ITERATIONS}${base64.b64encode(salt).decode()}"
            f"${base64.b64encode(digest).decode()}")


def ensure_client(out: Path, ca_key, ca_cert, identity: dict[str, str]) -> Path:
    """Key, certificate, password and env file of one user; existing ones are kept."""
    user = identity["user"]
    cdir = private_dir(out / "clients" / user)
    key = load_or_make_key(cdir / "client.key")
    if _needs_cert(cdir / "client.crt", ca_cert, None):
        issue(cdir / "client.crt", key, ca_key, ca_cert, user, None)
    write_public(cdir / "ca.crt", _pem(ca_cert))
    pw_path = cdir / "password"
    if not pw_path.exists():
        write_secret(pw_path, secrets.token_urlsafe(32).encode())
    password = pw_path.read_text().strip()
    prefix = ENV_PREFIX[identity["role"]]
    write_secret(cdir / "broker.env", (
        "# Broker credentials (systemd EnvironmentFile, mode 0600)\n"
        f"{prefix}_USERNAME={user}\n{prefix}_PASSWORD={password}\n").encode())
    write_public(cdir / "identity.json", (json.dumps(identity, sort_keys=True) + "\n").encode())
    return cdir


def identities(out: Path) -> list[dict[str, str]]:
    """Every provisioned user, in a stable order: servers, admins, then devices."""
    found = []
    for path in sorted((out / "clients").glob("*/identity.json")):
        found.append(json.loads(path.read_text()))
    order = {"server": 0, "admin": 1, "device": 2}
    return sorted(found, key=lambda i: (order[i["role"]], i["user"]))


def acl_lines(identity: dict[str, str]) -> list[str]:
    """The ACL block of one user (Mosquitto acl_file syntax)."""
    lines = [f"user {identity['user']}"]
    role = identity["role"]
    if role == "device":
        fleet, device = identity["fleet"], identity["device"]
        base = f"{ROOT}/{fleet}/device/{device}"
        lines += [f"topic read {ROOT}/{fleet}/adapter/fleet", f"topic read {base}/adapter",
                  f"topic write {base}/telemetry", f"topic write {base}/status",
                  f"topic write {base}/versions", f"topic write {base}/audit"]
    elif role == "server":
        # readwrite on adapters: the publisher reads its own retained packets back at start
        # to raise its version floor (a lost store never reuses a version).
        lines += [f"topic readwrite {ROOT}/+/adapter/fleet",
                  f"topic readwrite {ROOT}/+/device/+/adapter",
                  f"topic read {ROOT}/+/device/+/telemetry",
                  f"topic read {ROOT}/+/device/+/status", f"topic read {ROOT}/+/device/+/versions",
                  f"topic read {ROOT}/+/device/+/audit",
                  f"topic write {ROOT}/+/server/audit"]
    else:
        lines += [f"topic read {ROOT}/#", "topic read $SYS/#"]
    return lines


def render_acl(ids: list[dict[str, str]]) -> str:
    blocks = ["# Generated by deploy/scripts/provision.py: do not edit, re-run it.",
              "# No anonymous section and no pattern lines: a user without a block gets nothing."]
    for identity in ids:
        blocks.append("\n".join(acl_lines(identity)))
    return "\n\n".join(blocks) + "\n"


def render_passwd(out: Path, ids: list[dict[str, str]]) -> str:
    lines = []
    for identity in ids:
        password = (out / "clients" / identity["user"] / "password").read_text().strip()
        lines.append(f"{identity['user']}:{password_hash(password)}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- commands


def _identity_list(args: argparse.Namespace) -> list[dict[str, str]]:
    wanted = []
    if args.device and not args.fleet:
        raise ProvisionError("--device needs --fleet")
    if args.fleet is not None and not ID.fullmatch(args.fleet):
        raise ProvisionError(f"fleet {args.fleet!r} must match [A-Za-z0-9_-]{{1,64}}")
    for device in args.device:
        if not ID.fullmatch(device):
            raise ProvisionError(f"device {device!r} must match [A-Za-z0-9_-]{{1,64}}")
        wanted.append({"role": "device", "user": f"{args.fleet}.{device}", "fleet": args.fleet,
                       "device": device})
    for role, names in (("server", args.server), ("admin", args.admin)):
        for name in names:
            if not USER.fullmatch(name) or "." in name:
                raise ProvisionError(f"{role} name {name!r} must match [A-Za-z0-9_-]{{1,64}}")
            wanted.append({"role": role, "user": name})
    return wanted


def cmd_provision(args: argparse.Namespace) -> int:
    out = Path(args.out)
    wanted = _identity_list(args)  # refuse bad ids before anything is written
    private_dir(out)
    private_dir(out / "clients")
    if args.remove:
        for identity in wanted:
            shutil.rmtree(out / "clients" / identity["user"], ignore_errors=True)
        wanted = []
    ca_key, ca_cert = ensure_ca(out)
    broker = private_dir(out / "broker")
    key = load_or_make_key(broker / "broker.key")
    hosts = ["localhost", "127.0.0.1", *args.broker_host]
    if _needs_cert(broker / "broker.crt", ca_cert, hosts):
        issue(broker / "broker.crt", key, ca_key, ca_cert, args.broker_host[0]
              if args.broker_host else "localhost", hosts)
    write_public(broker / "ca.crt", _pem(ca_cert))
    for identity in wanted:
        ensure_client(out, ca_key, ca_cert, identity)
    ids = identities(out)
    write_secret(broker / "passwd", render_passwd(out, ids).encode())
    write_public(broker / "acl", render_acl(ids).encode())
    print(json.dumps({"out": str(out), "users": [i["user"] for i in ids],
                      "broker_hosts": hosts}))
    return 0


def render_conf(text: str, broker_dir: str, data_dir: str, tls_port: int, local_port: int,
                bind: str = "127.0.0.1", log_file: str | None = None,
                user: str | None = None) -> str:
    """The shipped config with ports, file paths and locations rewritten, nothing else.

    ``user`` adds a ``user`` line: Mosquitto started as root drops to the ``mosquitto`` user
    before it reads the password file, so a test run as root keeps root (``user root``).
    """
    out = [f"user {user}"] if user else []
    for line in text.splitlines():
        words = line.split()
        if words[:2] == ["listener", "8883"]:
            line = f"listener {tls_port} {bind}"
        elif words[:2] == ["listener", "1883"]:
            line = f"listener {local_port} 127.0.0.1"
        elif words[:1] == ["persistence_location"]:
            line = f"persistence_location {data_dir.rstrip('/')}/"
        elif words[:1] == ["log_dest"] and log_file is not None:
            line = "log_dest stdout" if log_file == "stdout" else f"log_dest file {log_file}"
        else:
            line = line.replace(SHIPPED_DIR + "/", broker_dir.rstrip("/") + "/")
        out.append(line)
    return "\n".join(out) + "\n"


def cmd_render_conf(args: argparse.Namespace) -> int:
    text = Path(args.conf).read_text()  # paths may be a container's: nothing is created
    rendered = render_conf(text, str(Path(args.broker_dir).resolve()),
                           str(Path(args.data_dir).resolve()), args.tls_port, args.local_port,
                           args.bind, args.log_file, args.user)
    write_public(Path(args.out), rendered.encode())
    print(json.dumps({"out": args.out, "tls_port": args.tls_port, "local_port": args.local_port}))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="provision.py", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    prov = sub.add_parser("provision", help="make or extend the PKI, passwords and ACL")
    prov.add_argument("--out", required=True, metavar="DIR", help="output directory (kept)")
    prov.add_argument("--fleet", default=None, help="fleet of the --device ids")
    prov.add_argument("--device", action="append", default=[], metavar="ID",
                      help="a device of --fleet (repeat)")
    prov.add_argument("--server", action="append", default=None, metavar="NAME",
                      help="a server worker user (repeat; default plasma-server)")
    prov.add_argument("--admin", action="append", default=[], metavar="NAME",
                      help="a read-only admin user (repeat)")
    prov.add_argument("--broker-host", action="append", default=[], metavar="HOST",
                      help="extra DNS name or IP of the broker certificate (localhost and "
                           "127.0.0.1 are always in it)")
    prov.add_argument("--remove", action="store_true",
                      help="revoke the named users instead: delete their credentials and "
                           "rebuild passwd and acl (then SIGHUP mosquitto)")
    prov.set_defaults(func=cmd_provision)
    conf = sub.add_parser("render-conf", help="render the shipped mosquitto.conf for a directory")
    conf.add_argument("--conf", default=str(SHIPPED_CONF), help="template (the shipped file)")
    conf.add_argument("--broker-dir", required=True, help="OUT/broker of `provision`")
    conf.add_argument("--data-dir", required=True, help="persistence directory")
    conf.add_argument("--tls-port", type=int, default=8883)
    conf.add_argument("--local-port", type=int, default=1883)
    conf.add_argument("--bind", default="127.0.0.1", help="address of the TLS listener")
    conf.add_argument("--log-file", default=None, help="log to this file instead of syslog "
                      "(`stdout` in a container)")
    conf.add_argument("--user", default=None,
                      help="add `user NAME` (the account mosquitto keeps when started as root)")
    conf.add_argument("--out", required=True, metavar="FILE")
    conf.set_defaults(func=cmd_render_conf)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "server", []) is None:
        args.server = [] if args.remove else ["plasma-server"]
    try:
        return int(args.func(args))
    except ProvisionError as exc:
        print(f"provision.py: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
