"""Server stage 4: planner actions on visited states -> LoRA factors (A, B) for named policy layers."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .phantom import PhantomPathSimulator
from .policy_net import Adam, LoRA, MLPPolicy

__all__ = ["DistillConfig", "DistillResult", "LoRADistiller"]

log = logging.getLogger(__name__)


@dataclass
class DistillConfig:
    """How the adapter is fitted."""

    rank: int = 4
    """LoRA rank r (rank 4 closes about 0.9 of the Pendulum gap: docs/benchmarks.md, bench adapt)."""
    alpha: float | None = None
    """LoRA alpha; None means alpha = rank (scale 1)."""
    targets: tuple[str, ...] | None = None
    """Layer names to adapt; None = every layer."""
    steps: int = 400
    """Adam steps per fit."""
    batch_size: int = 512
    """Minibatch of (state, planner action) pairs."""
    lr: float = 3e-3
    """Adam learning rate on A and B."""
    anchor: float = 0.05
    """Weight of the closeness term: mean squared action change against the base policy on anchor states."""
    seed: int = 0
    """Seed of A's init and of minibatches."""


@dataclass
class DistillResult:
    """The adapter and the figures that justify it."""

    adapter: LoRA
    """Fitted factors."""
    imitation_before: float
    """Imitation loss (half-range-normalized squared action error) of the starting adapter."""
    imitation_after: float
    """Imitation loss after fitting."""
    anchor_after: float
    """Mean squared normalized action change against the base policy on anchor states."""
    predicted_return_before: float | None = None
    """Mean phantom-path return of the starting policy under the world model (if a simulator was given)."""
    predicted_return_after: float | None = None
    """The same for the adapted policy, on the same start states and members."""

    def save_npz(self, path: str | Path) -> Path:
        """Adapter in the ``plasma-server packet build --adapter`` npz layout."""
        return self.adapter.save_npz(path)


class LoRADistiller:
    """Fits LoRA factors so that the adapted policy imitates planner actions, staying near the base."""

    def __init__(self, policy: MLPPolicy, cfg: DistillConfig | None = None) -> None:
        self.policy = policy
        self.cfg = cfg or DistillConfig()
        self.rng = np.random.default_rng(self.cfg.seed)
        self.half = 0.5 * (policy.act_high - policy.act_low)

    def init_adapter(self) -> LoRA:
        c = self.cfg
        return LoRA.init(self.policy, c.targets, c.rank, c.alpha, seed=c.seed)

    def loss_and_grads(self, lora: LoRA, states: np.ndarray, targets: np.ndarray, anchor_states: np.ndarray,
                       anchor_actions: np.ndarray) -> tuple[float, float, list[np.ndarray]]:
        """Imitation + anchor * closeness, and exact gradients for ``lora.params()``.

        states (n, od), targets (n, ad): planner actions; anchor_states (m, od) with the base
        policy's actions anchor_actions (m, ad)."""
        act, cache = self.policy.forward_cache(states, lora)
        err = (act - targets) / self.half  # (n, ad)
        imitation = float(np.mean(err**2))
        _, grads = self.policy.backward(cache, 2 * err / self.half / err.size)
        anchor = 0.0
        if self.cfg.anchor > 0 and len(anchor_states):
            a2, cache2 = self.policy.forward_cache(anchor_states, lora)
            err2 = (a2 - anchor_actions) / self.half
            anchor = float(np.mean(err2**2))
            _, g2 = self.policy.backward(cache2, self.cfg.anchor * 2 * err2 / self.half / err2.size)
            grads = [g + h for g, h in zip(grads, g2)]
        return imitation + self.cfg.anchor * anchor, imitation, grads

    def grads(self, lora: LoRA, states: np.ndarray, targets: np.ndarray, anchor_states: np.ndarray,
              anchor_actions: np.ndarray) -> list[np.ndarray]:
        """``loss_and_grads``' gradients (one Adam step's), from one forward pass over the states
        and the anchor states together and ``MLPPolicy.lora_grads``: the same up to float
        rounding, about half the work of two passes and full weight gradients."""
        n = len(states)
        anchored = self.cfg.anchor > 0 and len(anchor_states) > 0
        act, cache = self.policy.forward_cache(
            np.concatenate([states, anchor_states]) if anchored else states, lora)
        err = (act[:n] - targets) / self.half
        d_act = np.empty_like(act)
        d_act[:n] = 2 * err / self.half / err.size
        if anchored:
            err2 = (act[n:] - anchor_actions) / self.half
            d_act[n:] = self.cfg.anchor * 2 * err2 / self.half / err2.size
        return self.policy.lora_grads(cache, d_act)

    def imitation(self, lora: LoRA | None, states: np.ndarray, targets: np.ndarray) -> float:
        """Imitation loss: mean half-range-normalized squared action error."""
        return float(np.mean(((self.policy.forward(states, lora) - targets) / self.half) ** 2))

    def fit(self, states: np.ndarray, targets: np.ndarray, anchor_states: np.ndarray | None = None,
            init: LoRA | None = None, simulator: PhantomPathSimulator | None = None,
            start_pool: np.ndarray | None = None,
            eval_paths: int = 200, eval_horizon: int = 100, anchor_to: LoRA | None = None) -> DistillResult:
        """Fit from ``init`` (or a fresh standard-init adapter). If a ``PhantomPathSimulator`` and real
        start states are given, also report predicted returns before/after under the world model.

        The closeness term anchors to the actions of the policy with ``anchor_to`` (the last
        accepted adapter: a trust region between packets); None anchors to the base policy."""
        c = self.cfg
        lora = init.copy() if init is not None else self.init_adapter()
        start = lora.copy()
        anchor_states = states if anchor_states is None else anchor_states
        anchor_actions = self.policy.forward(anchor_states, anchor_to)
        opt = Adam(lora.params(), lr=c.lr)
        full = np.arange(len(states))
        imit_before = self.imitation(lora, states, targets)
        for _ in range(c.steps):
            idx = self.rng.choice(full, min(c.batch_size, len(full)), replace=False)
            jdx = self.rng.integers(0, len(anchor_states), min(c.batch_size, len(anchor_states)))
            opt.step(self.grads(lora, states[idx], targets[idx], anchor_states[jdx], anchor_actions[jdx]))
        imit_after = self.imitation(lora, states, targets)
        drift = float(np.mean(((self.policy.forward(anchor_states, lora) - anchor_actions) / self.half) ** 2))
        result = DistillResult(lora, imit_before, imit_after, drift)
        if simulator is not None and start_pool is not None:
            result.predicted_return_before, result.predicted_return_after = self.predicted_returns(
                simulator, start_pool, [start, lora], eval_paths, eval_horizon)
        log.info("distill: imitation %.4f -> %.4f, drift %.4f, predicted return %s -> %s", imit_before,
                 imit_after, drift, result.predicted_return_before, result.predicted_return_after)
        return result

    def predicted_returns(self, simulator: PhantomPathSimulator, start_pool: np.ndarray,
                          adapters: Sequence[LoRA | None], paths: int, horizon: int) -> list[float]:
        """Mean phantom return of each adapter from the same start states and members (common random numbers)."""
        out = []
        for lora in adapters:
            simulator.rng = np.random.default_rng(12345)
            roll = simulator.rollout(start_pool, self.policy, lora, paths=paths, horizon=horizon,
                                     with_disagreement=False)
            out.append(float(roll.returns.mean()))
        return out
