"""Edge stage 9a, record format: the bytes of one journal record, and the scan of a log.

A record is ``[magic u32 | length u32 | crc32 u32 | kind u8 | slot u8 | version u64 | payload]``
(little-endian; ``length`` counts the payload; the crc covers length, kind, slot, version and
payload). ``slot`` is the slot kind's ``code`` from ``plasma.protocol.slots`` (0 fleet, 1 device:
the bytes today's logs hold). Kinds: ACCEPT (payload = the raw verified packet bytes), ROLLBACK
(the canary rolled that version back), FLOOR (the highest version ever accepted, written by
compaction or when the log vanished under a running journal) and WITHDRAWN (the stored bytes of
that version stopped verifying on a load).
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

from plasma.protocol import DecodedPacket
from plasma.protocol.slots import slot_by_code, slot_kind

__all__ = ["ACCEPT", "FLOOR", "HEAD", "MAGIC", "MAX_STATE_FILE", "ROLLBACK", "WITHDRAWN",
           "Damage", "Rec", "check", "encode_record", "parse", "scan"]

MAX_STATE_FILE = 4 * 1024 * 1024  # far above the packet cap; a bigger file is damage, not a packet

ACCEPT, ROLLBACK, FLOOR, WITHDRAWN = 1, 2, 3, 4
_KINDS = (ACCEPT, ROLLBACK, FLOOR, WITHDRAWN)
MAGIC = b"PLJ1"
_MAGIC = struct.unpack("<I", MAGIC)[0]
HEAD = struct.Struct("<IIIBBQ")  # magic, length, crc32, kind, slot, version: 22 bytes
_CRC_HEAD = struct.Struct("<IBBQ")  # length, kind, slot, version (then the payload)

Damage = tuple[int, int, str]
"""A damaged span of a log: (start, end, why)."""


def encode_record(kind: int, slot: str, version: int, payload: bytes = b"") -> bytes:
    code = slot_kind(slot).code
    crc = zlib.crc32(payload, zlib.crc32(_CRC_HEAD.pack(len(payload), kind, code, version)))
    return HEAD.pack(_MAGIC, len(payload), crc, kind, code, version) + payload


@dataclass(frozen=True)
class Rec:
    kind: int
    slot: str
    version: int
    offset: int
    """Of the payload, in the log."""
    length: int

    @property
    def end(self) -> int:
        return self.offset + self.length


def parse(buf: bytes, pos: int) -> Rec | str:
    """The record at ``pos``, or why there is none."""
    if len(buf) - pos < HEAD.size:
        return "short record header"
    magic, length, crc, kind, code, version = HEAD.unpack_from(buf, pos)
    if magic != _MAGIC:
        return "bad magic"
    if length > MAX_STATE_FILE:
        return f"impossible length {length}"
    start = pos + HEAD.size
    if start + length > len(buf):
        return "short record"
    payload = memoryview(buf)[start:start + length]
    if crc != zlib.crc32(payload, zlib.crc32(_CRC_HEAD.pack(length, kind, code, version))):
        return "crc mismatch"
    kind_of_slot = slot_by_code(code)
    if kind not in _KINDS or kind_of_slot is None:
        return f"unknown record kind {kind} or slot {code}"
    return Rec(kind, kind_of_slot.name, version, start, length)


def scan(buf: bytes) -> tuple[list[Rec], list[Damage]]:
    """Valid records, and the damaged spans (start, end, why) between or after them."""
    records: list[Rec] = []
    damage: list[Damage] = []
    pos = 0
    while pos < len(buf):
        got = parse(buf, pos)
        if isinstance(got, Rec):
            records.append(got)
            pos = got.end
            continue
        resume = buf.find(MAGIC, pos + 1)  # bit rot mid-log: later records are still valid
        while resume >= 0 and not isinstance(parse(buf, resume), Rec):
            resume = buf.find(MAGIC, resume + 1)
        end = len(buf) if resume < 0 else resume
        damage.append((pos, end, got))
        pos = end
    return records, damage


def check(result: DecodedPacket | str, rec: Rec) -> DecodedPacket | str:
    """``result`` (a re-verification of ``rec``'s bytes), or why it does not match the record."""
    if isinstance(result, str):
        return result
    if result.header.slot != rec.slot:
        return f"holds a {result.header.slot}-slot packet"
    if result.header.version != rec.version:
        return f"holds v{result.header.version}"
    return result
