"""Server stage 6a: policy MLP weights -> bundle directory (fp32 + dynamic-int8 ONNX, master weights, manifest).

Layout written (read back by ``plasma.protocol.bundle.load_bundle``)::

    model.int8.onnx    dynamic-int8 graph the device runs; its sha256 is what packets bind to
    model.fp32.onnx    fp32 reference graph (fidelity checks, server-side probes)
    base_weights.npz   fp32 master weights l0.W (out, in), l0.b (out,), ...
    manifest.json      plasma.protocol.bundle.Manifest, with the int8 initializer names per layer
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import QuantType, quantize_dynamic

from plasma.protocol.bundle import (
    BASE_WEIGHTS,
    MANIFEST,
    MODEL_FP32,
    MODEL_INT8,
    WEIGHT_QMAX,
    LayerEntry,
    Manifest,
    load_bundle,
)

__all__ = ["ONNX_ACTIVATION_OPS", "export_bundle", "random_mlp_layers", "build_fp32_model"]

Layers = Sequence[tuple[np.ndarray, np.ndarray]]

_OMITTED_DEFAULTS: dict[str, Any] = {"activation_alpha": None, "output_activation": "tanh"}
"""Manifest fields left out at their default: a tanh policy's manifest reads as before they existed."""

# ONNX Runtime 1.32 loads IR 10 / opset 21; IR 9 + opset 17 keeps older device runtimes (1.17+) working.
ONNX_ACTIVATION_OPS = {"tanh": "Tanh", "relu": "Relu", "elu": "Elu", "leaky_relu": "LeakyRelu"}
"""Hidden activation (``plasma.protocol.activation``) -> the ONNX op the exporter writes and the
importer reads back."""
_IR_VERSION = 9
_OPSET = 17


