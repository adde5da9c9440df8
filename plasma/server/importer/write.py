"""Import stage 3: a ``PolicySpec`` -> a Plasma bundle, checked against the original file in onnxruntime.

The bundle is written by ``plasma.server.export.export_bundle``, the exporter of Plasma's own
policies, so the int8 model, the manifest and the fp32 master follow exactly the scheme the
device merges into. Then the original ONNX file, the bundle's fp32 model and its int8 model all
act on the same observations: an fp32 mismatch means the import misread the graph and is
refused (``BundleError`` code ``import_mismatch``); the int8 error is reported.
"""

from __future__ import annotations

import hashlib
import importlib
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from plasma.protocol import activation
from plasma.protocol.bundle import MODEL_FP32, MODEL_INT8
from plasma.protocol.errors import BundleError, ConfigError, EnvError

from ..export import export_bundle
from .graph import read_chain
from .layers import PolicySpec, policy_spec

__all__ = ["FP32_TOLERANCE", "env_spaces", "import_policy"]

FP32_TOLERANCE = 1e-4
"""Largest fp32 action error, as a fraction of the action span, before the import is refused."""
_PROBE_OBS = 512


def env_spaces(env: str) -> tuple[str, str, Any, Any]:
    """``ID[:overrides]`` -> (id, overrides text, observation Box, action Box), read from Gymnasium.

    Only the spaces matter here: the overrides describe a device's world, not the one the policy
    was trained in (the manifest's ``physics``), so they are returned as text and not recorded."""
    env_id, _, tail = env.strip().partition(":")
    if tail and re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", env_id) and re.fullmatch(r"[A-Za-z_]\w*", tail):
        return env.strip(), "", *_class_spaces(env_id, tail)  # module:Class, as plasma-edge run --env takes
    try:
        import gymnasium
        from gymnasium.spaces import Box
    except ImportError:
        raise EnvError(f"--env {env_id} needs Gymnasium: pip install 'plasma[server]'",
                       code="missing_dependency") from None
    try:
        made = gymnasium.make(env_id)
    except gymnasium.error.Error as exc:
        raise EnvError(f"--env {env_id}: {exc}") from None
    obs_space, act_space = made.observation_space, made.action_space
    made.close()
    for what, space in (("observation", obs_space), ("action", act_space)):
        if not isinstance(space, Box) or len(space.shape) != 1:
            raise EnvError(f"--env {env_id}: the {what} space is {space}; Plasma policies need 1-D Box spaces")
    return env_id, tail, obs_space, act_space


def _class_spaces(module_name: str, class_name: str) -> tuple[Any, Any]:
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
        made = cls()
    except (ImportError, AttributeError) as exc:
        raise EnvError(f"--env {module_name}:{class_name}: {exc}") from None
    spaces = (getattr(made, "observation_space", None), getattr(made, "action_space", None))
    if any(getattr(s, "shape", None) is None or len(s.shape) != 1 or not hasattr(s, "low") for s in spaces):
        raise EnvError(f"--env {module_name}:{class_name}: needs 1-D Box observation_space and action_space")
    return spaces


def _probe_obs(obs_space: Any, n: int, seed: int) -> np.ndarray:
    """Observations spread over the space (infinite bounds replaced by +-5)."""
    low = np.where(np.isfinite(obs_space.low), obs_space.low, -5.0)
    high = np.where(np.isfinite(obs_space.high), obs_space.high, 5.0)
    return np.random.default_rng(seed).uniform(low, high, size=(n, len(low))).astype(np.float32)


