"""``plasma-server bench scale``: adaptation rounds per minute with W Ray workers vs one local one.

Each run: a fresh Mosquitto (``tools.broker.start_local``), one ``plasma-server run`` process
(``--executor ray --workers W`` or ``--executor local``) and D replay devices
(``bench.replay``: real Pendulum-v1 transitions recorded in Gymnasium with the nominal base
policy in a shifted physics, each device with its own MQTT session) sending at ``rate_hz``, so
that every device is due a round faster than rounds complete (the executor is the bottleneck).
After ``duration_s`` the devices stop and the server gets up to ``drain_s`` to finish the rounds
still due. Everything is measured on the wire, from the judicial topic and the device packet
topics:

- ``rounds``: judicial records received in the sending window; ``rounds_per_min`` = rounds /
  window minutes.
- ``p50/p99_data_to_packet_s``: packet received - the newest transition its round used (the
  packet's ``provenance.trace_to``, the device's send clock), over all packets of the run.
- a record's data range is ``scores["data_cursor_from"/"data_cursor_to"]`` (store chunk ids).
  Per device, records sorted by range start: ``duplicate_rounds`` counts records whose range
  starts before the previous one ended (data counted twice); ``lost_rounds`` counts gaps (a
  range starting after the previous one ended: data no record covers) plus devices with at
  least ``min_new_transitions`` transitions after their last record once the drain is over (a
  due round that never produced a record).

With ``--executor ray`` and no ``--ray-address`` the bench starts a Ray cluster on this machine:
a head with no CPUs and W worker nodes of one CPU each (``ray start``, each in its own session,
token-authenticated, workers at niceness 0), and the server joins it with ``--ray-address``.
Separate sessions matter on Linux with autogroup scheduling: processes of one session share one
CPU share, so W workers started by the server itself would, on a busy machine, get the CPU of one.

``--kill-worker`` SIGKILLs one Ray worker process computing a round halfway through the window.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["ScaleBenchConfig", "bench_scale", "register", "round_pids"]

log = logging.getLogger(__name__)
FLEET = "scale"


@dataclass
class ScaleBenchConfig:
    """``plasma-server bench scale`` settings (name them when you report figures)."""

    devices: int = 8
    workers: int = 2
    executor: str = "ray"
    compare_local: bool = True
    """Also run ``--executor local`` on the same settings and report the ratio."""
    kill_worker: bool = False
    duration_s: float = 60.0
    drain_s: float = 120.0
    """Longest wait after the devices stop (it ends as soon as no device is due)."""
    rate_hz: float = 50.0
    frame_rows: int = 50
    min_new_transitions: int = 200
    budget: str = "small"
    physics: str = "m=1.6,g=12"
    device_processes: int = 2
    ray_address: str | None = None
    seed: int = 0
    out_dir: str | None = None
    models_dirs: tuple[str, ...] = ()
    """The user's directories of bundles, searched for the nominal Pendulum base policy before
    ``PLASMA_MODELS`` and the shipped bundles."""


def bench_scale(cfg: ScaleBenchConfig) -> dict[str, Any]:
    """The main run, plus the local run and the ratio when asked: one dict."""
    from plasma.protocol.bundle import load_bundle

    from ..catalog import find_model
    from ..run import policy_from_bundle
    from ..tools.watch import parse_physics
    from .replay import record

    root = Path(cfg.out_dir) if cfg.out_dir else Path(tempfile.mkdtemp(prefix="plasma-scale-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        model = find_model("Pendulum-v1", {}, cfg.models_dirs)
        data = record("Pendulum-v1", parse_physics(cfg.physics),
                      policy_from_bundle(load_bundle(model)), 8000, root / "replay.npz",
                      seed=cfg.seed)
        out = _run(cfg, cfg.executor, cfg.workers, cfg.kill_worker, root / cfg.executor, model,
                   data)
        if cfg.compare_local and cfg.executor != "local":
            local = _run(cfg, "local", 1, False, root / "local", model, data)
            out["local"] = local
            out["ratio"] = (out["rounds_per_min"] / local["rounds_per_min"]
                            if local["rounds_per_min"] else None)
        out["settings"] = {k: v for k, v in asdict(cfg).items() if k != "out_dir"}
        return out
    finally:
        if cfg.out_dir is None:
            shutil.rmtree(root, ignore_errors=True)


def _run(cfg: ScaleBenchConfig, executor: str, workers: int, kill: bool, work: Path,
         model: Path, data: Path) -> dict[str, Any]:
    from plasma.protocol import AuditRecord, SigningKey, TrustStore, decode_packet, topics
    from plasma.protocol.bus import BrokerConfig, MqttBus

    from ..publisher import judicial_topic
    from ..store import TraceStore
    from ..tools.broker import start_local
    from ..tools.processes import Processes

    SigningKey.generate().save(work / "keys")
    trust = TrustStore.from_dir(work / "keys")
    url, broker, _ = start_local(work / "broker")
    procs = Processes(work / "logs")
    names = [f"dev-{i}" for i in range(cfg.devices)]
    records: list[tuple[float, AuditRecord]] = []
    latencies: list[float] = []
    lock = threading.Lock()

    def on_record(m: Any) -> None:
        with lock:
            records.append((time.time(), AuditRecord.model_validate_json(m.payload)))

    def on_packet(m: Any) -> None:
        got = time.time()
        try:
            header = decode_packet(m.payload, trust).header
        except Exception:  # noqa: BLE001 - a retained packet of another run; not ours
            return
        with lock:
            latencies.append(got - header.provenance.trace_to)

    bus = MqttBus(BrokerConfig.from_url(url), client_id=f"scale-watch-{os.getpid()}", clean=True)
    store_path = work / "traces.sqlite"
    killed: list[int] = []
    try:
        bus.connect()
        address = cfg.ray_address
        if executor == "ray" and not address:
            address = _start_ray(procs, workers)
        bus.subscribe(judicial_topic(FLEET), on_record, qos=1)
        for dev in names:
            bus.subscribe(topics.device_adapter(FLEET, dev), on_packet, qos=1)
        procs.start("server", [
            sys.executable, "-m", "plasma.server.cli", "run", "--broker", url, "--fleet", FLEET,
            "--key", str(work / "keys"), "--model", str(model), "--store", str(store_path),
            "--env", "Pendulum-v1", "--budget", cfg.budget, "--seed", str(cfg.seed),
            "--min-new-transitions", str(cfg.min_new_transitions), "--publish-interval", "0",
            "--check-interval", "0.2", "--executor", executor, "--workers", str(workers),
            *(["--ray-address", address] if address and executor == "ray" else [])])
        _wait_ready(procs, work / "logs" / "server.log")
        log.warning("%s executor (%d worker(s)): server ready; %d devices for %.0f s", executor,
                    workers, cfg.devices, cfg.duration_s)
        t0 = time.time()
        shards = np.array_split(np.array(names), max(1, min(cfg.device_processes, cfg.devices)))
        for i, shard in enumerate(shards):
            procs.start(f"replay-{i}", [
                sys.executable, "-m", "plasma.server.bench.replay", "--broker", url, "--fleet",
                FLEET, "--devices", ",".join(shard), "--data", str(data), "--rate-hz",
                str(cfg.rate_hz), "--frame-rows", str(cfg.frame_rows), "--duration",
                str(cfg.duration_s)])
        while time.time() - t0 < cfg.duration_s:
            if kill and not killed and time.time() - t0 >= cfg.duration_s / 2:
                killed += _kill_one(procs)
            dead = [d for d in procs.check() if d.startswith("server")]
            if dead:
                raise RuntimeError(f"{dead[0]} (log in {procs.log_dir})")
            time.sleep(0.5)
            _progress(executor, t0, records, lock)
        t_end = time.time()
        with TraceStore(store_path) as store:
            deadline = time.time() + cfg.drain_s
            while time.time() < deadline and _still_due(store, names, records, lock, cfg):
                time.sleep(1.0)
            time.sleep(1.0)
            with lock:
                recs = list(records)
                lat = list(latencies)
            lost, dup = _lost_and_duplicate(store, names, [r for _, r in recs], cfg)
            t_drained = time.time()
    finally:
        procs.stop()
        _stop_sessions(procs)
        bus.close()
        broker.terminate()
        broker.wait(10)
    cpu = [r.scores["round_cpu_s"] for _, r in recs if "round_cpu_s" in r.scores]
    wall = [r.scores["round_wall_s"] for _, r in recs if "round_wall_s" in r.scores]
    window = [r for t, r in recs if t <= t_end]
    minutes = (t_end - t0) / 60
    return {"executor": executor, "devices": cfg.devices, "workers": workers,
            "budget": cfg.budget, "rounds": len(window),
            "rounds_per_min": len(window) / minutes if minutes else 0.0,
            "rounds_after_drain": len(recs),
            "p50_data_to_packet_s": float(np.percentile(lat, 50)) if lat else None,
            "p99_data_to_packet_s": float(np.percentile(lat, 99)) if lat else None,
            "packets": len(lat), "lost_rounds": lost, "duplicate_rounds": dup,
            "drain_s": round(t_drained - t_end, 1),
            "cpu_s_per_round": float(np.median(cpu)) if cpu else None,
            "wall_s_per_round": float(np.median(wall)) if wall else None,
            "killed_worker_pids": killed,
            "verdicts": {v: sum(1 for _, r in recs if r.verdict == v)
                         for v in sorted({r.verdict for _, r in recs})}}


def _start_ray(procs: Any, workers: int, timeout: float = 90.0) -> str:
    """A head (0 CPUs) and ``workers`` one-CPU worker nodes, each its own session; returns the
    address. The token and the niceness go to every Ray process and the server by environment."""
    import secrets

    from ..tools.broker import free_port

    os.environ.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16),
                       "RAY_worker_niceness": "0"})
    ray_bin = str(Path(sys.executable).with_name("ray"))
    port = free_port()
    address = f"127.0.0.1:{port}"
    common = ["--node-ip-address", "127.0.0.1", "--object-store-memory", str(100 * 2**20),
              "--disable-usage-stats", "--block"]
    procs.start("ray-head", [ray_bin, "start", "--head", "--port", str(port), "--num-cpus", "0",
                             "--include-dashboard", "false", *common])
    _wait_started(procs, "ray-head", timeout)
    for i in range(workers):  # one at a time: raylets starting together time out on 2 busy cores
        for attempt in range(3):
            name = f"ray-worker-{i}" + (f"-retry{attempt}" if attempt else "")
            procs.start(name, [ray_bin, "start", "--address", address, "--num-cpus", "1",
                               *common])
            if _wait_started(procs, name, timeout, fail=attempt == 2):
                break
    log.warning("Ray cluster at %s: head and %d one-CPU worker node(s)", address, workers)
    return address


def _wait_started(procs: Any, name: str, timeout: float, fail: bool = True) -> bool:
    """Until ``ray start --block`` says it is up; False (or RuntimeError if ``fail``) when the
    process exits first."""
    log_file = procs.log_dir / f"{name}.log"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log_file.exists() and "will now block" in log_file.read_text(errors="replace"):
            return True
        if procs.children[name].poll() is not None:  # its session is still swept at the end
            if fail:
                break
            return False
        time.sleep(0.3)
    raise RuntimeError(f"{name} did not start (log in {log_file})")


def _stop_sessions(procs: Any) -> None:
    """Every process left in the sessions of the bench's children (Ray's raylets, GCS and
    workers outlive ``ray start`` for a while): SIGTERM, then SIGKILL."""
    sids = {p.pid for p in procs.children.values()}
    for sig in (signal.SIGTERM, signal.SIGKILL):
        left = [pid for pid in _pids() if _sid(pid) in sids]
        for pid in left:
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        if not left:
            return
        time.sleep(3.0)


def _pids() -> list[int]:
    return [int(e.name) for e in Path("/proc").iterdir() if e.name.isdigit()]


def _sid(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[3])
    except (OSError, ValueError, IndexError):
        return None


def _wait_ready(procs: Any, log_file: Path, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        dead = [d for d in procs.check() if d.startswith("server")]
        if dead:
            raise RuntimeError(f"{dead[0]} (log in {log_file})")
        if log_file.exists() and "plasma-server: fleet" in log_file.read_text(errors="replace"):
            return
        time.sleep(0.3)
    raise RuntimeError(f"the server was not ready within {timeout:.0f} s (log in {log_file})")


def _progress(executor: str, t0: float, records: list[Any], lock: threading.Lock) -> None:
    elapsed = time.time() - t0
    if int(elapsed) % 10 == 0 and elapsed % 1 < 0.5:
        with lock:
            n = len(records)
        print(f"{executor}: t={elapsed:4.0f}s rounds={n}", file=sys.stderr, flush=True)


def _covered(records: list[Any]) -> dict[str, list[tuple[int, int]]]:
    """device -> the data ranges (from, to] of its device-slot records, by start."""
    out: dict[str, list[tuple[int, int]]] = {}
    seen: set[str] = set()
    for r in records:
        if r.slot != "device" or r.device is None or r.record_id in seen:
            continue  # a QoS 1 redelivery of the same record is transport, not a round
        seen.add(r.record_id)
        out.setdefault(r.device, []).append((int(r.scores["data_cursor_from"]),
                                             int(r.scores["data_cursor_to"])))
    return {d: sorted(v) for d, v in out.items()}


def _still_due(store: Any, names: list[str], records: list[Any], lock: threading.Lock,
               cfg: ScaleBenchConfig) -> bool:
    with lock:
        covered = _covered([r for _, r in records])
    return any(store.count_rows(FLEET, d, after_id=covered[d][-1][1] if d in covered else 0)
               >= cfg.min_new_transitions for d in names)


def _lost_and_duplicate(store: Any, names: list[str], records: list[Any],
                        cfg: ScaleBenchConfig) -> tuple[int, int]:
    lost = dup = 0
    covered = _covered(records)
    for device in names:
        end = 0
        for start, stop in covered.get(device, []):
            if start < end:
                dup += 1
            elif start > end:
                lost += 1
            end = max(end, stop)
        if store.count_rows(FLEET, device, after_id=end) >= cfg.min_new_transitions:
            lost += 1
    return lost, dup


def round_pids(ancestor: int | None = None) -> list[int]:
    """Ray worker processes computing a round now (Ray titles them ``ray::run_round``),
    optionally only descendants of ``ancestor``."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and (entry / "cmdline").read_bytes().startswith(
                    b"ray::run_round"):
                pid = int(entry.name)
                if ancestor is None or _descends(pid, ancestor):
                    pids.append(pid)
        except OSError:
            continue
    return pids


