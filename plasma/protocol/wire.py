"""The device's view of the contract: msgspec mirrors of the pydantic models the edge needs.

``plasma.protocol.messages`` (pydantic) stays the source of truth; the server and its tests
use it.  This module imports msgspec and the standard library only, so a device that never
imports pydantic saves ~12 MB of RSS.  Every struct here mirrors one model field for field:
same names, order, defaults, constraints and model-level checks, and the same strictness
(no NaN/Inf, no bool for an int, no string for a number, no unknown field).  The differential
tests in ``tests/protocol/test_wire.py`` check that a JSON document is accepted by a struct
iff it is accepted by its pydantic model, and that accepted values agree.

Unlike pydantic, msgspec checks constraints only when it decodes or converts; these structs
also validate in ``__init__`` (``__post_init__`` converts the builtins once more), so building
one with a bad value raises, as building the pydantic model did.  Known differences, all in
construction or stricter: a list (or a dict) given for a tuple (or a nested struct) field is
accepted and normalized where pydantic's strict mode refuses it; JSON ``true`` for
``schema_version`` (``Literal[1]``) is refused where pydantic accepts it (True == 1);
``model_copy`` validates the copy where pydantic's does not.

Errors: every invalid input raises ``MessageInvalid`` (a ``PlasmaError`` and a ``ValueError``)
with the dotted path of the offending field in ``field``.
"""

from __future__ import annotations

import re
import threading
import time
from typing import Annotated, Any, ClassVar, Literal, TypeVar

import msgspec

from ._limits import (
    HEX32_PATTERN,
    ID_PATTERN,
    KEY_ID_PATTERN,
    LAYER_NAME_PATTERN,
    MAX_FEATURES,
    MAX_LAYERS,
    MAX_RANK,
    REASON_CODE_PATTERN,
    SCHEMA_VERSION,
    SHA256_PATTERN,
    SLOTS,
    Slot,
    header_inconsistency,
    new_id,
)
from .errors import MessageInvalid

__all__ = [
    "SCHEMA_VERSION", "SLOTS", "Slot", "Verdict", "new_id", "WireStruct", "LayerSpec",
    "Provenance", "PacketHeader", "Reason", "AuditRecord", "Status", "LiveVersions", "FrameHeader",
    "MessageInvalid", "MAX_ROWS", "MAX_OBS_DIM", "MAX_ACT_DIM",
]


def _py(pattern: str) -> str:
    """pydantic's (Rust) ``$`` is end of text; Python's also matches before a final newline."""
    assert pattern.endswith("$")
    return pattern[:-1] + r"\Z"


_FMAX = 1.7976931348623157e308
Float = Annotated[float, msgspec.Meta(ge=-_FMAX, le=_FMAX)]
"""A finite float (pydantic ``allow_inf_nan=False``): NaN fails both bounds, Inf one."""
NonNegFloat = Annotated[float, msgspec.Meta(ge=0, le=_FMAX)]
NonNegInt = Annotated[int, msgspec.Meta(ge=0)]
Id = Annotated[str, msgspec.Meta(pattern=_py(ID_PATTERN))]
Sha256Hex = Annotated[str, msgspec.Meta(pattern=_py(SHA256_PATTERN))]
KeyId = Annotated[str, msgspec.Meta(pattern=_py(KEY_ID_PATTERN))]
Hex32 = Annotated[str, msgspec.Meta(pattern=_py(HEX32_PATTERN))]
ReasonCode = Annotated[str, msgspec.Meta(pattern=_py(REASON_CODE_PATTERN))]
LayerName = Annotated[str, msgspec.Meta(pattern=_py(LAYER_NAME_PATTERN))]
Verdict = Literal["accepted", "rejected", "rolled_back", "published", "blocked", "corrected"]

MAX_ROWS = 100_000
MAX_OBS_DIM = 4096
MAX_ACT_DIM = 1024

# Types to_builtins must hand to convert unchanged so that convert refuses them (pydantic's
# strict mode refuses bytes for a str; to_builtins would otherwise base64 them into a str).
_PASS_THROUGH = (bytes, bytearray, memoryview)
_state = threading.local()  # .trusted > 0: values come from msgspec's own decode/convert
_AT = re.compile(r" - at `(?:key` in `)?\$(.*)`$")

W = TypeVar("W", bound="WireStruct")


def _invalid(exc: BaseException, what: str) -> MessageInvalid:
    text = str(exc)
    match = _AT.search(text)
    field = ""
    if match:
        text = text[:match.start()]
        field = re.sub(r"\[(\d+)\]", r".\1", match.group(1).replace("[...]", "")).lstrip(".")
    if "1.7976931348623157e+308" in text:  # the bounds of Float: NaN or Inf
        text = "Input should be a finite number (no NaN or Inf)"
    where = f"field {field}" if field else what
    return MessageInvalid(f"{what} {where}: {text}" if field else f"{what}: {text}", field=field,
                          detail=text)


