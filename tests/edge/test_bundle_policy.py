"""Bundle loading and the policy runtime, on the prebuilt ONNX bundle run by onnxruntime.

The exporter's own tests (fresh exports, requantization bit for bit) are in
tests/server/test_export.py: edge tests run without ``onnx``.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from plasma.edge.runtime import PolicyRuntime, reference_forward
from plasma.protocol.bundle import BASE_WEIGHTS, MANIFEST, MODEL_FP32, MODEL_INT8, Bundle, BundleError, load_bundle


def observations(m: dict, n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal((n, m["obs_dim"]))
    return (np.array(m["obs_mean"]) + np.array(m["obs_std"]) * noise).astype(np.float32)


# -- the prebuilt bundle in onnxruntime -------------------------------------------------------

def test_dynamic_batch_dimension(bundle: Bundle) -> None:
    session = ort.InferenceSession(bundle.model_bytes, providers=["CPUExecutionProvider"])
    for n in (1, 7, 300):
        assert session.run(None, {"obs": np.zeros((n, 12), np.float32)})[0].shape == (n, 3)


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
