"""Edge seam: ``--env`` text -> the device's world (Gymnasium-shaped ``reset``/``step``).

Two forms::

    Pendulum-v1:m=1.6,g=12     a Gymnasium id, with physics overrides set on the unwrapped env
    mypkg.robot:RobotEnv       a user's class with reset() and step(), built with no arguments

Gymnasium is imported inside ``make_env`` only: ``plasma.edge`` never loads it at import time
(docs/design.md section 1), and a device acting on real hardware never needs it.
"""

from __future__ import annotations

import importlib
import re
from typing import Any, Protocol, SupportsFloat

from plasma.protocol._cli import parse_kv
from plasma.protocol.errors import ConfigError, EnvError

__all__ = ["Env", "EnvError", "EnvSpec", "make_env", "parse_env"]

INSTALL_HINT = "pip install 'plasma[env]'"
_MODULE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
_CLASS = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class Env(Protocol):
    """What the control loop needs (Gymnasium's API): obs from reset, a 5-tuple from step
    (obs, reward, terminated, truncated, info)."""

    def reset(self, *, seed: int | None = None) -> tuple[Any, dict[str, Any]]: ...

    def step(self, action: Any) -> tuple[Any, SupportsFloat, bool, bool, dict[str, Any]]: ...


class EnvSpec:
    """A parsed ``--env`` value."""

    def __init__(self, kind: str, target: str, physics: dict[str, float]) -> None:
        self.kind = kind  # "gym" or "class"
        self.target = target
        self.physics = physics

    def __repr__(self) -> str:
        return f"EnvSpec({self.kind!r}, {self.target!r}, {self.physics!r})"


def parse_env(text: str) -> EnvSpec:
    """``ID[:k=v,...]`` or ``module:Class``; raises EnvError on anything else."""
    head, sep, tail = text.strip().partition(":")
    if not head:
        raise EnvError(f"--env {text!r}: expected GYM_ID[:KEY=NUMBER,...] or module:Class")
    if sep and "=" not in tail and _MODULE.fullmatch(head) and _CLASS.fullmatch(tail):
        return EnvSpec("class", text.strip(), {})
    try:
        physics = parse_kv(tail, "physics override") if sep else {}
    except ConfigError as exc:
        raise EnvError(f"--env {text!r}: {exc}") from None
    if sep and not physics:
        raise EnvError(f"--env {text!r}: nothing after ':'")
    return EnvSpec("gym", head, physics)


def make_env(text: str) -> Env:
    """Build the environment ``text`` names (see the module docstring)."""
    spec = parse_env(text)
    if spec.kind == "class":
        return _user_env(spec.target)
    try:
        import gymnasium
    except ImportError:
        raise EnvError(f"--env {spec.target} needs Gymnasium: {INSTALL_HINT}",
                       code="missing_dependency") from None
    try:
        env = gymnasium.make(spec.target)
    except gymnasium.error.Error as exc:
        raise EnvError(f"--env {spec.target}: {exc}") from None
    _set_physics(env.unwrapped, spec.physics, spec.target)
    return env


def _user_env(target: str) -> Env:
    module_name, _, class_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise EnvError(f"--env {target}: cannot import {module_name} ({exc})") from None
    cls = getattr(module, class_name, None)
    if cls is None:
        raise EnvError(f"--env {target}: {module_name} has no {class_name}")
    env: Env = cls()  # a user's class: checked for the two methods just below
    if not (callable(getattr(env, "reset", None)) and callable(getattr(env, "step", None))):
        raise EnvError(f"--env {target}: {class_name} needs reset() and step() methods")
    return env


def _set_physics(env: object, physics: dict[str, float], env_id: str) -> None:
    """Set numeric attributes (Pendulum: m, g, l, max_speed, max_torque, dt); unknown ones are errors.

    Pendulum builds its action and observation spaces in __init__: overriding max_torque
    changes the clipping in step() but not ``action_space`` (the policy's bounds come from
    the bundle manifest anyway).
    """
    for key, value in physics.items():
        current = getattr(env, key, None)
        if isinstance(current, bool) or not isinstance(current, (int, float)):
            known = sorted(k for k, v in vars(env).items()
                           if isinstance(v, (int, float)) and not isinstance(v, bool)
                           and not k.startswith("_"))
            raise EnvError(f"--env {env_id}: no numeric physics attribute {key!r} "
                           f"(known: {', '.join(known)})")
        setattr(env, key, type(current)(value) if isinstance(current, float) else value)
