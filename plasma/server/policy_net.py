"""Server policy math: the numpy MLP policy, its LoRA adapters, forward and exact backward.

Conventions shared with the exporter and the edge (do not change them here alone):
layers ``l0..lK`` are ``(W float32 (out, in), b (out,))``; ``x = (obs - obs_mean) / obs_std``;
hidden ``h = act(W h + b)`` with ``act`` the bundle's ``hidden_activation`` (tanh, relu, elu,
leaky_relu; ``plasma.protocol.activation``); last ``z = W h + b``; ``action = output(z)``: the
tanh squash ``act_low + (tanh(z) + 1) / 2 * (act_high - act_low)`` or a clip to the bounds.
A LoRA adapter adds ``(alpha / rank) * B @ A`` to ``W`` of each target layer, with
``A (rank, in)`` and ``B (out, rank)``; its file form is an npz of ``NAME.A``, ``NAME.B`` and
a scalar ``alpha``.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np

from plasma.protocol import activation

__all__ = ["Adam", "ForwardCache", "Layer", "LoRA", "MLPPolicy", "policy_from_mapping"]

Layer = tuple[np.ndarray, np.ndarray]


@dataclass
class LoRA:
    """Low-rank factors for some named layers: delta W = (alpha / rank) * B @ A."""

    factors: dict[str, tuple[np.ndarray, np.ndarray]]
    """layer name -> (A (rank, in), B (out, rank)), float32."""
    alpha: float
    """Scale numerator; the applied scale is alpha / rank."""
    rank: int
    """Rank r shared by every target layer."""

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @classmethod
    def init(cls, policy: MLPPolicy, targets: Sequence[str] | None = None, rank: int = 4,
             alpha: float | None = None, seed: int = 0, a_std: float | None = None) -> LoRA:
        """Standard LoRA init: A small random (std 1/sqrt(in) unless given), B zero, so delta W = 0."""
        rng = np.random.default_rng(seed)
        names = list(targets) if targets is not None else policy.names
        factors = {}
        for name in names:
            w, _ = policy.layer(name)
            out_dim, in_dim = w.shape
            std = a_std if a_std is not None else 1.0 / np.sqrt(in_dim)
            factors[name] = (
                (rng.standard_normal((rank, in_dim)) * std).astype(np.float32),
                np.zeros((out_dim, rank), np.float32),
            )
        return cls(factors, float(alpha if alpha is not None else rank), rank)

    def delta(self, name: str) -> np.ndarray:
        """(out, in) weight delta of one layer."""
        a, b = self.factors[name]
        return self.scale * (b @ a)

    def params(self) -> list[np.ndarray]:
        """Flat list [A_0, B_0, A_1, B_1, ...] in factor order (views, for an optimizer)."""
        return [p for a, b in self.factors.values() for p in (a, b)]

    def copy(self) -> LoRA:
        return LoRA({k: (a.copy(), b.copy()) for k, (a, b) in self.factors.items()}, self.alpha, self.rank)

    def to_npz_bytes(self) -> bytes:
        arrays: dict[str, np.ndarray] = {"alpha": np.asarray(self.alpha, np.float32)}
        for name, (a, b) in self.factors.items():
            arrays[f"{name}.A"] = a.astype(np.float32)
            arrays[f"{name}.B"] = b.astype(np.float32)
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        return buf.getvalue()

    def save_npz(self, path: str | Path) -> Path:
        """Write the file form read by ``plasma-server packet build --adapter``."""
        path = Path(path)
        path.write_bytes(self.to_npz_bytes())
        return path

    @classmethod
    def load_npz(cls, path: str | Path) -> LoRA:
        with np.load(path, allow_pickle=False) as z:
            alpha = float(z["alpha"])
            names = sorted({k[:-2] for k in z.files if k.endswith(".A")})
            factors = {n: (z[f"{n}.A"].astype(np.float32), z[f"{n}.B"].astype(np.float32)) for n in names}
        rank = next(iter(factors.values()))[0].shape[0]
        return cls(factors, alpha, rank)


@dataclass
class ForwardCache:
    """Activations kept by ``MLPPolicy.forward_cache`` for the backward pass."""

    inputs: list[np.ndarray]
    """Input of each layer: x, h1, ..., hK; each (batch, in_k)."""
    pre: list[np.ndarray]
    """Pre-activation of each layer: z0, ..., zK; each (batch, out_k)."""
    lora: LoRA | None
    """Adapter used in the forward pass (its factors get gradients)."""
    weights: list[np.ndarray] | None = None
    """Each layer's weight as the pass used it (the adapter merged in): backward reuses them."""


