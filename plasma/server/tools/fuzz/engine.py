"""Fuzz tool: the built-in mutation engine - run inputs, classify outcomes, save crashes and hangs."""

from __future__ import annotations

import hashlib
import random
import re
import signal
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .inputs import mutate
from .targets import Target

__all__ = ["MAX_CORPUS", "Findings", "fuzz", "run_one"]

MAX_CORPUS = 2000


class _Hang(BaseException):
    """Raised by the interval timer inside a decode that ran far past the limit."""



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
