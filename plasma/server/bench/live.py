"""``plasma-server bench live``: the product's own loop, measured where users run it.

For each seed: a fresh broker (Mosquitto when installed, else the embedded amqtt), one
``plasma-server run`` process with its defaults (``--budget`` aside) and N ``plasma-edge run``
daemons, each in its own physics (cycled from ``--physics``) at ``--rate-hz``. A
``FleetWatcher`` evaluates the policy active on each device noise-free at the start and at
every activation (base plus accepted adapters, int8 through the edge runtime, fixed-seed
episodes of that device's physics and device-side wrapper, outside the device). Progress goes
to stderr; the result is one JSON object (see ``bench_live``). With ``baseline="sb3-sac"``,
SB3's own SAC fine-tuning then runs on each seed's shifted physics with the same real-step
budget and evaluations (``plasma.server.bench.baseline``), scored by the same ``gap_figures``.

The oracle of a physics is a policy trained for it by ``train-base``: a bundle whose manifest has
that physics (``--models-dir``, ``PLASMA_MODELS``, then the shipped ones), else a cached
training run.
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

from plasma.edge.envs import load_wrapper
from plasma.protocol import ConfigError, SigningKey, TrustStore
from plasma.protocol.bundle import Bundle, load_bundle
from plasma.protocol.bus import BrokerConfig, MqttBus
from plasma.protocol.catalog import resolve_bundle

from ..catalog import find_model, oracle_return
from ..tasks import get_task
from ..tools.broker import start_local
from ..tools.processes import Processes, cpu_seconds
from ..tools.watch import DeviceWatch, FleetWatcher, parse_physics

__all__ = ["LiveBenchConfig", "bench_live", "device_result", "gap_at", "gap_figures", "median_steps"]

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
    """Base policy: a bundle directory or a bundle's name; None: the nominal bundle of
    ``env_id`` (shipped, or in ``models_dirs``)."""
    models_dirs: tuple[str, ...] = ()
    """The user's directories of bundles, searched before ``PLASMA_MODELS`` and the shipped ones
    (base policy and oracles)."""
    eval_episodes: int = 10
    """Fixed-seed episodes per noise-free evaluation."""
    reach: float = 0.9
    """Gap closed that counts as reached / held (issue 22 reports 0.8 for the MuJoCo tasks)."""
    out_dir: str | None = None
    """Keys, stores, state and logs; None: a temporary directory, removed afterwards."""
    server_args: tuple[str, ...] = ()
    """Extra ``plasma-server run`` flags (name them when you report figures)."""
    device_args: tuple[str, ...] = ()
    """Extra ``plasma-edge run`` flags (name them when you report figures)."""
    progress_s: float = 10.0
    """Seconds between progress lines on stderr."""
    device_wrapper: str | None = None
    """``module:Class`` every device daemon wraps its env in (``plasma-edge run --wrapper``);
    the watcher's evaluations and the oracle's use it too. The server is not told."""
    baseline: str | None = None
    """``"sb3-sac"``: SB3 SAC fine-tuning of ``baseline_zip`` beside Plasma (the [baselines]
    extra); None: Plasma only."""
    baseline_zip: str | None = None
    """The SAC zip the baseline fine-tunes; None: ``sac.zip`` in the base bundle directory."""
    baseline_steps: int | None = None
    """Real steps of each baseline run; None: what the Plasma device got in that seed."""
    baseline_eval_every: int = 500
    """Real steps between the baseline's noise-free evaluations."""


