"""Server tool: long fuzz runs against the two decoders that read network bytes.

``decode_packet`` (edge stage 7) may raise ``PacketError`` and nothing else; ``decode_traces``
(server stage 1) may raise ``TelemetryError`` and nothing else; what they return must hold
finite numbers only.  Anything else is a CRASH (saved with its traceback); an input that takes
longer than ``--time-limit-ms`` is a HANG (saved too).  Prints one JSON summary line::

    plasma-server fuzz --inputs 100000 [--seed S] [--target packet|telemetry|both]
    python -m plasma.server.tools.fuzz --inputs 100000 --engine atheris   # coverage-guided

The built-in engine mutates valid seeds (bit flips, interesting bytes, inserts, deletes,
duplicated ranges, length-field edits, splices, truncation, stacked "havoc" rounds), sends
pure random bytes, and builds structure-aware inputs that fix the lengths and the digest and
RE-SIGN with an ephemeral key the decoder trusts, so the header and payload parsers behind
the signature check are exercised, not just the signature check.  Its only feedback is the
outcome (error code and message shape): an input with a new outcome joins the corpus.
``--engine atheris`` hands the same targets to libFuzzer with Python coverage (optional:
``pip install atheris``).  The tests' short version is tests/protocol/test_fuzz_props.py.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import signal
import struct
import sys
import time
import traceback
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from plasma.protocol import (
    Adapter,
    PacketError,
    PlasmaError,
    SigningKey,
    TelemetryError,
    TraceBatch,
    TrustStore,
    decode_packet,
    decode_traces,
    encode_packet,
    encode_traces,
)
from plasma.protocol import packet as packet_mod
from plasma.protocol import telemetry as telemetry_mod

MAX_CORPUS = 2000
MAX_INPUT = 64 * 1024
INTERESTING_U32 = (0, 1, 2, 7, 8, 16, 48, 255, 256, 4096, 32768, 65535, 65536, 2**31 - 1, 2**31,
                   2**32 - 1)
INTERESTING_BYTES = (0, 1, 0x7F, 0x80, 0xFF, ord("{"), ord("}"), ord('"'), ord("["), ord("9"))


class _Hang(BaseException):
    """Raised by the interval timer inside a decode that ran far past the limit."""


# ---------------------------------------------------------------- targets


@dataclass
class Target:
    """One decoder with its seeds, its allowed error family and its output check."""

    name: str
    seeds: list[bytes]
    decode: Callable[[bytes], Any]
    expected: type[PlasmaError]
    oracle: Callable[[Any], str | None]
    restructure: Callable[[random.Random], bytes]


def _adapter(shapes: dict[str, tuple[int, int]], rank: int, seed: int) -> Adapter:
    rng = np.random.default_rng(seed)
    return Adapter(alpha=4.0, rank=rank, layers={
        name: (rng.standard_normal((rank, i)).astype(np.float32),  # (rank, in)
               rng.standard_normal((o, rank)).astype(np.float32))  # (out, rank)
        for name, (i, o) in shapes.items()})


def packet_seeds(key: SigningKey) -> list[bytes]:
    """Valid packets: every dtype, both slots, a multi-layer one and a slot-clearing one."""
    t0 = time.time()
    seeds = [encode_packet(_adapter({"net.0": (8, 16), "net.2": (16, 16), "net.4": (16, 2)}, r, i),
                           key=key, fleet="f1", slot="fleet", version=i + 1, base_sha256="ab" * 32,
                           dtype=dtype, created_at=t0)
             for i, (dtype, r) in enumerate((("int8", 4), ("fp16", 2), ("fp32", 1)))]
    seeds.append(encode_packet(_adapter({"net.0": (3, 5)}, 2, 9), key=key, fleet="f1",
                               slot="device", device="d-1", version=3, base_sha256="cd" * 32,
                               created_at=t0))
    seeds.append(encode_packet(None, key=key, fleet="f1", slot="fleet", version=4,
                               base_sha256="ab" * 32, created_at=t0))
    return seeds


def frame_seeds() -> list[bytes]:
    seeds = []
    for n, o, a in ((1, 3, 1), (16, 8, 2), (0, 1, 1), (64, 3, 1)):
        rng = np.random.default_rng(n)
        seeds.append(encode_traces(TraceBatch(
            fleet="f1", device="d-1", episode=rng.integers(0, 9, n).astype(np.uint32),
            step=np.arange(n, dtype=np.uint32), obs=rng.standard_normal((n, o)).astype(np.float32),
            action=rng.standard_normal((n, a)).astype(np.float32),
            reward=rng.standard_normal(n).astype(np.float32),
            next_obs=rng.standard_normal((n, o)).astype(np.float32),
            terminated=rng.random(n) < 0.1, truncated=rng.random(n) < 0.1,
            fleet_version=np.ones(n, np.uint32), device_version=np.zeros(n, np.uint32),
            timestamp=1.7e9 + np.arange(n, dtype=np.float64), seq=n)))
    return seeds


def _finite_adapter(decoded: Any) -> str | None:
    for name, (a, b) in decoded.adapter.layers.items():
        if not (np.isfinite(a).all() and np.isfinite(b).all()):
            return f"decoded layer {name!r} holds non-finite factors"
    return None


def _finite_batch(batch: Any) -> str | None:
    for column in ("obs", "action", "reward", "next_obs", "timestamp"):
        if not np.isfinite(getattr(batch, column)).all():
            return f"decoded telemetry column {column} holds non-finite values"
    return None


# ---------------------------------------------------------------- structure-aware inputs


def random_json(rng: random.Random, depth: int = 0) -> Any:
    roll = rng.randrange(10 if depth < 3 else 7)
    if roll == 0:
        return None
    if roll == 1:
        return rng.random() < 0.5
    if roll == 2:
        return rng.choice([0, 1, -1, 2**31, 2**53, 2**64, -(2**63), 10**30, rng.randrange(100)])
    if roll == 3:
        return rng.choice([0.0, -0.0, 1e308, -1e308, 5e-324, 0.5, rng.uniform(-1e6, 1e6)])
    if roll in (4, 5, 6):
        alphabet = "abcdef0123456789-_./:{}\"\\ \u00e9\u0000\ud7ff"
        return "".join(rng.choice(alphabet) for _ in range(rng.choice([0, 1, 8, 32, 64, 65,
                                                                       129])))
    if roll in (7, 8):
        return [random_json(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {random_json(rng, 3) if rng.random() < 0.3 else "k": random_json(rng, depth + 1)
            for _ in range(rng.randrange(4))}


def edit_header(rng: random.Random, header: dict[str, Any]) -> dict[str, Any]:
    """Replace, drop or add fields, nested layer fields included."""
    header = json.loads(json.dumps(header))
    for _ in range(rng.randint(1, 3)):
        op = rng.randrange(4)
        keys = sorted(header)
        if op == 0 and keys:
            header[rng.choice(keys)] = random_json(rng)
        elif op == 1 and keys:
            header.pop(rng.choice(keys))
        elif op == 2:
            header[str(random_json(rng, 3))] = random_json(rng)
        elif isinstance(header.get("layers"), list) and header["layers"]:
            layer = rng.choice(header["layers"])
            if isinstance(layer, dict):
                layer[rng.choice(["name", "in_features", "out_features"])] = rng.choice(
                    [rng.randint(-2, 70_000), random_json(rng)])
    return header


def split_packet(data: bytes) -> tuple[dict[str, Any], bytes]:
    header_len = struct.unpack_from("<I", data, 8)[0]
    at = packet_mod.PREFIX_LEN + header_len
    payload_at = at + 1 + data[at] * packet_mod.SIG_ENTRY_LEN
    return json.loads(data[packet_mod.PREFIX_LEN:at]), data[payload_at:]


def resign(key: SigningKey, header_bytes: bytes, payload: bytes) -> bytes:
    """A packet with consistent prefix lengths and digest, signed by ``key``."""
    prefix = packet_mod._PREFIX.pack(packet_mod.MAGIC, packet_mod.FORMAT_VERSION, 0,
                                     len(header_bytes), len(payload),
                                     hashlib.sha256(payload).digest())
    signed = prefix + header_bytes
    return signed + b"\x01" + bytes.fromhex(key.key_id) + key.sign(signed) + payload


def restructure_packet(rng: random.Random, seeds: list[bytes], key: SigningKey) -> bytes:
    header, payload = split_packet(rng.choice(seeds))
    if rng.random() < 0.6:
        header = edit_header(rng, header)
    roll = rng.random()
    if roll < 0.15:  # same length, arbitrary values
        payload = rng.randbytes(len(payload))
    elif roll < 0.4 and payload:  # a few values edited in place: huge int8 scales, NaN, Inf
        buf = bytearray(payload)
        for _ in range(rng.randint(1, 4)):
            at = rng.randrange(len(buf))
            if rng.random() < 0.5:
                buf[at] ^= 1 << rng.randrange(8)
            else:
                buf[at] = rng.choice(INTERESTING_BYTES)
        payload = bytes(buf)
    elif roll < 0.55:
        payload = payload[:rng.randrange(len(payload) + 1)] + rng.randbytes(rng.randrange(64))
    if rng.random() < 0.8:
        header["payload_len"] = len(payload)
        header["payload_sha256"] = hashlib.sha256(payload).hexdigest()
    raw = json.dumps(header).encode()
    return resign(key, raw, payload)


def restructure_frame(rng: random.Random, seeds: list[bytes]) -> bytes:
    """Edited header, then a body of exactly the size the edited header asks for (if small)."""
    seed = rng.choice(seeds)
    header_len = struct.unpack_from("<I", seed, 8)[0]
    header = edit_header(rng, json.loads(seed[16:16 + header_len]))
    for name in ("rows", "obs_dim", "act_dim"):
        if rng.random() < 0.2:
            header[name] = rng.randint(-1, 12)
    raw = json.dumps(header).encode()
    try:
        size = telemetry_mod._body_size(int(header["rows"]), int(header["obs_dim"]),
                                        int(header["act_dim"]))
    except (KeyError, TypeError, ValueError, OverflowError):
        size = -1
    if not 0 <= size <= 16384:
        size = rng.randrange(128)
    body = rng.randbytes(size)
    if rng.random() < 0.5 and size >= 4:  # plant a NaN / Inf somewhere
        at = rng.randrange(size - 3)
        body = body[:at] + struct.pack("<f", rng.choice([np.nan, np.inf, -np.inf])) + body[at + 4:]
    return telemetry_mod._PREFIX.pack(telemetry_mod.MAGIC, 1, 0, len(raw), len(body)) + raw + body


def make_targets(which: str) -> list[Target]:
    """An ephemeral key signs the seeds and the re-signed inputs; no real key is read."""
    key = SigningKey.generate()
    trust = TrustStore([key.public_key])
    p_seeds, f_seeds = packet_seeds(key), frame_seeds()
    targets = {
        "packet": Target("packet", p_seeds, lambda d: decode_packet(d, trust), PacketError,
                         _finite_adapter, lambda rng: restructure_packet(rng, p_seeds, key)),
        "telemetry": Target("telemetry", f_seeds, decode_traces, TelemetryError, _finite_batch,
                            lambda rng: restructure_frame(rng, f_seeds)),
    }
    return list(targets.values()) if which == "both" else [targets[which]]


# ---------------------------------------------------------------- byte-level mutation


def mutate(rng: random.Random, data: bytes, corpus: Sequence[bytes]) -> bytes:
    """1 to 8 stacked edits of ``data`` (havoc)."""
    buf = bytearray(data)
    for _ in range(rng.choice([1, 1, 1, 2, 2, 3, 4, 8])):
        op = rng.randrange(10)
        at = rng.randrange(len(buf) + 1)
        if op == 0 and buf:  # bit flip
            at = min(at, len(buf) - 1)
            buf[at] ^= 1 << rng.randrange(8)
        elif op == 1 and buf:  # interesting byte
            buf[min(at, len(buf) - 1)] = rng.choice(INTERESTING_BYTES)
        elif op == 2:
            buf[at:at] = rng.randbytes(rng.choice([1, 2, 4, 16, 80]))
        elif op == 3:
            del buf[at:at + rng.choice([1, 2, 4, 16, 80, 1024])]
        elif op == 4 and buf:  # duplicate a range
            end = min(len(buf), at + rng.randrange(1, 256))
            buf[at:at] = buf[at:end]
        elif op == 5 and len(buf) >= 16:  # length fields: prefix u32s, signature count
            where = rng.choice([4, 6, 8, 12, 8, 12])
            if where < 8:
                struct.pack_into("<H", buf, where, rng.choice([0, 1, 2, 0xFFFF]))
            else:
                struct.pack_into("<I", buf, where, rng.choice(INTERESTING_U32)
                                 if rng.random() < 0.7 else rng.randrange(2**32))
            if where == 8 and rng.random() < 0.3:
                header_len = struct.unpack_from("<I", buf, 8)[0]
                sig_at = packet_mod.PREFIX_LEN + header_len
                if sig_at < len(buf):
                    buf[sig_at] = rng.choice([0, 1, 2, 8, 9, 255])
        elif op == 6:  # splice with another input
            other = rng.choice(corpus)
            buf = buf[:at] + other[rng.randrange(len(other) + 1):]
        elif op == 7:
            del buf[at:]
        elif op == 8 and buf:  # arithmetic on a byte
            at = min(at, len(buf) - 1)
            buf[at] = (buf[at] + rng.choice([-16, -1, 1, 16])) % 256
        elif buf:  # overwrite a range with random bytes
            chunk = rng.randbytes(rng.randrange(1, 33))
            buf[at:at + len(chunk)] = chunk
    return bytes(buf[:MAX_INPUT])


# ---------------------------------------------------------------- findings


@dataclass
class Findings:
    out_dir: Path
    crashes: int = 0
    hangs: int = 0
    signatures: dict[str, dict[str, Any]] = field(default_factory=dict)
    saved: list[str] = field(default_factory=list)

    def _save(self, kind: str, target: str, data: bytes, detail: str) -> str:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        stem = f"{kind}-{target}-{hashlib.sha256(data).hexdigest()[:16]}"
        (self.out_dir / f"{stem}.bin").write_bytes(data)
        (self.out_dir / f"{stem}.txt").write_text(detail)
        self.saved.append(stem)
        return stem

    def crash(self, target: str, data: bytes, signature: str, detail: str) -> None:
        self.crashes += 1
        entry = self.signatures.setdefault(signature, {"count": 0, "target": target})
        entry["count"] += 1
        if entry["count"] == 1:  # one saved input per distinct crash site
            entry["input"] = self._save("crash", target, data, detail)

    def hang(self, target: str, data: bytes, ms: float) -> None:
        self.hangs += 1
        if self.hangs <= 20:
            self._save("hang", target, data, f"{target} decode took {ms:.1f} ms\n")


def _signature(target: str, exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    where = f"{Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else "?"
    return f"{target}:{type(exc).__name__}@{where}"


_DIGITS = re.compile(r"\d+")


def run_one(target: Target, data: bytes, findings: Findings, limit_s: float,
            outcomes: Counter[str]) -> tuple[float, str]:
    """Decode one input; returns (seconds, outcome key) and records any finding."""
    start = time.perf_counter()
    outcome = "ok"
    try:
        result = target.decode(data)
    except _Hang:
        outcome = "hang"
    except target.expected as exc:
        outcome = f"{exc.code}:{_DIGITS.sub('N', str(exc))[:48]}"
    except Exception as exc:  # noqa: BLE001 - exactly what a fuzzer is for
        outcome = "crash"
        findings.crash(target.name, data, _signature(target.name, exc),
                       "".join(traceback.format_exception(exc)))
    else:
        problem = target.oracle(result)
        if problem is not None:
            outcome = "wrong_output"
            findings.crash(target.name, data, f"{target.name}:oracle:{problem}", problem + "\n")
    elapsed = time.perf_counter() - start
    if elapsed > limit_s or outcome == "hang":
        findings.hang(target.name, data, elapsed * 1e3)
    outcomes[outcome.split(":", 1)[0]] += 1
    return elapsed, f"{target.name}/{outcome}"


def _timer(limit_s: float) -> Callable[[], None]:
    """Interrupt a decode stuck in Python code at 5x the limit; returns a disarm function."""
    if not hasattr(signal, "setitimer") or not _on_main_thread():
        return lambda: None

    def on_alarm(signum: int, frame: object) -> None:
        raise _Hang()

    previous = signal.signal(signal.SIGALRM, on_alarm)

    def disarm() -> None:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)

    return disarm


def _on_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def fuzz(targets: list[Target], inputs: int, seed: int, out_dir: Path, limit_s: float
         ) -> dict[str, Any]:
    """The built-in engine; returns the summary."""
    rng = random.Random(seed)
    findings = Findings(out_dir)
    corpora = {t.name: list(t.seeds) for t in targets}
    seen: set[str] = set()
    outcomes: dict[str, Counter[str]] = {t.name: Counter() for t in targets}
    max_s = total_s = 0.0
    disarm = _timer(limit_s)
    hard = hasattr(signal, "setitimer") and _on_main_thread()
    started = time.perf_counter()
    try:
        for i in range(inputs):
            target = targets[i % len(targets)]
            corpus = corpora[target.name]
            roll = rng.random()
            if roll < 0.04:
                data = rng.randbytes(rng.randrange(2048))
            elif roll < 0.08:
                data = target.seeds[0][:4] + rng.randbytes(rng.randrange(512))
            elif roll < 0.30:
                data = target.restructure(rng)
            else:
                data = mutate(rng, rng.choice(corpus), corpus)
            if hard:
                signal.setitimer(signal.ITIMER_REAL, 5 * limit_s)
            elapsed, key = run_one(target, data, findings, limit_s, outcomes[target.name])
            if hard:
                signal.setitimer(signal.ITIMER_REAL, 0)
            max_s, total_s = max(max_s, elapsed), total_s + elapsed
            if key not in seen:  # a new outcome shape: keep the input as a mutation base
                seen.add(key)
                if len(corpus) < MAX_CORPUS:
                    corpus.append(data)
                else:
                    corpus[rng.randrange(len(target.seeds), MAX_CORPUS)] = data
    finally:
        disarm()
    wall = time.perf_counter() - started
    return {
        "engine": "mutation", "targets": [t.name for t in targets], "seed": seed,
        "inputs": inputs, "crashes": findings.crashes, "unique_crashes": len(findings.signatures),
        "hangs": findings.hangs, "max_ms": round(max_s * 1e3, 3),
        "mean_us": round(total_s / max(inputs, 1) * 1e6, 1),
        "inputs_per_s": round(inputs / wall, 1) if wall > 0 else None,
        "seconds": round(wall, 2), "time_limit_ms": limit_s * 1e3,
        "corpus": {name: len(c) for name, c in corpora.items()},
        "outcomes": {name: dict(c.most_common()) for name, c in outcomes.items()},
        "crash_sites": findings.signatures,
        "findings_dir": str(out_dir) if findings.saved else None,
    }


# ---------------------------------------------------------------- atheris (optional)


def fuzz_atheris(targets: list[Target], inputs: int, seed: int, out_dir: Path, limit_s: float
                 ) -> None:
    """libFuzzer with Python coverage.  Never returns: prints the summary and exits.

    Input layout: first byte picks the mode (target; or a re-sign mode for packets whose rest
    is u16 header length | header JSON | payload), the rest is the input.
    """
    try:
        import atheris  # type: ignore[import-not-found]
    except ImportError:
        raise SystemExit("--engine atheris needs atheris: pip install atheris") from None
    key = SigningKey.generate()
    trust = TrustStore([key.public_key])
    by_name = {t.name: t for t in targets}
    if "packet" in by_name:  # re-signed with this run's key, so re-encode the packet seeds
        by_name["packet"].seeds = packet_seeds(key)
        by_name["packet"].decode = lambda d: decode_packet(d, trust)
    modes: list[tuple[Target, bool]] = [(t, False) for t in targets]
    if "packet" in by_name:
        modes.append((by_name["packet"], True))
    findings, outcomes = Findings(out_dir), Counter[str]()
    state = {"n": 0, "max_s": 0.0, "start": time.perf_counter()}

    def finish() -> None:
        wall = time.perf_counter() - state["start"]
        print(json.dumps({
            "engine": "atheris", "targets": [t.name for t in targets], "seed": seed,
            "inputs": state["n"], "crashes": findings.crashes,
            "unique_crashes": len(findings.signatures), "hangs": findings.hangs,
            "max_ms": round(state["max_s"] * 1e3, 3),
            "inputs_per_s": round(state["n"] / wall, 1), "seconds": round(wall, 2),
            "outcomes": dict(outcomes.most_common()), "crash_sites": findings.signatures,
            "saved": findings.saved, "corpus_dir": str(corpus_dir)}), flush=True)
        os._exit(1 if findings.crashes or findings.hangs else 0)

    def one(data: bytes) -> None:
        if not data:
            return
        target, resigned = modes[data[0] % len(modes)]
        body = data[1:]
        if resigned:
            n = int.from_bytes(body[:2], "little")
            body = resign(key, body[2:2 + n], body[2 + n:])
        elapsed, _ = run_one(target, body, findings, limit_s, outcomes)
        state["max_s"] = max(state["max_s"], elapsed)
        state["n"] += 1
        if state["n"] >= inputs:
            finish()

    corpus_dir = out_dir / "atheris-corpus"  # kept: the next run starts from it
    corpus_dir.mkdir(parents=True, exist_ok=True)
    for m, (target, resigned) in enumerate(modes):
        for s, data in enumerate(target.seeds):
            if resigned:
                header, payload = split_packet(data)
                raw = json.dumps(header).encode()
                data = len(raw).to_bytes(2, "little") + raw + payload
            (corpus_dir / f"seed-{m}-{s}").write_bytes(bytes([m]) + data)
    _instrument_protocol(atheris)
    atheris.Setup([sys.argv[0], f"-runs={inputs * 2 + 1000}", f"-seed={seed or 1}",
                   f"-timeout={max(1, int(limit_s * 10))}", "-max_len=65536",
                   f"-artifact_prefix={out_dir}/", str(corpus_dir)], one)
    atheris.Fuzz()
    finish()


def _instrument_protocol(atheris: Any) -> int:
    """Coverage for plasma.protocol's own Python functions only (instrument_all() takes about
    a minute on numpy and pydantic, whose hot parts are C and Rust anyway)."""
    import inspect

    count = 0
    for name, module in list(sys.modules.items()):
        if not name.startswith("plasma.protocol") or module is None:
            continue
        members = list(vars(module).values())
        members += [m for c in members if inspect.isclass(c) and c.__module__ == name
                    for m in vars(c).values()]
        for member in members:
            func = getattr(member, "__func__", member)
            if inspect.isfunction(func) and func.__module__ == name:
                atheris.instrument_func(func)
                count += 1
    return count


# ---------------------------------------------------------------- entry point


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--inputs", type=int, default=100_000, help="inputs to run (100000)")
    parser.add_argument("--seed", type=int, default=None, help="RNG seed (random if omitted)")
    parser.add_argument("--target", choices=["packet", "telemetry", "both"], default="both")
    parser.add_argument("--out", default="fuzz-findings", metavar="DIR",
                        help="where crashing / hanging inputs are saved (made only if needed)")
    parser.add_argument("--time-limit-ms", type=float, default=1000.0,
                        help="an input slower than this is a hang (1000)")
    parser.add_argument("--engine", choices=["mutation", "atheris"], default="mutation")


def run(args: argparse.Namespace) -> int:
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**32)
    targets = make_targets(args.target)
    out_dir, limit_s = Path(args.out), args.time_limit_ms / 1e3
    if args.engine == "atheris":
        fuzz_atheris(targets, args.inputs, seed, out_dir, limit_s)
    summary = fuzz(targets, args.inputs, seed, out_dir, limit_s)
    print(json.dumps(summary))
    return 1 if summary["crashes"] or summary["hangs"] else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="plasma-server fuzz", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
