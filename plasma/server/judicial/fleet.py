"""Server stage 5 for the fleet slot: per-device screening and per-device judgement.

A fleet adapter is merged by every device of the fleet, and its round reads every device's
telemetry: one compromised or broken device that sends fabricated but well-formed transitions
could steer it. Two defences, both from the devices' own recorded transitions:

- ``screen_devices`` (before the round): with a simulator in the task, the auditor identifies
  each device's physics on that device's transitions alone and asks, for every pair, whether
  each one's physics explains the other's transitions (a transition is contradicted when the
  one-step miss exceeds ``device_model_error`` stds of the one-step change, or three times the
  device's own fit's 95th-percentile miss if that is larger: noise is not a contradiction). A device that
  agrees with fewer than half of the others is excluded from the fleet round's data, and the
  audit record names it. One device, one vote: flooding the fleet with transitions does not
  buy a majority. A fleet whose devices all contradict one another (honestly different physics)
  keeps every device.
- ``judge_devices`` (after the auditor approved the candidate on the pooled data): the
  candidate's gain over the reference is measured in each kept device's *own* identified
  physics, from that device's own real start states; a candidate that costs any device more
  than ``max_device_loss`` of its reference return is blocked (``fleet_hurts_device``).
  With ``running`` (``plasma-server run``: what each device reports it runs) the comparison is
  of the pair the device would run, base ⊕ candidate ⊕ its device adapter, against the
  combination it runs now, base ⊕ its fleet adapter (possibly an older one it rolled back to)
  ⊕ the same device adapter: a fleet packet never lands over a device adapter fitted for
  another fleet adapter without that pair being judged.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace

import numpy as np

from ..phantom import ModelDynamics
from ..policy_net import LoRA, MLPPolicy
from ..slots import Combination
from ..tasks import TaskSpec
from .auditor import Decision
from .checks import _reason
from .config import JudicialConfig, RealData
from .paths import rollout_paths

__all__ = ["DeviceScreen", "fleet_decision", "hurt_devices", "judge_devices", "pool", "screen_devices"]


@dataclass(frozen=True)
class DeviceScreen:
    """Which devices' transitions a fleet round may use, and why."""

    kept: tuple[str, ...]
    excluded: tuple[str, ...] = ()
    contradicted: dict[str, float] = field(default_factory=dict)
    """device -> median over the other devices of the transitions their identified physics and
    its own contradict (the worse direction)."""

    @property
    def message(self) -> str:
        return ", ".join(f"{d} ({self.contradicted.get(d, 0.0):.0%} of its transitions contradict "
                         "the other devices' physics)" for d in self.excluded)


def pool(devices: Mapping[str, RealData], names: tuple[str, ...] | list[str]) -> RealData:
    """The named devices' transitions as one RealData."""
    parts = [devices[n] for n in names]
    return RealData(*(np.concatenate([getattr(p, f) for p in parts])
                      for f in ("obs", "act", "rew", "next_obs")))


def _identify(task: TaskSpec, real: RealData, seed: int):  # type: ignore[no-untyped-def]
    from ..sysid import SysIdConfig, identify

    return identify(task, real.obs, real.act, real.next_obs,
                    SysIdConfig(members=1, member_iterations=0, seed=seed))


def _errors(task: TaskSpec, physics: Mapping[str, float], real: RealData, scale: np.ndarray
            ) -> np.ndarray:
    pred = task.project_obs(task.sim_step(real.obs, real.act, physics))  # type: ignore[misc]
    return (np.abs(pred - real.next_obs) / scale).max(-1)


def screen_devices(task: TaskSpec, devices: Mapping[str, RealData], cfg: JudicialConfig
                   ) -> DeviceScreen:
    """Exclude devices whose traces contradict the physics the other devices agree on.

    Each device's physics is identified on its own transitions only; two devices *agree* when
    each one's physics explains the other's transitions (at most ``max_device_contradicted`` of
    them missed by more than ``max_model_error`` stds). A device that agrees with fewer than half
    of the others is excluded, one device one vote (a device that floods the fleet with
    transitions gains nothing); never a majority of the fleet (then nobody is an outlier)."""
    names = tuple(sorted(devices))
    if task.sim_step is None or len(names) < 3:  # no prior, or no majority to judge against
        return DeviceScreen(kept=names)
    every = pool(devices, names)
    scale = (every.next_obs - every.obs).std(0) + 1e-6  # one-step change, as sysid fits it
    phys = {n: _identify(task, devices[n], cfg.seed).physics for n in names}
    # a device's own fit sets its noise floor: sensor noise is not a contradiction
    limit = {n: max(cfg.device_model_error,
                    3.0 * float(np.quantile(_errors(task, phys[n], devices[n], scale), 0.95)))
             for n in names}
    miss = {(i, j): float((_errors(task, phys[i], devices[j], scale) > limit[j]).mean())
            for i in names for j in names if i != j}
    frac = {n: float(np.median([max(miss[n, j], miss[j, n]) for j in names if j != n]))
            for n in names}
    agree = {n: sum(max(miss[n, j], miss[j, n]) <= cfg.max_device_contradicted
                    for j in names if j != n) for n in names}
    excluded = tuple(n for n in names if 2 * agree[n] < len(names) - 1)
    if 2 * len(excluded) >= len(names):  # never exclude a majority: no outlier then
        excluded = ()
    return DeviceScreen(kept=tuple(n for n in names if n not in excluded), excluded=excluded,
                        contradicted=frac)


