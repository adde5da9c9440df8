"""Server bench: the adaptation loop without a broker: real env -> ``plasma.server.adapt``
-> packet -> edge merge."""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..adapt import AdaptConfig, Learner, RoundResult, adapt_config
from ..basepolicy import (
    EVAL_SEED0,
    PolicyFn,
    TrainBaseConfig,
    cached_policy,
    default_cache_dir,
    evaluate,
    export_policy,
)
from ..judicial import RealData
from ..phantom import blas_threads
from ..policy_net import LoRA, MLPPolicy
from ..tasks import get_task

__all__ = ["AdaptBenchConfig", "bench_adapt", "estimated_packet_bytes"]

log = logging.getLogger(__name__)


@dataclass
class AdaptBenchConfig:
    """``plasma-server bench adapt``: one device with shifted physics, adapted by the product's own
    rounds (``plasma.server.adapt``), without a broker.

    The device steps its real env continuously; a round runs whenever ``min_new_transitions`` new
    transitions are in (as ``plasma-server run`` schedules it), on every transition so far; the
    device keeps acting with its current policy for the round's wall time at ``rate_hz``, then the
    approved adapter goes through the real packet codec and the edge merge and becomes active.
    At the start and at every activation the active int8 policy is evaluated noise-free on
    ``eval_episodes`` fixed-seed episodes of the device's physics (outside the device)."""

    env_id: str = "Pendulum-v1"
    """Gymnasium id of a task in ``plasma.server.tasks.TASKS``."""
    physics: dict[str, float] = field(default_factory=lambda: {"m": 1.6, "g": 12.0})
    """The shifted (device) physics."""
    base_physics: dict[str, float] = field(default_factory=dict)
    """Physics the base policy was trained at (empty = defaults)."""
    base_dir: str | None = None
    """Bundle dir of the base policy (with ``policy.npz``); None = train/cache one at ``base_physics``."""
    budget: str = "default"
    """The round's named budget (``plasma.server.adapt.adapt_config``): the product's own."""
    world_model: str = "auto"
    """``auto`` (the product's default), ``physics`` or ``ensemble`` (to compare them)."""
    real_steps: int = 3000
    """Real device steps in all."""
    min_new_transitions: int = 200
    """New real transitions that start a round (``plasma-server run``'s default)."""
    explore_noise: float = 0.0
    """Gaussian action noise on the device (``plasma-edge run --explore-noise``'s default)."""
    rate_hz: float = 50.0
    """Device steps per second: a round's wall time becomes this many steps of lag."""
    target: float = 0.9
    """Gap closed that counts as reached (``steps_to_reach``, ``steps_to_hold``)."""
    train: TrainBaseConfig = field(default_factory=TrainBaseConfig)
    """Template for training the base and oracle policies (its env_id and physics are replaced)."""
    eval_episodes: int = 10
    """Evaluation episodes per policy, fixed seeds from EVAL_SEED0."""
    edge_eval: bool = True
    """Evaluate base and adapted policies on the edge int8 runtime after a real packet round trip."""
    cache_dir: str | None = None
    """Where trained base/oracle policies are cached (None: ~/.cache/plasma)."""
    blas_threads: int | None = 1
    """OpenBLAS threads during the run (1: measured faster for these small matmuls, see phantom.blas_threads)."""
    seed: int = 0
    """Seed of the device's resets and noise, and of every round."""
    adapt: AdaptConfig | None = None
    """Override the named budget (tests only: tiny budgets)."""
    round_hook: Callable[[Learner, RealData, Callable[[], RoundResult]], RoundResult] | None = None
    """Runs each round in place of calling it: (the learner, the round's real data, the round
    as a call) -> its result (``bench profile-round`` profiles one round so; None: call it)."""


