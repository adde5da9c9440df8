"""plasma.protocol.wire (msgspec, the device's view) against messages (pydantic, the contract).

Differential properties: a document valid for the pydantic model decodes to the same values in
the wire struct and back; a mutated or garbage document is accepted by the wire struct iff
pydantic accepts it (wrong types, bools for ints, NaN/1e999, extra or missing fields, bad
patterns, a trailing newline after an id, out-of-range numbers, the model-level checks).
"""

from __future__ import annotations

import copy
import json
import math
import os
from typing import Any, Literal

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, Field, ValidationError

from plasma.protocol import PlasmaError, messages, wire
from plasma.protocol.errors import MessageInvalid
from plasma.protocol.messages import Id, Message, Slot
from plasma.protocol.telemetry import MAX_ACT_DIM, MAX_OBS_DIM, MAX_ROWS


class PydanticFrameHeader(Message):
    """The telemetry frame header as it was defined with pydantic (the oracle for wire's)."""

    schema_version: Literal[1] = 1
    fleet: Id
    device: Id
    rows: int = Field(ge=0, le=MAX_ROWS)
    obs_dim: int = Field(ge=1, le=MAX_OBS_DIM)
    act_dim: int = Field(ge=1, le=MAX_ACT_DIM)
    seq: int = Field(default=0, ge=0, le=2**63 - 1)
    created_at: float = 0.0
    slots: tuple[Slot, ...] | None = Field(default=None, min_length=1, max_length=16)


PAIRS: dict[str, tuple[type[BaseModel], type[wire.WireStruct]]] = {
    "LayerSpec": (messages.LayerSpec, wire.LayerSpec),
    "Provenance": (messages.Provenance, wire.Provenance),
    "InstructionPacket": (messages.InstructionPacket, wire.PacketHeader),
    "Reason": (messages.Reason, wire.Reason),
    "AuditRecord": (messages.AuditRecord, wire.AuditRecord),
    "Status": (messages.Status, wire.Status),
    "LiveVersions": (messages.LiveVersions, wire.LiveVersions),
    "FrameHeader": (PydanticFrameHeader, wire.FrameHeader),
}
FACTORY_FIELDS = {"packet_id", "record_id", "created_at", "timestamp"}
"""Fields with a default_factory: each side makes its own value when the document has none."""


# -- valid documents ----------------------------------------------------------------------------
ids = st.from_regex(r"\A[A-Za-z0-9_-]{1,64}\Z")
hex32 = st.text("0123456789abcdef", min_size=32, max_size=32)
sha256 = st.text("0123456789abcdef", min_size=64, max_size=64)
finite = st.floats(allow_nan=False, allow_infinity=False)
nonneg_float = st.floats(min_value=0, max_value=1e300, allow_nan=False)
big_nonneg = st.one_of(st.integers(0, 2**31), st.integers(0, 2**80))
texts = st.text(max_size=40)

layer_spec = st.fixed_dictionaries({
    "name": st.from_regex(r"\A[A-Za-z0-9_.:/-]{1,40}\Z"),
    "in_features": st.integers(1, 65536), "out_features": st.integers(1, 65536),
})
provenance = st.fixed_dictionaries({}, optional={
    "trace_count": big_nonneg, "trace_from": finite, "trace_to": finite,
    "world_model_version": st.text(max_size=128), "simulation_id": st.text(max_size=64),
    "note": st.text(max_size=256),
})
reason = st.fixed_dictionaries({
    "code": st.from_regex(r"\A[a-z0-9_]{1,64}\Z"), "message": st.text(max_size=1000),
}, optional={"check": st.text(max_size=64)})


