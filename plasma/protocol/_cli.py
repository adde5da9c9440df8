"""Small helpers shared by the two command-line tools and their config loaders (stdlib only).

The loaders' helpers raise ``ConfigError`` (a ``PlasmaError``); only the CLIs raise ``UsageError``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

from .errors import ConfigError, PlasmaError

__all__ = ["EXIT_OK", "EXIT_REJECTED", "EXIT_USAGE", "Parser", "UsageError", "add_broker_arguments",
           "add_models_dir_argument", "run_main", "coerce", "layered", "parse_kv", "read_toml"]

EXIT_OK, EXIT_USAGE, EXIT_REJECTED = 0, 1, 2


class UsageError(Exception):
    """A mistake in the command line or its inputs: printed in one line, exit status 1."""


class Parser(argparse.ArgumentParser):
    """argparse that exits with status 1 (not 2) on usage errors: 2 means 'rejected'."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def parse_kv(text: str, what: str = "value") -> dict[str, float]:
    """``"m=1.6,g=12"`` -> ``{"m": 1.6, "g": 12.0}``; raises ConfigError on bad input."""
    out: dict[str, float] = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = item.partition("=")
        try:
            if not sep or not key.strip():
                raise ValueError
            out[key.strip()] = float(value)
        except ValueError:
            raise ConfigError(f"bad {what} {item!r}: expected KEY=NUMBER[,KEY=NUMBER...]") from None
    return out


def add_broker_arguments(parser: argparse.ArgumentParser, env_prefix: str) -> None:
    """The broker flags both daemons share: URL, credentials, TLS files."""
    parser.add_argument("--broker", metavar="URL", help="mqtt://HOST:PORT or mqtts://HOST:PORT")
    parser.add_argument("--username")
    parser.add_argument("--password", help=f"prefer {env_prefix}PASSWORD: flags show in `ps`")
    parser.add_argument("--ca-file", dest="ca_file", metavar="PEM")
    parser.add_argument("--cert-file", dest="cert_file", metavar="PEM")
    parser.add_argument("--key-file", dest="key_file", metavar="PEM")


def add_models_dir_argument(parser: argparse.ArgumentParser) -> None:
    """``--models-dir DIR``: the user's own bundles, searched before ``PLASMA_MODELS`` and the
    shipped ones (``plasma.protocol.catalog``); repeatable, or one ``os.pathsep``-separated value."""
    parser.add_argument("--models-dir", dest="models_dir", action="append", metavar="DIR",
                        help="a directory of your own bundles (one sub-directory each), searched "
                             "before PLASMA_MODELS and the shipped bundles; repeatable")


def read_toml(path: str | None, known: Mapping[str, type],
              sections: Collection[str] = ()) -> tuple[dict[str, Any], dict[str, Any]]:
    """A ``--config`` TOML file: (scalar values, tables named in ``sections``).

    Unknown keys are refused, so a typo in a config file is an error, not a silent default.
    """
    if path is None:
        return {}, {}
    try:
        import tomllib
    except ImportError:  # Python 3.10
        raise ConfigError("--config needs Python 3.11 or newer (tomllib)") from None
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path}: {exc}") from None
    tables = {k: data.pop(k) for k in list(data) if k in sections}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"config file {path}: unknown keys {', '.join(unknown)}")
    return data, tables


def coerce(name: str, raw: Any, kind: type) -> Any:
    """``raw`` (a flag, an environment string or a TOML value) as ``kind``; ConfigError if not."""
    if isinstance(raw, bool) or (kind is str and not isinstance(raw, str)):
        raise ConfigError(f"{name}: expected {kind.__name__}, got {raw!r}")
    try:
        return kind(raw)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: expected {kind.__name__}, got {raw!r}") from None


def layered(flags: Mapping[str, Any], environ: Mapping[str, str], prefix: str,
            scalars: Mapping[str, type], file_values: Mapping[str, Any],
            required: Collection[str]) -> dict[str, Any]:
    """Each option from a flag, else ``{prefix}{NAME}`` in the environment, else the file.

    Raises ConfigError naming every missing required option.
    """
    values: dict[str, Any] = {}
    for name, kind in scalars.items():
        raw = flags.get(name)
        if raw is None:
            raw = environ.get(f"{prefix}{name.upper()}")
        if raw is None:
            raw = file_values.get(name)
        if raw is not None:
            values[name] = coerce(name, raw, kind)
    missing = [n for n in required if n not in values]
    if missing:
        raise ConfigError("missing " + ", ".join(f"--{n.replace('_', '-')}" for n in missing)
                         + f" (flag, {prefix}* variable or config file)")
    return values


def run_main(prog: str, parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> int:
    """Parse, set up logging and run the chosen handler; every library error (a PlasmaError),
    a usage error or a missing optional extra is one line on stderr and exit status 1."""
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.handler(args))
    except (UsageError, PlasmaError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ImportError as exc:  # an optional extra that is not installed: say which
        hint = "" if "pip install" in str(exc) else " (pip install 'plasma[server]' or '[demo]')"
        print(f"{prog}: error: {exc}{hint}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
