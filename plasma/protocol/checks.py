"""Protocol: the one shape of an audit check, edge or server - a named function returning its reason and scores.

Every auditor (the edge's packet and model checks, the server's judicial checks) holds its
checks in a tuple and runs them in order with ``judge_all``; adding a check is one function
and one tuple entry. A check takes what the auditor measured (``evidence``) and the limits it
judges against, and returns a ``CheckResult``: the ``Reason`` it fails with (None: passed) and
the scores it looked at, which go into the ``AuditRecord``. A check never raises or asserts
for a rejection (Gymnasium's ``check_env`` shape); input that breaks the contract (bytes that
do not decode, a signature that does not verify) stays an exception of the decoder.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

__all__ = ["Check", "CheckResult", "judge_all"]

E = TypeVar("E")
L = TypeVar("L")
R = TypeVar("R")


@dataclass(frozen=True)
class CheckResult(Generic[R]):
    """What one check found: why it fails (None: it passed) and the scores it judged.

    ``R`` is the reason type of the side: the device's ``wire.Reason``, the server's pydantic
    ``messages.Reason``. Unpacks as ``reason, scores = check(evidence, limits)``.
    """

    reason: R | None
    scores: dict[str, float]

    def __iter__(self) -> Iterator[Any]:
        return iter((self.reason, self.scores))


Check = Callable[[E, L], CheckResult[R]]
"""check(evidence, limits) -> CheckResult; its ``__name__`` names it."""


def judge_all(checks: Iterable[Callable[[E, L], CheckResult[R]]], evidence: E, limits: L
              ) -> tuple[tuple[R, ...], dict[str, float]]:
    """Run ``checks`` in order: every failing check's reason, and all their scores merged."""
    reasons: list[R] = []
    scores: dict[str, float] = {}
    for check in checks:
        found = check(evidence, limits)
        scores.update(found.scores)
        if found.reason is not None:
            reasons.append(found.reason)
    return tuple(reasons), scores