@st.composite
def packet_header(draw: st.DrawFn) -> dict[str, Any]:
    slot = draw(st.sampled_from(["fleet", "device"]))
    created = draw(st.floats(0, 1e12))
    doc: dict[str, Any] = {
        "key_id": draw(hex32), "fleet": draw(ids), "slot": slot,
        "version": draw(st.integers(1, 2**53 - 1)), "base_sha256": draw(sha256),
        "created_at": created, "expires_at": created + draw(st.floats(1, 1e9)),
        "rank": draw(st.integers(1, 64)), "alpha": draw(finite),
        "dtype": draw(st.sampled_from(["int8", "fp16", "fp32"])),
        "layers": draw(st.lists(layer_spec, max_size=4, unique_by=lambda d: d["name"])),
        "payload_len": draw(big_nonneg), "payload_sha256": draw(sha256),
    }
    if slot == "device":
        doc["device"] = draw(ids)
    extra = draw(st.fixed_dictionaries({}, optional={
        "schema_version": st.just(1), "packet_id": hex32, "priority": st.integers(0, 9),
        "provenance": provenance, "device": st.none() if slot == "fleet" else ids,
    }))
    return {**doc, **extra}


audit_record = st.fixed_dictionaries({
    "auditor": st.sampled_from(["edge", "judicial"]), "subject": st.text(max_size=256),
    "verdict": st.sampled_from(["accepted", "rejected", "rolled_back", "published", "blocked",
                                "corrected"]),
}, optional={
    "schema_version": st.just(1), "record_id": hex32, "fleet": st.none() | ids,
    "device": st.none() | ids, "slot": st.sampled_from([None, "fleet", "device"]),
    "version": st.none() | st.integers() | st.integers(-2**80, 2**80),
    "reasons": st.lists(reason, max_size=3), "scores": st.dictionaries(texts, finite, max_size=4),
    "created_at": finite,
})
status = st.fixed_dictionaries({
    "fleet": ids, "device": ids, "state": st.sampled_from(["online", "offline"]),
}, optional={
    "schema_version": st.just(1), "base_sha256": st.none() | sha256,
    "versions": st.dictionaries(st.sampled_from(["fleet", "device"]), big_nonneg,
                                max_size=3),
    "fleet_version": st.none() | big_nonneg, "device_version": st.none() | big_nonneg,
    "steps": st.none() | big_nonneg, "rolling_reward": st.none() | finite,
    "since": st.none() | finite, "timestamp": finite,
})
live_versions = st.fixed_dictionaries({
    "fleet": ids, "device": ids,
    "versions": st.dictionaries(st.sampled_from(["fleet", "device"]), big_nonneg, max_size=3),
}, optional={
    "schema_version": st.just(1), "base_sha256": st.none() | sha256,
    "steps": st.none() | big_nonneg, "since": st.none() | finite, "timestamp": finite,
})
frame_header = st.fixed_dictionaries({
    "fleet": ids, "device": ids, "rows": st.integers(0, MAX_ROWS),
    "obs_dim": st.integers(1, MAX_OBS_DIM), "act_dim": st.integers(1, MAX_ACT_DIM),
}, optional={"schema_version": st.just(1), "seq": st.integers(0, 2**63 - 1),
             "created_at": finite,
             "slots": st.none() | st.lists(st.sampled_from(["fleet", "device"]), min_size=1,
                                           max_size=3)})

VALID: dict[str, st.SearchStrategy[dict[str, Any]]] = {
    "LayerSpec": layer_spec, "Provenance": provenance, "InstructionPacket": packet_header(),
    "Reason": reason, "AuditRecord": audit_record, "Status": status,
    "LiveVersions": live_versions, "FrameHeader": frame_header,
}
documents = st.sampled_from(sorted(PAIRS)).flatmap(
    lambda name: st.tuples(st.just(name), VALID[name]))


def _comparable(dump: dict[str, Any], doc: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in dump.items() if not (k in FACTORY_FIELDS and k not in doc)}


def _json_equal(a: Any, b: Any) -> bool:
    """Equal as JSON values: 5 == 5.0, tuples == lists, floats exactly."""
    return json.loads(json.dumps(a)) == json.loads(json.dumps(b))


# -- round trips --------------------------------------------------------------------------------
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(documents)
def test_pydantic_json_decodes_to_the_same_wire_values(case: tuple[str, dict[str, Any]]) -> None:
    name, doc = case
    model, struct = PAIRS[name]
    p = model.model_validate_json(json.dumps(doc))
    w = struct.model_validate_json(p.model_dump_json().encode())
    assert _json_equal(w.model_dump(mode="json"), p.model_dump(mode="json"))
    assert w.model_dump_json() == p.model_dump_json() or \
        json.loads(w.model_dump_json()) == json.loads(p.model_dump_json())


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(documents)
def test_wire_json_validates_with_pydantic(case: tuple[str, dict[str, Any]]) -> None:
    """What the edge sends (records, status, frame headers) the server parses, same values."""
    name, doc = case
    model, struct = PAIRS[name]
    w = struct(**{k: _as_struct(name, k, v) for k, v in doc.items()})  # built like the edge does
    p = model.model_validate_json(w.model_dump_json())
    assert _json_equal(p.model_dump(mode="json"), w.model_dump(mode="json"))
    assert struct.model_validate_json(w.model_dump_json()) == w


