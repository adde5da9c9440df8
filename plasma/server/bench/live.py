"""``plasma-server bench live``: the product's own loop, measured where users run it.

For each seed: a fresh broker (Mosquitto when installed, else the embedded amqtt), one
``plasma-server run`` process with its defaults (``--budget`` aside) and N ``plasma-edge run``
daemons, each in its own physics (cycled from ``--physics``) at ``--rate-hz``. A
``FleetWatcher`` evaluates the policy active on each device noise-free at the start and at
every activation (base plus accepted adapters, int8 through the edge runtime, fixed-seed
episodes of that device's physics, outside the device). Progress goes to stderr; the result is
one JSON object (see ``bench_live``).

The oracle of a physics is a policy trained for it by ``train-base``: the shipped bundle in
``deploy/models`` whose manifest has that physics, else a cached training run.
"""

from __future__ import annotations

import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from plasma.protocol import ConfigError, SigningKey, TrustStore
from plasma.protocol.bundle import Bundle, load_bundle
from plasma.protocol.bus import BrokerConfig, MqttBus

from ..catalog import find_model, oracle_return
from ..tasks import get_task
from ..tools.broker import start_local
from ..tools.processes import Processes, cpu_seconds
from ..tools.watch import DeviceWatch, FleetWatcher, parse_physics

__all__ = ["LiveBenchConfig", "bench_live", "device_result"]

log = logging.getLogger(__name__)
FLEET = "live"


@dataclass
class LiveBenchConfig:
    """``plasma-server bench live`` settings (everything else is the product's default)."""

    env_id: str = "Pendulum-v1"
    """World of the devices."""
    physics: tuple[str, ...] = ("m=1.6,g=12",)
    """Physics override per device, cycled (``"m=1.6,g=12;g=14"`` on the command line)."""
    devices: int | None = None
    """Device daemons per seed; None: one per physics entry."""
    seeds: tuple[int, ...] = (0,)
    """One fresh run (broker, server, devices, store) per seed."""
    duration_s: float = 120.0
    """Wall-clock length of each run."""
    rate_hz: float = 50.0
    """Control rate of each device (the daemon's default)."""
    budget: str = "default"
    """The server's compute budget per round."""
    model: str | None = None
    """Base policy bundle; None: the shipped nominal bundle of ``env_id``."""
    eval_episodes: int = 10
    """Fixed-seed episodes per noise-free evaluation."""
    reach: float = 0.9
    """Gap closed that counts as reached / held."""
    out_dir: str | None = None
    """Keys, stores, state and logs; None: a temporary directory, removed afterwards."""
    server_args: tuple[str, ...] = ()
    """Extra ``plasma-server run`` flags (name them when you report figures)."""
    device_args: tuple[str, ...] = ()
    """Extra ``plasma-edge run`` flags (name them when you report figures)."""
    progress_s: float = 10.0
    """Seconds between progress lines on stderr."""


def bench_live(cfg: LiveBenchConfig) -> dict[str, Any]:
    """Run every seed; one dict: ``devices`` (one entry per device and seed), ``rounds``,
    ``server_cpu_s_per_round`` and per-physics medians over seeds."""
    try:
        get_task(cfg.env_id)
    except KeyError as exc:  # an unknown env: refused before anything starts
        raise ConfigError(str(exc.args[0])) from None
    for text in cfg.physics:
        parse_physics(text, cfg.env_id)  # ConfigError on an unknown physics name
    model = Path(cfg.model) if cfg.model else find_model(cfg.env_id, {})
    bundle = load_bundle(model)
    n_devices = cfg.devices or len(cfg.physics)
    physics = [cfg.physics[i % len(cfg.physics)] for i in range(n_devices)]
    oracles = {text: oracle_return(cfg.env_id, parse_physics(text, cfg.env_id),
                                 cfg.eval_episodes)
               for text in dict.fromkeys(physics)}
    root = Path(cfg.out_dir) if cfg.out_dir else Path(tempfile.mkdtemp(prefix="plasma-live-"))
    devices: list[dict[str, Any]] = []
    rounds, cpu = 0, 0.0
    try:
        for seed in cfg.seeds:
            tracks, n_rounds, seconds = _session(cfg, seed, root / f"seed{seed}", model, bundle,
                                                 physics)
            rounds += n_rounds
            cpu += seconds
            devices += [device_result(t, seed, oracles[t.physics_text], cfg.reach) for t in tracks]
    finally:
        if cfg.out_dir is None:
            shutil.rmtree(root, ignore_errors=True)
    return {"env": cfg.env_id, "budget": cfg.budget, "rate_hz": cfg.rate_hz,
            "duration_s": cfg.duration_s, "seeds": list(cfg.seeds), "model": str(model),
            "server_args": list(cfg.server_args), "device_args": list(cfg.device_args),
            "devices": devices, "rounds": rounds,
            "server_cpu_s_per_round": cpu / rounds if rounds else None,
            "medians": _medians(devices)}


def device_result(track: DeviceWatch, seed: int, oracle: float, reach: float) -> dict[str, Any]:
    """The issue's per-device figures from one device's evaluations."""
    evals = track.evaluations
    base = evals[0].mean_return if evals else None
    final = evals[-1].mean_return if evals else None
    span = None if base is None else oracle - base
    closed = [None if not span or span <= 0 else (e.mean_return - base) / span for e in evals]
    reached = [e.steps for e, g in zip(evals, closed) if g is not None and g >= reach]
    hold = None
    for i in range(len(evals) - 1, -1, -1):  # the earliest evaluation from which all stay above
        if closed[i] is None or closed[i] < reach:
            break
        hold = evals[i].steps
    return {
        "device": track.device, "physics": track.physics_text, "seed": seed,
        "base_return": base, "oracle_return": oracle, "final_return": final,
        "gap_closed": closed[-1] if closed else None,
        "steps_to_reach": reached[0] if reached else None, "steps_to_hold": hold,
        "first_packet_steps": track.first_packet_steps, "real_steps": track.steps,
        "packets": track.verdicts.get("accepted", 0),
        "packet_bytes": int(np.mean(track.accepted_bytes)) if track.accepted_bytes else None,
        "rollbacks": track.verdicts.get("rolled_back", 0),
        "rejected": track.verdicts.get("rejected", 0),
        "evaluations": [[e.steps, round(e.mean_return, 1)] for e in evals],
    }


