"""The contract: pydantic messages exchanged between devices and the server.

Every model is frozen, forbids unknown fields, refuses NaN/Inf and is strict about
types, so a message is validated once at the boundary and trusted inside.
"""

from __future__ import annotations

import time
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

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

__all__ = [
    "SCHEMA_VERSION", "ID_PATTERN", "Id", "Sha256Hex", "KeyId", "ReasonCode", "LayerName", "Slot",
    "SLOTS", "MAX_RANK", "MAX_LAYERS", "MAX_FEATURES", "Message", "new_id", "StateTrace",
    "WorldState", "SimulationResult", "Provenance", "LayerSpec", "InstructionPacket", "Reason",
    "Verdict", "AuditRecord", "Status", "LiveVersions",
]

Id = Annotated[str, StringConstraints(pattern=ID_PATTERN)]
"""Fleet and device ids: ``[A-Za-z0-9_-]{1,64}``; safe in topics and file names."""
Sha256Hex = Annotated[str, StringConstraints(pattern=SHA256_PATTERN)]
KeyId = Annotated[str, StringConstraints(pattern=KEY_ID_PATTERN)]
ReasonCode = Annotated[str, StringConstraints(pattern=REASON_CODE_PATTERN)]
LayerName = Annotated[str, StringConstraints(pattern=LAYER_NAME_PATTERN)]


class Message(BaseModel):
    """Base of all protocol models."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True, allow_inf_nan=False)


class StateTrace(Message):
    """One real transition of one device, as streamed in telemetry frames."""

    schema_version: Literal[1] = SCHEMA_VERSION
    fleet: Id
    device: Id
    episode: int = Field(ge=0)
    step: int = Field(ge=0)
    obs: tuple[float, ...]
    action: tuple[float, ...]
    reward: float
    next_obs: tuple[float, ...]
    terminated: bool
    truncated: bool
    fleet_version: int = Field(default=0, ge=0)
    """Version of the fleet-slot adapter active when the action was taken (0 = none)."""
    device_version: int = Field(default=0, ge=0)
    """Version of the device-slot adapter active when the action was taken (0 = none)."""
    timestamp: float

    @property
    def action_taken(self) -> tuple[float, ...]:
        """The action applied on the device (exploration included): ``action``."""
        return self.action

    @model_validator(mode="after")
    def _same_obs_dims(self) -> StateTrace:
        if len(self.obs) != len(self.next_obs):
            raise ValueError("obs and next_obs differ in length")
        return self


class WorldState(Message):
    """A real state a device was in: the start of a phantom path."""

    schema_version: Literal[1] = SCHEMA_VERSION
    fleet: Id
    device: Id
    obs: tuple[float, ...]
    episode: int = Field(default=0, ge=0)
    step: int = Field(default=0, ge=0)
    timestamp: float = 0.0


class SimulationResult(Message):
    """Summary of one phantom-path simulation (the arrays stay on the server)."""

    schema_version: Literal[1] = SCHEMA_VERSION
    simulation_id: str = Field(default_factory=new_id, pattern=HEX32_PATTERN)
    fleet: Id
    device: Id | None = None
    world_model_version: str = Field(max_length=128)
    n_paths: int = Field(ge=0)
    horizon: int = Field(ge=0)
    planner: str = Field(max_length=64)
    base_predicted_return: float
    """Mean predicted return of the policy before adaptation, per path."""
    planned_predicted_return: float
    """Mean predicted return of the planner's actions, per path."""
    disagreement_mean: float = Field(ge=0)
    disagreement_max: float = Field(ge=0)
    created_at: float = Field(default_factory=time.time)


class Provenance(Message):
    """Where an adapter came from: which traces, which world model, which simulation."""

    trace_count: int = Field(default=0, ge=0)
    trace_from: float = 0.0
    """Timestamp of the oldest real transition used."""
    trace_to: float = 0.0
    """Timestamp of the newest real transition used."""
    world_model_version: str = Field(default="", max_length=128)
    simulation_id: str = Field(default="", max_length=64)
    note: str = Field(default="", max_length=256)


class LayerSpec(Message):
    """One target layer of an adapter: delta W (out x in) = alpha/rank * B @ A."""

    name: LayerName
    in_features: int = Field(ge=1, le=MAX_FEATURES)
    out_features: int = Field(ge=1, le=MAX_FEATURES)


