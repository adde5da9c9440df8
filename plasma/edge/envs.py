"""Edge seam: ``--env`` text -> the device's world (Gymnasium-shaped ``reset``/``step``).

Two forms::

    Pendulum-v1:m=1.6,g=12                  a Gymnasium id, with physics overrides
    InvertedPendulum-v5:body_mass.pole=*3   ... MuJoCo model fields, NAME=*FACTOR scales
    mypkg.robot:RobotEnv                    a user's class with reset() and step()

The override syntax and the fields are ``plasma.edge.physics``'s (the server resolves the same
text the same way).

Gymnasium is imported inside ``make_env`` only: ``plasma.edge`` never loads it at import time
(docs/design.md section 1), and a device acting on real hardware never needs it.
"""

from __future__ import annotations

import importlib
import re
from typing import Any, Protocol, SupportsFloat

from plasma.protocol.errors import ConfigError, EnvError

from .physics import Override, apply_overrides, parse_overrides

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

    def __init__(self, kind: str, target: str, physics: dict[str, float],
                 overrides: dict[str, Override] | None = None) -> None:
        self.kind = kind  # "gym" or "class"
        self.target = target
        self.physics = physics
        """The overrides that set a value (NAME=NUMBER)."""
        self.overrides = overrides if overrides is not None else {
            k: Override(k, v, False) for k, v in physics.items()}
        """Every override, relative ones (NAME=*FACTOR) included."""

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
        overrides = parse_overrides(tail) if sep else {}
    except ConfigError as exc:
        raise EnvError(f"--env {text!r}: {exc}") from None
    if sep and not overrides:
        raise EnvError(f"--env {text!r}: nothing after ':'")
    physics = {k: o.value for k, o in overrides.items() if not o.relative}
    return EnvSpec("gym", head, physics, overrides)


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
    except ImportError as exc:  # e.g. a MuJoCo env without the mujoco package
        raise EnvError(f"--env {spec.target}: {exc}", code="missing_dependency") from None
    try:
        apply_overrides(env.unwrapped, spec.overrides)
    except ConfigError as exc:
        raise EnvError(f"--env {spec.target}: {exc}") from None
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