def _descends(pid: int, ancestor: int) -> bool:
    while pid > 1:
        if pid == ancestor:
            return True
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            return False
    return False


def _kill_one(procs: Any) -> list[int]:
    """SIGKILL one Ray worker of this bench (in a child's session) computing a round."""
    sids = {p.pid for p in procs.children.values()}
    pids = [pid for pid in round_pids() if _sid(pid) in sids]
    if not pids:
        return []
    os.kill(pids[0], signal.SIGKILL)
    print(f"killed Ray worker {pids[0]} mid-round", file=sys.stderr, flush=True)
    return [pids[0]]


def _bench(args: argparse.Namespace) -> int:
    from plasma.protocol._cli import UsageError

    if min(args.devices, args.workers, args.min_new_transitions) < 1 or min(
            args.duration, args.rate_hz) <= 0 or args.drain < 0:
        raise UsageError("--devices, --workers, --min-new-transitions, --duration and --rate-hz "
                         "must be positive, --drain >= 0")
    cfg = ScaleBenchConfig(devices=args.devices, workers=args.workers, executor=args.executor,
                           compare_local=not args.no_local, kill_worker=args.kill_worker,
                           duration_s=args.duration, drain_s=args.drain, rate_hz=args.rate_hz,
                           min_new_transitions=args.min_new_transitions, budget=args.budget,
                           device_processes=args.device_processes, ray_address=args.ray_address,
                           seed=args.seed, out_dir=args.out, models_dirs=tuple(args.models_dir or ()))
    from plasma.protocol.errors import BundleNotFound

    from ..commands import MODEL_HINT

    try:
        result = bench_scale(cfg)
    except BundleNotFound as exc:
        raise UsageError(f"{exc}: {MODEL_HINT}") from None
    except (FileNotFoundError, RuntimeError) as exc:
        raise UsageError(str(exc)) from None
    print(json.dumps(result), flush=True)
    return 0


