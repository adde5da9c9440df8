"""``plasma-server`` subcommands beyond keys and packets: training, benchmarks, demo, models, fuzz.

Each handler imports its stage lazily, so ``plasma-server --help`` and the packet tools
start fast and a missing optional dependency is reported only by the command needing it.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from plasma.protocol._cli import EXIT_OK, Parser, UsageError, add_models_dir_argument, parse_kv

__all__ = ["MODEL_HINT", "model_arg", "model_row", "models_table", "register"]

log = logging.getLogger("plasma.server")

MODEL_HINT = ("pass --model BUNDLE_DIR (or the name of a bundle: `plasma-server models list`), "
              "add a directory of bundles with --models-dir DIR, or make one with "
              "`plasma-server train-base`")
"""What a command appends to a ``BundleNotFound`` (the library names ``policy=`` instead)."""


def _print(result: Any) -> int:
    print(json.dumps(_plain(result)))
    return EXIT_OK


def _plain(value: Any) -> Any:
    """JSON-ready copy: numpy scalars and arrays become numbers and lists; objects (a trained
    policy, an adapter) are dropped - the figures are the output, artefacts go to files."""
    if isinstance(value, dict):
        items = ((str(k), _plain(v)) for k, v in value.items())
        return {k: v for k, v in items if v is not _DROP}
    if isinstance(value, (list, tuple)):
        return [v for v in map(_plain, value) if v is not _DROP]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if hasattr(value, "tolist"):  # numpy scalar or array
        return value.tolist()
    return _DROP


_DROP = object()


def _physics(text: str | None, env: str | None = None) -> dict[str, float]:
    if env is None:
        return parse_kv(text or "", "physics override")
    from .tools.watch import parse_physics  # NAME=*FACTOR and MuJoCo fields, checked on env

    return parse_physics(text or "", env)


def _seeds(text: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise UsageError(f"--seeds must be integers separated by commas, got {text!r}") from None


def _needs(extra: str, exc: ImportError) -> UsageError:
    return UsageError(f"{exc.name or 'a dependency'} is missing: pip install 'plasma[{extra}]'")


def _no_bundle(exc: Exception) -> UsageError:
    """A ``BundleNotFound`` in the words of the command line."""
    return UsageError(f"{exc}: {MODEL_HINT}")


def model_arg(args: argparse.Namespace) -> str | None:
    """``--model`` as a bundle directory: a path, or a name looked up in ``--models-dir``,
    ``PLASMA_MODELS`` and the shipped bundles (None when the flag is not given)."""
    if args.model is None:
        return None
    from plasma.protocol.catalog import resolve_bundle
    from plasma.protocol.errors import BundleNotFound

    try:
        return str(resolve_bundle(args.model, args.models_dir))
    except BundleNotFound as exc:
        raise _no_bundle(exc) from None


# ------------------------------------------------------------------ train-base


def _train_base(args: argparse.Namespace) -> int:
    try:
        from .basepolicy import TrainBaseConfig, train_base
    except ImportError as exc:
        raise _needs("server", exc) from None
    cfg = TrainBaseConfig(env_id=args.env, physics=_physics(args.physics, args.env), out_dir=args.out,
                          seed=args.seed)
    return _print(train_base(cfg))


def _import_policy(args: argparse.Namespace) -> int:
    try:
        from .importer import import_policy
    except ImportError as exc:
        raise _needs("server", exc) from None
    return _print(import_policy(args.model, args.env, args.out, output=args.output,
                                rescale_actions=args.rescale_actions, force=args.force))


# ------------------------------------------------------------------ benchmarks


def _bench_adapt(args: argparse.Namespace) -> int:
    try:
        from .bench.adapt import AdaptBenchConfig, bench_adapt
    except ImportError as exc:
        raise _needs("server", exc) from None
    runs = []
    for seed in _seeds(args.seeds):
        cfg = AdaptBenchConfig(env_id=args.env, physics=_physics(args.physics, args.env), seed=seed,
                               budget=args.budget, world_model=args.world_model,
                               explore_noise=args.explore_noise,
                               **({"real_steps": args.steps} if args.steps else {}))
        log.info("bench adapt: %s %s seed %d", args.env, args.physics, seed)
        runs.append(bench_adapt(cfg))
    if len(runs) == 1:
        return _print(runs[0])
    return _print(_aggregate(runs))


def _aggregate(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Means over seeds of the headline figures, and every run in full."""
    import numpy as np

    keys = ("base_return", "final_return", "oracle_return", "gap_closed", "real_steps",
            "packets", "packet_bytes", "server_cpu_s_per_round", "wall_s")
    out: dict[str, Any] = {k: float(np.median([r[k] for r in runs])) for k in keys if k in runs[0]}
    out["aggregate"] = "median over seeds"
    out["gap_closed_min"] = float(min(r["gap_closed"] for r in runs))
    for k in ("steps_to_reach", "steps_to_hold"):  # None (never) counts as infinitely many steps
        vals = sorted(float("inf") if r[k] is None else r[k] for r in runs)
        med = vals[len(vals) // 2] if len(vals) % 2 else (vals[len(vals) // 2 - 1] + vals[len(vals) // 2]) / 2
        out[k] = None if med == float("inf") else med
    out["seeds"] = runs
    return out


def _bench_phantom(args: argparse.Namespace) -> int:
    from .phantom import PhantomBenchConfig, bench_phantom

    return _print(bench_phantom(PhantomBenchConfig(paths=args.paths, horizon=args.horizon)))


def _bench_audit(args: argparse.Namespace) -> int:
    from .bench.audit import AuditBenchConfig, bench_audit

    cfg = AuditBenchConfig(seeds=_ints(args.seeds), budget=args.budget,
                           calibration_seeds=_ints(args.calibration_seeds)
                           if args.calibration_seeds is not None else None,
                           splits=(args.split,), jobs=args.jobs,
                           thresholds=Path(args.thresholds) if args.thresholds else None,
                           overrides=parse_kv(args.set or "", "threshold"),
                           write_thresholds=args.write_thresholds,
                           allow_recalibrated=args.allow_recalibrated)
    if args.families:
        cfg.families = tuple(args.families.split(","))
    return _print(bench_audit(cfg))


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(s) for s in text.split(",") if s.strip())


