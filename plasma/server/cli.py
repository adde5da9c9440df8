"""``plasma-server``: keys, packets, training, benchmarks and the publisher process."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from plasma.protocol import (
    SigningKey,
    encode_packet,
    load_adapter_npz,
    peek_header,
)
from plasma.protocol._cli import EXIT_OK, Parser, UsageError, add_models_dir_argument, run_main

__all__ = ["build_parser", "DESCRIPTION", "Handler", "main"]

DESCRIPTION = """\
Plasma server: learns each device's dynamics from its telemetry, practises in that
world model, distills a LoRA adapter, audits it and publishes it as a signed packet.

First steps:
  plasma-server keys generate --out keys/          # an Ed25519 signing key (0600)
  plasma-server packet build --adapter a.npz --key keys/ --fleet f1 --slot fleet \\
      --version 1 --base-sha256 HEX --out a.pkt    # a signed adapter packet
  plasma-server packet inspect a.pkt               # its header, as JSON
Copy keys/signing.pub into each device's trust directory.
"""

Handler = Callable[[argparse.Namespace], int]


def _keys_generate(args: argparse.Namespace) -> int:
    key = SigningKey.generate()
    private, public = key.save(args.out, overwrite=args.force)
    print(json.dumps({"key_id": key.key_id, "private_key": str(private),
                      "public_key": str(public)}))
    return EXIT_OK


def _packet_build(args: argparse.Namespace) -> int:
    adapter = load_adapter_npz(args.adapter)
    base_sha256 = args.base_sha256
    if args.model is not None:
        from .commands import model_arg

        base_sha256 = _check_against_model(str(model_arg(args)), adapter, base_sha256)
    if base_sha256 is None:
        raise UsageError("give --base-sha256 HEX or --model BUNDLE_DIR")
    if args.slot == "device" and not args.device:
        raise UsageError("--slot device needs --device D")
    if args.slot == "fleet" and args.device:
        raise UsageError("--device is only for --slot device")
    key = SigningKey.load(args.key)
    try:
        data = encode_packet(
            adapter, key=key, fleet=args.fleet, slot=args.slot, device=args.device,
            version=args.version, base_sha256=base_sha256.lower(), dtype=args.dtype,
            expires_in=args.expires_in, priority=args.priority,
        )
    except ValueError as exc:
        raise UsageError(_first_line(exc)) from None
    Path(args.out).write_bytes(data)
    print(json.dumps({"out": str(args.out), "bytes": len(data), "version": args.version,
                      "slot": args.slot, "key_id": key.key_id}))
    return EXIT_OK


def _check_against_model(model_dir: str, adapter, base_sha256: str | None) -> str:
    from plasma.protocol.bundle import load_bundle  # the bundle reader lives on the edge

    bundle = load_bundle(model_dir)
    if base_sha256 is not None and base_sha256.lower() != bundle.base_sha256:
        raise UsageError(f"--base-sha256 differs from the model's {bundle.base_sha256}")
    layers = {name: (i, o) for name, i, o in bundle.layer_specs}
    for name, shape in adapter.shapes().items():
        if name not in layers:
            raise UsageError(f"adapter layer {name!r} is not a target layer of the model "
                             f"(layers: {', '.join(layers)})")
        if layers[name] != shape:
            raise UsageError(f"adapter layer {name!r} is {shape[0]}->{shape[1]}, the model's "
                             f"is {layers[name][0]}->{layers[name][1]}")
    return bundle.base_sha256


def _packet_inspect(args: argparse.Namespace) -> int:
    data = _read_capped(Path(args.file), 64 * 1024 * 1024)
    header = peek_header(data)
    print(header.model_dump_json(indent=2))
    return EXIT_OK


def _read_capped(path: Path, cap: int) -> bytes:
    try:
        with path.open("rb") as fh:
            data = fh.read(cap + 1)
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from None
    if len(data) > cap:
        raise UsageError(f"{path} is larger than {cap} bytes")
    return data


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def build_parser() -> Parser:
    parser = Parser(prog="plasma-server", description=DESCRIPTION,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True,
                                parser_class=Parser)

    keys = sub.add_parser("keys", help="manage signing keys")
    keys_sub = keys.add_subparsers(dest="keys_command", metavar="ACTION", required=True,
                                   parser_class=Parser)
    gen = keys_sub.add_parser("generate", help="write a new Ed25519 key pair")
    gen.add_argument("--out", required=True, metavar="DIR",
                     help="directory for signing.key (mode 0600) and signing.pub")
    gen.add_argument("--force", action="store_true", help="overwrite an existing key")
    gen.set_defaults(handler=_keys_generate)

    packet = sub.add_parser("packet", help="build and inspect adapter packets")
    packet_sub = packet.add_subparsers(dest="packet_command", metavar="ACTION", required=True,
                                       parser_class=Parser)
    build = packet_sub.add_parser("build", help="sign an adapter npz into a packet",
                                  description="The npz holds NAME.A (rank x in) and NAME.B "
                                  "(out x rank) for each target layer NAME, and a scalar alpha.")
    build.add_argument("--adapter", required=True, metavar="ADAPTER.npz")
    build.add_argument("--key", required=True, metavar="DIR", help="key directory (or file)")
    build.add_argument("--fleet", required=True)
    build.add_argument("--device", default=None, help="target device (slot device only)")
    build.add_argument("--slot", required=True, choices=["fleet", "device"])
    build.add_argument("--version", required=True, type=int,
                       help="strictly increasing per (fleet, slot, target)")
    build.add_argument("--base-sha256", default=None, metavar="HEX",
                       help="sha256 of the base model (model.int8.onnx) the adapter is for")
    build.add_argument("--model", default=None, metavar="BUNDLE",
                       help="take the base digest from a policy bundle (a directory or a "
                            "bundle's name) and check shapes")
    add_models_dir_argument(build)
    build.add_argument("--expires-in", type=float, default=7 * 24 * 3600.0, metavar="SECONDS",
                       help="validity from now (default one week)")
    build.add_argument("--dtype", choices=["int8", "fp16", "fp32"], default="int8")
    build.add_argument("--priority", type=int, default=5, help="0 (urgent) .. 9")
    build.add_argument("--out", required=True, metavar="FILE")
    build.set_defaults(handler=_packet_build)

    inspect = packet_sub.add_parser("inspect", help="print a packet's header as JSON "
                                    "(not verified: use plasma-edge check-packet for that)")
    inspect.add_argument("file", metavar="FILE")
    inspect.set_defaults(handler=_packet_inspect)

    for register in _EXTRA_COMMANDS:
        register(sub)
    return parser


def _register_commands(sub: argparse._SubParsersAction) -> None:
    from . import commands

    commands.register(sub)


_EXTRA_COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [_register_commands]


def main(argv: Sequence[str] | None = None) -> int:
    from .heap import roomy_heap

    roomy_heap()  # the rounds' and benches' numpy temporaries: no page faults per call
    return run_main("plasma-server", build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
