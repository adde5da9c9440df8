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

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, NamedTuple, TypeVar, Union

if TYPE_CHECKING:
    from . import messages, wire

    AnyReason = Union[wire.Reason, messages.Reason]
    """The device speaks ``wire.Reason``, the server the pydantic ``messages.Reason``."""

__all__ = ["Check", "CheckResult", "judge_all"]

E = TypeVar("E")
L = TypeVar("L")


class CheckResult(NamedTuple):
    """What one check found: why it fails (None: it passed) and the scores it judged."""

    reason: AnyReason | None
    scores: dict[str, float]


Check = Callable[[E, L], CheckResult]
"""check(evidence, limits) -> CheckResult; its ``__name__`` names it."""


def judge_all(checks: Iterable[Check[E, L]], evidence: E, limits: L
              ) -> tuple[tuple[AnyReason, ...], dict[str, float]]:
    """Run ``checks`` in order: every failing check's reason, and all their scores merged."""
    reasons: list[AnyReason] = []
    scores: dict[str, float] = {}
    for check in checks:
        reason, found = check(evidence, limits)
        scores.update(found)
        if reason is not None:
            reasons.append(reason)
    return tuple(reasons), scores