def _as_struct(name: str, key: str, value: Any) -> Any:
    if key == "layers":
        return tuple(wire.LayerSpec(**v) for v in value)
    if key == "reasons":
        return tuple(wire.Reason(**v) for v in value)
    if key == "provenance":
        return wire.Provenance(**value)
    return value


# -- mutations: accepted by one iff accepted by the other ---------------------------------------
class Raw:
    """A JSON token written as is (NaN, 1e999...): json.dumps cannot produce them."""

    def __init__(self, text: str) -> None:
        self.text = text


GARBAGE: list[Any] = [
    True, False, None, 0, 1, -1, 2, 9, 10, 64, 65, 65536, 65537, 2**31, 2**53 - 1, 2**53,
    2**63 - 1, 2**63, 2**64, -2**63 - 1, 10**30, -10**30, 0.0, -0.0, 0.5, 1.0, -1.5, 2.0, 1e308,
    -1e308, 5e-324, "", "a", "A", "1", "1.5", "true", "null", "fleet", "device", "int8", "fp32",
    "online", "offline", "accepted", "edge", "judicial", "x" * 65, "a" * 129, "a" * 257,
    "a" * 1001, "abc\n", "a/b", "a b", "\u00e9", "0" * 32, "f" * 32, "F" * 32, "0" * 64, "l0",
    [], [1], [1.5], ["a"], {}, {"a": 1}, {"a": "b"}, {"name": "l0", "in_features": 1,
                                                    "out_features": 1},
    {"code": "x", "message": "y"},
    Raw("NaN"), Raw("-NaN"), Raw("Infinity"), Raw("-Infinity"), Raw("inf"), Raw("1e999"),
    Raw("-1e999"), Raw("1E2"), Raw("1.0e0"), Raw("-0"), Raw("1e-400"), Raw("0.1e1"),
    Raw("100000000000000000000000000000000000000"),
]


def _paths(node: Any, at: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [at]
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, at + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, at + (i,))
    return out


def _get(node: Any, path: tuple[Any, ...]) -> Any:
    for p in path:
        node = node[p]
    return node


def _dumps(node: Any) -> str:
    raws: list[str] = []

    def walk(n: Any) -> Any:
        if isinstance(n, Raw):
            raws.append(n.text)
            return f"@@RAW{len(raws) - 1}@@"
        if isinstance(n, dict):
            return {k: walk(v) for k, v in n.items()}
        if isinstance(n, list):
            return [walk(v) for v in n]
        return n

    text = json.dumps(walk(node), ensure_ascii=False)
    for i, r in enumerate(raws):
        text = text.replace(f'"@@RAW{i}@@"', r)
    return text


MUTATIONS = ["replace", "replace", "replace", "delete", "extra", "newline", "nudge", "consistency"]


@st.composite
def mutated(draw: st.DrawFn) -> tuple[str, dict[str, Any], str]:
    name, doc = draw(documents)
    doc = json.loads(json.dumps(doc))  # a deep copy in JSON shapes (tuples -> lists)
    for _ in range(draw(st.integers(1, 2))):
        op = draw(st.sampled_from(MUTATIONS))
        path = draw(st.sampled_from(_paths(doc)))
        parent = _get(doc, path[:-1]) if path else None
        key = path[-1] if path else None
        if op == "replace" and path:
            value = draw(st.sampled_from(GARBAGE) | st.integers() | finite | texts)
            parent[key] = copy.deepcopy(value)  # GARBAGE holds shared lists and dicts
        elif op == "delete" and path and isinstance(parent, dict):
            del parent[key]
        elif op == "extra":
            target = _get(doc, path)
            if isinstance(target, dict):
                target[draw(st.sampled_from(["surprise", "extra", "Fleet", "schema"]))] = 1
        elif op == "newline" and path and isinstance(parent[key], str):
            parent[key] = parent[key] + draw(st.sampled_from(["\n", " ", "\t", "\x00"]))
        elif op == "nudge" and path and isinstance(parent[key], (int, float)) \
                and not isinstance(parent[key], bool):
            parent[key] = parent[key] + draw(st.sampled_from([-1, 1, -2**53, 2**53, 0.5]))
        elif op == "consistency" and name == "InstructionPacket" and isinstance(doc, dict):
            _break_consistency(doc, draw(st.sampled_from(
                ["slot", "device", "expires", "dup", "expires_lt"])))
    return name, doc, _dumps(doc)