class _EdgeSide:
    """Base bundle + a throwaway signing key: every adapter goes through the real packet codec
    (encode, sign, verify, decode, int8 factors) and the edge's merge, then acts on int8 ONNX.

    Preferred path: ``plasma.edge.runtime.PolicyRuntime`` + ``MergeEngine.restore``. If the runtime
    refuses the bundle (it once did for act_dim 1: ``quantize_weight`` wrote into a read-only view
    when the last layer was (1, n); tests/edge/test_merge.py keeps that case), fall back to the
    edge's ``merged_weights`` (same arithmetic as the engine), re-exported to dynamic-int8 ONNX
    and run in a plain session.
    """

    def __init__(self, bundle_dir: Path, task: Any) -> None:
        from plasma.edge.merge import MergeEngine
        from plasma.edge.runtime import PolicyRuntime
        from plasma.protocol.bundle import load_bundle
        from plasma.protocol.signing import SigningKey, TrustStore

        self.bundle = load_bundle(bundle_dir)
        self.task = task
        self.key = SigningKey.generate()
        self.trust = TrustStore([self.key.public_key])
        self.version = 0
        self.runtime_error = ""
        self.engine: Any = None
        self._session: Any = None
        self._tmp = tempfile.TemporaryDirectory(prefix="plasma-bench-")
        try:
            self.engine = MergeEngine(PolicyRuntime(self.bundle))
        except ValueError as exc:  # BundleError / MergeError are ValueErrors too
            self.runtime_error = f"{type(exc).__name__}: {exc}"
            log.warning("edge PolicyRuntime refused the bundle (%s); merging with plasma.edge.merge.merged_weights",
                        self.runtime_error)
            self._load_session(self.bundle.int8_path)

    def _load_session(self, path: Path) -> None:
        import onnxruntime as ort

        self._session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        self._input = self._session.get_inputs()[0].name

    def ship(self, lora: LoRA) -> int:
        """Encode, sign, decode and merge one packet; returns its size in bytes."""
        from plasma.edge.merge import merged_weights
        from plasma.protocol import Adapter
        from plasma.protocol.packet import decode_packet, encode_packet

        from ..export import export_bundle

        self.version += 1
        adapter = Adapter(alpha=lora.alpha, rank=lora.rank, layers=lora.factors)
        data = encode_packet(adapter, key=self.key, fleet="bench", slot="device", device="bench-device",
                             version=self.version, base_sha256=self.bundle.manifest.base_sha256)
        decoded = decode_packet(data, self.trust)
        if self.engine is not None:
            self.engine.restore({"device": decoded.adapter})
        else:
            merged = merged_weights(self.bundle.weights, {"fleet": None, "device": decoded.adapter})
            names = [name for name, _, _ in self.bundle.layer_specs]
            m = self.bundle.manifest
            out = export_bundle(Path(self._tmp.name) / f"v{self.version}",
                                [(merged[n], self.bundle.biases[n]) for n in names],
                                obs_mean=m.obs_mean, obs_std=m.obs_std, act_low=m.act_low, act_high=m.act_high,
                                env_id=m.env_id)
            self._load_session(out / "model.int8.onnx")
        return len(data)

    def act(self, obs: np.ndarray) -> np.ndarray:
        """(batch, obs_dim) -> (batch, act_dim) on the int8 policy the device would run, one
        observation per call as the device acts: dynamic int8 quantizes activations with one
        scale per call, so a batch of lock-stepped episodes would share it (measured: an
        adapted policy lost 50-60 of return, balancing episodes swinging once more)."""
        x = np.ascontiguousarray(obs, np.float32)
        if self.engine is not None:
            run = self.engine.runtime.act_batch
        else:
            def run(row: np.ndarray) -> np.ndarray:
                return self._session.run(None, {self._input: row})[0]
        return np.concatenate([np.asarray(run(x[i:i + 1]), np.float32) for i in range(len(x))])


def estimated_packet_bytes(lora: LoRA) -> int:
    """Size estimate used only if the codec is unavailable: int8 factors + 8 B/layer + 800 B header."""
    return sum(lora.rank * (a.shape[1] + b.shape[0]) + 8 for a, b in lora.factors.values()) + 800


def _policy_fn(policy: MLPPolicy, lora: LoRA | None) -> PolicyFn:
    merged = policy.merged(lora)
    return lambda obs: merged.forward(obs.astype(np.float32))


