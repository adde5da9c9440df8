"""Small helpers shared by the two command-line tools (stdlib only)."""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

EXIT_OK, EXIT_USAGE, EXIT_REJECTED = 0, 1, 2


class UsageError(Exception):
    """A mistake in the command line or its inputs: printed in one line, exit status 1."""


class Parser(argparse.ArgumentParser):
    """argparse that exits with status 1 (not 2) on usage errors: 2 means 'rejected'."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def parse_kv(text: str, what: str = "value") -> dict[str, float]:
    """``"m=1.6,g=12"`` -> ``{"m": 1.6, "g": 12.0}``; raises UsageError on bad input."""
    out: dict[str, float] = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = item.partition("=")
        try:
            if not sep or not key.strip():
                raise ValueError
            out[key.strip()] = float(value)
        except ValueError:
            raise UsageError(f"bad {what} {item!r}: expected KEY=NUMBER[,KEY=NUMBER...]") from None
    return out