def _break_consistency(doc: dict[str, Any], what: str) -> None:
    """The model-level checks: slot vs device, expires_at > created_at, unique layer names."""
    created = doc.get("created_at")
    if what == "slot":
        doc["slot"] = "fleet" if doc.get("slot") == "device" else "device"
    elif what == "device":
        doc["device"] = None if doc.get("device") else "d1"
    elif what in ("expires", "expires_lt") and isinstance(created, (int, float)):
        doc["expires_at"] = created if what == "expires" else created - 1
    elif what == "dup" and isinstance(doc.get("layers"), list) and doc["layers"] \
            and isinstance(doc["layers"][0], dict):
        doc["layers"].append(dict(doc["layers"][0]))


def _known_stricter(doc: Any) -> bool:
    """Where wire is deliberately stricter than pydantic: ``true`` or ``1.0`` for ``Literal[1]``.

    pydantic accepts JSON ``true`` and ``1.0`` (also written ``0.1e1``) as ``schema_version``
    (== 1 in Python) and stores 1; the wire structs want the integer itself.  Nothing produces
    either.
    """
    if not isinstance(doc, dict):
        return False
    version = doc.get("schema_version")
    if isinstance(version, Raw):  # a number token written as is, e.g. 0.1e1 (== 1.0)
        try:
            version = float(version.text)
        except ValueError:
            return False
    return version is True or isinstance(version, float)


def _accepts(fn: Any, raw: bytes) -> tuple[bool, Any]:
    try:
        return True, fn(raw)
    except (ValidationError, MessageInvalid) as exc:
        return False, exc


@settings(max_examples=int(os.environ.get("WIRE_EXAMPLES", "3000")), deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(mutated())
def test_wire_accepts_iff_pydantic_accepts(case: tuple[str, dict[str, Any], str]) -> None:
    name, doc, text = case
    model, struct = PAIRS[name]
    raw = text.encode()
    p_ok, p = _accepts(model.model_validate_json, raw)
    w_ok, w = _accepts(struct.model_validate_json, raw)
    if p_ok and not w_ok and _known_stricter(doc):
        return
    assert p_ok == w_ok, f"pydantic {'accepts' if p_ok else 'refuses'} {text!r}: {p} / {w}"
    if p_ok:
        assert _json_equal(_comparable(w.model_dump(mode="json"), doc),
                           _comparable(p.model_dump(mode="json"), doc))


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(sorted(PAIRS)), st.binary(max_size=64) | st.text(max_size=64).map(str.encode))
def test_garbage_bytes_are_refused_alike(name: str, raw: bytes) -> None:
    model, struct = PAIRS[name]
    p_ok, _ = _accepts(model.model_validate_json, raw)
    w_ok, _ = _accepts(struct.model_validate_json, raw)
    assert p_ok == w_ok


# -- construction validates like pydantic did ---------------------------------------------------
def _record(**kw: Any) -> wire.AuditRecord:
    return wire.AuditRecord(**{"auditor": "edge", "subject": "s", "verdict": "accepted", **kw})


