"""``python -m plasma.baselines train ...``: SB3 SAC base and oracle policies (fixed seeds).

Example (the shipped HalfCheetah base)::

    python -m plasma.baselines train --env HalfCheetah-v5 --steps 150000 --seed 0 \\
        --out plasma/models/halfcheetah-sb3/sac.zip
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .sb3 import record_oracle, ship, train


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m plasma.baselines")
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train SB3 SAC at some physics; save the zip and its curve")
    t.add_argument("--env", required=True)
    t.add_argument("--physics", default="", help="override text, e.g. body_mass.torso=*2")
    t.add_argument("--wrapper", default=None, help="device-side wrapper module:Class")
    t.add_argument("--steps", type=int, required=True)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--eval-every", type=int, default=10_000)
    t.add_argument("--init", type=Path, default=None, help="start from this SAC zip")
    t.add_argument("--out", type=Path, required=True, help="the zip to write")
    s = sub.add_parser("ship", help="SB3 zip -> ONNX (SB3's recipe) -> imported bundle with SCORE.json")
    s.add_argument("--zip", type=Path, required=True)
    s.add_argument("--env", required=True)
    s.add_argument("--out", type=Path, required=True, help="the bundle directory to write")
    o = sub.add_parser("oracle", help="train SB3 SAC on a shifted device and record its noise-free "
                       "return in the base bundle's ORACLES.json")
    o.add_argument("--base", type=Path, required=True, help="the base bundle (with sac.zip)")
    o.add_argument("--physics", default="")
    o.add_argument("--wrapper", default=None)
    o.add_argument("--steps", type=int, required=True)
    o.add_argument("--seed", type=int, default=0)
    o.add_argument("--eval-every", type=int, default=10_000)
    o.add_argument("--from-scratch", action="store_true", help="do not start from the base's sac.zip")
    o.add_argument("--out", type=Path, required=True, help="the oracle's zip to write")
    args = parser.parse_args(argv)
    if args.command == "oracle":
        manifest = json.loads((args.base / "manifest.json").read_text())
        init = None if args.from_scratch else args.base / "sac.zip"
        run = train(manifest["env_id"], args.steps, args.out, physics=args.physics,
                    wrapper=args.wrapper, seed=args.seed, eval_every=args.eval_every, init=init,
                    progress=lambda line: print(line, file=sys.stderr, flush=True))
        print(json.dumps(record_oracle(args.base, run, init="scratch" if init is None else
                                       f"{args.base.name}/sac.zip")))
        return 0
    if args.command == "ship":
        print(json.dumps(ship(args.zip, args.env, args.out)))
        return 0
    run = train(args.env, args.steps, args.out, physics=args.physics, wrapper=args.wrapper,
                seed=args.seed, eval_every=args.eval_every, init=args.init,
                progress=lambda line: print(line, file=sys.stderr, flush=True))
    print(json.dumps(run.to_json()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
