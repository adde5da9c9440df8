"""Fuzz tool: the optional coverage-guided engine - the same targets under libFuzzer via atheris."""

from __future__ import annotations

import json
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from plasma.protocol import SigningKey, TrustStore, decode_packet

from .engine import Findings, run_one
from .inputs import resign, split_packet
from .targets import Target, packet_seeds

__all__ = ["fuzz_atheris"]


def fuzz_atheris(targets: list[Target], inputs: int, seed: int, out_dir: Path, limit_s: float
                 ) -> None:
    """libFuzzer with Python coverage.  Never returns: prints the summary and exits.

    Input layout: first byte picks the mode (target; or a re-sign mode for packets whose rest
    is u16 header length | header JSON | payload), the rest is the input.
    """
    try:
        import atheris
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
