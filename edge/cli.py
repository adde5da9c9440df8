"""``plasma-edge``: the device daemon, packet checks, model info and benchmarks."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from plasma.protocol import KeyFileError, PlasmaError, TrustStore
from plasma.protocol._cli import EXIT_OK, EXIT_REJECTED, EXIT_USAGE, Parser, UsageError

from .audit import AuditContext, audit_packet

DESCRIPTION = """\
Plasma edge: runs a quantized ONNX policy, receives signed LoRA packets over MQTT,
audits them, merges them in place and rolls back by itself if real reward drops.

Check packets the way the daemon would:
  plasma-edge check-packet a.pkt b.pkt --trust keys/ --fleet f1 --device d7
Exit status: 0 all accepted, 2 any rejected, 1 usage error.
"""


def _check_packet(args: argparse.Namespace) -> int:
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


def _model_context(model_dir: str | None) -> dict:
    if model_dir is None:
        return {}
    from .bundle import load_bundle

    bundle = load_bundle(model_dir)
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


_EXTRA_COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = []


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.handler(args))
    except (UsageError, PlasmaError, KeyFileError) as exc:
        print(f"plasma-edge: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("plasma-edge: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
