"""Exporter, bundle loading and the policy runtime, on real ONNX models run by onnxruntime."""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from plasma.protocol.bundle import BASE_WEIGHTS, MANIFEST, MODEL_FP32, MODEL_INT8, Bundle, BundleError, load_bundle
from plasma.edge.runtime import PolicyRuntime, quantize_weight, reference_forward


def numpy_forward(layers: list[tuple[np.ndarray, np.ndarray]], obs: np.ndarray, m: dict) -> np.ndarray:
    """The convention, written out independently of the code under test (float64)."""
    h = (obs - np.array(m["obs_mean"])) / np.array(m["obs_std"])
    for k, (w, b) in enumerate(layers):
        h = h @ w.T.astype(np.float64) + b
        if k < len(layers) - 1:
            h = np.tanh(h) if m["hidden_activation"] == "tanh" else np.maximum(h, 0)
    low, high = np.array(m["act_low"]), np.array(m["act_high"])
    return low + (np.tanh(h) + 1) / 2 * (high - low)


def observations(m: dict, n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal((n, m["obs_dim"]))
    return (np.array(m["obs_mean"]) + np.array(m["obs_std"]) * noise).astype(np.float32)


def run(path: Path, obs: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"obs": obs})[0]


def int8_initializers(path: Path) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


# -- exporter -----------------------------------------------------------------------------------

@pytest.mark.parametrize("activation", ["tanh", "relu"])
def test_fp32_model_matches_numpy_forward_and_int8_is_close(make_bundle: Callable[..., Path], activation: str) -> None:
    root = make_bundle(activation=activation)
    m = json.loads((root / MANIFEST).read_text())
    npz = np.load(root / BASE_WEIGHTS, allow_pickle=False)
    layers = [(npz[f"l{k}.W"], npz[f"l{k}.b"]) for k in range(len(m["layers"]))]
    obs = observations(m, 256)
    want = numpy_forward(layers, obs.astype(np.float64), m)
    fp32 = run(root / MODEL_FP32, obs)
    assert fp32.dtype == np.float32 and fp32.shape == (256, m["act_dim"])
    assert np.abs(fp32 - want).max() < 1e-5
    span = np.max(np.array(m["act_high"]) - np.array(m["act_low"]))
    assert np.abs(run(root / MODEL_INT8, obs) - fp32).max() < 0.02 * span  # measured ~0.004 * span


def test_bundle_layout_and_manifest(shared_bundle_dir: Path) -> None:
    root = shared_bundle_dir
    assert sorted(p.name for p in root.iterdir()) == sorted([MODEL_INT8, MODEL_FP32, BASE_WEIGHTS, MANIFEST])
    m = json.loads((root / MANIFEST).read_text())
    assert set(m) == {"schema", "obs_dim", "act_dim", "obs_low", "obs_high", "act_low", "act_high", "obs_mean",
                      "obs_std", "hidden_activation", "weight_qmax", "env_id", "physics", "base_sha256", "layers",
                      "meta"}
    assert m["schema"] == 1 and m["env_id"] == "Test-v0" and m["physics"] == {"g": 9.81}
    assert m["base_sha256"] == hashlib.sha256((root / MODEL_INT8).read_bytes()).hexdigest()
    inits = int8_initializers(root / MODEL_INT8)
    for k, layer in enumerate(m["layers"]):
        assert layer["name"] == f"l{k}"
        q, scale, zp = inits[layer["weight_q"]], inits[layer["weight_scale"]], inits[layer["weight_zero_point"]]
        assert q.dtype == np.int8 and q.shape == (layer["in"], layer["out"])
        assert scale.dtype == np.float32 and scale.shape == (layer["out"],)
        assert zp.dtype == np.int8 and not zp.any()
        assert m["weight_qmax"] == 64 and np.abs(q).max() <= 64  # reduce-range: exact without VNNI


def test_dynamic_batch_dimension(bundle: Bundle) -> None:
    session = ort.InferenceSession(bundle.model_bytes, providers=["CPUExecutionProvider"])
    for n in (1, 7, 300):
        assert session.run(None, {"obs": np.zeros((n, 12), np.float32)})[0].shape == (n, 3)