def random_mlp_layers(sizes: list[int], seed: int | np.random.Generator = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """Random MLP layers for tests and benchmarks: sizes [in, h1, ..., out], W (out, in) ~ U(+-1/sqrt(in))."""
    rng = np.random.default_rng(seed)
    layers = []
    for n_in, n_out in zip(sizes[:-1], sizes[1:]):
        bound = 1.0 / np.sqrt(n_in)  # PyTorch nn.Linear default init range
        w = rng.uniform(-bound, bound, size=(n_out, n_in)).astype(np.float32)  # (out, in)
        b = rng.uniform(-bound, bound, size=(n_out,)).astype(np.float32)  # (out,)
        layers.append((w, b))
    return layers


def _f32(name: str, value: Any) -> onnx.TensorProto:
    return numpy_helper.from_array(np.ascontiguousarray(value, dtype=np.float32), name)


def build_fp32_model(
    layers: Layers,
    *,
    obs_mean: np.ndarray,
    obs_std: np.ndarray,
    act_low: np.ndarray,
    act_high: np.ndarray,
    hidden_activation: str = "tanh",
    activation_alpha: float | None = None,
    output_activation: str = "tanh",
) -> onnx.ModelProto:
    """fp32 graph: normalize, (MatMul + Add + act) per hidden layer, MatMul + Add + tanh squash to
    [low, high] (or Min + Max: a clip to them)."""
    obs_dim, act_dim = layers[0][0].shape[1], layers[-1][0].shape[0]
    inits = [_f32("obs_mean", obs_mean), _f32("obs_std", obs_std)]
    nodes = [
        helper.make_node("Sub", ["obs", "obs_mean"], ["x_c"]),
        helper.make_node("Div", ["x_c", "obs_std"], ["h_in"]),
    ]
    h = "h_in"
    act_op = ONNX_ACTIVATION_OPS[hidden_activation]
    with_alpha = activation_alpha is not None and act_op in ("Elu", "LeakyRelu")
    act_attrs = {"alpha": float(activation_alpha)} if with_alpha else {}  # type: ignore[arg-type]
    for k, (w, b) in enumerate(layers):
        name = f"l{k}"
        # ONNX MatMul is h @ W: store W transposed, (in, out); the quantizer then scales per output column.
        inits += [_f32(f"{name}.W", np.asarray(w).T), _f32(f"{name}.b", b)]
        nodes += [
            helper.make_node("MatMul", [h, f"{name}.W"], [f"{name}.mm"]),
            helper.make_node("Add", [f"{name}.mm", f"{name}.b"], [f"{name}.z"]),
        ]
        h = f"{name}.z"
        if k < len(layers) - 1:
            nodes.append(helper.make_node(act_op, [h], [f"{name}.h"], **act_attrs))
            h = f"{name}.h"
    if output_activation == "clip":
        inits += [_f32("act_low", act_low), _f32("act_high", act_high)]
        nodes += [helper.make_node("Min", [h, "act_high"], ["below_high"]),
                  helper.make_node("Max", ["below_high", "act_low"], ["action"])]
    else:
        half_span = (np.asarray(act_high, np.float32) - np.asarray(act_low, np.float32)) / 2  # exact: /2
        inits += [_f32("one", np.ones(1)), _f32("half_span", half_span), _f32("act_low", act_low)]
        nodes += [
            helper.make_node("Tanh", [h], ["squash"]),
            helper.make_node("Add", ["squash", "one"], ["squash1"]),
            helper.make_node("Mul", ["squash1", "half_span"], ["scaled"]),
            helper.make_node("Add", ["scaled", "act_low"], ["action"]),
        ]
    graph = helper.make_graph(
        nodes,
        "plasma_policy",
        [helper.make_tensor_value_info("obs", TensorProto.FLOAT, ["batch", obs_dim])],
        [helper.make_tensor_value_info("action", TensorProto.FLOAT, ["batch", act_dim])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", _OPSET)], producer_name="plasma")
    model.ir_version = _IR_VERSION
    onnx.checker.check_model(model)
    return model


class _DropPreprocessHint(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not ("pre-processing before quantization" in message
                    or message.startswith("Quantization parameters for tensor"))


@contextmanager
def _quiet_quantizer() -> Iterator[None]:
    """quantize_dynamic logs a pre-processing hint on the root logger; our MLP needs no shape inference."""
    hint = _DropPreprocessHint()
    root = logging.getLogger()
    root.addFilter(hint)
    try:
        yield
    finally:
        root.removeFilter(hint)


def _quantize(fp32_path: Path, int8_path: Path) -> None:
    with _quiet_quantizer():
        # per_channel=True gives symmetric per-output-column int8 (zero point 0), the scheme
        # plasma.edge.merge reproduces bit for bit. reduce_range=True keeps weights in [-64, 64]
        # (scale = max|W_col| / 64): on x86 CPUs without VNNI, onnxruntime's u8 x s8 kernel
        # (VPMADDUBSW) saturates int16 pair sums with full-range weights, and a 48-wide MLP then
        # missed its fp32 actions by 9% of the action span (measured on this AVX2 machine).
        quantize_dynamic(fp32_path, int8_path, weight_type=QuantType.QInt8, per_channel=True,
                         reduce_range=True)


def _layer_entries(int8_model: onnx.ModelProto, layers: Layers) -> list[LayerEntry]:
    """Find each layer's int8 weight / scale / zero-point initializers in the quantized graph."""
    inits = {t.name: t for t in int8_model.graph.initializer}
    entries = []
    for k, (w, _) in enumerate(layers):
        n_out, n_in = w.shape
        names = {s: f"l{k}.W_{s}" for s in ("quantized", "scale", "zero_point")}
        want = {"quantized": (n_in, n_out), "scale": (n_out,), "zero_point": (n_out,)}
        for suffix, name in names.items():
            if name not in inits or tuple(inits[name].dims) != want[suffix]:
                raise RuntimeError(f"quantized graph lacks {name} {want[suffix]}; quantizer layout changed")
        entries.append(
            LayerEntry.model_validate(
                {"name": f"l{k}", "in": n_in, "out": n_out, "weight_q": names["quantized"],
                 "weight_scale": names["scale"], "weight_zero_point": names["zero_point"]}
            )
        )
    return entries


def export_bundle(
    out_dir: str | Path,
    layers: Layers,
    *,
    obs_mean: Any,
    obs_std: Any,
    act_low: Any,
    act_high: Any,
    hidden_activation: str = "tanh",
    activation_alpha: float | None = None,
    output_activation: str = "tanh",
    obs_low: Any = None,
    obs_high: Any = None,
    env_id: str = "",
    physics: dict[str, float] | None = None,
    meta: dict[str, Any] | None = None,
) -> Path:
    """Write a bundle directory for an MLP policy and return its path (validated by loading it back)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    layers = [(np.asarray(w, np.float32), np.asarray(b, np.float32)) for w, b in layers]
    vec = {k: np.asarray(v, np.float32).reshape(-1) for k, v in
           {"obs_mean": obs_mean, "obs_std": obs_std, "act_low": act_low, "act_high": act_high}.items()}
    model = build_fp32_model(layers, hidden_activation=hidden_activation, activation_alpha=activation_alpha,
                             output_activation=output_activation, **vec)
    onnx.save(model, out / MODEL_FP32)
    with tempfile.TemporaryDirectory() as tmp:
        # quantize next to a scratch copy: the quantizer may write helper files beside its output.
        tmp_int8 = Path(tmp) / MODEL_INT8
        _quantize(out / MODEL_FP32, tmp_int8)
        int8_bytes = tmp_int8.read_bytes()
    (out / MODEL_INT8).write_bytes(int8_bytes)
    arrays = {f"l{k}.{p}": a for k, (w, b) in enumerate(layers) for p, a in (("W", w), ("b", b))}
    np.savez(out / BASE_WEIGHTS, allow_pickle=False, **arrays)
    manifest = Manifest.model_validate(
        {
            "schema": 1, "obs_dim": layers[0][0].shape[1], "act_dim": layers[-1][0].shape[0],
            "obs_low": _opt_list(obs_low), "obs_high": _opt_list(obs_high),
            **{k: v.tolist() for k, v in vec.items()},
            "hidden_activation": hidden_activation, "activation_alpha": activation_alpha,
            "output_activation": output_activation, "weight_qmax": WEIGHT_QMAX, "env_id": env_id,
            "physics": dict(physics or {}), "base_sha256": hashlib.sha256(int8_bytes).hexdigest(),
            "layers": [e.model_dump(by_alias=True) for e in _layer_entries(onnx.load_from_string(int8_bytes), layers)],
            "meta": dict(meta or {}),
        }
    )
    data = {k: v for k, v in json.loads(manifest.model_dump_json(by_alias=True)).items()
            if k not in _OMITTED_DEFAULTS or v != _OMITTED_DEFAULTS[k]}
    (out / MANIFEST).write_text(json.dumps(data, indent=2) + "\n")
    load_bundle(out)  # the device-side checks, run once here so a bad export fails on the server
    return out


def _opt_list(value: Any) -> list[float] | None:
    return None if value is None else np.asarray(value, np.float32).reshape(-1).tolist()
