"""Server stage 2: real transitions -> ensemble dynamics model."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from itertools import pairwise

import numpy as np

from .policy_net import Adam

__all__ = ["FitReport", "Member", "WorldModel", "WorldModelConfig"]

log = logging.getLogger(__name__)


@dataclass
class WorldModelConfig:
    """How the ensemble is built and trained."""

    ensemble_size: int = 5
    """Number of members (PETS uses 5 to 7)."""
    hidden: tuple[int, ...] = (200, 200)
    """Hidden widths of each member (ReLU: tanh cost 2x the matmul time in batched rollouts)."""
    lr: float = 1e-3
    """Adam learning rate."""
    weight_decay: float = 1e-5
    """L2 on weights, added to the gradient."""
    batch_size: int = 256
    """Minibatch size per member."""
    max_epochs: int = 200
    """Upper bound on passes over the training split."""
    min_steps_per_epoch: int = 5
    """An epoch has at least this many minibatch steps, so tiny data sets still train."""
    patience: int = 8
    """Epochs without held-out improvement before stopping."""
    holdout: float = 0.15
    """Fraction of transitions kept out of training for validation and early stopping."""
    bootstrap: bool = True
    """Each member trains on its own bootstrap resample of the training split."""
    learn_reward: bool = False
    """Also predict the reward (only for tasks whose reward is not known)."""
    seed: int = 0
    """Seed for init, split and minibatches."""


def _softplus(x: np.ndarray) -> np.ndarray:
    return np.logaddexp(0.0, x)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


@dataclass
class Member:
    """One probabilistic MLP: normalized (obs, act) -> (mean, raw log-variance) of the normalized target."""

    layers: list[tuple[np.ndarray, np.ndarray]]
    """[(W (out, in), b (out,)), ...]; the last layer outputs 2 * target_dim."""
    max_logvar: np.ndarray
    """(target_dim,) learned soft upper bound of the log-variance (PETS)."""
    min_logvar: np.ndarray
    """(target_dim,) learned soft lower bound of the log-variance (PETS)."""

    def params(self) -> list[np.ndarray]:
        return [p for w, b in self.layers for p in (w, b)] + [self.max_logvar, self.min_logvar]

    def copy(self) -> Member:
        return Member([(w.copy(), b.copy()) for w, b in self.layers], self.max_logvar.copy(), self.min_logvar.copy())

    # ---------------------------------------------------------------- math
    def mean(self, x: np.ndarray) -> np.ndarray:
        """Fast path for rollouts: (batch, in) -> (batch, target_dim) mean only, plain 2-D matmuls."""
        h = x
        for w, b in self.layers[:-1]:
            h = h @ w.T
            h += b
            np.maximum(h, 0.0, out=h)
        w, b = self.layers[-1]
        d = len(self.max_logvar)
        return h @ w[:d].T + b[:d]

    def forward(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
        """(batch, in) -> mean (batch, d), bounded log-variance (batch, d), cache for backward."""
        acts = [x]
        h = x
        for w, b in self.layers[:-1]:
            h = np.maximum(h @ w.T + b, 0.0)
            acts.append(h)
        w, b = self.layers[-1]
        out = h @ w.T + b
        d = len(self.max_logvar)
        mu, raw = out[:, :d], out[:, d:]
        lv1 = self.max_logvar - _softplus(self.max_logvar - raw)
        logvar = self.min_logvar + _softplus(lv1 - self.min_logvar)
        acts += [raw, lv1]
        return mu, logvar, acts

    def loss_and_grads(self, x: np.ndarray, y: np.ndarray, weight_decay: float = 0.0,
                       bound_coef: float = 0.01) -> tuple[float, list[np.ndarray]]:
        """Gaussian NLL (per element, 0.5 * ((mu-y)^2 e^-lv + lv)) + PETS bound penalty; exact grads."""
        mu, logvar, acts = self.forward(x)
        raw, lv1 = acts[-2], acts[-1]
        n = mu.size
        inv_var = np.exp(-logvar)
        err = mu - y  # (batch, d)
        loss = 0.5 * float(np.sum(err**2 * inv_var + logvar)) / n
        loss += bound_coef * float(self.max_logvar.sum() - self.min_logvar.sum())
        d_mu = err * inv_var / n
        d_lv = 0.5 * (1.0 - err**2 * inv_var) / n
        # logvar = min + softplus(lv1 - min); lv1 = max - softplus(max - raw)
        s2 = _sigmoid(lv1 - self.min_logvar)
        d_lv1 = d_lv * s2
        d_min = np.sum(d_lv * (1.0 - s2), axis=0) - bound_coef
        s1 = _sigmoid(self.max_logvar - raw)
        d_raw = d_lv1 * s1
        d_max = np.sum(d_lv1 * (1.0 - s1), axis=0) + bound_coef
        dz = np.concatenate([d_mu, d_raw], axis=1)  # (batch, 2d)
        grads: list[np.ndarray] = [np.empty(0)] * (2 * len(self.layers))
        for k in range(len(self.layers) - 1, -1, -1):
            w, _ = self.layers[k]
            h_in = acts[k]
            grads[2 * k] = dz.T @ h_in + weight_decay * w
            grads[2 * k + 1] = dz.sum(axis=0)
            if k > 0:
                dz = (dz @ w) * (h_in > 0)
        if weight_decay:
            loss += 0.5 * weight_decay * sum(float(np.sum(w**2)) for w, _ in self.layers)
        return loss, grads + [d_max.astype(np.float32), d_min.astype(np.float32)]


@dataclass
class FitReport:
    """What one ``WorldModel.fit`` did and how good the result is."""

    n_train: int
    """Transitions in the training split."""
    n_holdout: int
    """Transitions held out."""
    epochs: int
    """Epochs run before early stopping."""
    val_mse: float
    """Held-out MSE of the ensemble-mean prediction, in normalized target units (1.0 = predicting the mean)."""
    val_mse_obs: float
    """Held-out MSE of the predicted next observation, in raw observation units."""
    val_nll: float
    """Held-out Gaussian NLL averaged over members."""
    disagreement: float
    """Mean per-sample ensemble disagreement on the held-out set (std across members, normalized units)."""


@dataclass
class WorldModel:
    """Ensemble of probabilistic MLPs predicting delta-obs (and the reward if asked) from (obs, act)."""

    obs_dim: int
    act_dim: int
    cfg: WorldModelConfig = field(default_factory=WorldModelConfig)
    members: list[Member] = field(default_factory=list)
    in_mean: np.ndarray = field(init=False)
    in_std: np.ndarray = field(init=False)
    out_mean: np.ndarray = field(init=False)
    out_std: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.target_dim = self.obs_dim + (1 if self.cfg.learn_reward else 0)
        n_in = self.obs_dim + self.act_dim
        self.in_mean, self.in_std = np.zeros(n_in, np.float32), np.ones(n_in, np.float32)
        self.out_mean, self.out_std = np.zeros(self.target_dim, np.float32), np.ones(self.target_dim, np.float32)
        self._rng = np.random.default_rng(self.cfg.seed)
        if not self.members:
            self.members = [self._init_member() for _ in range(self.cfg.ensemble_size)]

    def _init_member(self) -> Member:
        sizes = [self.obs_dim + self.act_dim, *self.cfg.hidden, 2 * self.target_dim]
        layers = []
        for n_in, n_out in pairwise(sizes):
            w = self._rng.standard_normal((n_out, n_in)) * np.sqrt(2.0 / n_in)  # He init for ReLU
            layers.append((w.astype(np.float32), np.zeros(n_out, np.float32)))
        d = self.target_dim
        return Member(layers, np.full(d, 0.5, np.float32), np.full(d, -10.0, np.float32))

    # ---------------------------------------------------------------- data
    def _targets(self, obs: np.ndarray, next_obs: np.ndarray, rew: np.ndarray | None) -> np.ndarray:
        delta = next_obs - obs
        if self.cfg.learn_reward:
            if rew is None:
                raise ValueError("learn_reward=True needs rewards")
            delta = np.concatenate([delta, np.reshape(rew, (-1, 1))], axis=1)
        return delta.astype(np.float32)

    def normalize_input(self, obs: np.ndarray, act: np.ndarray) -> np.ndarray:
        x = np.concatenate([obs, act], axis=-1)
        return ((x - self.in_mean) / self.in_std).astype(np.float32)

    # ---------------------------------------------------------------- training
    def fit(self, obs: np.ndarray, act: np.ndarray, next_obs: np.ndarray, rew: np.ndarray | None = None,
            *, reset_stats: bool = True) -> FitReport:
        """Train every member on (obs, act) -> next_obs - obs with early stopping on a held-out split.

        Warm-starts from the current weights (call again as data grows)."""
        cfg = self.cfg
        x_raw = np.concatenate([obs, act], axis=1).astype(np.float32)  # (n, in)
        y_raw = self._targets(obs, next_obs, rew)  # (n, d)
        n = len(x_raw)
        perm = self._rng.permutation(n)
        n_hold = max(1, round(cfg.holdout * n)) if n >= 10 else 0
        hold, train = perm[:n_hold], perm[n_hold:]
        if reset_stats:
            self.in_mean, self.in_std = x_raw[train].mean(0), x_raw[train].std(0) + 1e-6
            self.out_mean, self.out_std = y_raw[train].mean(0), y_raw[train].std(0) + 1e-6
        x = (x_raw - self.in_mean) / self.in_std
        y = (y_raw - self.out_mean) / self.out_std
        x_tr, y_tr = x[train], y[train]
        x_ho, y_ho = (x[hold], y[hold]) if n_hold else (x_tr, y_tr)
        boots = [self._rng.integers(0, len(train), len(train)) if cfg.bootstrap else np.arange(len(train))
                 for _ in self.members]
        opts = [Adam(m.params(), lr=cfg.lr) for m in self.members]
        steps = max(cfg.min_steps_per_epoch, -(-len(train) // cfg.batch_size))
        best = [np.inf] * len(self.members)
        snapshots = [m.copy() for m in self.members]
        since_best, epoch = 0, 0
        for epoch in range(1, cfg.max_epochs + 1):
            for _ in range(steps):
                for m, opt, boot in zip(self.members, opts, boots):
                    idx = boot[self._rng.integers(0, len(boot), min(cfg.batch_size, len(boot)))]
                    _, grads = m.loss_and_grads(x_tr[idx], y_tr[idx], cfg.weight_decay)
                    opt.step(grads)
            improved = False
            for i, m in enumerate(self.members):
                mse = float(np.mean((m.mean(x_ho) - y_ho) ** 2))
                if mse < best[i] * (1 - 1e-3):
                    best[i], snapshots[i], improved = mse, m.copy(), True
            since_best = 0 if improved else since_best + 1
            if since_best >= cfg.patience:
                break
        self.members = snapshots
        report = self._evaluate(x_ho, y_ho, len(train), n_hold, epoch)
        log.info("world model: %d train / %d held out, %d epochs, val mse %.4f (normalized), disagreement %.4f",
                 report.n_train, report.n_holdout, epoch, report.val_mse, report.disagreement)
        return report

    def _evaluate(self, x: np.ndarray, y: np.ndarray, n_train: int, n_hold: int, epochs: int) -> FitReport:
        mus, nlls = [], []
        for m in self.members:
            mu, lv, _ = m.forward(x)
            mus.append(mu)
            nlls.append(0.5 * float(np.mean((mu - y) ** 2 * np.exp(-lv) + lv + np.log(2 * np.pi))))
        mus_a = np.stack(mus)  # (members, n, d)
        mean = mus_a.mean(0)
        d_obs = self.obs_dim
        err_obs = (mean - y)[:, :d_obs] * self.out_std[:d_obs]
        return FitReport(n_train, n_hold, epochs, float(np.mean((mean - y) ** 2)), float(np.mean(err_obs**2)),
                         float(np.mean(nlls)), float(np.mean(mus_a.std(0).mean(-1))))

    # ---------------------------------------------------------------- prediction
    def predict(self, obs: np.ndarray, act: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Every member's Gaussian over the next observation.

        obs (batch, obs_dim), act (batch, act_dim) -> mean (members, batch, target_dim), var (same),
        where the target is next_obs (plus the reward if learned)."""
        x = self.normalize_input(obs, act)
        means, vars_ = [], []
        for m in self.members:
            mu, lv, _ = m.forward(x)
            means.append(mu * self.out_std + self.out_mean)
            vars_.append(np.exp(lv) * self.out_std**2)
        mean = np.stack(means)  # (members, batch, d)
        mean[..., : self.obs_dim] += obs
        return mean, np.stack(vars_)

    def disagreement(self, obs: np.ndarray, act: np.ndarray) -> np.ndarray:
        """(batch,) std across members of the predicted mean, averaged over target dims (normalized units)."""
        x = self.normalize_input(obs, act)
        mus = np.stack([m.mean(x) for m in self.members])  # (members, batch, d)
        return mus.std(0).mean(-1)

    def step_member(self, member: int, obs: np.ndarray, act: np.ndarray) -> np.ndarray:
        """Mean next target of one member for a batch: plain 2-D matmuls, the rollout fast path."""
        x = self.normalize_input(obs, act)
        out = self.members[member].mean(x) * self.out_std + self.out_mean  # (batch, d)
        out[:, : self.obs_dim] += obs
        return out

    def step_mean(self, obs: np.ndarray, act: np.ndarray) -> np.ndarray:
        """Ensemble-mean next target (batch, d)."""
        x = self.normalize_input(obs, act)
        out = np.mean([m.mean(x) for m in self.members], axis=0) * self.out_std + self.out_mean
        out[:, : self.obs_dim] += obs
        return out
