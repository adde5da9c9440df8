"""Server stage 2 with a prior: the nominal simulator, its physics parameters identified on the
device's real transitions, with bootstrap members for uncertainty.

The base policy came from a nominal simulator (``TaskSpec.sim_step`` at ``default_physics``), so
the server legitimately knows the form of the dynamics; what it does not know is the device's
parameters (a heavier load, stronger gravity, a longer arm). ``PhysicsModel`` fits those
parameters by least squares on the one-step prediction error of the real transitions through
``sim_step`` (Levenberg-Marquardt on log-parameters, finite-difference Jacobian, a weak ridge
toward the nominal values so parameters the data cannot separate stay nominal), then refits
each of K members on a bootstrap resample of the transitions. The members are K parameter sets,
so ``disagreement`` is the spread of the identified physics, like the learned ensemble's.

For a MuJoCo task ``sim_step`` is ``plasma.server.tasks.mujoco.MujocoSim``: each real
transition's (qpos, qvel) is read from its observation, the env's model is stepped with the real
action (one ``mujoco.rollout`` call for the batch) at the candidate model fields, and the fields
named in ``TaskSpec.identify`` (body masses, gear, gravity, damping) are fitted the same way:
the fitted MuJoCo model is the world model. Fields that are zero at nominal are not fitted
(log-parameters).

It is a drop-in for ``WorldModel`` wherever the phantom simulator and the judicial auditor use
one: ``members`` (a list; ``judicial.member_view`` keeps a subset), ``step_member``,
``step_mean``, ``predict``, ``disagreement``, ``fit`` (warm-started from the last fit) and
``obs_dim`` / ``act_dim`` / ``target_dim``. The device's true physics are never read: only its
recorded transitions.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np

from .tasks import TaskSpec
from .worldmodel import FitReport

__all__ = ["PhysicsModel", "SysIdConfig", "identify", "physics_error"]

_StackedStep = Callable[[np.ndarray, np.ndarray, Mapping[str, Any]], np.ndarray]
"""``sim_step`` given stacked parameter sets (``TaskSpec.sim_rows``)."""

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SysIdConfig:
    """How the physics parameters are identified."""

    members: int = 5
    """Bootstrap members (parameter sets); the auditor holds some back like ensemble members."""
    params: tuple[str, ...] | None = None
    """Names in ``TaskSpec.default_physics`` to identify; None = the task's ``identify`` names, or
    all of them (those the data cannot inform stay at the nominal value through ``prior``)."""
    prior: float = 1e-4
    """Ridge weight on the log-ratio to the nominal value, against the mean squared one-step error
    in units of the real per-dimension delta std (the data dominate wherever they inform)."""
    iterations: int = 30
    """Levenberg-Marquardt iterations of the full-data fit (it stops earlier once converged)."""
    member_iterations: int = 6
    """LM iterations of each bootstrap member, started from the full-data solution."""
    max_rows: int = 4000
    """Transitions used per fit (newest kept; older ones add little once parameters are pinned)."""
    fd_step: float = 1e-4
    """Finite-difference step in log-parameter space."""
    max_log_ratio: float = 2.5
    """Parameters stay within exp(+-this) of the nominal value (a factor of about 12)."""
    seed: int = 0
    """Seed of the bootstrap resamples."""


@dataclass
class PhysicsModel:
    """Nominal simulator with identified parameters; members are bootstrap parameter sets."""

    task: TaskSpec
    cfg: SysIdConfig = field(default_factory=SysIdConfig)
    members: list[dict[str, float]] = field(default_factory=list)
    """One physics mapping per member (what ``task.sim_step`` takes)."""

    def __post_init__(self) -> None:
        if self.task.sim_step is None:
            raise ValueError(f"{self.task.env_id} has no simulator; use the learned WorldModel")
        self.obs_dim, self.act_dim = self.task.obs_dim, self.task.act_dim
        self.target_dim = self.obs_dim
        self.nominal = dict(self.task.physics())
        names = self.cfg.params if self.cfg.params is not None else self.task.identify
        # log-parameters: a field that is zero at nominal (no wind, no armature) cannot be scaled
        self.names = [n for n in (names if names is not None else self.nominal) if self.nominal[n] != 0]
        self.theta = np.zeros(len(self.names))  # log(p / nominal), the full-data fit
        self.out_std = np.ones(self.obs_dim, np.float32)  # delta std of real data (units of disagreement)
        self._rng = np.random.default_rng(self.cfg.seed)
        self._rows: tuple[object, object, int, tuple[int, dict[str, float | np.ndarray]]] | None = None
        if not self.members:
            self.members = [dict(self.nominal) for _ in range(self.cfg.members)]

    # ---------------------------------------------------------------- parameters
    def physics_of(self, theta: np.ndarray) -> dict[str, float]:
        phys = dict(self.nominal)
        for name, t in zip(self.names, theta):
            phys[name] = float(self.nominal[name] * np.exp(t))
        return phys

    @property
    def physics(self) -> dict[str, float]:
        """The full-data estimate of the device's physics."""
        return self.physics_of(self.theta)

    def spread(self) -> dict[str, float]:
        """Std across members of each identified parameter (its bootstrap uncertainty)."""
        return {n: float(np.std([m[n] for m in self.members])) for n in self.names}

    def _residuals(self, theta: np.ndarray, obs: np.ndarray, act: np.ndarray, nxt: np.ndarray,
                   scale: np.ndarray) -> np.ndarray:
        pred = self.task.sim_step(obs, act, self.physics_of(theta))  # type: ignore[misc]
        return ((pred - nxt) / scale).ravel()

    def _lm(self, theta: np.ndarray, obs: np.ndarray, act: np.ndarray, nxt: np.ndarray,
            scale: np.ndarray, iterations: int) -> tuple[np.ndarray, float]:
        """Levenberg-Marquardt on mean squared residual + prior * |theta|^2; returns (theta, mse)."""
        c, n = self.cfg, len(obs)
        lam = c.prior

        def cost(t: np.ndarray, r: np.ndarray) -> float:
            return float(r @ r) / n + lam * float(t @ t)

        r = self._residuals(theta, obs, act, nxt, scale)
        f = cost(theta, r)
        mu = 1e-3
        for _ in range(iterations):
            jac = np.empty((len(r), len(theta)))
            for j in range(len(theta)):
                t2 = theta.copy()
                t2[j] += c.fd_step
                jac[:, j] = (self._residuals(t2, obs, act, nxt, scale) - r) / c.fd_step
            h = jac.T @ jac / n + lam * np.eye(len(theta))
            g = jac.T @ r / n + lam * theta
            improved = False
            for _ in range(8):
                step = np.linalg.solve(h + mu * np.diag(np.diag(h) + 1e-12), -g)
                t_new = np.clip(theta + step, -c.max_log_ratio, c.max_log_ratio)
                r_new = self._residuals(t_new, obs, act, nxt, scale)
                f_new = cost(t_new, r_new)
                if f_new < f:
                    converged = f - f_new < 1e-10 * max(f, 1e-30) or np.max(np.abs(step)) < 1e-7
                    theta, r, f, improved = t_new, r_new, f_new, True
                    mu = max(mu / 3, 1e-9)
                    break
                mu *= 10
            if not improved or converged:
                break
        return theta, float(r @ r) / (n * len(scale))

    # ---------------------------------------------------------------- training
    def fit(self, obs: np.ndarray, act: np.ndarray, next_obs: np.ndarray,
            rew: np.ndarray | None = None, **_: object) -> FitReport:
        """Identify the parameters on every transition, then each member on a bootstrap resample.

        Warm-starts from the previous fit (call again as data grows)."""
        c = self.cfg
        obs, act, nxt = (np.asarray(a, np.float64)[-c.max_rows:] for a in (obs, act, next_obs))
        n = len(obs)
        delta = nxt - obs
        scale = delta.std(0) + 1e-6
        self.out_std = scale.astype(np.float32)
        self.theta, mse = self._lm(self.theta, obs, act, nxt, scale, c.iterations)
        thetas = []
        for _ in range(c.members):
            idx = self._rng.integers(0, n, n)
            t, _ = self._lm(self.theta.copy(), obs[idx], act[idx], nxt[idx], scale,
                            c.member_iterations)
            thetas.append(t)
        self.members = [self.physics_of(t) for t in thetas]
        dis = float(np.mean(self.disagreement(obs.astype(np.float32), act.astype(np.float32))))
        log.info("sysid: %s (spread %s), one-step mse %.2e (delta-std units) on %d transitions",
                 {k: round(v, 4) for k, v in self.physics.items() if k in self.names},
                 {k: round(v, 4) for k, v in self.spread().items()}, mse, n)
        return FitReport(n_train=n, n_holdout=0, epochs=0, val_mse=mse,
                         val_mse_obs=mse * float(np.mean(scale**2)), val_nll=float("nan"),
                         disagreement=dis)

    # ---------------------------------------------------------------- prediction
    def step_member(self, member: int, obs: np.ndarray, act: np.ndarray) -> np.ndarray:
        """Next observation of one member for a batch (batch, obs_dim)."""
        return self.task.sim_step(obs, act, self.members[member])  # type: ignore[misc]

    def step_blocks(self, obs: np.ndarray, act: np.ndarray, blocks: Sequence[tuple[int, slice]]
                    ) -> np.ndarray | None:
        """The rows of each (member, rows) block under that member, in one ``sim_step`` call: the
        members' parameters stacked row by row (``TaskSpec.sim_rows``); row by row exactly what
        ``step_member`` gives block by block (``phantom.step_paths`` uses it). None where it
        cannot: a simulator that takes one parameter set per call, blocks that do not cover the
        batch, or a subclass with its own ``step_member`` (it must be stepped member by member)."""
        if type(self).step_member is not PhysicsModel.step_member:
            return None
        return self._sim_blocks(obs, act, blocks)

    def _sim_blocks(self, obs: np.ndarray, act: np.ndarray, blocks: Sequence[tuple[int, slice]]
                    ) -> np.ndarray | None:
        if not self.task.sim_rows:
            return None
        stacked = self._stacked(blocks, len(obs))
        if stacked is None:
            return None
        groups, stacked_physics = stacked
        step = cast(_StackedStep, self.task.sim_step)
        if groups:  # equal blocks in order: (groups, rows per group, dim) against (groups, 1)
            shape = (groups, len(obs) // groups)
            out = step(obs.reshape(*shape, -1), act.reshape(*shape, -1), stacked_physics)
            return out.reshape(len(obs), -1)
        return step(obs, act, stacked_physics)

    def _stacked(self, blocks: Sequence[tuple[int, slice]], rows: int
                 ) -> tuple[int, dict[str, float | np.ndarray]] | None:
        """The blocks' members' physics for one ``sim_step`` call, kept while the same blocks
        step the same members (a loop over a horizon): (groups, values (groups, 1)) when the
        blocks are equal and in order (the batch is stepped as (groups, rows, dim)), else
        (0, values per row (rows,)); a value the members share stays a float."""
        cached = self._rows
        if cached is not None and cached[0] is blocks and cached[1] is self.members and \
                cached[2] == rows:
            return cached[3]
        member_of = np.full(rows, -1)
        for member, sl in blocks:
            member_of[sl] = member
        if rows == 0 or member_of.min() < 0:
            return None
        order = [member for member, _ in blocks]
        size = rows // len(order)
        equal = size * len(order) == rows and np.array_equal(
            member_of, np.repeat(np.asarray(order), size))
        index = (np.asarray(order)[:, None] if equal else member_of)
        physics: dict[str, float | np.ndarray] = {}
        for name in self.members[order[0]]:
            values = np.array([self.members[m][name] for m in range(len(self.members))], np.float64)
            first = values[order[0]]
            physics[name] = float(first) if np.all(values[order] == first) else values[index]
        stacked = (len(order) if equal else 0, physics)
        self._rows = (blocks, self.members, rows, stacked)
        return stacked

    def step_mean(self, obs: np.ndarray, act: np.ndarray) -> np.ndarray:
        return np.mean([self.step_member(m, obs, act) for m in range(len(self.members))], axis=0)

    def predict(self, obs: np.ndarray, act: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Every member's next observation: mean (members, batch, obs_dim) and a zero variance
        (the simulator is deterministic; the uncertainty is in the spread of the members)."""
        mean = np.stack([self.step_member(m, obs, act) for m in range(len(self.members))])
        return mean, np.zeros_like(mean)

    def disagreement(self, obs: np.ndarray, act: np.ndarray) -> np.ndarray:
        """(batch,) std across members of the predicted next observation, in units of the real
        data's per-dimension delta std, averaged over dimensions (the ensemble's convention)."""
        mean, _ = self.predict(obs, act)
        return (mean.std(0) / self.out_std).mean(-1)


def identify(task: TaskSpec, obs: np.ndarray, act: np.ndarray, next_obs: np.ndarray,
             cfg: SysIdConfig | None = None) -> PhysicsModel:
    """A fitted ``PhysicsModel`` in one call."""
    model = PhysicsModel(task, cfg or SysIdConfig())
    model.fit(obs, act, next_obs)
    return model


def physics_error(estimate: Mapping[str, float], truth: Mapping[str, float],
                  names: Sequence[str]) -> dict[str, float]:
    """Relative error of each named parameter (tests and benches)."""
    return {n: abs(estimate[n] - truth[n]) / abs(truth[n]) for n in names}
