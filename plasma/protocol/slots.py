"""Protocol: the table of slot kinds, the adapters a device stacks on its base model.

One entry per kind: its name (the packet header's ``slot``), its stable ``code`` (the byte that
names it in the device's journal; never reused), its target rule (``per_device``: a packet of
this kind names one device and arrives on that device's topic; otherwise it is for the whole
fleet and names no device) and, by its position in ``SLOT_KINDS``, the merge order (the sum
``W_base + sum of alpha/r * B A`` runs in table order). Adding a slot kind is one entry here.

Standard library only: the device imports this without pydantic.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from . import topics

__all__ = ["SLOT_KINDS", "SLOTS", "Slot", "SlotKind", "slot_by_code", "slot_kind", "slot_topic"]


@dataclass(frozen=True)
class SlotKind:
    """One kind of adapter slot (see the module docstring)."""

    name: str
    code: int
    per_device: bool
    topic: Callable[[str, str], str]
    """(fleet, device) -> the retained adapter topic packets of this kind arrive on."""


SLOT_KINDS: tuple[SlotKind, ...] = (
    SlotKind("fleet", code=0, per_device=False, topic=lambda fleet, _: topics.fleet_adapter(fleet)),
    SlotKind("device", code=1, per_device=True, topic=topics.device_adapter),
)

SLOTS: tuple[str, ...] = tuple(kind.name for kind in SLOT_KINDS)
"""The slot names in merge order."""

if TYPE_CHECKING:
    Slot = str
else:  # validated by pydantic and msgspec from the table: a new entry needs no other edit
    Slot = Literal[SLOTS]

_BY_NAME = {kind.name: kind for kind in SLOT_KINDS}
_BY_CODE = {kind.code: kind for kind in SLOT_KINDS}
assert len(_BY_NAME) == len(_BY_CODE) == len(SLOT_KINDS), "slot names and codes are unique"


def slot_kind(name: str) -> SlotKind:
    """The table entry of ``name``; KeyError for a name outside the table."""
    return _BY_NAME[name]


def slot_by_code(code: int) -> SlotKind | None:
    """The table entry whose journal ``code`` is ``code`` (None: unknown, e.g. damage)."""
    return _BY_CODE.get(code)


def slot_topic(fleet: str, slot: str, device: str | None = None) -> str:
    """The adapter topic of ``slot`` for ``fleet`` (and ``device`` for a per-device kind)."""
    return slot_kind(slot).topic(fleet, device or "")
