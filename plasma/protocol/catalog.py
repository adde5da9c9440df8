"""Where policy bundles are found: the shipped ones and a user's own directories of bundles.

The shipped bundles are package data of ``plasma.models`` (one directory per bundle), found with
``importlib.resources``: the same from an installed wheel as from a checkout, whatever the
current directory. A user adds directories of bundles with ``PLASMA_MODELS`` (``os.pathsep``
separated) or, on the command line, ``--models-dir``. The search order is: the directories a
caller passes (``--models-dir``), then ``PLASMA_MODELS``, then the shipped ones; a bundle is any
``DIR/NAME/manifest.json``, and the first bundle of a name wins.

Standard library only (json, os, importlib.resources): the device resolves
``plasma-edge run --model pendulum-nominal`` with it and imports no server code. Matching a task's
*physics* needs the task registry and lives in ``plasma.server.catalog``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from .errors import BundleNotFound, ConfigError

__all__ = ["BundleInfo", "MODELS_ENV", "SHIPPED", "list_bundles", "model_dirs", "resolve_bundle",
           "searched", "shipped_dir", "split_dirs"]

log = logging.getLogger(__name__)

MODELS_ENV = "PLASMA_MODELS"
"""Environment variable: directories of the user's bundles, ``os.pathsep`` separated."""
SHIPPED = "shipped"
"""``BundleInfo.source`` of a bundle that ships with Plasma (``plasma.models``)."""
_PACKAGE = "plasma.models"
_SCORE = "SCORE.json"
_INT8 = "model.int8.onnx"


@dataclass(frozen=True)
class BundleInfo:
    """One bundle found by the catalog (its manifest read, not yet validated: ``load_bundle``)."""

    name: str
    """Its directory's name: what ``--model NAME`` and ``policy="NAME"`` resolve."""
    path: Path
    source: str
    """``"shipped"``, or the user directory it was found in."""
    env_id: str
    physics: Mapping[str, float]
    """The manifest's physics (every value the bundle was trained at, as its exporter wrote it)."""
    int8_bytes: int
    """Size of ``model.int8.onnx``: what a device runs."""
    total_bytes: int
    """Every file of the bundle."""
    score: Mapping[str, Any] | None = None
    """``SCORE.json`` when the bundle has one (how it scores, how it was made)."""
    shadowed: bool = False
    """True when a bundle of the same name comes earlier in the search order (that one wins)."""
    meta: Mapping[str, Any] = field(default_factory=dict)

    @property
    def mean_return(self) -> float | None:
        """``SCORE.json``'s ``mean_return``, if any."""
        value = (self.score or {}).get("mean_return")
        return float(value) if isinstance(value, (int, float)) else None


def shipped_dir() -> Path | None:
    """The directory of the shipped bundles (``plasma/models`` where Plasma is installed), or
    None when the package is not on a file system (a zipped install: bundles need real files)."""
    root = resources.files(_PACKAGE)
    return root if isinstance(root, Path) and root.is_dir() else None


def split_dirs(values: str | os.PathLike[str] | Iterable[str | os.PathLike[str]] | None
               ) -> list[Path]:
    """Directories from one ``os.pathsep``-separated string or several (repeated flags)."""
    if values is None:
        return []
    items = [values] if isinstance(values, (str, os.PathLike)) else list(values)
    out: list[Path] = []
    for item in items:
        out += [Path(p).expanduser() for p in os.fspath(item).split(os.pathsep) if p.strip()]
    return out


def model_dirs(models_dirs: str | os.PathLike[str] | Iterable[str | os.PathLike[str]] | None = (),
               environ: Mapping[str, str] | None = None) -> list[tuple[Path, str]]:
    """(directory, source) in search order: ``models_dirs``, then ``PLASMA_MODELS``, then the
    shipped bundles. A user directory that does not exist is a ConfigError (a typo would
    otherwise silently fall back to the shipped bundles)."""
    environ = os.environ if environ is None else environ
    out: list[tuple[Path, str]] = []
    for where, dirs in (("models directory", split_dirs(models_dirs)),
                        (f"{MODELS_ENV} entry", split_dirs(environ.get(MODELS_ENV)))):
        for d in dirs:
            if not d.is_dir():
                raise ConfigError(f"{where} {d} is not a directory")
            out.append((d, str(d)))
    shipped = shipped_dir()
    if shipped is not None:
        out.append((shipped, SHIPPED))
    return out