def _base_bundle(cfg: AdaptBenchConfig, policy: MLPPolicy, cache: Path) -> Path:
    """The cached base policy's bundle, exported once next to it."""
    task = get_task(cfg.env_id)
    d = cache / "bundle"
    if not (d / "manifest.json").exists():
        export_policy(policy, d, task, task.physics(cfg.base_physics))
    return d


def bench_adapt(cfg: AdaptBenchConfig) -> dict[str, Any]:
    """Run one device; returns base/oracle/final returns, gap closed, steps to reach and hold the
    target, packets, bytes, and per-round timings (``server_cpu_s_per_round``).

    ``wall_s`` covers the loop and the evaluations; training (or loading from the cache) the base
    and oracle policies and exporting the base bundle are in ``wall_s_including_setup``."""
    with blas_threads(cfg.blas_threads):
        return _bench_adapt(cfg)


def gap_figures(evals: list[tuple[int, float]], base: float, oracle: float, target: float
                ) -> dict[str, Any]:
    """steps_to_reach (first evaluation at or above ``target`` gap closed), steps_to_hold (real
    steps after which every evaluation stays there; None if the last is below), final gap."""
    gap = oracle - base
    closed = [((ret - base) / gap if abs(gap) > 1e-9 else float("nan")) for _, ret in evals]
    reach = next((s for (s, _), c in zip(evals, closed) if c >= target), None)
    hold = None
    for (s, _), c in zip(reversed(evals), reversed(closed)):
        if c < target:
            break
        hold = s
    return {"gap_closed": closed[-1], "steps_to_reach": reach, "steps_to_hold": hold,
            "gap_curve": [(s, round(c, 4)) for (s, _), c in zip(evals, closed)]}