@pytest.mark.parametrize("bad", [
    {"scores": {"a": math.nan}}, {"scores": {"a": math.inf}}, {"created_at": -math.inf},
    {"version": True}, {"version": 1.0}, {"fleet": "a/b"}, {"fleet": "ok\n"}, {"verdict": "maybe"},
    {"subject": "x" * 257}, {"subject": b"bytes"}, {"reasons": ("not a reason",)},
    {"scores": {1: 1.0}}, {"record_id": "XYZ"},
])
def test_building_a_record_validates(bad: dict[str, Any]) -> None:
    with pytest.raises(MessageInvalid) as info:
        _record(**bad)
    assert isinstance(info.value, ValueError) and isinstance(info.value, PlasmaError)
    assert info.value.field and info.value.field.split(".")[0] == next(iter(bad))
    with pytest.raises(ValidationError):  # the contract agrees
        messages.AuditRecord(**{"auditor": "edge", "subject": "s", "verdict": "accepted", **bad})


@pytest.mark.parametrize("build", [
    lambda: wire.Reason(code="Bad", message="m"),
    lambda: wire.Reason(code="ok", message="m" * 1001),
    lambda: wire.Status(fleet="f", device="d", state="online", steps=-1),
    lambda: wire.Status(fleet="f", device="d", state="online", rolling_reward=math.nan),
    lambda: wire.Status(fleet="f", device="d", state="offline", since=math.inf),
    lambda: wire.Status(fleet="f", device="d", state="offline", device_version=-1),
    lambda: wire.LiveVersions(fleet="f", device="d", versions={"fleet": -1}),
    lambda: wire.LiveVersions(fleet="f", device="d", versions={"cloud": 1}),
    lambda: wire.LiveVersions.model_validate_json(b'{"fleet": "f", "device": "d"}'),
    lambda: wire.FrameHeader(fleet="f", device="d", rows=MAX_ROWS + 1, obs_dim=1, act_dim=1),
    lambda: wire.FrameHeader(fleet="f", device="d", rows=1, obs_dim=1, act_dim=1, seq=True),
    lambda: wire.LayerSpec(name="l0", in_features=0, out_features=1),
])
def test_building_other_structs_validates(build: Any) -> None:
    with pytest.raises(MessageInvalid):
        build()


def test_model_level_checks_run_on_construction_and_decode(make_header: Any) -> None:
    good = make_header()
    fields = {k: getattr(good, k) for k in type(good).model_fields}
    fields["layers"] = tuple(wire.LayerSpec(**s.model_dump()) for s in good.layers)
    fields["provenance"] = wire.Provenance(**good.provenance.model_dump())
    header = wire.PacketHeader(**fields)
    assert header.target == good.target == good.fleet
    for change, words in ((dict(slot="device"), "slot 'device'"),
                          (dict(expires_at=good.created_at), "expires_at"),
                          (dict(layers=fields["layers"] * 2), "duplicate")):
        with pytest.raises(MessageInvalid, match=words):
            wire.PacketHeader(**{**fields, **change})
        doc = {**good.model_dump(mode="json"),
               **{k: [x.model_dump() for x in v] if isinstance(v, tuple) else v
                  for k, v in change.items()}}
        with pytest.raises(MessageInvalid, match=words):
            wire.PacketHeader.model_validate_json(json.dumps(doc))
        with pytest.raises(ValidationError):
            messages.InstructionPacket.model_validate_json(json.dumps(doc))


def test_pydantic_like_surface() -> None:
    r = _record(reasons=[{"code": "x", "message": "y"}], scores={"a": 1})
    assert r.reasons == (wire.Reason(code="x", message="y"),)  # normalized to a tuple
    assert r.scores == {"a": 1.0} and isinstance(r.scores["a"], float)
    assert r.ok and not r.model_copy(update={"verdict": "rejected"}).ok
    with pytest.raises(MessageInvalid):
        r.model_copy(update={"scores": {"a": math.nan}})
    assert wire.AuditRecord.model_validate(r.model_dump()) == r
    assert wire.AuditRecord.model_validate(r) is r
    assert json.loads(r.model_dump_json(indent=2)) == r.model_dump(mode="json")
    assert messages.AuditRecord.model_validate_json(r.model_dump_json()).model_dump(mode="json") \
        == r.model_dump(mode="json")
    with pytest.raises(AttributeError):
        r.verdict = "rejected"  # type: ignore[misc]  # frozen
    with pytest.raises(MessageInvalid) as info:
        wire.AuditRecord.model_validate_json(b"{not json")
    assert info.value.code == "bad_message"