def list_bundles(models_dirs: str | os.PathLike[str] | Iterable[str | os.PathLike[str]] | None = (),
                 environ: Mapping[str, str] | None = None) -> list[BundleInfo]:
    """Every bundle in search order; a later bundle with an earlier one's name is ``shadowed``.
    A directory whose manifest cannot be read is skipped with a warning."""
    seen: set[str] = set()
    out: list[BundleInfo] = []
    for root, source in model_dirs(models_dirs, environ):
        for manifest in sorted(root.glob("*/manifest.json")):
            info = _info(manifest, source, shadowed=manifest.parent.name in seen)
            if info is not None:
                seen.add(info.name)
                out.append(info)
    return out


def resolve_bundle(ref: str | os.PathLike[str],
                   models_dirs: str | os.PathLike[str] | Iterable[str | os.PathLike[str]] | None = (),
                   environ: Mapping[str, str] | None = None) -> Path:
    """A bundle directory from a path or a bundle's name.

    An existing directory, or anything written as a path (with a separator, ``.`` or ``~``), is
    returned as it is (``load_bundle`` reports what is wrong with it); a bare name is looked up
    in the search order. Raises ``BundleNotFound`` for a name no directory holds."""
    text = os.fspath(ref)
    path = Path(text).expanduser()
    if path.is_dir() or _looks_like_path(text):
        return path
    bundles = [b for b in list_bundles(models_dirs, environ) if not b.shadowed]
    for info in bundles:
        if info.name == text:
            return info.path
    known = ", ".join(b.name for b in bundles) or "none"
    raise BundleNotFound(f"{text!r} is neither a bundle directory nor the name of a bundle in "
                         f"{searched(models_dirs, environ)} (known: {known})")


def searched(models_dirs: str | os.PathLike[str] | Iterable[str | os.PathLike[str]] | None = (),
             environ: Mapping[str, str] | None = None) -> str:
    """Where a lookup looked, for an error message: ``"/my/models, the shipped bundles"``."""
    dirs = model_dirs(models_dirs, environ)
    parts = ["the shipped bundles" if source == SHIPPED else str(d) for d, source in dirs]
    if not any(source == SHIPPED for _, source in dirs):
        parts.append(f"no shipped bundles ({_PACKAGE} is not a directory)")
    return ", ".join(parts)


def _looks_like_path(text: str) -> bool:
    seps: Sequence[str] = [s for s in (os.sep, os.altsep, "/") if s]
    return any(s in text for s in seps) or text.startswith((".", "~"))


def _info(manifest: Path, source: str, shadowed: bool) -> BundleInfo | None:
    root = manifest.parent
    try:
        m = json.loads(manifest.read_text(encoding="utf-8"))
        if not isinstance(m, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as exc:
        log.warning("skipping %s: its manifest cannot be read (%s)", root, exc)
        return None
    score: dict[str, Any] | None = None
    if (root / _SCORE).is_file():
        try:
            loaded = json.loads((root / _SCORE).read_text(encoding="utf-8"))
            score = loaded if isinstance(loaded, dict) else None
        except (OSError, ValueError):
            score = None
    physics = m.get("physics")
    sizes = [p.stat().st_size for p in root.iterdir() if p.is_file()]
    int8 = root / _INT8
    meta = m.get("meta")
    return BundleInfo(
        name=root.name, path=root, source=source, env_id=str(m.get("env_id", "")),
        physics=dict(physics) if isinstance(physics, dict) else {},
        int8_bytes=int8.stat().st_size if int8.is_file() else 0, total_bytes=sum(sizes),
        score=score, shadowed=shadowed, meta=dict(meta) if isinstance(meta, dict) else {})