def bench_live(cfg: LiveBenchConfig) -> dict[str, Any]:
    """Run every seed; one dict: ``devices`` (one entry per device and seed), ``rounds``,
    ``server_cpu_s_per_round``, per-physics medians over seeds and, with ``cfg.baseline``, the
    ``baseline`` runs and their medians beside Plasma's (``plasma.server.bench.baseline``)."""
    try:
        get_task(cfg.env_id)
    except KeyError as exc:  # an unknown env: refused before anything starts
        raise ConfigError(str(exc.args[0])) from None
    for text in cfg.physics:
        parse_physics(text, cfg.env_id)  # ConfigError on an unknown physics name
    if not 0.0 < cfg.reach <= 1.0:
        raise ConfigError(f"reach must be in (0, 1], got {cfg.reach}")
    load_wrapper(cfg.device_wrapper)  # EnvError on a bad module:Class, before anything starts
    model = (resolve_bundle(cfg.model, cfg.models_dirs) if cfg.model
             else find_model(cfg.env_id, {}, cfg.models_dirs))
    bundle = load_bundle(model)
    baseline_zip = None
    if cfg.baseline:  # the [baselines] extra, imported only when asked for
        from .baseline import check_baseline

        baseline_zip = check_baseline(cfg, model)
    n_devices = cfg.devices or len(cfg.physics)
    physics = [cfg.physics[i % len(cfg.physics)] for i in range(n_devices)]
    oracles = {text: oracle_return(cfg.env_id, parse_physics(text, cfg.env_id),
                                   cfg.eval_episodes, cfg.device_wrapper, cfg.models_dirs,
                                   base=model)
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
    medians = _medians(devices)
    result = {"env": cfg.env_id, "budget": cfg.budget, "rate_hz": cfg.rate_hz,
              "duration_s": cfg.duration_s, "seeds": list(cfg.seeds), "model": str(model),
              "reach": cfg.reach, "device_wrapper": cfg.device_wrapper,
              "server_args": list(cfg.server_args), "device_args": list(cfg.device_args),
              "devices": devices, "rounds": rounds,
              "server_cpu_s_per_round": cpu / rounds if rounds else None,
              "medians": medians}
    if baseline_zip is not None:
        from .baseline import run_baseline

        result["baseline"] = run_baseline(cfg, baseline_zip, devices, medians)
    return result


def gap_figures(curve: Sequence[tuple[int, float]], base: float | None, oracle: float,
                reach: float) -> dict[str, Any]:
    """The issue's figures from a curve of (real steps, noise-free return), Plasma's or a
    baseline's: ``gaps``, the gap closed at each point, (return - base) / (oracle - base), None
    when there is no gap to close (oracle not above base); ``gap_closed``, the last one;
    ``steps_to_reach``, the steps of the first point at ``reach`` or more; ``steps_to_hold``,
    the steps of the earliest point from which every later one stays there (None: never)."""
    span = None if base is None else oracle - base
    gaps = [None if base is None or not span or span <= 0 else (r - base) / span
            for _, r in curve]
    reached = [s for (s, _), g in zip(curve, gaps) if g is not None and g >= reach]
    hold = None
    for i in range(len(curve) - 1, -1, -1):  # the earliest point from which all stay above
        gap = gaps[i]
        if gap is None or gap < reach:
            break
        hold = curve[i][0]
    return {"gaps": gaps, "gap_closed": gaps[-1] if gaps else None,
            "steps_to_reach": reached[0] if reached else None, "steps_to_hold": hold}


def gap_at(curve: Sequence[tuple[int, float]], base: float | None, oracle: float,
           steps: int) -> float | None:
    """The gap closed by the last point of ``curve`` at or before ``steps`` real steps."""
    before = [point for point in curve if point[0] <= steps]
    if not before:
        return None
    gaps: list[float | None] = gap_figures(before, base, oracle, 1.0)["gaps"]
    return gaps[-1]


def device_result(track: DeviceWatch, seed: int, oracle: float, reach: float) -> dict[str, Any]:
    """The issue's per-device figures from one device's evaluations."""
    evals = track.evaluations
    curve = [(e.steps, e.mean_return) for e in evals]
    base = evals[0].mean_return if evals else None
    figures = gap_figures(curve, base, oracle, reach)
    return {
        "device": track.device, "physics": track.physics_text, "seed": seed,
        "base_return": base, "oracle_return": oracle,
        "final_return": evals[-1].mean_return if evals else None,
        "gap_closed": figures["gap_closed"],
        "steps_to_reach": figures["steps_to_reach"], "steps_to_hold": figures["steps_to_hold"],
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
                               cfg.eval_episodes, cfg.device_wrapper)
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
            "--rate-hz", str(cfg.rate_hz), "--seed", str(seed),
            *(["--wrapper", cfg.device_wrapper] if cfg.device_wrapper else []), *cfg.device_args]


def _medians(devices: list[dict[str, Any]],
             keys: Sequence[str] = ("steps_to_reach", "steps_to_hold", "first_packet_steps")
             ) -> dict[str, dict[str, Any]]:
    """Per physics, the median over devices (or baseline runs) and seeds of the headline figures
    (None counts as worse than any number for the step counts ``keys``: a device that never
    reached is not skipped)."""
    out: dict[str, dict[str, Any]] = {}
    for text in dict.fromkeys(d["physics"] for d in devices):
        group = [d for d in devices if d["physics"] == text]
        out[text] = {"runs": len(group)}
        for key in keys:
            out[text][key] = median_steps([d[key] for d in group])
        gaps = [d["gap_closed"] for d in group if d["gap_closed"] is not None]
        out[text]["gap_closed"] = statistics.median(gaps) if gaps else None
    return out


def median_steps(values: Sequence[float | None]) -> float | None:
    """Median of step counts where None (never) counts as more than any number."""
    if not values:
        return None
    m = statistics.median(float("inf") if v is None else v for v in values)
    return None if m == float("inf") else m

