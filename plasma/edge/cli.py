"""``plasma-edge``: the device daemon, packet checks, model info and benchmarks."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypedDict

from plasma.protocol import TrustStore
from plasma.protocol._cli import EXIT_OK, EXIT_REJECTED, Parser, UsageError, add_broker_arguments, run_main
from plasma.protocol.topics import validate_id

from .audit import AuditContext, audit_packet

__all__ = ["build_parser", "DESCRIPTION", "main"]

DESCRIPTION = """\
Plasma edge: runs a quantized ONNX policy, receives signed LoRA packets over MQTT,
audits them, merges them in place and rolls back by itself if real reward drops.

Run a device:
  plasma-edge run --broker mqtt://HOST:1883 --fleet f1 --device d7 --model pendulum-nominal \
      --trust keys/ --state /var/lib/plasma --env Pendulum-v1:m=1.6,g=12
Check packets the way the daemon would:
  plasma-edge check-packet a.pkt b.pkt --trust keys/ --fleet f1 --device d7
Show a bundle's manifest:
  plasma-edge model info bundle/
Exit status: 0 all accepted (or a clean stop), 2 any rejected, 1 usage error.
"""


def _check_packet(args: argparse.Namespace) -> int:
    for flag, value in (("--fleet", args.fleet), ("--device", args.device)):
        if value is not None:  # a bad id is a usage error, not a crash inside the audit
            validate_id(value, flag)
    trust = TrustStore.from_dir(args.trust)
    ctx = AuditContext(trust=trust, fleet=args.fleet, device=args.device,
                       **_model_context(args.model))
    rejected = 0
    out = sys.stdout
    for name in args.files:
        line = _check_one(Path(name), ctx)
        rejected += not line.startswith("accepted")
        out.write(f"{name}: {line}\n")
    out.flush()
    return EXIT_REJECTED if rejected else EXIT_OK


class _ModelContext(TypedDict, total=False):
    """The AuditContext fields a ``--model`` bundle sets."""

    base_sha256: str
    layers: dict[str, tuple[int, int]]


def _model_context(model_dir: str | None) -> _ModelContext:
    if model_dir is None:
        return {}
    from plasma.protocol.bundle import load_bundle

    bundle = load_bundle(_bundle_dir(model_dir, "--model"))
    return {"base_sha256": bundle.base_sha256,
            "layers": {name: (i, o) for name, i, o in bundle.layer_specs}}


def _check_one(path: Path, ctx: AuditContext) -> str:
    try:
        with path.open("rb") as fh:
            data = fh.read(ctx.max_bytes + 1)  # the size cap, before reading the rest
    except OSError as exc:
        return f"rejected unreadable: {exc.strerror or exc}"
    verdict = audit_packet(data, ctx, subject=f"file:{path.name}")
    record = verdict.record
    if verdict.accepted:
        return f"accepted version={record.version} slot={record.slot}"
    reason = record.reasons[0]
    return f"rejected {reason.code}: {_one_line(reason.message)}"


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _bundle_dir(ref: str, what: str) -> Path:
    """A bundle directory from a path or a bundle's name (shipped, or in ``PLASMA_MODELS``)."""
    from plasma.protocol.catalog import MODELS_ENV, resolve_bundle
    from plasma.protocol.errors import BundleNotFound

    try:
        return resolve_bundle(ref)
    except BundleNotFound as exc:
        raise UsageError(f"{what}: {exc}; give a bundle directory or one of those names "
                         f"({MODELS_ENV} adds directories of bundles)") from None


def _model_info(args: argparse.Namespace) -> int:
    from plasma.protocol.bundle import load_bundle

    bundle = load_bundle(_bundle_dir(args.bundle, "BUNDLE"))
    info = bundle.manifest.model_dump(mode="json", by_alias=True)
    info["layers"] = [{"name": n, "in": i, "out": o} for n, i, o in bundle.layer_specs]
    info["model_bytes"] = len(bundle.model_bytes)
    sys.stdout.write(json.dumps(info, indent=2) + "\n")
    return EXIT_OK


def _run(args: argparse.Namespace) -> int:
    from .config import SCALARS, load_config
    from .daemon import run

    flags = {name: getattr(args, name, None) for name in (*SCALARS, "config")}
    return run(load_config(flags))


def _add_run(sub: argparse._SubParsersAction[Parser]) -> None:
    p = sub.add_parser("run", help="run the device daemon (control loop + MQTT + audit + merge)",
                       description="Every option may also come from PLASMA_EDGE_<NAME> or "
                                   "--config FILE (TOML); flags win.")
    p.add_argument("--config", metavar="FILE", help="TOML file (keys as below, plus [audit], "
                   "[canary], [telemetry] tables)")
    add_broker_arguments(p, "PLASMA_EDGE_")
    p.add_argument("--fleet")
    p.add_argument("--device")
    p.add_argument("--model", metavar="BUNDLE", help="policy bundle directory, or the name of a "
                   "shipped bundle (pendulum-nominal) or of one in a PLASMA_MODELS directory")
    p.add_argument("--trust", metavar="KEYS_DIR", help="directory of trusted *.pub keys")
    p.add_argument("--state", metavar="STATE_DIR", help="journal of accepted packets")
    p.add_argument("--env", metavar="ENV", help="Gymnasium id with physics overrides "
                   "(Pendulum-v1:m=1.6,g=12) or module:Class")
    p.add_argument("--wrapper", metavar="MODULE:CLASS", help="wrap the env in a device-side "
                   "effect, constructed with the env (e.g. plasma.edge.wrappers:ActionDelay, a "
                   "one-step actuation delay); the server is not told")
    p.add_argument("--rate-hz", dest="rate_hz", type=float, help="control rate (default 50; "
                   "0 = as fast as possible)")
    p.add_argument("--metrics-port", dest="metrics_port", type=int,
                   help="serve Prometheus metrics on this port")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--episodes", type=int, help="stop after N episodes")
    budget.add_argument("--max-steps", dest="max_steps", type=int, help="stop after N steps")
    p.add_argument("--status-interval", dest="status_interval", type=float,
                   help="seconds between retained status messages (default 5)")
    p.add_argument("--seed", type=int, help="seed of the first env.reset and of the exploration "
                   "noise")
    p.add_argument("--explore-noise", dest="explore_noise", type=float, metavar="FRACTION",
                   help="Gaussian action noise, as a fraction of the half action range (clipped "
                   "to the bounds; telemetry records the applied action). Default 0: "
                   "deterministic. 0.1 widens what the server's world model learns from")
    p.set_defaults(handler=_run)