class WireStruct(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Base of the wire structs: validation on construction plus a pydantic-like surface."""

    _strict: ClassVar[bool] = True
    """False: msgspec's lax conversions (str -> number...), for files people edit (bundles)."""

    def __post_init__(self) -> None:
        if getattr(_state, "trusted", 0):
            self._check()  # msgspec decoded/converted the fields: only the model checks remain
            return
        _state.trusted = 1
        try:
            raw = msgspec.to_builtins(self, builtin_types=_PASS_THROUGH)
            checked = msgspec.convert(raw, type(self), strict=self._strict)
        except (msgspec.ValidationError, TypeError, ValueError) as exc:
            raise _invalid(exc, type(self).__name__) from None
        finally:
            _state.trusted = 0
        for name in self.__struct_fields__:  # normalized values: lists -> tuples, int -> float
            msgspec.structs.force_setattr(self, name, getattr(checked, name))

    def _check(self) -> None:
        """Model-level checks (pydantic's ``model_validator``); raise ValueError."""

    # -- the pydantic-compatible surface the code and tests use -------------------------------
    @classmethod
    def model_validate_json(cls: type[W], raw: bytes | bytearray | memoryview | str) -> W:
        """Decode and validate a JSON document (bytes or str); raises ``MessageInvalid``."""
        _state.trusted = getattr(_state, "trusted", 0) + 1
        try:
            return msgspec.json.decode(raw, type=cls, strict=cls._strict)
        except (msgspec.DecodeError, TypeError, ValueError) as exc:
            raise _invalid(exc, cls.__name__) from None
        finally:
            _state.trusted -= 1

    @classmethod
    def model_validate(cls: type[W], obj: Any) -> W:
        """Validate a mapping of builtins (or return an instance as is)."""
        if isinstance(obj, cls):
            return obj
        _state.trusted = getattr(_state, "trusted", 0) + 1
        try:
            return msgspec.convert(obj, cls, strict=cls._strict)
        except (msgspec.ValidationError, TypeError, ValueError) as exc:
            raise _invalid(exc, cls.__name__) from None
        finally:
            _state.trusted -= 1

    def model_dump_json(self, *, indent: int | None = None, by_alias: bool = True) -> str:
        """Compact JSON (or indented); renamed fields always use their JSON name."""
        data = msgspec.json.encode(self)
        return (msgspec.json.format(data, indent=indent) if indent else data).decode()

    def model_dump(self, *, mode: str = "python", by_alias: bool = False) -> dict[str, Any]:
        """Nested dicts; ``mode="json"`` turns tuples into lists."""
        return {(f.encode_name if by_alias else f.name):
                _dump(getattr(self, f.name), mode == "json", by_alias)
                for f in msgspec.structs.fields(self)}

    def model_copy(self: W, *, update: dict[str, Any] | None = None) -> W:
        """A copy with some fields replaced; unlike pydantic, the copy is validated."""
        fields = {name: getattr(self, name) for name in self.__struct_fields__}
        fields.update(update or {})
        return type(self)(**fields)


def _dump(value: Any, json_mode: bool, by_alias: bool) -> Any:
    if isinstance(value, WireStruct):
        return value.model_dump(mode="json" if json_mode else "python", by_alias=by_alias)
    if isinstance(value, (tuple, list)):
        items = [_dump(v, json_mode, by_alias) for v in value]
        return items if json_mode or isinstance(value, list) else tuple(items)
    if isinstance(value, dict):
        return {k: _dump(v, json_mode, by_alias) for k, v in value.items()}
    return value


class Provenance(WireStruct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Mirror of ``messages.Provenance``."""

    trace_count: NonNegInt = 0
    trace_from: Float = 0.0
    trace_to: Float = 0.0
    world_model_version: Annotated[str, msgspec.Meta(max_length=128)] = ""
    simulation_id: Annotated[str, msgspec.Meta(max_length=64)] = ""
    note: Annotated[str, msgspec.Meta(max_length=256)] = ""


class LayerSpec(WireStruct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Mirror of ``messages.LayerSpec``."""

    name: LayerName
    in_features: Annotated[int, msgspec.Meta(ge=1, le=MAX_FEATURES)]
    out_features: Annotated[int, msgspec.Meta(ge=1, le=MAX_FEATURES)]


class PacketHeader(WireStruct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Mirror of ``messages.InstructionPacket``: the signed packet header."""

    schema_version: Literal[1] = SCHEMA_VERSION
    packet_id: Hex32 = msgspec.field(default_factory=new_id)
    key_id: KeyId
    fleet: Id
    slot: Slot
    device: Id | None = None
    version: Annotated[int, msgspec.Meta(ge=1, lt=2**53)]
    base_sha256: Sha256Hex
    created_at: NonNegFloat
    expires_at: NonNegFloat
    priority: Annotated[int, msgspec.Meta(ge=0, le=9)] = 5
    rank: Annotated[int, msgspec.Meta(ge=1, le=MAX_RANK)]
    alpha: Float
    dtype: Literal["int8", "fp16", "fp32"]
    layers: Annotated[tuple[LayerSpec, ...], msgspec.Meta(max_length=MAX_LAYERS)]
    payload_len: NonNegInt
    payload_sha256: Sha256Hex
    provenance: Provenance = msgspec.field(default_factory=Provenance)

    def _check(self) -> None:
        problem = header_inconsistency(self.slot, self.device, self.created_at, self.expires_at,
                                       [layer.name for layer in self.layers])
        if problem:
            raise MessageInvalid(problem)

    @property
    def target(self) -> str:
        """The device id for a device packet, the fleet id for a fleet packet."""
        return self.device if self.device is not None else self.fleet


class Reason(WireStruct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Mirror of ``messages.Reason``: why a check failed, a stable code and words."""

    code: ReasonCode
    message: Annotated[str, msgspec.Meta(max_length=1000)]
    check: Annotated[str, msgspec.Meta(max_length=64)] = ""


class AuditRecord(WireStruct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Mirror of ``messages.AuditRecord``."""

    schema_version: Literal[1] = SCHEMA_VERSION
    record_id: Hex32 = msgspec.field(default_factory=new_id)
    auditor: Literal["edge", "judicial"]
    subject: Annotated[str, msgspec.Meta(max_length=256)]
    fleet: Id | None = None
    device: Id | None = None
    slot: Slot | None = None
    version: int | None = None
    verdict: Verdict
    reasons: tuple[Reason, ...] = ()
    scores: dict[str, Float] = msgspec.field(default_factory=dict)
    created_at: Float = msgspec.field(default_factory=time.time)

    @property
    def ok(self) -> bool:
        return self.verdict in ("accepted", "published", "corrected")


class Status(WireStruct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Mirror of ``messages.Status``: a device's retained status (the last will names no
    versions, see there)."""

    schema_version: Literal[1] = SCHEMA_VERSION
    fleet: Id
    device: Id
    state: Literal["online", "offline"]
    base_sha256: Sha256Hex | None = None
    versions: dict[Slot, NonNegInt] = msgspec.field(default_factory=dict)
    fleet_version: NonNegInt | None = None
    device_version: NonNegInt | None = None
    steps: NonNegInt | None = None
    rolling_reward: Float | None = None
    since: Float | None = None
    timestamp: Float = msgspec.field(default_factory=time.time)

    def slot_versions(self) -> dict[str, int]:
        """Slot -> live version this status names; empty when it names none (a last will)."""
        named = {slot: v for slot, v in (("fleet", self.fleet_version),
                                         ("device", self.device_version)) if v is not None}
        return {**named, **self.versions}


class LiveVersions(WireStruct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Mirror of ``messages.LiveVersions``: what a device runs, on its retained versions topic."""

    schema_version: Literal[1] = SCHEMA_VERSION
    fleet: Id
    device: Id
    base_sha256: Sha256Hex | None = None
    versions: dict[Slot, NonNegInt]
    steps: NonNegInt | None = None
    since: Float | None = None
    timestamp: Float = msgspec.field(default_factory=time.time)

    def slot_versions(self) -> dict[str, int]:
        """Slot -> live version, 0 for a slot the message does not name."""
        return {**dict.fromkeys(SLOTS, 0), **self.versions}


class FrameHeader(WireStruct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """The telemetry frame header (``plasma.protocol.telemetry``); it has no pydantic twin."""

    schema_version: Literal[1] = 1
    fleet: Id
    device: Id
    rows: Annotated[int, msgspec.Meta(ge=0, le=MAX_ROWS)]
    obs_dim: Annotated[int, msgspec.Meta(ge=1, le=MAX_OBS_DIM)]
    act_dim: Annotated[int, msgspec.Meta(ge=1, le=MAX_ACT_DIM)]
    seq: Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)] = 0
    """Frame counter of the sending device (restarts at 0 with the daemon)."""
    created_at: Float = 0.0
    slots: Annotated[tuple[Slot, ...], msgspec.Meta(min_length=1, max_length=16)] | None = None
    """The slots whose version columns the body holds, in order; None: fleet, device."""
