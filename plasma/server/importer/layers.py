"""Import stage 2: the chain of steps read from an ONNX file -> the Plasma policy convention.

Plasma's convention (``plasma.server.policy_net``): ``x = (obs - obs_mean) / obs_std``, Linear
layers with one hidden activation between them, and an output that squashes
(``act_low + (tanh(z) + 1) / 2 * (act_high - act_low)``) or clips to the action bounds. Elementwise
affine steps are folded where they stand: before the first layer they become the normalization,
after a layer they scale its rows, after an activation they scale the next layer's columns, and
after the final tanh they become the bounds (SB3's action rescale). A graph with no squash (a
plain ``nn.Sequential``, PPO's Gaussian mean) gets a clip to the environment's bounds, which is
what SB3 and Gymnasium do to its actions anyway.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from plasma.protocol.errors import BundleError, ConfigError

from .graph import Chain, Step, unsupported

__all__ = ["PolicySpec", "policy_spec"]


@dataclass
class PolicySpec:
    """Everything ``export_bundle`` needs, in float32."""

    layers: list[tuple[np.ndarray, np.ndarray]]
    obs_mean: np.ndarray
    obs_std: np.ndarray
    act_low: np.ndarray
    act_high: np.ndarray
    hidden_activation: str
    activation_alpha: float | None
    output_activation: str
    notes: list[str] = field(default_factory=list)


def _compose(steps: list[Step], i: int, width: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Fold consecutive affine steps from i: y = s * x + c; returns (s, c, next index)."""
    s, c = np.ones(width), np.zeros(width)
    while i < len(steps) and steps[i].kind == "affine":
        s2, c2 = np.broadcast_to(steps[i].w, (width,)), np.broadcast_to(steps[i].b, (width,))  # type: ignore[arg-type]
        s, c = s2 * s, s2 * c + c2
        i += 1
    return s, c, i


def policy_spec(chain: Chain, env_low: np.ndarray, env_high: np.ndarray, *,
                rescale_actions: bool = False) -> PolicySpec:
    """The Plasma policy equal to ``chain`` (raises ``BundleError`` on a chain of another shape)."""
    steps, notes = chain.steps, list(chain.notes)
    s_in, c_in, i = _compose(steps, 0, chain.obs_dim)
    if i == len(steps) or steps[i].kind != "linear":
        bad = steps[i] if i < len(steps) else None
        if bad is None:
            raise BundleError("unsupported graph: no Linear layer (Gemm or MatMul) on the way to the output",
                              code="unsupported_graph")
        raise unsupported(bad.node, bad.op, "comes before the first Linear layer")
    layers: list[tuple[np.ndarray, np.ndarray]] = []
    acts: list[Step] = []
    pending = (np.ones(chain.obs_dim), np.zeros(chain.obs_dim))  # affine between an activation and a layer
    last_linear = max(k for k, st in enumerate(steps) if st.kind == "linear")
    while True:
        step = steps[i]
        w, b = np.asarray(step.w, np.float64), np.asarray(step.b, np.float64)
        w, b = w * pending[0][None, :], b + w @ pending[1]
        s, c, i = _compose(steps, i + 1, w.shape[0])
        layers.append((s[:, None] * w, s * b + c))
        if i > last_linear:
            break
        step = steps[i]
        if step.kind == "linear":
            raise unsupported(step.node, step.op, "follows a Linear layer with no activation between them")
        if step.kind != "act":
            raise unsupported(step.node, step.op, "sits between two Linear layers")
        acts.append(step)
        s, c, i = _compose(steps, i + 1, w.shape[0])
        pending = (s, c)
        if steps[i].kind != "linear":
            raise unsupported(steps[i].node, steps[i].op, "follows a hidden activation")
    first = acts[0] if acts else None
    for a in acts[1:]:
        assert first is not None
        if (a.act, a.alpha) != (first.act, first.alpha):
            raise unsupported(a.node, a.op, f"differs from the first hidden activation {first.op} ({first.node}); "
                              "Plasma policies use one hidden activation")
    out, low, high = _tail(steps[i:], layers, env_low, env_high, rescale_actions, notes)
    mean, std = _normalization(s_in, c_in, layers)
    f32 = [(np.asarray(w, np.float32), np.asarray(b, np.float32)) for w, b in layers]
    return PolicySpec(f32, mean.astype(np.float32), std.astype(np.float32), low.astype(np.float32),
                      high.astype(np.float32), first.act if first else "tanh",
                      first.alpha if first else None, out, notes)