def _run(path: Path | bytes, obs: np.ndarray, output: str | None = None, rows: bool = False) -> np.ndarray:
    """One session, row by row when asked or when the graph's batch dimension is fixed (the recipes
    export a batch of 1)."""
    import onnxruntime as ort

    sess = ort.InferenceSession(path if isinstance(path, bytes) else str(path), providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    names = [output] if output else [sess.get_outputs()[0].name]
    if rows or isinstance(inp.shape[0], int):
        return np.concatenate([sess.run(names, {inp.name: obs[k:k + 1]})[0] for k in range(len(obs))])
    return np.asarray(sess.run(names, {inp.name: obs})[0])


def _expected(original: np.ndarray, spec: PolicySpec, rescaled: bool) -> np.ndarray:
    """The original file's actions mapped as the import promises (rescale, clip)."""
    low, high = spec.act_low.astype(np.float64), spec.act_high.astype(np.float64)
    a = original.astype(np.float64)
    if rescaled:
        a = low + (a + 1.0) / 2.0 * (high - low)
    if spec.output_activation == "clip":
        a = activation.output(a, "clip", low, high)
    return a


def import_policy(model: str | Path, env: str, out: str | Path, *, output: str | None = None,
                  rescale_actions: bool = False, force: bool = False) -> dict[str, Any]:
    """ONNX policy file -> bundle directory ``out``; returns the report (errors per action span)."""
    model = Path(model)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a bundle directory", code="bad_out")
    if out.exists() and any(out.iterdir()) and not force:
        raise ConfigError(f"--out {out} exists and is not empty (give --force to overwrite)", code="bad_out")
    env_id, overrides, obs_space, act_space = env_spaces(env)
    chain = read_chain(model, output)
    if chain.obs_dim != obs_space.shape[0]:
        raise ConfigError(f"{model.name} takes {chain.obs_dim} observations, {env_id} gives {obs_space.shape[0]}",
                          code="env_mismatch")
    spec = policy_spec(chain, act_space.low, act_space.high, rescale_actions=rescale_actions)
    _input_scale(spec, env_id)
    if spec.layers[-1][0].shape[0] != act_space.shape[0]:
        raise ConfigError(f"{model.name} gives {spec.layers[-1][0].shape[0]} actions, {env_id} takes "
                          f"{act_space.shape[0]}", code="env_mismatch")
    finite = np.isfinite(obs_space.low) & np.isfinite(obs_space.high)
    source = model.read_bytes()
    with tempfile.TemporaryDirectory() as tmp:
        staged = export_bundle(
            Path(tmp) / "bundle", spec.layers, obs_mean=spec.obs_mean, obs_std=spec.obs_std,
            act_low=spec.act_low, act_high=spec.act_high, hidden_activation=spec.hidden_activation,
            activation_alpha=spec.activation_alpha, output_activation=spec.output_activation,
            obs_low=obs_space.low if finite.all() else None, obs_high=obs_space.high if finite.all() else None,
            env_id=env_id,
            meta={"imported_from": model.name, "source_sha256": hashlib.sha256(source).hexdigest(),
                  "source_output": chain.output_name, "rescale_actions": rescale_actions})
        report = _fidelity(model, staged, spec, chain.output_name, obs_space, rescale_actions)
        if out.exists():
            shutil.rmtree(out)
        shutil.copytree(staged, out)
    sizes = [spec.layers[0][0].shape[1], *(w.shape[0] for w, _ in spec.layers)]
    if overrides:
        spec.notes.append(f"--env overrides {overrides!r} ignored: only {env_id}'s spaces are read")
    for note in spec.notes:
        print(f"import-policy: {note}", file=sys.stderr)
    return {"bundle": str(out), "layers": sizes, "hidden_activation": spec.hidden_activation,
            "activation_alpha": spec.activation_alpha, "output_activation": spec.output_activation,
            "act_low": spec.act_low.tolist(), "act_high": spec.act_high.tolist(), **report,
            "notes": spec.notes}


def _input_scale(spec: PolicySpec, env_id: str) -> None:
    """A graph without its own input normalization gets the registered task's observation scale,
    folded into the first layer (the same function in fp32). The int8 model quantizes its input
    with one scale per call: raw HalfCheetah observations (angles of 0.1, speeds of 20) lost the
    angles and cost the SB3 policy 23% of its return; normalized inputs keep them."""
    if not (np.all(spec.obs_mean == 0) and np.all(spec.obs_std == 1)):
        return
    from ..tasks import get_task

    try:
        task = get_task(env_id)
    except KeyError:  # not a registered task: no scale known
        return
    mean, std = task.obs_mean.astype(np.float64), task.obs_std.astype(np.float64)
    if mean.shape != spec.obs_mean.shape or (np.all(mean == 0) and np.all(std == 1)):
        return  # another shape, or a task whose scale is the identity: nothing to fold
    w, b = (np.asarray(a, np.float64) for a in spec.layers[0])
    spec.layers[0] = ((w * std[None, :]).astype(np.float32), (b + w @ mean).astype(np.float32))
    spec.obs_mean, spec.obs_std = mean.astype(np.float32), std.astype(np.float32)
    spec.notes.append(f"inputs normalized with {env_id}'s observation scale (folded into the first "
                      "layer: the same function, better int8 precision)")


def _fidelity(model: Path, bundle: Path, spec: PolicySpec, output: str, obs_space: Any,
              rescaled: bool) -> dict[str, Any]:
    obs = _probe_obs(obs_space, _PROBE_OBS, seed=0)
    want = _expected(_run(model, obs, output), spec, rescaled)
    span = (spec.act_high - spec.act_low).astype(np.float64)
    got = _run(bundle / MODEL_FP32, obs)
    if got.shape != want.shape:
        raise BundleError(f"{model.name}: its output has shape {want.shape[1:]} per observation, the import "
                          f"{got.shape[1:]}; the graph was misread", code="import_mismatch")
    err_fp32 = np.abs(got - want)
    # the device acts on one observation at a time; dynamic int8 quantizes activations per call,
    # so a batch shares one (coarser) activation scale: both are reported
    err_int8 = np.abs(_run(bundle / MODEL_INT8, obs, rows=True) - want)
    err_batch = np.abs(_run(bundle / MODEL_INT8, obs) - want)
    rel_fp32 = float((err_fp32 / span).max())
    if not rel_fp32 <= FP32_TOLERANCE:
        raise BundleError(f"{model.name}: the imported fp32 model differs from the file by {rel_fp32:.2e} of the "
                          "action span; the graph was misread", code="import_mismatch")
    return {"probe_observations": len(obs), "max_abs_error_fp32": float(err_fp32.max()),
            "max_abs_error_int8": float(err_int8.max()), "max_error_fp32_of_span": rel_fp32,
            "max_error_int8_of_span": float((err_int8 / span).max()),
            "p99_error_int8_of_span": float(np.percentile(err_int8 / span, 99)),
            "max_error_int8_batched_of_span": float((err_batch / span).max())}