@pytest.mark.parametrize("zero_row", [False, True])
def test_requantizing_master_reproduces_shipped_int8_bit_for_bit(tmp_path: Path, zero_row: bool) -> None:
    from plasma.server.export import export_bundle, random_mlp_layers

    layers = random_mlp_layers([10, 40, 4], seed=3)
    if zero_row:  # an all-zero output channel: the quantizer's scale-1.0 guard
        layers[0][0][5] = 0.0
    root = export_bundle(tmp_path / "b", layers, obs_mean=np.zeros(10), obs_std=np.ones(10),
                         act_low=-np.ones(4), act_high=np.ones(4))
    inits = int8_initializers(root / MODEL_INT8)
    for k, (w, _) in enumerate(layers):
        q, scale = quantize_weight(w, 64)
        assert np.array_equal(q, inits[f"l{k}.W_quantized"])
        assert np.array_equal(scale, inits[f"l{k}.W_scale"])


# -- bundle loading errors ----------------------------------------------------------------------

@pytest.mark.parametrize("name", [MANIFEST, MODEL_INT8, MODEL_FP32, BASE_WEIGHTS])
def test_missing_file(bundle_dir: Path, name: str) -> None:
    (bundle_dir / name).unlink()
    with pytest.raises(BundleError) as err:
        load_bundle(bundle_dir)
    assert err.value.code == "missing_file"


def _edit_manifest(root: Path, edit: Callable[[dict], None]) -> None:
    m = json.loads((root / MANIFEST).read_text())
    edit(m)
    (root / MANIFEST).write_text(json.dumps(m))


BAD_MANIFESTS: list[tuple[str, Callable[[dict], None]]] = [
    ("extra key", lambda m: m.update(surprise=1)),
    ("schema 2", lambda m: m.update(schema=2)),
    ("short obs_mean", lambda m: m.update(obs_mean=m["obs_mean"][:-1])),
    ("zero obs_std", lambda m: m["obs_std"].__setitem__(0, 0.0)),
    ("low >= high", lambda m: m.update(act_low=m["act_high"])),
    ("bad activation", lambda m: m.update(hidden_activation="gelu")),
    ("broken chain", lambda m: m["layers"][1].update({"in": 7})),
    ("bad sha", lambda m: m.update(base_sha256="xyz")),
    ("missing layers", lambda m: m.pop("layers")),
]


@pytest.mark.parametrize("edit", [e for _, e in BAD_MANIFESTS], ids=[n for n, _ in BAD_MANIFESTS])
def test_bad_manifest(bundle_dir: Path, edit: Callable[[dict], None]) -> None:
    _edit_manifest(bundle_dir, edit)
    with pytest.raises(BundleError) as err:
        load_bundle(bundle_dir)
    assert err.value.code == "bad_manifest"


def test_manifest_not_json(bundle_dir: Path) -> None:
    (bundle_dir / MANIFEST).write_text("{not json")
    with pytest.raises(BundleError) as err:
        load_bundle(bundle_dir)
    assert err.value.code == "bad_manifest"


def test_digest_mismatch(bundle_dir: Path) -> None:
    data = bytearray((bundle_dir / MODEL_INT8).read_bytes())
    data[-1] ^= 1
    (bundle_dir / MODEL_INT8).write_bytes(bytes(data))
    with pytest.raises(BundleError) as err:
        load_bundle(bundle_dir)
    assert err.value.code == "digest_mismatch"


BAD_WEIGHTS: list[tuple[str, Callable[[dict], None]]] = [
    ("wrong shape", lambda a: a.update({"l0.W": a["l0.W"][:, :-1]})),
    ("float64", lambda a: a.update({"l1.b": a["l1.b"].astype(np.float64)})),
    ("nan", lambda a: a["l2.W"].__setitem__((0, 0), np.nan)),
    ("missing", lambda a: a.pop("l2.b")),
    ("extra", lambda a: a.update(junk=np.zeros(1, np.float32))),
]


