"""Edge runtime: fp32 master -> per-channel int8 weights (the shipped scheme), and the fp32 reference forward."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from plasma.protocol import activation
from plasma.protocol.bundle import Bundle

__all__ = ["quantize_into", "quantize_weight", "reference_forward"]

_TINY = float(np.finfo(np.float32).tiny)


def quantize_weight(w: np.ndarray, qmax: int = 127) -> tuple[np.ndarray, np.ndarray]:
    """W float32 (out, in) -> (q int8 (in, out), scale float32 (out,)): quantize_dynamic's per-channel QInt8.

    Symmetric, zero point 0: scale computed in float64 as 2*max|W_col| / (2*qmax) then cast,
    q = clip(round_half_even(W / scale), -qmax, qmax); an all-zero column gets scale 1.0. With
    qmax 64 (``reduce_range=True``) or 127 this reproduces onnxruntime.quantization 1.32's
    weights bit for bit (tested).
    """
    # Always a copy: for a one-row or one-column W, W.T is already contiguous and
    # ascontiguousarray would hand back the read-only master itself.
    acc = np.array(np.asarray(w, np.float32).T, order="C", copy=True)  # (in, out)
    q = np.empty(acc.shape, np.int8)
    scale = np.empty(acc.shape[1], np.float32)
    quantize_into(acc, q, scale, np.empty_like(acc), qmax)
    return q, scale


def quantize_into(acc: np.ndarray, q: np.ndarray, scale: np.ndarray, scratch: np.ndarray,
                  qmax: int = 127) -> None:
    """In place: acc float32 (in, out) is consumed; writes q int8 (in, out) and scale (out,)."""
    np.abs(acc, out=scratch)
    absmax = scratch.max(axis=0).astype(np.float64)  # (out,)
    s64 = absmax * 2.0 / (2.0 * qmax)
    s32 = s64.astype(np.float32)
    s32[s64 < _TINY] = 1.0  # the quantizer's guard for an all-zero column
    np.divide(acc, s32, out=acc)
    np.round(acc, out=acc)
    np.clip(acc, -qmax, qmax, out=acc)
    np.copyto(q, acc, casting="unsafe")
    np.copyto(scale, s32)


def reference_forward(bundle: Bundle, obs: np.ndarray, weights: Mapping[str, np.ndarray] | None = None) -> np.ndarray:
    """fp32 numpy forward of the policy convention; ``weights`` (name -> W (out, in)) overrides the master."""
    m = bundle.manifest
    h = (np.asarray(obs, np.float32) - np.asarray(m.obs_mean, np.float32)) / np.asarray(m.obs_std, np.float32)
    for k, e in enumerate(m.layers):
        w = bundle.weights[e.name] if weights is None or e.name not in weights else weights[e.name]
        h = h @ w.T + bundle.biases[e.name]  # (batch, out)
        if k < len(m.layers) - 1:
            h = activation.hidden(h, m.hidden_activation, m.activation_alpha)
    low, high = np.asarray(m.act_low, np.float32), np.asarray(m.act_high, np.float32)
    return activation.output(h, m.output_activation, low, high).astype(np.float32)