def _add_model(sub: argparse._SubParsersAction[Parser]) -> None:
    model = sub.add_parser("model", help="inspect a policy bundle")
    model_sub = model.add_subparsers(dest="model_command", metavar="SUBCOMMAND", required=True,
                                     parser_class=Parser)
    info = model_sub.add_parser("info", help="the manifest as JSON (base_sha256, layers...)")
    info.add_argument("bundle", metavar="BUNDLE", help="bundle directory or a bundle's name")
    info.set_defaults(handler=_model_info)


def _bench(args: argparse.Namespace) -> int:
    """Benchmarks print one JSON object; model-building ones need the [server] extra."""
    if args.bench_command == "packet":
        from .bench.packet import bench_packet

        result = bench_packet(rank=args.rank, dtype=args.dtype)
    elif args.bench_command == "rss":
        from .bench.rss import bench_rss

        try:
            result = bench_rss(args.broker, args.model, env=args.env, seconds=args.seconds)
        except RuntimeError as exc:
            raise UsageError(str(exc)) from None
    else:
        from .bench import runtime as bench

        model = None if args.model is None else str(_bundle_dir(args.model, "--model"))
        if args.bench_command == "inference":
            result = bench.bench_inference(model, swap=args.swap)
        else:
            result = bench.bench_merge(model, rank=args.rank, loop_hz=args.loop_hz, swap=args.swap)
    sys.stdout.write(json.dumps(result) + "\n")
    return EXIT_OK


def _add_bench(sub: argparse._SubParsersAction[Parser]) -> None:
    bench = sub.add_parser("bench", help="benchmarks of the edge hot paths (JSON output)")
    bsub = bench.add_subparsers(dest="bench_command", metavar="BENCH", required=True,
                                parser_class=Parser)
    inference = bsub.add_parser("inference", help="act() latency against a bare session.run")
    inference.add_argument("--model", default=None, metavar="BUNDLE_DIR",
                           help="default: a random MLP 64-256-256-256-8")
    inference.add_argument("--swap", choices=["rebuild", "inplace"], default="rebuild")
    inference.set_defaults(handler=_bench)
    merge = bsub.add_parser("merge", help="merge + activate latency, control-loop stall, "
                            "int8 fidelity, full reload")
    merge.add_argument("--model", default=None, metavar="BUNDLE_DIR")
    merge.add_argument("--rank", type=int, default=8)
    merge.add_argument("--loop-hz", type=float, default=50.0,
                       help="rate of the control loop measured for stalls (default 50, the "
                            "daemon's default; 0 = act() non-stop)")
    merge.add_argument("--swap", choices=["rebuild", "inplace"], default="rebuild",
                       help="how merged weights go live (default rebuild, tiered: the staged side "
                            "goes live on its non-prepacked session, the prepacked one is built "
                            "afterwards on the control thread in its idle time)")
    merge.set_defaults(handler=_bench)
    packet = bsub.add_parser("packet", help="verify + decode of one packet (MLP "
                             "64-256-256-256-8, every layer)")
    packet.add_argument("--rank", type=int, default=4)
    packet.add_argument("--dtype", choices=["int8", "fp16", "fp32"], default="int8")
    packet.set_defaults(handler=_bench)
    rss = bsub.add_parser("rss", help="resident memory of a running plasma-edge run (Linux)")
    rss.add_argument("--broker", required=True, metavar="URL")
    rss.add_argument("--model", required=True, metavar="BUNDLE", help="a bundle directory or name")
    rss.add_argument("--env", default="Pendulum-v1", help="as for run (default Pendulum-v1)")
    rss.add_argument("--seconds", type=float, default=12.0, help="how long it runs (default 12)")
    rss.set_defaults(handler=_bench)


def build_parser() -> Parser:
    parser = Parser(prog="plasma-edge", description=DESCRIPTION,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True,
                                parser_class=Parser)
    check = sub.add_parser("check-packet", help="verify packet files as the daemon would")
    check.add_argument("files", nargs="+", metavar="FILE")
    check.add_argument("--trust", required=True, metavar="DIR",
                       help="directory of trusted *.pub keys")
    check.add_argument("--fleet", default=None, help="this device's fleet")
    check.add_argument("--device", default=None, help="this device's id")
    check.add_argument("--model", default=None, metavar="BUNDLE_DIR",
                       help="policy bundle: checks base model digest and layer shapes")
    check.set_defaults(handler=_check_packet)
    for register in _EXTRA_COMMANDS:
        register(sub)
    return parser


_EXTRA_COMMANDS: list[Callable[[argparse._SubParsersAction[Parser]], None]] = [_add_run, _add_model, _add_bench]


def main(argv: Sequence[str] | None = None) -> int:
    return run_main("plasma-edge", build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
