"""``plasma-server bench profile-round``: where one adaptation round's CPU time goes.

``bench adapt``'s device loop (Pendulum-v1 at m=1.6,g=12, the ``default`` budget, a round whenever
200 new transitions are in, an approved adapter live after the round's wall time at 50 Hz) runs
until a round has at least ``transitions`` real transitions. That round runs twice from the same
learner state (model, labels, accepted adapter):

1. plain, with ``StageTimers`` around the ``STAGES`` functions: their CPU seconds as the round
   really spends them;
2. under cProfile, for the detail (``top_self``: where the time goes inside the stages).

Both count CPU time (``time.process_time``: on a shared machine wall time would charge functions
for other processes' turns). cProfile charges every Python call, so it inflates call-heavy code
(the planner's per-step loop) more than matmul-heavy code (distillation): the timers' column is
the one to read for shares. Stages overlap (the review's redistillation calls the planner and the
distiller again), so each share is of the whole round, not of its parent.
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import functools
import importlib
import json
import pstats
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the command registers without importing the server stack
    from ..adapt import Learner, RoundResult
    from ..judicial import RealData

__all__ = ["STAGES", "Stage", "StageTimers", "profile_round", "register", "stage_rows"]


@dataclass(frozen=True)
class Stage:
    """A reported function, ``module:attribute`` under ``plasma.server`` (``adapt:fit_model``,
    ``phantom:PhantomPathSimulator.plan``).

    The timers count only calls made (transitively) ``inside`` another stage's target, or
    ``outside`` it; cProfile only those directly from ``caller`` (``file:name`` or a name)."""

    label: str
    target: str
    inside: str | None = None
    outside: str | None = None
    caller: str | None = None


_REVIEW = "judicial.auditor:JudicialAuditor.review"
_RESIDUAL = "residual:ResidualModel.fit"

STAGES: tuple[Stage, ...] = (
    Stage("the round (Learner.round)", "adapt:Learner.round"),
    Stage("world-model fit (fit_model)", "adapt:fit_model"),
    Stage("identification (PhysicsModel.fit)", "sysid:PhysicsModel.fit", inside=_RESIDUAL,
          caller="server/residual.py:fit"),
    Stage("residual ensemble (ResidualModel.fit, identification included)", _RESIDUAL),
    Stage("residual nets trained (WorldModel.fit)", "worldmodel:WorldModel.fit"),
    Stage("producer (phantom_dagger)", "adapt:phantom_dagger", outside=_REVIEW,
          caller="adaptation_round"),
    Stage("expert labels (expert_labels)", "adapt:expert_labels"),
    Stage("DAgger planner labels (sim.plan)", "phantom:PhantomPathSimulator.plan"),
    Stage("phantom rollouts (sim.rollout)", "phantom:PhantomPathSimulator.rollout"),
    Stage("distillation (LoRADistiller.fit)", "distill:LoRADistiller.fit"),
    Stage("phantom selection (_episode_return)", "adapt:_episode_return"),
    Stage("judicial review (auditor.review)", _REVIEW),
    Stage("review: evidence (rollouts, probes, the checks' inputs)",
          "judicial.evidence:EvidenceGatherer.evidence"),
    Stage("review: trust model (with its own identification)", "judicial.trust:TrustModel.__init__"),
    Stage("review: redistillation (phantom_dagger)", "adapt:phantom_dagger", inside=_REVIEW,
          caller="redistill"),
)


def _resolve(target: str) -> tuple[Any, str, Any]:
    """(owner: module or class, attribute name, the function) of a ``module:attr`` target."""
    module, _, path = target.partition(":")
    owner: Any = importlib.import_module(f"plasma.server.{module}")
    *classes, name = path.split(".")
    for cls in classes:
        owner = getattr(owner, cls)
    return owner, name, vars(owner)[name]


class StageTimers:
    """CPU seconds (``time.process_time``) and calls of every ``STAGES`` target, by the targets
    that were running around each call: the functions are wrapped while the block runs (a few
    dozen calls per round, so unlike cProfile the timers do not slow the round down)."""

    def __init__(self) -> None:
        self.totals: dict[tuple[str, frozenset[str]], list[float]] = {}
        self._stack: list[str] = []

    @contextmanager
    def installed(self) -> Iterator[StageTimers]:
        saved = []
        try:
            for target in dict.fromkeys(s.target for s in STAGES):
                owner, name, fn = _resolve(target)
                saved.append((owner, name, fn))
                setattr(owner, name, self._wrap(target, fn))
            yield self
        finally:
            for owner, name, fn in reversed(saved):
                setattr(owner, name, fn)

    def _wrap(self, target: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            around = frozenset(self._stack)
            self._stack.append(target)
            c0 = time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self._stack.pop()
                acc = self.totals.setdefault((target, around), [0, 0.0])
                acc[0] += 1
                acc[1] += time.process_time() - c0
        return timed

    def stage(self, stage: Stage) -> tuple[int, float]:
        """(calls, CPU seconds) of one stage."""
        calls, cpu = 0, 0.0
        for (target, around), (n, seconds) in self.totals.items():
            if target != stage.target or (stage.inside and stage.inside not in around) or (
                    stage.outside and stage.outside in around):
                continue
            calls, cpu = calls + int(n), cpu + seconds
        return calls, cpu


def _cprofile(stats: pstats.Stats, stage: Stage) -> tuple[int, float]:
    """(calls, cumulative CPU seconds) of one stage in a cProfile run."""
    code = getattr(_resolve(stage.target)[2], "__code__", None)
    table: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    calls, cum = 0, 0.0
    for key, (_, nc, _, ct, callers) in table.items():
        if code is None or key[0] != code.co_filename or key[2] != code.co_name:
            continue
        if stage.caller is None:
            calls, cum = calls + nc, cum + ct
            continue
        file, _, name = stage.caller.rpartition(":")
        for caller, value in callers.items():
            if caller[2] == name and (not file or caller[0].replace("\\", "/").endswith("/" + file)):
                calls, cum = calls + value[0], cum + value[3]
    return calls, cum


def stage_rows(timers: StageTimers, stats: pstats.Stats | None = None) -> list[dict[str, Any]]:
    """One row per ``STAGES`` entry: calls and CPU seconds by the timers (the unprofiled run) and
    cumulative CPU seconds under cProfile, each with its share of the round (the first stage)."""
    rows = []
    for stage in STAGES:
        calls, cpu = timers.stage(stage)
        row: dict[str, Any] = {"stage": stage.label, "function": stage.target, "calls": calls,
                               "cpu_s": round(cpu, 3)}
        if stats is not None:
            row["cprofile_cpu_s"] = round(_cprofile(stats, stage)[1], 3)
        rows.append(row)
    for key in ("cpu_s", "cprofile_cpu_s"):
        total = rows[0].get(key)
        for row in rows:
            if key in row:
                row[key.replace("cpu_s", "share")] = round(row[key] / total, 3) if total else None
    return rows


def top_self(stats: pstats.Stats, n: int) -> list[dict[str, Any]]:
    """The ``n`` functions with the most CPU in their own code (callees excluded)."""
    table: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    items = sorted(table.items(), key=lambda kv: kv[1][2], reverse=True)[:n]
    return [{"function": f"{_short(f)}:{line}({name})", "calls": nc, "self_s": round(tt, 3),
             "cum_s": round(ct, 3)} for (f, line, name), (_, nc, tt, ct, _) in items]


def _short(path: str) -> str:
    path = path.replace("\\", "/")
    for marker in ("/plasma/", "/site-packages/"):
        if marker in path:
            return path.split(marker, 1)[1]
    return path


class _Done(Exception):
    """Raised by the hook once the round is profiled: the rest of the device loop is not needed."""


class _RoundProfiler:
    def __init__(self, transitions: int) -> None:
        self.transitions = transitions
        self.out: dict[str, Any] = {}
        self.timers = StageTimers()
        self.stats: pstats.Stats | None = None
        self.rounds = 0

    def __call__(self, learner: Learner, real: RealData, run: Callable[[], RoundResult]
                 ) -> RoundResult:
        self.rounds += 1
        if len(real.obs) < self.transitions:
            return run()
        before = copy.deepcopy(learner.__dict__)
        labels, had_adapter = len(learner.labels), learner.adapter is not None
        with self.timers.installed():
            c0 = time.process_time()
            plain = run()
            plain_cpu = time.process_time() - c0
        learner.__dict__.update(before)  # the same round again, from the same state
        prof = cProfile.Profile(time.process_time)
        c0 = time.process_time()
        result: RoundResult = prof.runcall(run)
        profiled_cpu = time.process_time() - c0
        self.stats = pstats.Stats(prof)
        model = learner.model
        self.out = {
            "round": self.rounds - 1, "transitions": len(real.obs),
            "labels_before": labels, "had_adapter": had_adapter,
            "world_model": result.model_kind, "verdict": result.verdict,
            "verdict_unprofiled": plain.verdict,
            "cpu_s_unprofiled": round(plain_cpu, 3), "cpu_s_profiled": round(profiled_cpu, 3),
            "profiler_overhead": round(profiled_cpu / plain_cpu, 3) if plain_cpu else None,
            "residual": {"prior_error": getattr(model, "prior_error", None),
                         "residual_error": getattr(model, "residual_error", None),
                         "used": getattr(model, "residual", None) is not None},
        }
        raise _Done


def profile_round(physics: dict[str, float] | None = None, *, env_id: str = "Pendulum-v1",
                  transitions: int = 600, seed: int = 0, budget: str = "default", top: int = 15,
                  pstats_out: str | None = None) -> dict[str, Any]:
    """Profile the first round with at least ``transitions`` real transitions (see the module
    docstring); one dict: the round, its unprofiled and profiled CPU, ``stages``, ``top_self``."""
    from .adapt import AdaptBenchConfig, bench_adapt

    hook = _RoundProfiler(transitions)
    cfg = AdaptBenchConfig(env_id=env_id, physics=dict(physics or {"m": 1.6, "g": 12.0}),
                           seed=seed, budget=budget, real_steps=transitions * 10,
                           round_hook=hook)
    try:
        bench_adapt(cfg)
    except _Done:
        pass
    if hook.stats is None:
        raise RuntimeError(f"no round reached {transitions} transitions")
    if pstats_out:
        hook.stats.dump_stats(pstats_out)
    return {"env": env_id, "physics": cfg.physics, "budget": budget, "seed": seed,
            "clock": "process_time (CPU seconds)", **hook.out,
            "stages": stage_rows(hook.timers, hook.stats), "top_self": top_self(hook.stats, top)}


def markdown(result: dict[str, Any]) -> str:
    """The stage table as docs/benchmarks.md prints it."""
    def pct(x: float | None) -> str:
        return "-" if x is None else f"{x:.0%}"

    lines = ["| stage | function | calls | CPU s | share | CPU s under cProfile | share |",
             "|---|---|---|---|---|---|---|"]
    for r in result["stages"]:
        lines.append(f"| {r['stage']} | `{r['function']}` | {r['calls']} | {r['cpu_s']:.2f} | "
                     f"{pct(r['share'])} | {r.get('cprofile_cpu_s', 0.0):.2f} | "
                     f"{pct(r.get('cprofile_share'))} |")
    return "\n".join(lines)


def _cli(args: argparse.Namespace) -> int:
    from plasma.protocol._cli import UsageError, parse_kv

    if args.transitions < 200:
        raise UsageError("--transitions must be at least 200 (the first round's data)")
    result = profile_round(parse_kv(args.physics, "physics override"), env_id=args.env,
                           transitions=args.transitions, seed=args.seed, budget=args.budget,
                           top=args.top, pstats_out=args.pstats)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(markdown(result) if args.markdown else json.dumps(result), flush=True)
    return 0


def register(bsub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``plasma-server bench profile-round``."""
    p = bsub.add_parser("profile-round", help="cProfile of one adaptation round (bench adapt's "
                                              "loop): CPU per stage")
    p.add_argument("--env", default="Pendulum-v1")
    p.add_argument("--physics", default="m=1.6,g=12", metavar="K=V,...")
    p.add_argument("--transitions", type=int, default=600,
                   help="profile the first round with at least this many real transitions (600)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--budget", choices=["default", "small"], default="default")
    p.add_argument("--top", type=int, default=15, help="functions listed by their own CPU time")
    p.add_argument("--pstats", default=None, metavar="FILE", help="also dump the raw profile")
    p.add_argument("--out", default=None, metavar="FILE", help="also write the JSON here")
    p.add_argument("--markdown", action="store_true", help="print the stage table as markdown")
    p.set_defaults(handler=_cli)
