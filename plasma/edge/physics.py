"""Physics overrides: one syntax for the device (``--env ID:OVERRIDES``) and the server (the
task's physics), so a shift named once is the same shift on both sides.

Syntax: comma-separated ``NAME=NUMBER`` (set) or ``NAME=*FACTOR`` (multiply the env's nominal
value). A NAME without a dot is a numeric attribute of the unwrapped env (classic control:
Pendulum's ``m``, ``g``, ``l``...). A dotted NAME is a MuJoCo model field, one scalar each:

=========================  =================================================================
``body_mass.BODY``          mass of a body (``model.body_mass``)
``geom_friction.GEOM``      sliding friction of a geom (``model.geom_friction[:, 0]``)
``actuator_gear.ACTUATOR``  gear of an actuator (``model.actuator_gear[:, 0]``)
``dof_damping.JOINT``       damping of a joint's first dof (also ``dof_armature``,
                            ``dof_frictionloss``)
``opt.gravity.x|y|z``       a gravity component (``model.opt.gravity``; also ``opt.wind``)
``opt.timestep``            the integrator step (also ``opt.density``, ``opt.viscosity``)
=========================  =================================================================

BODY, GEOM, ACTUATOR and JOINT are the names in the model's XML. Why one scalar per name: the
server identifies each named field separately from real transitions and keeps them in a flat
``name -> float`` mapping. Unknown names are errors that list what exists. Nothing here imports
MuJoCo or Gymnasium: the fields are read from the env's own ``model``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from plasma.protocol.errors import ConfigError

__all__ = ["FIELDS", "Override", "apply_overrides", "field_names", "get_field", "parse_overrides",
           "set_field"]

FIELDS: dict[str, tuple[str, str, int | None]] = {
    # field -> (model array, object kind, column of a per-object row or None)
    "body_mass": ("body_mass", "body", None),
    "geom_friction": ("geom_friction", "geom", 0),
    "actuator_gear": ("actuator_gear", "actuator", 0),
    "dof_damping": ("dof_damping", "joint", None),
    "dof_armature": ("dof_armature", "joint", None),
    "dof_frictionloss": ("dof_frictionloss", "joint", None),
}
_OPT_VECTORS = ("gravity", "wind")
_OPT_SCALARS = ("timestep", "density", "viscosity")
_AXES = {"x": 0, "y": 1, "z": 2}


@dataclass(frozen=True)
class Override:
    """One parsed ``NAME=NUMBER`` (``relative`` False) or ``NAME=*FACTOR`` (True)."""

    name: str
    value: float
    relative: bool

    def resolve(self, nominal: float) -> float:
        return nominal * self.value if self.relative else self.value


def parse_overrides(text: str) -> dict[str, Override]:
    """``"m=1.6,body_mass.pole=*3"`` -> overrides by name; ConfigError on malformed text."""
    out: dict[str, Override] = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = (s.strip() for s in item.partition("="))
        relative = value.startswith("*")
        try:
            if not sep or not key:
                raise ValueError
            number = float(value[1:] if relative else value)
        except ValueError:
            raise ConfigError(f"bad physics override {item!r}: expected NAME=NUMBER or "
                              "NAME=*FACTOR[,...]") from None
        out[key] = Override(key, number, relative)
    return out


def _is_mujoco(env: Any) -> bool:
    model = getattr(env, "model", None)
    return model is not None and hasattr(model, "body_mass") and hasattr(model, "opt")


def _where(model: Any, name: str) -> tuple[Any, tuple[int, ...]]:
    """(array, index) of a dotted MuJoCo field name; ConfigError if the model has no such field."""
    parts = name.split(".")
    if parts[0] == "opt" and len(parts) == 3 and parts[1] in _OPT_VECTORS and parts[2] in _AXES:
        return getattr(model.opt, parts[1]), (_AXES[parts[2]],)
    if parts[0] == "opt" and len(parts) == 2 and parts[1] in _OPT_SCALARS:
        return model.opt, ()
    if len(parts) == 2 and parts[0] in FIELDS:
        array, kind, column = FIELDS[parts[0]]
        row = _object_id(model, kind, parts[1])
        if row is not None:
            if kind == "joint":
                row = int(model.jnt_dofadr[row])
            return getattr(model, array), (row,) if column is None else (row, column)
    raise ConfigError(f"no MuJoCo field {name!r}; known: {', '.join(field_names(model))}")


def _object_id(model: Any, kind: str, name: str) -> int | None:
    count = {"body": model.nbody, "geom": model.ngeom, "actuator": model.nu,
             "joint": model.njnt}[kind]
    getter = getattr(model, kind)
    for i in range(1 if kind == "body" else 0, count):  # body 0 is the world
        if getter(i).name == name:
            return i
    return None


def field_names(model: Any) -> list[str]:
    """Every MuJoCo field name ``model`` supports, in a stable order."""
    names = []
    for field, (_, kind, _) in FIELDS.items():
        count = {"body": model.nbody, "geom": model.ngeom, "actuator": model.nu,
                 "joint": model.njnt}[kind]
        getter = getattr(model, kind)
        names += [f"{field}.{getter(i).name}" for i in range(1 if kind == "body" else 0, count)
                  if getter(i).name]
    names += [f"opt.{v}.{a}" for v in _OPT_VECTORS for a in _AXES]
    names += [f"opt.{s}" for s in _OPT_SCALARS]
    return names


def get_field(model: Any, name: str) -> float:
    array, index = _where(model, name)
    if not index:
        return float(getattr(array, name.split(".")[1]))
    return float(array[index])


def set_field(model: Any, name: str, value: float) -> None:
    array, index = _where(model, name)
    if not index:
        setattr(array, name.split(".")[1], float(value))
    else:
        array[index] = float(value)


def _numeric_attributes(env: Any) -> list[str]:
    return sorted(k for k, v in vars(env).items()
                  if isinstance(v, (int, float)) and not isinstance(v, bool) and not k.startswith("_"))


def apply_overrides(env: Any, overrides: Mapping[str, Override | float]) -> dict[str, float]:
    """Apply overrides to an unwrapped env (dotted names: its MuJoCo ``model``; others: numeric
    attributes). Returns the values set; ConfigError on a name the env does not have."""
    done: dict[str, float] = {}
    for name, item in overrides.items():
        ov = item if isinstance(item, Override) else Override(name, float(item), False)
        if "." in name:
            if not _is_mujoco(env):
                raise ConfigError(f"{name!r} is a MuJoCo field name and {type(env).__name__} "
                                  "is not a MuJoCo env")
            value = ov.resolve(get_field(env.model, name))
            set_field(env.model, name, value)
        else:
            current = getattr(env, name, None)
            if isinstance(current, bool) or not isinstance(current, (int, float)):
                raise ConfigError(f"no numeric physics attribute {name!r} (known: "
                                  f"{', '.join(_numeric_attributes(env))}"
                                  f"{'; MuJoCo fields: NAME.OBJECT' if _is_mujoco(env) else ''})")
            value = ov.resolve(float(current))
            setattr(env, name, type(current)(value) if isinstance(current, float) else value)
        done[name] = float(value)
    return done