@pytest.mark.parametrize("edit", [e for _, e in BAD_WEIGHTS], ids=[n for n, _ in BAD_WEIGHTS])
def test_bad_weights(bundle_dir: Path, edit: Callable[[dict], None]) -> None:
    with np.load(bundle_dir / BASE_WEIGHTS) as npz:
        arrays = {k: npz[k].copy() for k in npz.files}
    edit(arrays)
    np.savez(bundle_dir / BASE_WEIGHTS, **arrays)
    with pytest.raises(BundleError) as err:
        load_bundle(bundle_dir)
    assert err.value.code == "bad_weights"


def test_pickled_weights_refused(bundle_dir: Path) -> None:
    np.savez(bundle_dir / BASE_WEIGHTS, **{"l0.W": np.array([{"a": 1}], dtype=object)})
    with pytest.raises(BundleError) as err:
        load_bundle(bundle_dir)
    assert err.value.code == "bad_weights"


def test_master_weights_are_read_only(bundle: Bundle) -> None:
    assert bundle.layer_specs == [("l0", 12, 48), ("l1", 48, 48), ("l2", 48, 3)]
    assert bundle.layer_shapes == {"l0": (12, 48), "l1": (48, 48), "l2": (48, 3)}
    with pytest.raises(ValueError):
        bundle.weights["l0"][0, 0] = 1.0


# -- runtime ------------------------------------------------------------------------------------

@pytest.mark.parametrize("swap", ["rebuild", "inplace"])
def test_act_equals_session_run(bundle: Bundle, swap: str) -> None:
    rt = PolicyRuntime(bundle, swap=swap)  # type: ignore[arg-type]
    assert rt.swap == swap and rt.base_requant_err == 0.0
    bare = ort.InferenceSession(bundle.model_bytes, providers=["CPUExecutionProvider"])
    obs = observations(bundle.manifest.model_dump(), 50, seed=1)
    for row in obs:
        want = bare.run(None, {"obs": row[None]})[0][0]
        assert np.array_equal(rt.act(row), want)
        assert np.array_equal(rt.act(row[None].astype(np.float64)), want)  # (1, obs_dim), any float dtype
    assert np.array_equal(rt.act_batch(obs), bare.run(None, {"obs": obs})[0])
    assert np.array_equal(rt.base_act_batch(obs), bare.run(None, {"obs": obs})[0])


def test_act_returns_the_bound_buffer(bundle: Bundle) -> None:
    rt = PolicyRuntime(bundle)
    obs = observations(bundle.manifest.model_dump(), 2)
    first = rt.act(obs[0])
    kept = first.copy()
    second = rt.act(obs[1])
    assert second is first and not np.array_equal(first, kept)  # documented: copy to keep


def test_int8_runtime_close_to_reference_forward(bundle: Bundle) -> None:
    rt = PolicyRuntime(bundle)
    obs = observations(bundle.manifest.model_dump(), 500)
    assert np.abs(rt.act_batch(obs) - reference_forward(bundle, obs)).max() < 0.05


def test_inplace_self_test_passes_and_falls_back(bundle: Bundle, monkeypatch: pytest.MonkeyPatch,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    assert PolicyRuntime(bundle, swap="inplace")._inplace_works(PolicyRuntime(bundle).base_q, None)
    monkeypatch.setattr(PolicyRuntime, "_inplace_works", lambda self, base_q, graph: False)
    with caplog.at_level(logging.WARNING, logger="plasma.edge.runtime"):
        rt = PolicyRuntime(bundle, swap="inplace")
    assert rt.swap == "rebuild" and "session rebuild" in caplog.text


def test_edge_import_loads_no_server_modules() -> None:
    code = (
        "import sys, plasma.edge, plasma.protocol.bundle, plasma.edge.runtime, plasma.edge.merge, plasma.edge.bench\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('onnx', 'gymnasium', 'torch')\n"
        "       or m.startswith(('plasma.server', 'onnxruntime.quantization'))]\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