def _bench_e2e(args: argparse.Namespace) -> int:
    from .bench.fleet import bench_e2e

    return _print(bench_e2e(args.broker, packets=args.packets, rank=args.rank, model=model_arg(args),
                            full_model_pushes=args.full_model_pushes, swap=args.swap,
                            link_kbps=args.link_kbps))


def _bench_fleet(args: argparse.Namespace) -> int:
    from .bench.fleet import bench_fleet

    return _print(bench_fleet(args.broker, devices=args.devices, processes=args.processes,
                              rank=args.rank, model=model_arg(args), swap=args.swap))


def _bench_live(args: argparse.Namespace) -> int:
    try:
        from .bench.live import bench_live
    except ImportError as exc:
        raise _needs("server", exc) from None
    from plasma.protocol.errors import BundleNotFound

    cfg = _live_config(args)
    try:
        return _print(bench_live(cfg))
    except BundleNotFound as exc:
        raise _no_bundle(exc) from None
    except (FileNotFoundError, RuntimeError) as exc:
        raise UsageError(str(exc)) from None


def _live_config(args: argparse.Namespace) -> Any:
    """``bench live`` flags -> a ``LiveBenchConfig`` (usage errors before anything starts)."""
    from .bench.live import LiveBenchConfig

    physics = tuple(p.strip() for p in args.physics.split(";"))
    for text in physics:
        _physics(text, args.env)  # a usage error for a malformed entry, before anything starts
    if not 0.0 < args.reach <= 1.0:
        raise UsageError(f"--reach must be in (0, 1], got {args.reach}")
    baseline_flags = [flag for flag, value in (("--baseline-zip", args.baseline_zip),
                                               ("--baseline-steps", args.baseline_steps))
                      if value is not None]
    if baseline_flags and not args.baseline:
        raise UsageError(f"{', '.join(baseline_flags)} need --baseline sb3-sac")
    return LiveBenchConfig(env_id=args.env, physics=physics, devices=args.devices,
                           seeds=tuple(_seeds(args.seeds)), duration_s=args.duration,
                           rate_hz=args.rate_hz, budget=args.budget, model=args.model,
                           eval_episodes=args.eval_episodes, reach=args.reach, out_dir=args.out,
                           server_args=tuple(args.server_arg), device_args=tuple(args.device_arg),
                           device_wrapper=args.device_wrapper, baseline=args.baseline,
                           baseline_zip=args.baseline_zip, baseline_steps=args.baseline_steps,
                           baseline_eval_every=args.baseline_eval_every,
                           models_dirs=tuple(args.models_dir or ()))