@dataclass
class MLPPolicy:
    """MLP policy with baked-in observation normalization and action squashing (or clipping)."""

    layers: list[Layer]
    """[(W (out, in), b (out,)), ...] named l0..lK."""
    obs_mean: np.ndarray
    """(obs_dim,) input normalization offset."""
    obs_std: np.ndarray
    """(obs_dim,) input normalization scale."""
    act_low: np.ndarray
    """(act_dim,) action lower bound."""
    act_high: np.ndarray
    """(act_dim,) action upper bound."""
    hidden_activation: str = "tanh"
    """One of ``plasma.protocol.activation.HIDDEN_ACTIVATIONS``."""
    activation_alpha: float | None = None
    """ELU alpha or LeakyReLU slope; None: the ONNX default."""
    output_activation: str = "tanh"
    """``tanh`` (squash to the bounds) or ``clip``."""
    names: list[str] = field(init=False)

    def __post_init__(self) -> None:
        self.layers = [(np.asarray(w, np.float32), np.asarray(b, np.float32)) for w, b in self.layers]
        self.obs_mean = np.asarray(self.obs_mean, np.float32)
        self.obs_std = np.asarray(self.obs_std, np.float32)
        self.act_low = np.asarray(self.act_low, np.float32)
        self.act_high = np.asarray(self.act_high, np.float32)
        self.names = [f"l{i}" for i in range(len(self.layers))]
        if self.hidden_activation not in activation.HIDDEN_ACTIVATIONS:
            raise ValueError(f"hidden activation {self.hidden_activation!r}; known {activation.HIDDEN_ACTIVATIONS}")
        if self.output_activation not in activation.OUTPUT_ACTIVATIONS:
            raise ValueError(f"output activation {self.output_activation!r}; known {activation.OUTPUT_ACTIVATIONS}")

    # ------------------------------------------------------------------ construction
    @classmethod
    def init(cls, obs_dim: int, act_dim: int, hidden: Sequence[int], *, obs_mean: np.ndarray,
             obs_std: np.ndarray, act_low: np.ndarray, act_high: np.ndarray, seed: int = 0) -> MLPPolicy:
        """Gaussian 1/sqrt(fan_in) init; the last layer 100x smaller so actions start near the middle."""
        rng = np.random.default_rng(seed)
        sizes = [obs_dim, *hidden, act_dim]
        layers = []
        for i, (n_in, n_out) in enumerate(pairwise(sizes)):
            gain = 0.01 if i == len(sizes) - 2 else 1.0
            layers.append(((rng.standard_normal((n_out, n_in)) * gain / np.sqrt(n_in)).astype(np.float32),
                           np.zeros(n_out, np.float32)))
        return cls(layers, obs_mean, obs_std, act_low, act_high)

    def copy(self) -> MLPPolicy:
        return MLPPolicy([(w.copy(), b.copy()) for w, b in self.layers], self.obs_mean.copy(),
                         self.obs_std.copy(), self.act_low.copy(), self.act_high.copy(),
                         self.hidden_activation, self.activation_alpha, self.output_activation)

    @property
    def activations(self) -> dict[str, str | float | None]:
        """The nonlinearity fields, as keyword arguments (and manifest fields)."""
        return {"hidden_activation": self.hidden_activation, "activation_alpha": self.activation_alpha,
                "output_activation": self.output_activation}

    def layer(self, name: str) -> Layer:
        return self.layers[self.names.index(name)]

    def params(self) -> list[np.ndarray]:
        """Flat list [W0, b0, W1, b1, ...] (views, for an optimizer)."""
        return [p for w, b in self.layers for p in (w, b)]

    def merged(self, lora: LoRA | None) -> MLPPolicy:
        """A new policy with the adapter folded into the weights (fp32; the edge requantizes)."""
        out = self.copy()
        if lora is not None:
            for name in lora.factors:
                i = self.names.index(name)
                w, b = out.layers[i]
                out.layers[i] = (w + lora.delta(name), b)
        return out

    # ------------------------------------------------------------------ forward / backward
    def _weights(self, lora: LoRA | None) -> list[np.ndarray]:
        if lora is None:
            return [w for w, _ in self.layers]
        return [w + lora.delta(n) if n in lora.factors else w for n, (w, _) in zip(self.names, self.layers)]

    def forward(self, obs: np.ndarray, lora: LoRA | None = None) -> np.ndarray:
        """Actions for a batch: obs (batch, obs_dim) -> (batch, act_dim); 1-D obs gives 1-D action."""
        return self.forward_cache(obs, lora)[0]

    __call__ = forward

    def forward_cache(self, obs: np.ndarray, lora: LoRA | None = None) -> tuple[np.ndarray, ForwardCache]:
        single = obs.ndim == 1
        h = (np.atleast_2d(obs) - self.obs_mean) / self.obs_std  # (batch, obs_dim)
        weights = self._weights(lora)
        inputs, pre = [], []
        for k, (w, (_, b)) in enumerate(zip(weights, self.layers)):
            inputs.append(h)
            z = h @ w.T + b  # (batch, out_k)
            pre.append(z)
            h = activation.hidden(z, self.hidden_activation, self.activation_alpha) if k < len(weights) - 1 else z
        act = activation.output(h, self.output_activation, self.act_low, self.act_high)
        return (act[0] if single else act), ForwardCache(inputs, pre, lora, weights)

    def backward(self, cache: ForwardCache, d_act: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Exact gradients of a scalar loss given dL/daction (batch, act_dim).

        Returns (grads for ``params()`` order [dW0, db0, ...], grads for ``lora.params()`` order
        [dA, dB, ...] or [] without an adapter).
        """
        lora = cache.lora
        weights = cache.weights if cache.weights is not None else self._weights(lora)
        dz = np.atleast_2d(d_act) * self._output_grad(cache.pre[-1])
        grads_w: list[np.ndarray] = [np.empty(0)] * (2 * len(weights))
        grads_lora: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for k in range(len(weights) - 1, -1, -1):
            h_in = cache.inputs[k]  # (batch, in_k)
            d_w = dz.T @ h_in  # (out_k, in_k)
            grads_w[2 * k], grads_w[2 * k + 1] = d_w, dz.sum(axis=0)
            name = self.names[k]
            if lora is not None and name in lora.factors:
                a, b = lora.factors[name]
                grads_lora[name] = (lora.scale * (b.T @ d_w), lora.scale * (d_w @ a.T))
            if k > 0:
                dz = _mm(dz, weights[k]) * self._hidden_grad(cache.pre[k - 1], h_in)  # through the activation
        flat_lora = [g for n in (lora.factors if lora else {}) for g in grads_lora[n]]
        return grads_w, flat_lora

    def lora_grads(self, cache: ForwardCache, d_act: np.ndarray) -> list[np.ndarray]:
        """``backward``'s adapter gradients ([dA, dB, ...] in ``lora.params()`` order) without the
        weight gradients: dA = s (dz B)^T h and dB = s dz^T (h A^T) instead of s B^T dW and
        s dW A^T through dW = dz^T h (equal up to float rounding; the rank-r products are a
        fraction of dW's work). Distillation needs only these."""
        lora = cache.lora
        if lora is None:
            return []
        weights = cache.weights if cache.weights is not None else self._weights(lora)
        dz = np.atleast_2d(d_act) * self._output_grad(cache.pre[-1])
        first = min(self.names.index(n) for n in lora.factors) if lora.factors else len(weights)
        grads: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for k in range(len(weights) - 1, first - 1, -1):
            h_in = cache.inputs[k]  # (batch, in_k)
            name = self.names[k]
            if name in lora.factors:
                a, b = lora.factors[name]
                grads[name] = (lora.scale * (_mm(dz, b).T @ h_in), lora.scale * (dz.T @ (h_in @ a.T)))
            if k > first:
                dz = _mm(dz, weights[k]) * self._hidden_grad(cache.pre[k - 1], h_in)
        return [g for n in lora.factors for g in grads[n]]

    def _output_grad(self, z: np.ndarray) -> np.ndarray:
        """d action / d z, elementwise (batch, act_dim)."""
        if self.output_activation == "tanh":
            return 0.5 * (self.act_high - self.act_low) * (1.0 - np.tanh(z) ** 2)
        return ((z > self.act_low) & (z < self.act_high)).astype(np.float32)  # clip

    def _hidden_grad(self, z: np.ndarray, h: np.ndarray) -> np.ndarray:
        """d h / d z of the hidden activation, given z and h = act(z)."""
        name = self.hidden_activation
        alpha = np.float32(activation.DEFAULT_ALPHA[name] if self.activation_alpha is None else self.activation_alpha)
        if name == "tanh":
            return 1.0 - h**2
        if name == "relu":
            return (z > 0).astype(np.float32)
        if name == "elu":
            return np.where(z > 0, np.float32(1), h + alpha)  # alpha * exp(z) = h + alpha
        return np.where(z >= 0, np.float32(1), alpha)  # leaky_relu

    # ------------------------------------------------------------------ files
    def save_npz(self, path: str | Path) -> Path:
        """Own cache format: weights and normalization in one npz (the bundle is export_bundle's job)."""
        arrays = {"obs_mean": self.obs_mean, "obs_std": self.obs_std, "act_low": self.act_low,
                  "act_high": self.act_high, "hidden_activation": np.asarray(self.hidden_activation),
                  "output_activation": np.asarray(self.output_activation)}
        if self.activation_alpha is not None:
            arrays["activation_alpha"] = np.asarray(self.activation_alpha, np.float64)
        for n, (w, b) in zip(self.names, self.layers):
            arrays[f"{n}.W"], arrays[f"{n}.b"] = w, b
        path = Path(path)
        with path.open("wb") as f:
            np.savez(f, **arrays)
        return path

    @classmethod
    def load_npz(cls, path: str | Path, **overrides: np.ndarray) -> MLPPolicy:
        """Load ``save_npz`` output, or a bundle's ``base_weights.npz`` given normalization overrides."""
        with np.load(path, allow_pickle=False) as z:
            n_layers = len([k for k in z.files if k.endswith(".W")])
            layers = [(z[f"l{i}.W"], z[f"l{i}.b"]) for i in range(n_layers)]
            meta = {k: overrides.get(k, z[k] if k in z.files else None)
                    for k in ("obs_mean", "obs_std", "act_low", "act_high")}
            acts = {k: str(z[k]) for k in ("hidden_activation", "output_activation") if k in z.files}
            if "activation_alpha" in z.files:
                acts["activation_alpha"] = float(z["activation_alpha"])  # type: ignore[assignment]
        missing = [k for k, v in meta.items() if v is None]
        if missing:
            raise KeyError(f"{path}: missing {missing}; pass them as keyword overrides")
        return cls(layers, **meta, **acts)  # type: ignore[arg-type]


def _mm(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """x @ y; an outer product (one column, act_dim 1) by broadcasting: the same numbers, without
    BLAS's slow path for an inner dimension of one."""
    return np.asarray(x * y if x.shape[-1] == 1 else x @ y)


class Adam:
    """Adam over a list of numpy arrays, updated in place (CleanRL/PyTorch defaults)."""

    def __init__(self, params: Sequence[np.ndarray], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0) -> None:
        self.params = list(params)
        self.lr, self.b1, self.b2, self.eps, self.wd = lr, betas[0], betas[1], eps, weight_decay
        self.m = [np.zeros_like(p) for p in self.params]
        self.v = [np.zeros_like(p) for p in self.params]
        self.t = 0

    def step(self, grads: Sequence[np.ndarray]) -> None:
        self.t += 1
        c1, c2 = 1 - self.b1**self.t, 1 - self.b2**self.t
        for p, g, m, v in zip(self.params, grads, self.m, self.v):
            if self.wd:
                g = g + self.wd * p
            m *= self.b1
            m += (1 - self.b1) * g
            v *= self.b2
            v += (1 - self.b2) * g * g
            p -= (self.lr * (m / c1) / (np.sqrt(v / c2) + self.eps)).astype(p.dtype)


def policy_from_mapping(weights: Mapping[str, np.ndarray], **norm: Any) -> MLPPolicy:
    """Build from a ``{"l0.W": ..., "l0.b": ...}`` mapping (e.g. a bundle's base_weights.npz);
    ``norm`` holds the normalization, bounds and activation fields."""
    n = len([k for k in weights if k.endswith(".W")])
    return MLPPolicy([(weights[f"l{i}.W"], weights[f"l{i}.b"]) for i in range(n)], **norm)  # type: ignore[arg-type]
