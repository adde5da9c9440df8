"""The exporter (server side): fresh bundles against a numpy forward pass, the manifest, the
int8 layout the device requantizes bit for bit, and the prebuilt test bundles kept current."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from plasma.edge.runtime import quantize_weight
from plasma.protocol.bundle import BASE_WEIGHTS, MANIFEST, MODEL_FP32, MODEL_INT8
from plasma.server.export import export_bundle, random_mlp_layers
from tests.fixtures.make_bundles import SPECS, export
from tests.helpers.bundles import EDGE, bundle_path


def numpy_forward(layers: list[tuple[np.ndarray, np.ndarray]], obs: np.ndarray, m: dict) -> np.ndarray:
    """The convention, written out independently of the code under test (float64)."""
    h = (obs - np.array(m["obs_mean"])) / np.array(m["obs_std"])
    for k, (w, b) in enumerate(layers):
        h = h @ w.T.astype(np.float64) + b
        if k < len(layers) - 1:
            h = {"tanh": np.tanh(h), "relu": np.maximum(h, 0),
                 "leaky_relu": np.where(h >= 0, h, (m.get("activation_alpha") or 0.01) * h)}[m["hidden_activation"]]
    low, high = np.array(m["act_low"]), np.array(m["act_high"])
    if m.get("output_activation") == "clip":
        return np.clip(h, low, high)
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


@pytest.mark.parametrize("activation", ["tanh", "relu", "leaky_relu"])
def test_fp32_model_matches_numpy_forward_and_int8_is_close(tmp_path: Path, activation: str) -> None:
    extra = {"activation_alpha": 0.2, "output_activation": "clip"} if activation == "leaky_relu" else {}
    root = export(EDGE, tmp_path / "b", hidden_activation=activation, **extra)
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


def test_bundle_layout_and_manifest(tmp_path: Path) -> None:
    root = export(EDGE, tmp_path / "b")
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


@pytest.mark.parametrize("zero_row", [False, True])
def test_requantizing_master_reproduces_shipped_int8_bit_for_bit(tmp_path: Path, zero_row: bool) -> None:
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


@pytest.mark.parametrize("name", sorted(SPECS))
def test_prebuilt_bundles_match_the_current_exporter(tmp_path: Path, name: str) -> None:
    """The edge tests' bundles are what the exporter writes today (else run
    ``python tests/fixtures/make_bundles.py``)."""
    fresh, shipped = export(name, tmp_path / name), bundle_path(name)
    manifests = [json.loads((root / MANIFEST).read_text()) for root in (fresh, shipped)]
    for m in manifests:
        m.pop("base_sha256")
    assert manifests[0] == manifests[1]
    with np.load(fresh / BASE_WEIGHTS) as a, np.load(shipped / BASE_WEIGHTS) as b:
        assert sorted(a.files) == sorted(b.files)
        assert all(np.array_equal(a[k], b[k]) for k in a.files)
    new, old = int8_initializers(fresh / MODEL_INT8), int8_initializers(shipped / MODEL_INT8)
    assert all(np.array_equal(new[k], old[k]) for k in new)