def register(bsub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``plasma-server bench scale``."""
    from plasma.protocol._cli import add_models_dir_argument

    p = bsub.add_parser("scale", help="rounds per minute: D replay devices, W Ray workers vs "
                                      "one local worker")
    p.add_argument("--devices", type=int, default=8)
    p.add_argument("--workers", type=int, default=2, help="Ray workers (rounds in flight)")
    p.add_argument("--executor", choices=["ray", "local"], default="ray")
    p.add_argument("--no-local", dest="no_local", action="store_true",
                   help="skip the --executor local run (and the ratio)")
    p.add_argument("--kill-worker", dest="kill_worker", action="store_true",
                   help="SIGKILL a Ray worker computing a round halfway through")
    p.add_argument("--duration", type=float, default=60.0, metavar="SECONDS")
    p.add_argument("--drain", type=float, default=120.0, metavar="SECONDS",
                   help="after the devices stop, the longest wait for the rounds still due "
                        "(default 120; ends when none is due)")
    p.add_argument("--rate-hz", dest="rate_hz", type=float, default=50.0)
    p.add_argument("--min-new-transitions", dest="min_new_transitions", type=int, default=200)
    p.add_argument("--budget", choices=["default", "small"], default="small")
    p.add_argument("--device-processes", dest="device_processes", type=int, default=2)
    p.add_argument("--ray-address", dest="ray_address", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, metavar="DIR", help="keep logs and stores here")
    add_models_dir_argument(p)
    p.set_defaults(handler=_bench)