# ------------------------------------------------------------------ demo and fuzz


def _demo(args: argparse.Namespace) -> int:
    try:
        from .tools.demo import DemoConfig, run_demo
    except ImportError as exc:
        raise _needs("demo", exc) from None
    from plasma.protocol.errors import BundleNotFound

    physics = tuple(p for p in (args.physics or "").split(";") if p) or DemoConfig.physics
    cfg = DemoConfig(broker=args.broker, devices=args.devices, duration_s=args.duration,
                     out_dir=args.out, model=args.model, physics=physics,
                     rate_hz=args.rate_hz, models_dirs=tuple(args.models_dir or ()))
    try:
        summary = run_demo(cfg)
    except BundleNotFound as exc:
        raise _no_bundle(exc) from None
    print(json.dumps(summary, indent=2))
    return {"completed": EXIT_OK, "interrupted": 130}.get(summary["outcome"], 1)


# ------------------------------------------------------------------ models


def _models_list(args: argparse.Namespace) -> int:
    from plasma.protocol.catalog import list_bundles

    rows = [model_row(b) for b in list_bundles(args.models_dir)]
    if args.json:
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    print(models_table(rows))
    return EXIT_OK


def model_row(info: Any) -> dict[str, Any]:
    """One ``models list`` row of a ``plasma.protocol.catalog.BundleInfo``."""
    return {"name": info.name, "env_id": info.env_id, "physics": _physics_text(info),
            "source": info.source, "int8_bytes": info.int8_bytes, "total_bytes": info.total_bytes,
            "mean_return": info.mean_return, "shadowed": info.shadowed, "path": str(info.path)}


def models_table(rows: list[dict[str, Any]]) -> str:
    """The rows as an aligned text table (sizes in KB); a shadowed bundle is marked ``*``."""
    head = ("NAME", "TASK", "PHYSICS", "SOURCE", "INT8 KB", "TOTAL KB", "RETURN")
    body = [(r["name"] + ("*" if r["shadowed"] else ""), r["env_id"] or "?", r["physics"],
             r["source"], f"{r['int8_bytes'] / 1024:.1f}", f"{r['total_bytes'] / 1024:.1f}",
             "" if r["mean_return"] is None else f"{r['mean_return']:.1f}") for r in rows]
    widths = [max(len(str(c)) for c in col) for col in zip(head, *body)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip()
             for line in (head, *body)]
    if any(r["shadowed"] for r in rows):
        lines.append("* shadowed by a bundle of the same name earlier in the search order")
    return "\n".join(lines)


def _physics_text(info: Any) -> str:
    """The physics a bundle was trained at, as overrides of the task's nominal physics:
    SCORE.json's own words when it has them, else the manifest against the task's defaults."""
    score = info.score or {}
    if isinstance(score.get("physics_text"), str):
        return score["physics_text"] or "nominal"
    if isinstance(score.get("physics"), dict):
        return _kv(score["physics"])
    physics = dict(info.physics)
    try:
        from .tasks import TASKS  # the classic tasks, registered without building anything

        nominal = TASKS[info.env_id].default_physics if info.env_id in TASKS else {}
    except ImportError:  # a device-only install without the task's dependencies
        nominal = {}
    if nominal and set(physics) <= set(nominal):
        physics = {k: v for k, v in physics.items() if float(nominal[k]) != float(v)}
    return _kv(physics)