def _bench_adapt(cfg: AdaptBenchConfig) -> dict[str, Any]:
    from ..tasks import make_env

    t_start = time.perf_counter()
    task = get_task(cfg.env_id)
    root = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
    rng = np.random.default_rng(cfg.seed)

    # One-time (cached): base policy at the nominal physics, oracle trained at the shifted physics.
    if cfg.base_dir:
        base = MLPPolicy.load_npz(Path(cfg.base_dir) / "policy.npz")
        base_bundle = Path(cfg.base_dir)
    else:
        base, _, base_cache = cached_policy(replace(cfg.train, env_id=cfg.env_id, physics=dict(cfg.base_physics)), root)
        base_bundle = _base_bundle(cfg, base, base_cache) if cfg.edge_eval else Path()
    oracle, _, _ = cached_policy(replace(cfg.train, env_id=cfg.env_id, physics=dict(cfg.physics)), root)
    edge = _EdgeSide(base_bundle, task) if cfg.edge_eval else None
    t_loop = time.perf_counter()

    base_eval = evaluate(edge.act if edge else _policy_fn(base, None), cfg.env_id, cfg.physics,
                         cfg.eval_episodes)
    oracle_eval = evaluate(_policy_fn(oracle, None), cfg.env_id, cfg.physics, cfg.eval_episodes)

    acfg = cfg.adapt or adapt_config(cfg.budget, cfg.seed, world_model=cfg.world_model)
    learner = Learner(task, acfg)
    env = make_env(cfg.env_id, cfg.physics)
    episode = 0
    obs = np.asarray(env.reset(seed=cfg.seed * 100_000 + episode)[0], np.float32)
    sigma = cfg.explore_noise * 0.5 * (task.act_high - task.act_low)
    cols: dict[str, list[np.ndarray]] = {"obs": [], "act": [], "rew": [], "next_obs": []}
    act_fn = edge.act if edge else _policy_fn(base, None)
    evals: list[tuple[int, float]] = [(0, base_eval["mean"])]
    rounds: list[dict[str, Any]] = []
    pending: tuple[int, LoRA] | None = None  # (activation step, adapter)
    last_round = packets = packet_bytes = 0
    episode_returns, ep_ret = [], 0.0
    for step in range(1, cfg.real_steps + 1):
        a = act_fn(obs[None])[0]
        if cfg.explore_noise > 0:
            a = np.clip(a + sigma * rng.standard_normal(a.shape), task.act_low, task.act_high)
        a = np.asarray(a, np.float32)
        nxt, r, term, trunc, _ = env.step(a)
        for k, v in (("obs", obs), ("act", a), ("rew", np.float32(r)), ("next_obs", nxt)):
            cols[k].append(np.asarray(v, np.float32))
        ep_ret += float(r)
        obs = np.asarray(nxt, np.float32)
        if term or trunc:
            episode += 1
            episode_returns.append(ep_ret)
            ep_ret = 0.0
            obs = np.asarray(env.reset(seed=cfg.seed * 100_000 + episode)[0], np.float32)
        if pending is not None and step >= pending[0]:
            lora = pending[1]
            pending = None
            size = edge.ship(lora) if edge else estimated_packet_bytes(lora)
            packets += 1
            packet_bytes += size
            act_fn = edge.act if edge else _policy_fn(base, lora)
            ev = evaluate(act_fn, cfg.env_id, cfg.physics, cfg.eval_episodes)
            evals.append((step, ev["mean"]))
            rounds[-1].update(activated_at=step, eval_return=ev["mean"], packet_bytes=size)
            log.info("step %d: adapter active, noise-free return %.1f (base %.1f, oracle %.1f)",
                     step, ev["mean"], base_eval["mean"], oracle_eval["mean"])
        if pending is None and step - last_round >= cfg.min_new_transitions:
            last_round = step
            data = {k: np.stack(v) for k, v in cols.items()}
            n = min(len(data["obs"]), acfg.max_transitions)
            real = RealData(*(data[k][-n:] for k in ("obs", "act", "rew", "next_obs")))

            def run_round(real: RealData = real) -> RoundResult:
                return learner.round(base, real, fleet="bench", slot="device",
                                     device="bench-device", subject=f"bench:round{len(rounds)}")

            result = cfg.round_hook(learner, real, run_round) if cfg.round_hook else run_round()
            lag = int(np.ceil(result.seconds * cfg.rate_hz))
            rounds.append({"round": len(rounds), "real_steps": step, "verdict": result.verdict,
                           "reasons": [x.code for x in result.record.reasons],
                           "seconds": result.seconds, "cpu_s": result.cpu_seconds,
                           "lag_steps": lag, "labels": len(learner.labels),
                           "model": result.model_kind, **result.scores})
            log.info("round %d at step %d: %s in %.1f s", len(rounds) - 1, step, result.verdict,
                     result.seconds)
            if result.adapter is not None:
                pending = (step + max(lag, 1), result.adapter)

    figures = gap_figures(evals, base_eval["mean"], oracle_eval["mean"], cfg.target)
    cpu = [r["cpu_s"] for r in rounds]
    return {
        "env_id": cfg.env_id, "physics": dict(cfg.physics), "seed": cfg.seed, "budget": cfg.budget,
        "world_model": rounds[0]["model"] if rounds else cfg.world_model,
        "base_return": base_eval["mean"], "final_return": evals[-1][1],
        "oracle_return": oracle_eval["mean"],
        "base_sem": base_eval["sem"], "oracle_sem": oracle_eval["sem"],
        **figures,
        "first_packet_steps": next((r["activated_at"] for r in rounds if "activated_at" in r), None),
        "real_steps": cfg.real_steps, "packets": packets, "packet_bytes": packet_bytes,
        "rounds": rounds, "episode_returns": episode_returns,
        "server_cpu_s_per_round": float(np.mean(cpu)) if cpu else 0.0,
        "server_cpu_s_per_round_max": float(np.max(cpu)) if cpu else 0.0,
        "edge_eval": bool(edge), "edge_runtime_error": edge.runtime_error if edge else "",
        "eval_episodes": cfg.eval_episodes, "eval_seed0": EVAL_SEED0,
        "wall_s": time.perf_counter() - t_loop,
        "wall_s_including_setup": time.perf_counter() - t_start,
        "adapter": learner.adapter,
    }