def _tail(tail: list[Step], layers: list[tuple[np.ndarray, np.ndarray]], env_low: np.ndarray,
          env_high: np.ndarray, rescale: bool, notes: list[str]) -> tuple[str, np.ndarray, np.ndarray]:
    """What follows the last layer: nothing, a clip, or tanh then an affine rescale."""
    env_low, env_high = np.asarray(env_low, np.float64), np.asarray(env_high, np.float64)
    width = layers[-1][0].shape[0]
    if not tail or tail[0].kind == "clip":
        low, high = env_low.copy(), env_high.copy()
        for step in tail:
            if step.kind != "clip":
                raise unsupported(step.node, step.op, "follows the output clip")
            low = low if step.low is None else np.maximum(low, step.low)
            high = high if step.high is None else np.minimum(high, step.high)
        if rescale:
            raise ConfigError("--rescale-actions maps a final tanh's [-1, 1] onto the environment's bounds; "
                              "this graph has no final tanh", code="bad_rescale")
        notes.append("no squash after the last layer: actions are clipped to "
                     f"[{low.tolist()}, {high.tolist()}] (what the environment does with them anyway)")
        return "clip", low, high
    head = tail[0]
    if head.kind != "act" or head.act != "tanh":
        raise unsupported(head.node, head.op, "ends the policy; the output must be linear, clipped or a tanh")
    s, c, j = _compose(tail, 1, width)
    if j < len(tail):
        raise unsupported(tail[j].node, tail[j].op, "follows the final tanh and its rescale")
    if np.any(s == 0):
        raise unsupported(tail[-1].node, tail[-1].op, "scales an action dimension by 0")
    w, b = layers[-1]
    sign = np.sign(s)
    layers[-1] = (w * sign[:, None], b * sign)  # s * tanh(z) = |s| * tanh(-z) where s < 0
    low, high = c - np.abs(s), c + np.abs(s)
    if rescale:
        if not (np.allclose(low, -1.0, atol=1e-6) and np.allclose(high, 1.0, atol=1e-6)):
            raise ConfigError(f"--rescale-actions: the graph's actions already span [{low.tolist()}, "
                              f"{high.tolist()}], not [-1, 1]", code="bad_rescale")
        notes.append(f"actions rescaled from [-1, 1] to the environment's [{env_low.tolist()}, {env_high.tolist()}]")
        return "tanh", env_low.copy(), env_high.copy()
    if not (np.allclose(low, env_low, rtol=1e-5, atol=1e-6) and np.allclose(high, env_high, rtol=1e-5, atol=1e-6)):
        notes.append(f"the graph's actions span [{low.tolist()}, {high.tolist()}] but the environment's are "
                     f"[{env_low.tolist()}, {env_high.tolist()}]; kept as the graph has them (an SB3 actor "
                     "exported without its rescale wants --rescale-actions)")
    return "tanh", low, high


def _normalization(s: np.ndarray, c: np.ndarray,
                   layers: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """x' = s * obs + c as (obs - mean) / std with std > 0: a negative s flips the first layer's column."""
    if np.any(s == 0) or not np.all(np.isfinite(s)) or not np.all(np.isfinite(c)):
        raise BundleError(f"unsupported graph: the input normalization has scale {s.tolist()}",
                          code="unsupported_graph")
    sign = np.sign(s)
    w, b = layers[0]
    layers[0] = (w * sign[None, :], b)
    a = np.abs(s)
    return -(c * sign) / a, 1.0 / a
