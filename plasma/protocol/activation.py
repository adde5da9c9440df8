"""The policy convention's nonlinearities, shared by the server's policy math and the edge's reference forward.

A bundle's manifest names them: ``hidden_activation`` (with ``activation_alpha`` for ELU and
LeakyReLU) after every hidden layer, and ``output_activation`` on the last pre-activation z:
``tanh`` squashes to ``act_low + (tanh(z) + 1) / 2 * (act_high - act_low)``, ``clip`` clips z to
``[act_low, act_high]`` (imported policies whose graph ends without a squash, such as PPO's
Gaussian mean, whose actions the environment clips anyway). Kept in ``plasma.protocol`` because
the device and the server must compute exactly the same function.
"""

from __future__ import annotations

import numpy as np

__all__ = ["DEFAULT_ALPHA", "HIDDEN_ACTIVATIONS", "OUTPUT_ACTIVATIONS", "hidden", "output"]

HIDDEN_ACTIVATIONS = ("tanh", "relu", "elu", "leaky_relu")
OUTPUT_ACTIVATIONS = ("tanh", "clip")
DEFAULT_ALPHA = {"tanh": 0.0, "relu": 0.0, "elu": 1.0, "leaky_relu": 0.01}
"""ONNX's (and PyTorch's) defaults: Elu alpha 1.0, LeakyRelu alpha 0.01."""


def hidden(z: np.ndarray, name: str, alpha: float | None = None) -> np.ndarray:
    """The hidden activation ``name`` of z (float32 in, float32 out)."""
    a = np.float32(DEFAULT_ALPHA[name] if alpha is None else alpha)
    if name == "tanh":
        return np.asarray(np.tanh(z))
    if name == "relu":
        return np.asarray(np.maximum(z, np.float32(0)))
    if name == "elu":
        return np.asarray(np.where(z > 0, z, a * np.expm1(np.minimum(z, np.float32(0)))))
    if name == "leaky_relu":
        return np.asarray(np.where(z >= 0, z, a * z))
    raise ValueError(f"unknown hidden activation {name!r}; known: {HIDDEN_ACTIVATIONS}")


def output(z: np.ndarray, name: str, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """Actions from the last pre-activation z (batch, act_dim)."""
    if name == "tanh":
        return np.asarray(low + (np.tanh(z) + 1) / 2 * (high - low))
    if name == "clip":
        return np.asarray(np.minimum(np.maximum(z, low), high))
    raise ValueError(f"unknown output activation {name!r}; known: {OUTPUT_ACTIVATIONS}")
