"""Edge seam: ``--env`` text -> the device's world (Gymnasium-shaped ``reset``/``step``).

Two forms::

    Pendulum-v1:m=1.6,g=12                  a Gymnasium id, with physics overrides
    InvertedPendulum-v5:body_mass.pole=*3   ... MuJoCo model fields, NAME=*FACTOR scales
    mypkg.robot:RobotEnv                    a user's class with reset() and step()

The override syntax and the fields are ``plasma.edge.physics``'s (the server resolves the same
text the same way).

``--wrapper module:Class`` wraps the env in a device-side effect no physics parameter names
(``plasma.edge.wrappers.ActionDelay``): the class is constructed with the env and must give
``reset``/``step`` back. The server is never told; bench watchers evaluate with the same wrapper.

Gymnasium is imported inside ``make_env`` only: ``plasma.edge`` never loads it at import time
(docs/design.md section 1), and a device acting on real hardware never needs it.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from typing import Any, Protocol, SupportsFloat

from plasma.protocol.errors import ConfigError, EnvError

from .physics import Override, apply_overrides, parse_overrides

__all__ = ["Env", "EnvError", "EnvSpec", "load_wrapper", "make_env", "parse_env", "wrap_env"]

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


def make_env(text: str, wrapper: str | None = None) -> Env:
    """Build the environment ``text`` names, wrapped in ``wrapper`` (``module:Class``) if given
    (see the module docstring)."""
    cls = load_wrapper(wrapper)  # a bad wrapper is refused before the env is built
    env = _make_env(text)
    return env if cls is None else _construct_wrapper(cls, env, wrapper or "")


def load_wrapper(text: str | None) -> Callable[[Any], Any] | None:
    """``module:Class`` -> the wrapper class, None for None or empty text; EnvError if it does
    not name a class that can be imported."""
    if not text:
        return None
    module_name, sep, class_name = text.strip().partition(":")
    if not (sep and _MODULE.fullmatch(module_name) and _CLASS.fullmatch(class_name)):
        raise EnvError(f"--wrapper {text!r}: expected module:Class "
                       "(e.g. plasma.edge.wrappers:ActionDelay)")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise EnvError(f"--wrapper {text}: cannot import {module_name} ({exc})") from None
    cls = getattr(module, class_name, None)
    if not callable(cls):
        raise EnvError(f"--wrapper {text}: {module_name} has no {class_name}")
    return cls  # type: ignore[no-any-return]


def wrap_env(env: Any, text: str | None) -> Any:
    """``env`` inside the wrapper ``text`` names (``env`` itself for None or empty text)."""
    cls = load_wrapper(text)
    return env if cls is None else _construct_wrapper(cls, env, text or "")


def _construct_wrapper(cls: Callable[[Any], Any], env: Any, text: str) -> Any:
    try:
        wrapped = cls(env)
    except Exception as exc:  # noqa: BLE001 - a user's class may raise anything: one line, not a traceback
        raise EnvError(f"--wrapper {text}: constructing it with the env failed: "
                       f"{type(exc).__name__}: {exc}") from None
    if not (callable(getattr(wrapped, "reset", None)) and callable(getattr(wrapped, "step", None))):
        raise EnvError(f"--wrapper {text}: it needs reset() and step() methods")
    return wrapped


def _make_env(text: str) -> Env:
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