class InstructionPacket(Message):
    """The signed packet header: everything a device needs to judge the payload."""

    schema_version: Literal[1] = SCHEMA_VERSION
    packet_id: str = Field(default_factory=new_id, pattern=HEX32_PATTERN)
    key_id: KeyId
    fleet: Id
    slot: Slot
    device: Id | None = None
    """Target device for the ``device`` slot; ``None`` for the ``fleet`` slot."""
    version: int = Field(ge=1, lt=2**53)
    base_sha256: Sha256Hex
    created_at: float = Field(ge=0)
    expires_at: float = Field(ge=0)
    priority: int = Field(default=5, ge=0, le=9)
    """0 is the most urgent."""
    rank: int = Field(ge=1, le=MAX_RANK)
    alpha: float
    dtype: Literal["int8", "fp16", "fp32"]
    layers: tuple[LayerSpec, ...] = Field(max_length=MAX_LAYERS)
    """Empty means: clear this slot (run the base model on it)."""
    payload_len: int = Field(ge=0)
    payload_sha256: Sha256Hex
    provenance: Provenance = Provenance()

    @model_validator(mode="after")
    def _consistent(self) -> InstructionPacket:
        problem = header_inconsistency(self.slot, self.device, self.created_at, self.expires_at,
                                       [layer.name for layer in self.layers])
        if problem:
            raise ValueError(problem)
        return self

    @property
    def target(self) -> str:
        """The device id for a device packet, the fleet id for a fleet packet."""
        return self.device if self.device is not None else self.fleet


class Reason(Message):
    """Why a check failed (or passed with a remark): a stable code and words."""

    code: ReasonCode
    message: str = Field(max_length=1000)
    check: str = Field(default="", max_length=64)


Verdict = Literal["accepted", "rejected", "rolled_back", "published", "blocked", "corrected"]


class AuditRecord(Message):
    """The outcome of an audit on either side: a verdict value, never an exception."""

    schema_version: Literal[1] = SCHEMA_VERSION
    record_id: str = Field(default_factory=new_id, pattern=HEX32_PATTERN)
    auditor: Literal["edge", "judicial"]
    subject: str = Field(max_length=256)
    """What was judged, e.g. ``packet:<packet_id>`` or ``file:<name>``."""
    fleet: Id | None = None
    device: Id | None = None
    slot: Slot | None = None
    version: int | None = None
    verdict: Verdict
    reasons: tuple[Reason, ...] = ()
    scores: dict[str, float] = {}
    created_at: float = Field(default_factory=time.time)

    @property
    def ok(self) -> bool:
        return self.verdict in ("accepted", "published", "corrected")


class Status(Message):
    """A device's retained status: online, or offline (its clean stop or the broker's last will).

    An online status and the offline status of a clean stop name the live versions; the last
    will names none (``versions`` empty, ``fleet_version``, ``device_version`` and ``steps``
    null): it is composed once, at start, so it would name what the device ran then. What a
    device runs is its retained ``LiveVersions`` message (docs/design.md section 4).
    """

    schema_version: Literal[1] = SCHEMA_VERSION
    fleet: Id
    device: Id
    state: Literal["online", "offline"]
    base_sha256: Sha256Hex | None = None
    versions: dict[Slot, Annotated[int, Field(ge=0)]] = Field(default_factory=dict)
    """Slot -> version of the adapter live in that slot (0: none; absent: not named)."""
    fleet_version: int | None = Field(default=None, ge=0)
    """``versions["fleet"]``, kept for readers of older statuses; None: not named."""
    device_version: int | None = Field(default=None, ge=0)
    """``versions["device"]``, kept for readers of older statuses; None: not named."""
    steps: int | None = Field(default=None, ge=0)
    """Control steps of this run; None: not known (the last will)."""
    rolling_reward: float | None = None
    since: float | None = None
    """When the daemon run that wrote this started (epoch seconds); None: not said (older)."""
    timestamp: float = Field(default_factory=time.time)
    """When the message was composed; for the last will that is the start, not the death."""

    def slot_versions(self) -> dict[str, int]:
        """Slot -> live version this status names; empty when it names none (a last will).

        Older statuses carry only the fleet/device pair, older wills the versions at start."""
        named = {slot: v for slot, v in (("fleet", self.fleet_version),
                                         ("device", self.device_version)) if v is not None}
        return {**named, **self.versions}


class LiveVersions(Message):
    """What a device runs, retained on its ``versions`` topic: published (retained, QoS 1) at
    start, after every accept and rollback and on every (re)connection, so it survives the
    device going down and the last will that follows."""

    schema_version: Literal[1] = SCHEMA_VERSION
    fleet: Id
    device: Id
    base_sha256: Sha256Hex | None = None
    versions: dict[Slot, Annotated[int, Field(ge=0)]]
    """Slot -> version of the adapter live in that slot (0: none)."""
    steps: int | None = Field(default=None, ge=0)
    """The run's control steps when these versions became live (0: restored at start)."""
    since: float | None = None
    """When the daemon run that wrote this started (epoch seconds)."""
    timestamp: float = Field(default_factory=time.time)
    """When these versions became live (a republish keeps it)."""

    def slot_versions(self) -> dict[str, int]:
        """Slot -> live version, 0 for a slot the message does not name."""
        return {**dict.fromkeys(SLOTS, 0), **self.versions}