def judge_devices(task: TaskSpec, policy: MLPPolicy, candidate: LoRA, reference: LoRA | None,
                  devices: Mapping[str, RealData], cfg: JudicialConfig,
                  running: Mapping[str, Combination] | None = None,
                  model: object | None = None) -> dict[str, tuple[float, float]]:
    """device -> (candidate gain, reference return) per path, in the device's own identified
    physics from its own real start states (empty without a simulator).

    ``policy`` is the base; a device in ``running`` is judged on the pair it would run (base ⊕
    candidate ⊕ its device adapter) against what it runs (base ⊕ its fleet adapter ⊕ the same
    device adapter); a device not in it on ``candidate`` against ``reference`` alone.

    Without a simulator there is no per-device physics: the devices in ``running`` are then
    judged in the round's own world model (``model``), each from its own real start states, so
    a pair is never left unjudged."""
    if task.sim_step is None and (model is None or not running):
        return {}
    out = {}
    for name, real in sorted(devices.items()):
        if task.sim_step is None and name not in (running or {}):
            continue
        world = _identify(task, real, cfg.seed) if task.sim_step is not None else model
        rng = np.random.default_rng(cfg.seed)
        starts = real.obs[rng.integers(0, len(real.obs), cfg.device_paths)].astype(np.float32)
        dyn = ModelDynamics(world)  # type: ignore[arg-type]
        runs = (running or {}).get(name)
        if runs is None:
            ref = rollout_paths(dyn, task, policy, reference, starts, cfg.horizon)[2].sum(1)
            cand = rollout_paths(dyn, task, policy, candidate, starts, cfg.horizon)[2].sum(1)
        else:  # the worst pair over the device adapters that may be live with it
            now, new = runs.policy(policy), policy.merged(candidate)
            pairs = []
            for device in runs.device_adapters():
                r = rollout_paths(dyn, task, now, device, starts, cfg.horizon)[2].sum(1)
                c = rollout_paths(dyn, task, new, device, starts, cfg.horizon)[2].sum(1)
                pairs.append((float(np.mean(c - r)), r))
            gain, ref = min(pairs, key=lambda p: p[0])
            out[name] = (gain, float(np.mean(ref)))
            continue
        out[name] = (float(np.mean(cand - ref)), float(np.mean(ref)))
    return out


def hurt_devices(gains: Mapping[str, tuple[float, float]], cfg: JudicialConfig) -> list[str]:
    """Devices the candidate costs more than ``max_device_loss`` of their reference return."""
    return [d for d, (gain, ref) in gains.items() if gain < -cfg.max_device_loss * abs(ref)]


def fleet_decision(decision: Decision, screen: DeviceScreen,
                   gains: Mapping[str, tuple[float, float]], cfg: JudicialConfig,
                   running: Mapping[str, Combination] | None = None) -> Decision:
    """The auditor's decision on the pooled data, amended by the per-device screen and judgement:
    excluded devices are named in the record; a candidate that hurts a kept device is blocked.
    With ``running``, the record names the combination each device was judged with
    (``device_runs_fleet:D``, ``device_runs_device:D``: the versions it reported;
    ``device_next_device:D`` 1 when a device adapter on its way was judged too)."""
    record = decision.record
    reasons = list(record.reasons)
    scores = dict(record.scores)
    running = running or {}
    scores.update({f"device_contradicted:{d}": v for d, v in screen.contradicted.items()})
    scores.update({f"device_gain:{d}": g for d, (g, _) in gains.items()})
    for d in gains:
        if d in running:
            scores[f"device_runs_fleet:{d}"] = float(running[d].fleet_version)
            scores[f"device_runs_device:{d}"] = float(running[d].device_version)
            scores[f"device_next_device:{d}"] = float(running[d].next_device is not None)
    scores["devices_excluded"] = float(len(screen.excluded))
    if screen.excluded:
        reasons.append(_reason("device_excluded", "fleet_screen",
                               "excluded from the fleet round's data: " + screen.message))
    hurt = hurt_devices(gains, cfg)
    verdict = decision.verdict
    adapter = decision.adapter
    if adapter is not None and hurt:
        verdict, adapter = "blocked", None
        reasons.append(_reason("fleet_hurts_device", "fleet_devices", "the fleet candidate lowers "
                               "the predicted return of " + ", ".join(
                                   f"{d} by {-gains[d][0]:.1f} (of {gains[d][1]:.1f}"
                                   + (f", with its device adapter v{running[d].device_version}"
                                      + (" or the one on its way" if running[d].next_device
                                         is not None else "")
                                      + f", against fleet v{running[d].fleet_version}"
                                      if d in running else "") + ")"
                                   for d in hurt) + " in its own identified physics"))
    record = record.model_copy(update={"verdict": verdict, "reasons": tuple(reasons[:64]),
                                       "scores": scores})
    return replace(decision, verdict=verdict, adapter=adapter, record=record)