def _session(cfg: LiveBenchConfig, seed: int, work: Path, model: Path, bundle: Bundle,
             physics: Sequence[str]) -> tuple[list[DeviceWatch], int, float]:
    """One run: (device tracks, server rounds, server CPU seconds)."""
    keys, trust = work / "keys", work / "trust"
    SigningKey.generate().save(keys)
    trust.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(keys / "signing.pub", trust / "server.pub")
    url, broker, kind = start_local(work / "broker")
    log.info("seed %d: %s broker at %s, %d device(s), %.0f s", seed, kind, url, len(physics),
             cfg.duration_s)
    procs = Processes(work / "logs")
    bus = MqttBus(BrokerConfig.from_url(url), client_id=f"plasma-live-{os.getpid()}", clean=True)
    names = {f"dev-{i}": text for i, text in enumerate(physics)}
    watcher: FleetWatcher | None = None
    cpu = 0.0
    try:
        bus.connect()
        watcher = FleetWatcher(bus, FLEET, names, bundle, TrustStore.from_dir(trust), cfg.env_id,
                               cfg.eval_episodes)
        server = procs.start("server", _server_argv(cfg, url, keys, model, work, seed))
        for i, (dev, text) in enumerate(names.items()):
            procs.start(dev, _device_argv(cfg, url, dev, text, model, trust, work, seed * 100 + i))
        cpu = _watch(cfg, watcher, procs, server.pid)
    finally:
        procs.stop()
        if watcher is not None:
            watcher.drain()
            watcher.close()
        bus.close()
        broker.terminate()
        broker.wait(10)
    assert watcher is not None
    rounds = sum(1 for r in watcher.server_records if r.auditor == "judicial")
    return list(watcher.tracks.values()), rounds, cpu


def _watch(cfg: LiveBenchConfig, watcher: FleetWatcher, procs: Processes, server_pid: int) -> float:
    """Until the duration is over; returns the server's CPU seconds. A dead child is an error."""
    start = time.monotonic()
    next_report = start + cfg.progress_s
    cpu = 0.0
    while time.monotonic() - start < cfg.duration_s:
        dead = procs.check()
        if dead:
            raise RuntimeError(f"a process stopped early: {'; '.join(dead)} (logs in "
                               f"{procs.log_dir})")
        cpu = cpu_seconds(server_pid) or cpu
        if time.monotonic() >= next_report:
            next_report += cfg.progress_s
            _progress(watcher, time.monotonic() - start, cfg.duration_s)
        time.sleep(0.5)
    return cpu


def _progress(watcher: FleetWatcher, elapsed: float, total: float) -> None:
    with watcher.lock:
        rounds = len(watcher.server_records)
        lines = [f"t={elapsed:4.0f}/{total:.0f}s server rounds={rounds}"]
        for t in watcher.tracks.values():
            last = t.evaluations[-1].mean_return if t.evaluations else float("nan")
            lines.append(f"  {t.device} [{t.physics_text}] steps={t.steps} "
                         f"versions={t.versions} eval={last:.1f} "
                         f"accepted={t.verdicts.get('accepted', 0)} "
                         f"rejected={t.verdicts.get('rejected', 0)} "
                         f"rolled_back={t.verdicts.get('rolled_back', 0)}")
    print("\n".join(lines), file=sys.stderr, flush=True)


def _server_argv(cfg: LiveBenchConfig, url: str, keys: Path, model: Path, work: Path,
                 seed: int) -> list[str]:
    return [sys.executable, "-m", "plasma.server.cli", "run", "--broker", url, "--fleet", FLEET,
            "--key", str(keys), "--model", str(model), "--store", str(work / "traces.sqlite"),
            "--env", cfg.env_id, "--budget", cfg.budget, "--seed", str(seed), *cfg.server_args]


def _device_argv(cfg: LiveBenchConfig, url: str, device: str, physics: str, model: Path,
                 trust: Path, work: Path, seed: int) -> list[str]:
    env = f"{cfg.env_id}:{physics}" if physics else cfg.env_id
    return [sys.executable, "-m", "plasma.edge.cli", "run", "--broker", url, "--fleet", FLEET,
            "--device", device, "--model", str(model), "--trust", str(trust),
            "--state", str(work / "state" / device), "--env", env,
            "--rate-hz", str(cfg.rate_hz), "--seed", str(seed), *cfg.device_args]


def _medians(devices: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per physics, the median over devices and seeds of the headline figures (None counts as
    worse than any number for the step counts: a device that never reached is not skipped)."""
    out: dict[str, dict[str, Any]] = {}
    for text in dict.fromkeys(d["physics"] for d in devices):
        group = [d for d in devices if d["physics"] == text]
        out[text] = {"runs": len(group)}
        for key in ("steps_to_reach", "steps_to_hold", "first_packet_steps"):
            values = [d[key] if d[key] is not None else float("inf") for d in group]
            m = statistics.median(values)
            out[text][key] = None if m == float("inf") else m
        gaps = [d["gap_closed"] for d in group if d["gap_closed"] is not None]
        out[text]["gap_closed"] = statistics.median(gaps) if gaps else None
    return out

