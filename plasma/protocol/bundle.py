"""Edge stage 10a: bundle directory -> validated manifest, int8 model bytes and fp32 master weights.

A bundle is what a device is provisioned with (written by ``plasma.server.export``)::

    model.int8.onnx   the dynamic-int8 policy the device runs; sha256 = manifest.base_sha256
    model.fp32.onnx   fp32 reference (not needed to act; checked for presence only)
    base_weights.npz  fp32 master weights l0.W (out, in), l0.b (out,), ... (no pickle)
    manifest.json     ``Manifest``

Every problem raises ``BundleError`` with a ``code``: missing_file, bad_manifest, bad_weights,
digest_mismatch, bad_model (and
``base_mismatch`` from ``PolicyRuntime``). This module imports neither onnx nor onnxruntime.
"""

from __future__ import annotations

import hashlib
import json
import math
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Annotated, Any, ClassVar, Literal

import msgspec
import numpy as np

from .errors import BundleError, MessageInvalid
from .wire import WireStruct

__all__ = ["Bundle", "BundleError", "LayerEntry", "Manifest", "load_bundle", "MODEL_INT8", "MODEL_FP32",
           "BASE_WEIGHTS", "MANIFEST", "WEIGHT_QMAX"]

MODEL_INT8 = "model.int8.onnx"
MODEL_FP32 = "model.fp32.onnx"
BASE_WEIGHTS = "base_weights.npz"
MANIFEST = "manifest.json"
WEIGHT_QMAX = 64
"""What new bundles use (``Manifest.weight_qmax``)."""
MAX_MODEL_BYTES = 64 * 1024 * 1024  # an edge MLP policy is ~100 KB; refuse to hash/load anything absurd


_Positive = Annotated[int, msgspec.Meta(ge=1)]
_NonEmpty = Annotated[str, msgspec.Meta(min_length=1)]