def _kv(physics: dict[str, Any]) -> str:
    text = ",".join(f"{k}={v:g}" if isinstance(v, (int, float)) else f"{k}={v}"
                    for k, v in physics.items())
    return text or "nominal"


def _fuzz(args: argparse.Namespace) -> int:
    from .tools.fuzz import run

    return run(args)


# ------------------------------------------------------------------ registration


def register(sub: argparse._SubParsersAction) -> None:
    from .run import register as register_run

    register_run(sub)
    train = sub.add_parser("train-base", help="train a base policy and export a bundle")
    train.add_argument("--env", default="Pendulum-v1", help="Gymnasium id (default Pendulum-v1)")
    train.add_argument("--physics", default=None, metavar="K=V,...",
                       help="physics overrides, e.g. m=1.6,g=12")
    train.add_argument("--out", required=True, metavar="DIR", help="bundle directory to write")
    train.add_argument("--seed", type=int, default=0)
    train.set_defaults(handler=_train_base)

    imp = sub.add_parser("import-policy", help="an ONNX MLP policy (PyTorch, Stable-Baselines3) -> a bundle")
    imp.add_argument("model", metavar="MODEL.onnx", help="the exported policy")
    imp.add_argument("--env", required=True, help="the Gymnasium world it acts in, e.g. Pendulum-v1")
    imp.add_argument("--out", required=True, metavar="BUNDLE", help="bundle directory to write")
    imp.add_argument("--output", default=None, metavar="NAME",
                     help="the graph output holding the actions (default: the first; SB3 PPO's is the first)")
    imp.add_argument("--rescale-actions", dest="rescale_actions", action="store_true",
                     help="map a final tanh's [-1, 1] onto the env's action bounds (SB3's unscale_action, "
                          "for SAC/TD3 actors exported as the SB3 recipe writes them)")
    imp.add_argument("--force", action="store_true", help="overwrite a non-empty --out")
    imp.set_defaults(handler=_import_policy)

    bench = sub.add_parser("bench", help="benchmarks; each prints one JSON object")
    bsub = bench.add_subparsers(dest="bench_command", metavar="BENCH", required=True,
                                parser_class=Parser)
    adapt = bsub.add_parser("adapt", help="the adaptation loop without a broker")
    adapt.add_argument("--env", default="Pendulum-v1")
    adapt.add_argument("--physics", default="m=1.6,g=12", metavar="K=V,...",
                       help="the device's shifted physics (default m=1.6,g=12)")
    adapt.add_argument("--seeds", default="0", help="comma-separated seeds (default 0)")
    adapt.add_argument("--steps", type=int, default=None, help="real device steps (default 3000)")
    adapt.add_argument("--budget", choices=["default", "small"], default="default",
                       help="the round's named budget (default: default, as plasma-server run)")
    adapt.add_argument("--world-model", dest="world_model", default="auto",
                       choices=["auto", "physics", "ensemble"],
                       help="auto (the product's default: physics when the task has a simulator)")
    adapt.add_argument("--explore-noise", dest="explore_noise", type=float, default=0.0,
                       help="device exploration noise (default 0, plasma-edge run's default)")
    adapt.set_defaults(handler=_bench_adapt)

    phantom = bsub.add_parser("phantom", help="batched world-model rollout throughput")
    phantom.add_argument("--paths", type=int, default=1000)
    phantom.add_argument("--horizon", type=int, default=30)
    phantom.set_defaults(handler=_bench_phantom)

    audit = bsub.add_parser("audit", help="judicial auditor: honest and exploit families, "
                            "calibration and held-out splits")
    audit.add_argument("--seeds", default="0,1,2,3,4",
                       help="held-out (or development) instance seeds")
    audit.add_argument("--calibration-seeds", default=None,
                       help="calibration instance seeds (default: the first two of --seeds)")
    audit.add_argument("--budget", default="default", choices=("default", "small"))
    audit.add_argument("--split", default="heldout",
                       choices=("calibration", "heldout", "development"),
                       help="one split per run: calibration may try (--set) and write "
                       "(--write-thresholds) thresholds; heldout only reads them and refuses "
                       "thresholds written after its last result (default: heldout); "
                       "development: the red team's own shifts, in neither split, judged for "
                       "the controls' harm (no oracles, no ledger)")
    audit.add_argument("--families", default=None, help="comma-separated subset of families")
    audit.add_argument("--jobs", type=int, default=2, help="instances run in parallel processes")
    audit.add_argument("--thresholds", default=None, metavar="FILE",
                       help="judicial thresholds file (default: the shipped one)")
    audit.add_argument("--set", default=None, metavar="K=V[,K=V]",
                       help="calibration: thresholds to try instead of the file's")
    audit.add_argument("--write-thresholds", action="store_true",
                       help="calibration: write the thresholds judged with to the file")
    audit.add_argument("--allow-recalibrated", action="store_true",
                       help="heldout: run although the thresholds were written after the last "
                       "held-out result (recorded in the output and the ledger)")
    audit.set_defaults(handler=_bench_audit)

    e2e = bsub.add_parser("e2e", help="publish -> device swap latency vs a full-model push")
    e2e.add_argument("--broker", required=True, metavar="URL")
    e2e.add_argument("--packets", type=int, default=200)
    e2e.add_argument("--full-model-pushes", type=int, default=100)
    e2e.add_argument("--rank", type=int, default=4)
    e2e.add_argument("--swap", choices=["rebuild", "inplace"], default="rebuild",
                     help="device runtime's swap mode (default rebuild, as the daemon)")
    e2e.add_argument("--model", default=None, metavar="BUNDLE",
                     help="a bundle directory or name (default: a random MLP 64-256-256-256-8)")
    add_models_dir_argument(e2e)
    e2e.add_argument("--link-kbps", type=float, default=None, metavar="KBPS",
                     help="the device reaches the broker through a relay carrying this many "
                          "kbit/s each way (mqtt:// only; e.g. 1000 with --packets 50 "
                          "--full-model-pushes 10)")
    e2e.set_defaults(handler=_bench_e2e)

    fleet = bsub.add_parser("fleet", help="one fleet packet to N devices")
    fleet.add_argument("--broker", default=None, metavar="URL",
                       help="broker URL (default: a Mosquitto of the bench's own, sized for --devices)")
    fleet.add_argument("--devices", type=int, default=200)
    fleet.add_argument("--processes", type=int, default=4, help="device worker processes")
    fleet.add_argument("--rank", type=int, default=4)
    fleet.add_argument("--swap", choices=["rebuild", "inplace"], default="rebuild",
                     help="device runtime's swap mode (default rebuild, as the daemon)")
    fleet.add_argument("--model", default=None, metavar="BUNDLE",
                       help="a bundle directory or name (default: a random MLP 64-256-256-256-8)")
    add_models_dir_argument(fleet)
    fleet.set_defaults(handler=_bench_fleet)

    live = bsub.add_parser("live", help="the product loop: server and device daemons over a "
                                        "broker, noise-free evaluations at every activation")
    live.add_argument("--env", default="Pendulum-v1")
    live.add_argument("--physics", default="m=1.6,g=12", metavar="K=V,...;K=V,...",
                      help="per-device physics, separated by ';' (cycled; default m=1.6,g=12)")
    live.add_argument("--devices", type=int, default=None,
                      help="devices per seed (default: one per physics entry)")
    live.add_argument("--seeds", default="0", help="comma-separated seeds, one run each")
    live.add_argument("--duration", type=float, default=120.0, metavar="SECONDS",
                      help="length of each run (default 120)")
    live.add_argument("--rate-hz", type=float, default=50.0, help="device control rate (50)")
    live.add_argument("--budget", default="default", help="server compute budget per round")
    live.add_argument("--model", default=None, metavar="BUNDLE",
                      help="base policy, a bundle directory or name (default: the nominal bundle "
                           "of --env, shipped or in --models-dir)")
    add_models_dir_argument(live)
    live.add_argument("--eval-episodes", type=int, default=10)
    live.add_argument("--out", default=None, metavar="DIR",
                      help="keep keys, stores, state and logs here (default: a temporary dir)")
    live.add_argument("--server-arg", action="append", default=[], metavar="FLAG",
                      help="extra plasma-server run flag (repeatable; e.g. --server-arg=--x=1)")
    live.add_argument("--device-arg", action="append", default=[], metavar="FLAG",
                      help="extra plasma-edge run flag (repeatable)")
    live.add_argument("--reach", type=float, default=0.9, metavar="FRACTION",
                      help="gap closed that counts as reached / held (default 0.9)")
    live.add_argument("--device-wrapper", default=None, metavar="MODULE:CLASS",
                      help="every device wraps its env in this (plasma-edge run --wrapper, e.g. "
                           "plasma.edge.wrappers:ActionDelay); the evaluations and the oracle use "
                           "it too, the server is not told")
    live.add_argument("--baseline", default=None, choices=["sb3-sac"],
                      help="then fine-tune SB3 SAC on the same physics and real-step budget, "
                           "evaluated the same way (pip install 'plasma[baselines]')")
    live.add_argument("--baseline-zip", default=None, metavar="PATH",
                      help="the SAC zip to fine-tune (default: sac.zip in the --model bundle)")
    live.add_argument("--baseline-steps", type=int, default=None, metavar="N",
                      help="real steps per baseline run (default: the Plasma device's in that "
                           "seed)")
    live.add_argument("--baseline-eval-every", type=int, default=500, metavar="N",
                      help="real steps between the baseline's evaluations (default 500)")
    live.set_defaults(handler=_bench_live)

    from .bench.scale import register as register_scale

    register_scale(bsub)

    from .bench.guard import register as register_guard
    from .bench.profile import register as register_profile

    register_guard(bsub)
    register_profile(bsub)

    demo = sub.add_parser("demo", help="the closed loop in one command (broker, server, devices)")
    demo.add_argument("--broker", default="mqtt://127.0.0.1:1883", metavar="URL",
                      help="used when a broker answers there; else an embedded one starts there")
    demo.add_argument("--devices", type=int, default=3)
    demo.add_argument("--duration", type=float, default=120.0, metavar="SECONDS")
    demo.add_argument("--physics", default=None, metavar="K=V,...;K=V,...",
                      help="per-device physics, separated by ';' (cycled)")
    demo.add_argument("--rate-hz", type=float, default=50.0, help="device control rate (50)")
    demo.add_argument("--model", default=None, metavar="BUNDLE",
                      help="base policy, a bundle directory or name (default: the nominal "
                           "Pendulum-v1 bundle, shipped as pendulum-nominal)")
    add_models_dir_argument(demo)
    demo.add_argument("--out", default="plasma-demo", metavar="DIR",
                      help="output: plot, summary, logs, keys, state")
    demo.set_defaults(handler=_demo)

    models = sub.add_parser("models", help="the policy bundles available by name")
    msub = models.add_subparsers(dest="models_command", metavar="ACTION", required=True,
                                 parser_class=Parser)
    listing = msub.add_parser("list", help="every bundle: name, task, physics, source, sizes, "
                                           "score", description="Searched in order: --models-dir, "
                              "PLASMA_MODELS (os.pathsep-separated), the shipped bundles; the "
                              "first bundle of a name is the one --model NAME uses.")
    add_models_dir_argument(listing)
    listing.add_argument("--json", action="store_true", help="one JSON list instead of a table")
    listing.set_defaults(handler=_models_list)

    from .tools.fuzz import add_arguments

    fuzz = sub.add_parser("fuzz", help="long mutation fuzzing of packet and telemetry decoding")
    add_arguments(fuzz)
    fuzz.set_defaults(handler=_fuzz)
