"""The pydantic contract: frozen, no extra fields, no NaN, strict ids, consistent slots."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from plasma.protocol import (
    AuditRecord,
    InstructionPacket,
    LayerSpec,
    LiveVersions,
    Provenance,
    Reason,
    SimulationResult,
    StateTrace,
    Status,
    WorldState,
    new_id,
)

SHA = "ab" * 32


def trace(**overrides: Any) -> StateTrace:
    fields: dict[str, Any] = dict(
        fleet="fleet-1", device="dev_7", episode=0, step=3, obs=(0.1, 0.2, 0.3),
        action=(1.0,), reward=-0.5, next_obs=(0.2, 0.3, 0.4), terminated=False,
        truncated=False, timestamp=1_700_000_000.0,
    )
    fields.update(overrides)
    return StateTrace(**fields)


# One valid instance of every message, for the contract checks run over all of them.
def _examples(make_header: Callable[..., InstructionPacket]) -> dict[str, BaseModel]:
    return {
        "StateTrace": trace(),
        "WorldState": WorldState(fleet="f", device="d", obs=(1.0, 2.0)),
        "SimulationResult": SimulationResult(
            fleet="f", world_model_version="wm-1", n_paths=64, horizon=20, planner="mppi",
            base_predicted_return=1.0, planned_predicted_return=2.0, disagreement_mean=0.1,
            disagreement_max=0.3),
        "Provenance": Provenance(trace_count=3, world_model_version="wm-1"),
        "LayerSpec": LayerSpec(name="net.0", in_features=4, out_features=3),
        "InstructionPacket": make_header(),
        "Reason": Reason(code="expired", message="packet expired", check="expiry"),
        "AuditRecord": AuditRecord(auditor="edge", subject="file:a.pkt", verdict="rejected",
                                   reasons=(Reason(code="expired", message="x"),)),
        "Status": Status(fleet="f", device="d", state="online", base_sha256=SHA),
        "LiveVersions": LiveVersions(fleet="f", device="d", base_sha256=SHA,
                                     versions={"fleet": 2, "device": 0}, since=1.0),
    }


MESSAGE_NAMES = ["StateTrace", "WorldState", "SimulationResult", "Provenance", "LayerSpec",
                 "InstructionPacket", "Reason", "AuditRecord", "Status", "LiveVersions"]


@pytest.fixture(params=MESSAGE_NAMES)
def message(request: pytest.FixtureRequest, make_header: Callable[..., InstructionPacket]
            ) -> BaseModel:
    return _examples(make_header)[request.param]


def test_every_message_is_frozen(message: BaseModel) -> None:
    field = next(iter(type(message).model_fields))
    with pytest.raises(ValidationError):
        setattr(message, field, getattr(message, field))


def test_every_message_refuses_extra_fields(message: BaseModel) -> None:
    data = message.model_dump()
    data["surprise"] = 1
    with pytest.raises(ValidationError, match="surprise"):
        type(message).model_validate(data)
    with pytest.raises(ValidationError):
        type(message)(**data)


def test_every_message_round_trips_through_json(message: BaseModel) -> None:
    raw = message.model_dump_json()
    assert type(message).model_validate_json(raw) == message
    assert type(message).model_validate_json(raw.encode()) == message


def test_every_message_refuses_nan_and_inf_in_float_fields(message: BaseModel) -> None:
    cls = type(message)
    floats = [name for name, info in cls.model_fields.items()
              if info.annotation in (float, "float") or info.annotation == float | None]
    data = message.model_dump()
    for name in floats:
        for bad in (math.nan, math.inf, -math.inf):
            with pytest.raises(ValidationError):
                cls.model_validate({**data, name: bad})


@pytest.mark.parametrize("field", ["obs", "action", "next_obs"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_trace_vectors_refuse_non_finite(field: str, bad: float) -> None:
    values = list(trace().model_dump()[field])
    values[0] = bad
    with pytest.raises(ValidationError):
        trace(**{field: tuple(values)})


@pytest.mark.parametrize("field", ["reward", "timestamp"])
def test_trace_scalars_refuse_nan_also_from_json(field: str) -> None:
    good = trace().model_dump_json()
    for token in ("NaN", "Infinity", "-Infinity", "1e999"):
        raw = re.sub(f'"{field}":[^,}}]+', f'"{field}":{token}', good)
        assert raw != good
        with pytest.raises(ValidationError):
            StateTrace.model_validate_json(raw)
    with pytest.raises(ValidationError):
        trace(**{field: math.nan})


GOOD_IDS = ["a", "A", "0", "_", "-", "dev_7", "Fleet-01", "x" * 64]
BAD_IDS = ["", "x" * 65, "a/b", "a+b", "+", "#", "a#", "a b", " a", "a\n", "\na", "a.b",
           "..", "../etc", "dév", "устройство", "a\x00b", "a$", "$share", "a\\b", "😀"]


@pytest.mark.parametrize("value", GOOD_IDS)
def test_good_ids(value: str) -> None:
    assert trace(fleet=value, device=value).device == value
    assert Status(fleet=value, device=value, state="offline").fleet == value


@pytest.mark.parametrize("value", BAD_IDS)
@pytest.mark.parametrize("field", ["fleet", "device"])
def test_bad_ids_are_refused(value: str, field: str,
                             make_header: Callable[..., InstructionPacket]) -> None:
    with pytest.raises(ValidationError):
        trace(**{field: value})
    with pytest.raises(ValidationError):
        WorldState(**{"fleet": "f", "device": "d", "obs": (1.0,), field: value})
    with pytest.raises(ValidationError):
        Status(**{"fleet": "f", "device": "d", "state": "online", field: value})
    with pytest.raises(ValidationError):
        AuditRecord(auditor="edge", subject="s", verdict="accepted", **{field: value})
    header = {"fleet": value} if field == "fleet" else {"slot": "device", "device": value}
    with pytest.raises(ValidationError):
        make_header(**header)


@pytest.mark.parametrize(("slot", "device", "ok"), [
    ("fleet", None, True),
    ("device", "d1", True),
    ("fleet", "d1", False),
    ("device", None, False),
    ("edge", None, False),
    ("Fleet", None, False),
])
def test_slot_and_device_must_agree(slot: str, device: str | None, ok: bool,
                                    make_header: Callable[..., InstructionPacket]) -> None:
    if ok:
        header = make_header(slot=slot, device=device)
        assert header.target == (device or "fleet-1")
    else:
        with pytest.raises(ValidationError):
            make_header(slot=slot, device=device)


@pytest.mark.parametrize("overrides", [
    {"version": 0}, {"version": -1}, {"version": 2**53}, {"version": 1.0}, {"version": "1"},
    {"rank": 0}, {"rank": 65}, {"priority": -1}, {"priority": 10},
    {"created_at": 10.0, "expires_at": 10.0}, {"created_at": 10.0, "expires_at": 9.0},
    {"created_at": -1.0}, {"alpha": math.nan}, {"alpha": math.inf},
    {"base_sha256": "AB" * 32}, {"base_sha256": "ab" * 31}, {"base_sha256": "xy" * 32},
    {"key_id": "ab" * 15}, {"key_id": "AB" * 16}, {"payload_len": -1},
    {"payload_sha256": "0" * 63}, {"dtype": "int4"}, {"dtype": "float16"},
    {"packet_id": "x" * 32}, {"packet_id": "../../../../etc/passwd"},
    {"schema_version": 2},
    {"layers": (LayerSpec(name="a", in_features=1, out_features=1),) * 2},
    {"layers": tuple(LayerSpec(name=f"l{i}", in_features=1, out_features=1)
                     for i in range(65))},
])
def test_instruction_packet_refuses(overrides: dict[str, Any],
                                    make_header: Callable[..., InstructionPacket]) -> None:
    with pytest.raises(ValidationError):
        make_header(**overrides)


@pytest.mark.parametrize("spec", [
    {"name": "", "in_features": 1, "out_features": 1},
    {"name": "a b", "in_features": 1, "out_features": 1},
    {"name": "x" * 129, "in_features": 1, "out_features": 1},
    {"name": "a", "in_features": 0, "out_features": 1},
    {"name": "a", "in_features": 1, "out_features": 65537},
    {"name": "a", "in_features": 1.5, "out_features": 1},
])
def test_layer_spec_refuses(spec: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        LayerSpec(**spec)


def test_trace_obs_and_next_obs_must_have_the_same_length() -> None:
    with pytest.raises(ValidationError, match="next_obs"):
        trace(obs=(1.0, 2.0), next_obs=(1.0,))
    with pytest.raises(ValidationError):
        trace(obs=(), next_obs=(1.0,))
    assert trace(obs=(1.0,), next_obs=(2.0,), action=(0.0, 1.0)).action == (0.0, 1.0)


@pytest.mark.parametrize("overrides", [
    {"episode": -1}, {"step": -1}, {"fleet_version": -1}, {"device_version": -1},
    {"terminated": 1}, {"terminated": "yes"}, {"episode": 1.5}, {"obs": [1, "x"]},
    {"schema_version": 2},
])
def test_trace_refuses(overrides: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        trace(**overrides)


def test_strict_types_in_json() -> None:
    raw = trace().model_dump_json()
    with pytest.raises(ValidationError):
        StateTrace.model_validate_json(raw.replace('"step":3', '"step":"3"'))
    with pytest.raises(ValidationError):
        StateTrace.model_validate_json(raw.replace('"terminated":false', '"terminated":0'))


@pytest.mark.parametrize(("verdict", "ok"), [
    ("accepted", True), ("published", True), ("corrected", True),
    ("rejected", False), ("rolled_back", False), ("blocked", False),
])
def test_audit_record_verdicts(verdict: str, ok: bool) -> None:
    assert AuditRecord(auditor="judicial", subject="s", verdict=verdict).ok is ok


@pytest.mark.parametrize("overrides", [
    {"verdict": "maybe"}, {"auditor": "cloud"}, {"subject": "s" * 257},
    {"reasons": (Reason(code="x", message="m"),), "scores": {"a": math.nan}},
])
def test_audit_record_refuses(overrides: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        AuditRecord(**{"auditor": "edge", "subject": "s", "verdict": "accepted", **overrides})


@pytest.mark.parametrize("fields", [
    {"code": "Expired", "message": "m"}, {"code": "", "message": "m"},
    {"code": "a-b", "message": "m"}, {"code": "x" * 65, "message": "m"},
    {"code": "ok", "message": "m" * 1001},
])
def test_reason_refuses(fields: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        Reason(**fields)


def test_new_id_is_32_hex_and_unique() -> None:
    ids = {new_id() for _ in range(1000)}
    assert len(ids) == 1000
    assert all(len(i) == 32 and set(i) <= set("0123456789abcdef") for i in ids)


def test_status_and_simulation_bounds() -> None:
    with pytest.raises(ValidationError):
        Status(fleet="f", device="d", state="sleeping")
    with pytest.raises(ValidationError):
        Status(fleet="f", device="d", state="online", base_sha256="ab")
    for bad in ({"fleet_version": -1}, {"steps": -1}, {"since": math.inf}):
        with pytest.raises(ValidationError):
            Status(fleet="f", device="d", state="offline", **bad)
    with pytest.raises(ValidationError):
        LiveVersions(fleet="f", device="d")  # type: ignore[call-arg]  # versions is required
    with pytest.raises(ValidationError):
        LiveVersions(fleet="f", device="d", versions={"fleet": -1})
    with pytest.raises(ValidationError):
        LiveVersions(fleet="f", device="d", versions={}, steps=-1)
    with pytest.raises(ValidationError):
        LiveVersions(fleet="f", device="d", versions={"cloud": 1})
    with pytest.raises(ValidationError):
        SimulationResult(fleet="f", world_model_version="w", n_paths=1, horizon=1,
                         planner="p", base_predicted_return=0.0,
                         planned_predicted_return=0.0, disagreement_mean=-0.1,
                         disagreement_max=0.0)