class LayerEntry(WireStruct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """One Linear layer and the names of its int8 initializers in model.int8.onnx.

    In JSON ``in_features`` is ``in`` and ``out_features`` is ``out``.
    """

    _strict: ClassVar[bool] = False  # lax like the pydantic model it replaces ("3" -> 3)
    _aliases: ClassVar[dict[str, str]] = {"in_features": "in", "out_features": "out"}

    name: Annotated[str, msgspec.Meta(pattern=r"^l\d+\Z")]
    in_features: _Positive = msgspec.field(name="in")
    out_features: _Positive = msgspec.field(name="out")
    weight_q: _NonEmpty
    """int8 (in, out) initializer: the transposed weight, as ONNX MatMul wants it."""
    weight_scale: _NonEmpty
    """float32 (out,) per-output-channel scale."""
    weight_zero_point: _NonEmpty
    """int8 (out,) zero point, all 0 (symmetric)."""


class Manifest(WireStruct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """manifest.json, schema 1 (``schema_version`` is ``schema`` in JSON)."""

    _strict: ClassVar[bool] = False
    _aliases: ClassVar[dict[str, str]] = {"schema_version": "schema"}

    schema_version: Literal[1] = msgspec.field(name="schema")
    obs_dim: _Positive
    act_dim: _Positive
    obs_low: list[float] | None = None
    obs_high: list[float] | None = None
    act_low: list[float]
    act_high: list[float]
    obs_mean: list[float]
    obs_std: list[float]
    hidden_activation: Literal["tanh", "relu", "elu", "leaky_relu"]
    activation_alpha: float | None = None
    """ELU's alpha or LeakyReLU's negative slope (``plasma.protocol.activation``); None: the default."""
    output_activation: Literal["tanh", "clip"] = "tanh"
    """How the last layer's z becomes an action: tanh squash to the bounds, or clip to them."""
    weight_qmax: Literal[64, 127] = 127
    """Largest |q| of the int8 weights: 64 (reduce-range, what ``export_bundle`` writes: exact on
    CPUs without VNNI) or 127 (full range, bundles written before the field existed)."""
    env_id: str = ""
    physics: dict[str, float] = msgspec.field(default_factory=dict)
    base_sha256: Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{64}\Z")]
    layers: Annotated[list[LayerEntry], msgspec.Meta(min_length=1)]
    meta: dict[str, Any] = msgspec.field(default_factory=dict)

    @classmethod
    def model_validate(cls, obj: Any) -> Manifest:
        """Like pydantic's ``populate_by_name``: field names are accepted besides the aliases."""
        if isinstance(obj, dict):
            obj = _aliased(obj, cls._aliases)
            if isinstance(obj.get("layers"), list):
                obj["layers"] = [_aliased(e, LayerEntry._aliases) if isinstance(e, dict) else e
                                 for e in obj["layers"]]
        return super().model_validate(obj)

    def _check(self) -> None:
        if self.activation_alpha is not None and not math.isfinite(self.activation_alpha):
            raise MessageInvalid("activation_alpha: must be finite", field="activation_alpha")
        for field in ("obs_low", "obs_high", "act_low", "act_high", "obs_mean", "obs_std"):
            value = getattr(self, field)
            if value is not None and not all(math.isfinite(x) for x in value):
                raise MessageInvalid(f"{field}: must be finite", field=field)
        for field, dim in (("obs_mean", self.obs_dim), ("obs_std", self.obs_dim), ("obs_low", self.obs_dim),
                           ("obs_high", self.obs_dim), ("act_low", self.act_dim), ("act_high", self.act_dim)):
            value = getattr(self, field)
            if value is not None and len(value) != dim:
                raise ValueError(f"{field} has {len(value)} entries, expected {dim}")
        if min(self.obs_std) <= 0:
            raise ValueError("obs_std must be > 0")
        if any(lo >= hi for lo, hi in zip(self.act_low, self.act_high)):
            raise ValueError("act_low must be < act_high")
        self._check_chain()

    def _check_chain(self) -> None:
        width = self.obs_dim
        for k, layer in enumerate(self.layers):
            if layer.name != f"l{k}" or layer.in_features != width:
                raise ValueError(f"layer {k} ({layer.name}, in={layer.in_features}) does not chain: "
                                 f"want l{k}, in={width}")
            width = layer.out_features
        if width != self.act_dim:
            raise ValueError(f"last layer has {width} outputs, act_dim is {self.act_dim}")


def _aliased(obj: dict[str, Any], aliases: Mapping[str, str]) -> dict[str, Any]:
    out = dict(obj)
    for name, alias in aliases.items():
        if name in out and alias not in out:
            out[alias] = out.pop(name)
    return out


@dataclass(frozen=True)
class Bundle:
    """A loaded, validated bundle. Arrays are read-only: the fp32 master is never modified."""

    root: Path
    manifest: Manifest
    model_bytes: bytes
    """Contents of model.int8.onnx (sha256 checked against the manifest)."""
    weights: Mapping[str, np.ndarray]
    """name -> W float32 (out, in)."""
    biases: Mapping[str, np.ndarray]
    """name -> b float32 (out,)."""

    @property
    def layer_specs(self) -> list[tuple[str, int, int]]:
        """[(name, in, out)] in forward order."""
        return [(e.name, e.in_features, e.out_features) for e in self.manifest.layers]

    @property
    def layer_shapes(self) -> dict[str, tuple[int, int]]:
        """name -> (in, out), the form ``plasma.protocol.check_layers`` takes."""
        return {e.name: (e.in_features, e.out_features) for e in self.manifest.layers}

    @property
    def int8_path(self) -> Path:
        return self.root / MODEL_INT8

    @property
    def fp32_path(self) -> Path:
        return self.root / MODEL_FP32

    @property
    def base_sha256(self) -> str:
        return self.manifest.base_sha256

    def layers(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """[(W (out, in), b (out,))] in forward order, the ``export_bundle`` convention."""
        return [(self.weights[e.name], self.biases[e.name]) for e in self.manifest.layers]


def load_bundle(path: str | Path) -> Bundle:
    """Load and validate a bundle directory; raises ``BundleError``."""
    root = Path(path)
    for name in (MANIFEST, MODEL_INT8, MODEL_FP32, BASE_WEIGHTS):
        if not (root / name).is_file():
            raise BundleError(f"{root / name} not found", code="missing_file")
    manifest = _read_manifest(root / MANIFEST)
    model_bytes = _read_model(root / MODEL_INT8, manifest.base_sha256)
    weights, biases = _read_weights(root / BASE_WEIGHTS, manifest)
    return Bundle(root, manifest, model_bytes, MappingProxyType(weights), MappingProxyType(biases))


def _read_manifest(path: Path) -> Manifest:
    try:
        return Manifest.model_validate(json.loads(path.read_text(encoding="utf-8")))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{path.name} is not JSON: {exc}", code="bad_manifest") from None
    except MessageInvalid as exc:
        raise BundleError(f"{path.name} is invalid: {exc}", code="bad_manifest") from None


def _read_model(path: Path, want_sha256: str) -> bytes:
    if path.stat().st_size > MAX_MODEL_BYTES:
        raise BundleError(f"{path.name} is larger than {MAX_MODEL_BYTES} bytes", code="bad_model")
    data = path.read_bytes()
    got = hashlib.sha256(data).hexdigest()
    if got != want_sha256:
        raise BundleError(f"{path.name} sha256 {got} != manifest {want_sha256}", code="digest_mismatch")
    return data


def _read_weights(path: Path, manifest: Manifest) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise BundleError(f"{path.name} unreadable: {exc}", code="bad_weights") from None
    want = {f"{e.name}.{p}" for e in manifest.layers for p in ("W", "b")}
    if set(arrays) != want:
        raise BundleError(f"{path.name} holds {sorted(arrays)}, expected {sorted(want)}", code="bad_weights")
    weights, biases = {}, {}
    for e in manifest.layers:
        weights[e.name] = _checked(arrays[f"{e.name}.W"], (e.out_features, e.in_features), f"{e.name}.W")
        biases[e.name] = _checked(arrays[f"{e.name}.b"], (e.out_features,), f"{e.name}.b")
    return weights, biases


def _checked(a: np.ndarray, shape: tuple[int, ...], name: str) -> np.ndarray:
    if a.dtype != np.float32 or a.shape != shape:
        raise BundleError(f"{name} is {a.dtype}{a.shape}, expected float32{shape}", code="bad_weights")
    if not np.isfinite(a).all():
        raise BundleError(f"{name} has NaN or Inf", code="bad_weights")
    a = np.ascontiguousarray(a)
    a.flags.writeable = False
    return a
