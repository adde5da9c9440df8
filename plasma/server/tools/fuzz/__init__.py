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
import json
import random
from collections.abc import Sequence
from pathlib import Path

from .engine import MAX_CORPUS, Findings, fuzz, run_one
from .inputs import MAX_INPUT, mutate, restructure_frame, restructure_packet
from .libfuzzer import fuzz_atheris
from .targets import Target, frame_seeds, make_targets, packet_seeds

__all__ = ["MAX_CORPUS", "MAX_INPUT", "Findings", "Target", "add_arguments", "frame_seeds",
           "fuzz", "fuzz_atheris", "main", "make_targets", "mutate", "packet_seeds",
           "restructure_frame", "restructure_packet", "run", "run_one"]


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
