"""Stable-Baselines3 SAC: base and oracle policies, and SB3's own fine-tuning as a baseline.

Everything an SB3 user would do, with SB3's defaults: ``train`` fits a SAC model on a task at
some physics (a base on the nominal model, an oracle on a shifted one) and saves the zip
without its replay buffer; ``evaluate`` scores a policy noise-free on fixed-seed episodes, the
same episodes the live bench's watcher uses; ``fine_tune`` keeps training a saved SAC model
(actor and critic from the zip, an empty replay buffer) on a shifted device and evaluates it
along the way.

Torch and SB3 are imported here only; this module is reached from the ``[baselines]`` extra.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from plasma.edge import envs as edge_envs
from plasma.edge.physics import apply_overrides, parse_overrides
from plasma.protocol.errors import ConfigError, EnvError
from plasma.server.basepolicy import EVAL_SEED0  # the watcher's evaluation seeds: one constant

__all__ = ["EVAL_SEED0", "SacRun", "checkpoints", "evaluate", "export_onnx", "fine_tune",
           "make_env", "one_at_a_time", "record_oracle", "sb3_actor", "ship", "train"]

LEARNING_STARTS = {"HalfCheetah-v5": 10_000, "InvertedPendulum-v5": 1_000}
"""SB3 SAC's ``learning_starts`` for base training (RL Zoo's values); SB3 defaults otherwise."""


def _sb3() -> Any:
    try:
        import stable_baselines3
        import torch
    except ImportError:
        raise ConfigError("SB3 baselines need PyTorch and Stable-Baselines3: "
                          "pip install 'plasma[baselines]'") from None
    torch.set_num_threads(1)
    return stable_baselines3


def make_env(env_id: str, physics: str = "", wrapper: str | None = None) -> Any:
    """A Gymnasium env at ``physics`` (override text) with an optional device-side wrapper,
    as a ``gymnasium.Env`` (what SB3 needs)."""
    import gymnasium as gym

    env = gym.make(env_id)
    if physics:
        apply_overrides(env.unwrapped, parse_overrides(physics))
    if wrapper:
        try:
            env = _GymWrapper(env, edge_envs.wrap_env(env, wrapper))
        except EnvError as exc:
            raise ConfigError(str(exc)) from None
    return env


def _gym_wrapper_base() -> Any:
    import gymnasium as gym

    return gym.Wrapper


class _GymWrapper(_gym_wrapper_base()):  # type: ignore[misc]
    """A plain device-side wrapper seen as a ``gymnasium.Wrapper``."""

    def __init__(self, env: Any, inner: Any) -> None:
        super().__init__(env)
        self.inner = inner

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> Any:
        return self.inner.reset(seed=seed, options=options)

    def step(self, action: Any) -> Any:
        return self.inner.step(action)


def evaluate(act: Callable[[np.ndarray], np.ndarray], env_id: str, physics: str = "",
             wrapper: str | None = None, episodes: int = 10, seed0: int = EVAL_SEED0
             ) -> dict[str, float]:
    """Noise-free return of ``act`` (a batch of observations -> their actions) on ``episodes``
    fixed-seed episodes at ``physics`` (override text): the watcher's own evaluation
    (``plasma.server.basepolicy.evaluate``), so both score the same episodes."""
    from plasma.server.basepolicy import evaluate as evaluate_episodes
    from plasma.server.tasks import resolve_physics

    out = evaluate_episodes(act, env_id, resolve_physics(env_id, physics), episodes, seed0, wrapper)
    return {"mean": out["mean"], "std": out["std"], "episodes": episodes}


def one_at_a_time(act: Callable[[np.ndarray], Any]) -> Callable[[np.ndarray], np.ndarray]:
    """A one-observation policy (the int8 edge runtime) over a batch, row by row: the dynamic
    int8 scales depend on the batch, and the device acts on one observation at a time."""
    return lambda obs: np.stack([np.asarray(act(row)) for row in obs.astype(np.float32)])


def sb3_actor(model: Any) -> Callable[[np.ndarray], np.ndarray]:
    """obs -> deterministic action of a SAC model (``model.predict``)."""
    return lambda obs: model.predict(obs, deterministic=True)[0]


@dataclass
class SacRun:
    """What ``train`` or ``fine_tune`` measured."""

    env_id: str
    physics: str
    wrapper: str | None
    steps: int
    seed: int
    seconds: float
    curve: list[tuple[int, float]] = field(default_factory=list)
    """(real steps, noise-free mean return) at each evaluation."""
    final: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"env_id": self.env_id, "physics": self.physics, "wrapper": self.wrapper,
                "steps": self.steps, "seed": self.seed, "seconds": round(self.seconds, 1),
                "curve": [[s, round(r, 2)] for s, r in self.curve], "final": self.final}


def checkpoints(steps: int, eval_every: int, at: Iterable[int] = ()) -> list[int]:
    """The real-step counts a run of ``steps`` is evaluated at: every ``eval_every`` steps, the
    steps in ``at`` (those within the run), and the last step; sorted, without 0."""
    if eval_every < 1:
        raise ConfigError(f"eval_every must be >= 1, got {eval_every}")
    points = set(range(eval_every, steps, eval_every)) | {s for s in at if 0 < s < steps}
    return sorted(points | ({steps} if steps > 0 else set()))


def _learn(model: Any, steps: int, env_id: str, physics: str, wrapper: str | None,
           eval_every: int, episodes: int, progress: Callable[[str], None] | None,
           start: int = 0, at: Iterable[int] = ()) -> list[tuple[int, float]]:
    """``model.learn`` up to each checkpoint (see ``checkpoints``), evaluated noise-free there."""
    curve: list[tuple[int, float]] = []
    if start == 0:
        r = evaluate(sb3_actor(model), env_id, physics, wrapper, episodes)["mean"]
        curve.append((0, r))
    done = 0
    for point in checkpoints(steps, eval_every, at):
        model.learn(point - done, reset_num_timesteps=done == 0)  # counts (learning_starts) from 0
        done = point
        r = evaluate(sb3_actor(model), env_id, physics, wrapper, episodes)["mean"]
        curve.append((start + done, r))
        if progress is not None:
            progress(f"{env_id} [{physics or 'nominal'}{' ' + wrapper if wrapper else ''}] "
                     f"{start + done} steps: noise-free return {r:.1f}")
    return curve


def train(env_id: str, steps: int, out: Path, *, physics: str = "", wrapper: str | None = None,
          seed: int = 0, eval_every: int = 10_000, episodes: int = 10,
          init: Path | None = None, progress: Callable[[str], None] | None = None) -> SacRun:
    """Train SB3 SAC (defaults, RL Zoo's ``learning_starts``) for ``steps`` at ``physics``; save
    ``out`` (zip, no replay buffer) and ``out`` with ``.json`` (the curve). ``init``: start from
    a saved model (an oracle warm-started from the base)."""
    sb3 = _sb3()
    t0 = time.perf_counter()
    env = make_env(env_id, physics, wrapper)
    if init is not None:
        model = sb3.SAC.load(str(init), env=env, seed=seed,
                             learning_starts=LEARNING_STARTS.get(env_id, 100))
    else:
        model = sb3.SAC("MlpPolicy", env, seed=seed, verbose=0,
                        learning_starts=LEARNING_STARTS.get(env_id, 100))
    curve = _learn(model, steps, env_id, physics, wrapper, eval_every, episodes, progress)
    out.parent.mkdir(parents=True, exist_ok=True)
    model.save(str(out))
    run = SacRun(env_id, physics, wrapper, steps, seed, time.perf_counter() - t0, curve,
                 evaluate(sb3_actor(model), env_id, physics, wrapper, episodes))
    Path(str(out) + ".json").write_text(json.dumps(run.to_json(), indent=1) + "\n")
    return run


def fine_tune(zip_path: Path, env_id: str, steps: int, *, physics: str = "",
              wrapper: str | None = None, seed: int = 0, eval_every: int = 1_000,
              episodes: int = 10, progress: Callable[[str], None] | None = None,
              at: Iterable[int] = ()) -> SacRun:
    """What an SB3 user does on a shifted device: load the SAC zip (actor, critic and their
    optimizers; the zip has no replay buffer, so it starts empty) and keep training it with
    SB3's defaults on the device's physics; noise-free evaluations at 0, every ``eval_every``
    steps, at each step count in ``at`` and at the end."""
    sb3 = _sb3()
    t0 = time.perf_counter()
    env = make_env(env_id, physics, wrapper)
    model = sb3.SAC.load(str(zip_path), env=env, seed=seed, learning_starts=100)  # SB3's default
    curve = _learn(model, steps, env_id, physics, wrapper, eval_every, episodes, progress, at=at)
    return SacRun(env_id, physics, wrapper, steps, seed, time.perf_counter() - t0, curve,
                  {"mean": curve[-1][1]})


def export_onnx(zip_path: Path, out: Path) -> Path:
    """SB3's own export recipe for SAC ("Exporting models" in its docs): the actor, deterministic,
    through the TorchScript exporter (``dynamo=False``: the ``torch.export`` one fails on SB3's
    ``Normal`` distribution). Actions stay a tanh in [-1, 1]: import with ``--rescale-actions``."""
    sb3 = _sb3()
    import torch as th

    model = sb3.SAC.load(str(zip_path), device="cpu")

    class OnnxablePolicy(th.nn.Module):  # type: ignore[misc]
        def __init__(self, actor: th.nn.Module) -> None:
            super().__init__()
            self.actor = actor

        def forward(self, observation: th.Tensor) -> th.Tensor:
            return self.actor(observation, deterministic=True)

    dummy = th.randn(1, *model.observation_space.shape)
    out.parent.mkdir(parents=True, exist_ok=True)
    th.onnx.export(OnnxablePolicy(model.policy.actor), dummy, str(out), opset_version=17,
                   input_names=["input"], dynamo=False)
    return out


def ship(zip_path: Path, env_id: str, out: Path, *, episodes: int = 10) -> dict[str, Any]:
    """The user's path from an SB3 zip to a shipped bundle: export the actor to ONNX (SB3's
    recipe), ``plasma-server import-policy`` it, copy the zip (no replay buffer) into the bundle
    and write ``SCORE.json`` with the SB3 policy's noise-free return and the int8 bundle's, on the
    same fixed-seed episodes."""
    import shutil
    import tempfile

    from plasma.edge.merge import MergeEngine
    from plasma.edge.runtime import PolicyRuntime
    from plasma.protocol.bundle import load_bundle
    from plasma.server.importer import import_policy

    sb3 = _sb3()
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = export_onnx(zip_path, Path(tmp) / "actor.onnx")
        report = import_policy(onnx_path, env_id, out, rescale_actions=True, force=True)
    shutil.copyfile(zip_path, out / "sac.zip")
    model = sb3.SAC.load(str(zip_path), device="cpu")
    sb3_score = evaluate(sb3_actor(model), env_id, episodes=episodes)
    runtime = MergeEngine(PolicyRuntime(load_bundle(out))).runtime
    int8_score = evaluate(one_at_a_time(runtime.act), env_id, episodes=episodes)
    curve = Path(str(zip_path) + ".json")
    score = {"env_id": env_id, "physics": {}, "physics_text": "",
             "mean_return": int8_score["mean"], "std_return": int8_score["std"],
             "sb3_mean_return": sb3_score["mean"], "sb3_std_return": sb3_score["std"],
             "eval_episodes": episodes, "eval_seed0": EVAL_SEED0,
             "method": "SB3 SAC (defaults) on the nominal model, exported with SB3's ONNX recipe "
                       "and imported with plasma-server import-policy --rescale-actions",
             "evaluated_with": "mean_return: the int8 bundle through the edge runtime, one "
                               "observation per call; sb3_mean_return: model.predict(deterministic)",
             "training": json.loads(curve.read_text()) if curve.exists() else None,
             "import": {k: report[k] for k in ("max_error_fp32_of_span", "max_error_int8_of_span",
                                               "p99_error_int8_of_span") if k in report}}
    (out / "SCORE.json").write_text(json.dumps(score, indent=2) + "\n")
    return score


def record_oracle(base: Path, run: SacRun, *, init: str) -> dict[str, Any]:
    """Append (or replace) the oracle of ``run``'s physics and wrapper in ``base/ORACLES.json``
    (what ``plasma.server.catalog.recorded_oracle`` reads)."""
    path = base / "ORACLES.json"
    doc = json.loads(path.read_text()) if path.exists() else {"oracles": []}
    entry = {"env_id": run.env_id, "physics": run.physics, "wrapper": run.wrapper,
             "mean_return": run.final["mean"], "std_return": run.final.get("std"),
             "eval_episodes": run.final.get("episodes"), "eval_seed0": EVAL_SEED0,
             "trained_steps": run.steps, "seed": run.seed, "seconds": round(run.seconds, 1),
             "init": init, "curve": [[s, round(r, 1)] for s, r in run.curve],
             "method": "SB3 SAC (defaults) on the shifted device; evaluated noise-free with "
                       "model.predict(deterministic) on the bench's fixed-seed episodes"}
    doc["oracles"] = [e for e in doc["oracles"] if not (
        e.get("env_id") == run.env_id and e.get("physics") == run.physics
        and (e.get("wrapper") or None) == (run.wrapper or None))] + [entry]
    path.write_text(json.dumps(doc, indent=1) + "\n")
    return entry
