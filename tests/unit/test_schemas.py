"""The JSON Schema files and the pydantic models describe the same messages.

Producers in other languages validate with the schema files; streamrec decodes with the models.
These tests fail as soon as one changes without the other. The hypothesis strategies here are
also used by ``test_codec_properties.py``.
"""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator
from pydantic import BaseModel, ValidationError

from schemas import SCHEMA_NAMES, schema_path
from schemas.models import (
    BASE64_PATTERN,
    MAX_COALESCED,
    MAX_ID_LEN,
    MAX_LIST_LEN,
    MAX_MAP_KEY_LEN,
    MAX_MAP_LEN,
    MAX_MAP_VALUE_LEN,
    MAX_SLATE_LEN,
    MAX_TEXT_LEN,
    MAX_TITLE_LEN,
    MAX_TS_MS,
    MAX_TS_TEXT_LEN,
    RFC3339_PATTERN,
    UTC_TIME_PATTERN,
    DeadLetter,
    ErrorCode,
    Event,
    EventType,
    Item,
    Recommendation,
    SlateItem,
)
from serving.types import EVENT_TYPES

MODELS: dict[str, type[BaseModel]] = {
    "event": Event,
    "item": Item,
    "recommendation": Recommendation,
    "dlq": DeadLetter,
}
DOCS = Path(__file__).resolve().parents[2] / "docs" / "wire-format.md"


def load(name: str) -> dict[str, Any]:
    return json.loads(schema_path(name).read_text(encoding="utf-8"))


VALIDATORS = {name: Draft202012Validator(load(name)) for name in SCHEMA_NAMES}


def schema_accepts(name: str, obj: object) -> bool:
    return VALIDATORS[name].is_valid(obj)


def model_accepts(name: str, obj: object) -> bool:
    # Through JSON, as on the wire: the models are used with model_validate_json.
    try:
        MODELS[name].model_validate_json(json.dumps(obj))
    except ValidationError:
        return False
    return True


# --- Strategies (valid messages) ----------------------------------------------------------
ids = st.one_of(
    st.text(min_size=1, max_size=12),
    st.text(st.characters(codec="utf-8"), min_size=MAX_ID_LEN, max_size=MAX_ID_LEN),
)
small_text = st.text(max_size=20)
str_maps = st.dictionaries(st.text(min_size=1, max_size=10), small_text, max_size=5)
finite = st.one_of(st.floats(allow_nan=False, allow_infinity=False), st.integers(-(10**15), 10**15))
json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-(10**6), 10**6), small_text)
# Fields a newer producer might add; streamrec must ignore them.
extras = st.dictionaries(st.text(min_size=1, max_size=8).map(lambda s: "x_" + s), json_scalars)

# Whole instants from 1970 to 9999, so that every offset representation stays in range.
instants_ms = st.integers(86_400_000, MAX_TS_MS - 86_400_000)


@st.composite
def rfc3339(draw: st.DrawFn, utc_only: bool = False) -> tuple[str, int]:
    """An RFC 3339 text and the epoch ms it denotes (sub-ms digits are truncated)."""
    ms = draw(instants_ms)
    minutes = 0 if utc_only else draw(st.integers(-23 * 60 - 59, 23 * 60 + 59))
    tz = UTC if minutes == 0 else timezone(timedelta(minutes=minutes))
    dt = (datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=ms)).astimezone(tz)
    digits = draw(st.sampled_from(["", "3", "6", "9"]))
    frac = "" if not digits else "." + f"{dt.microsecond // 1000:03d}".ljust(int(digits), "7")
    if utc_only or minutes == 0:
        offset = draw(st.sampled_from(["Z", "z", "+00:00", "-00:00"])) if not utc_only else "Z"
    else:
        sign = "-" if minutes < 0 else "+"
        offset = f"{sign}{abs(minutes) // 60:02d}:{abs(minutes) % 60:02d}"
    sep = "T" if utc_only else draw(st.sampled_from(["T", "t"]))
    text = (
        f"{dt.year:04d}-{dt.month:02d}-{dt.day:02d}{sep}"
        f"{dt.hour:02d}:{dt.minute:02d}:{dt.second:02d}{frac}{offset}"
    )
    return text, ms - ms % 1000 + (ms % 1000 if digits else 0)


@st.composite
def events(draw: st.DrawFn) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "event_id": draw(ids),
        "user_id": draw(ids),
        "item_id": draw(ids),
        "type": draw(st.sampled_from(EVENT_TYPES)),
        "ts": draw(st.one_of(st.integers(0, MAX_TS_MS), rfc3339().map(lambda p: p[0]))),
    }
    if draw(st.booleans()):
        obj["value"] = draw(st.one_of(st.none(), finite))
    if draw(st.booleans()):
        obj["context"] = draw(st.one_of(st.none(), str_maps))
    return {**draw(extras), **obj}


@st.composite
def items(draw: st.DrawFn) -> dict[str, Any]:
    obj: dict[str, Any] = {"item_id": draw(ids), "title": draw(st.text(min_size=1, max_size=30))}
    optional = {
        "description": st.one_of(st.none(), st.text(max_size=50)),
        "categories": st.lists(st.text(min_size=1, max_size=10), max_size=5),
        "price": st.one_of(st.none(), st.floats(0, 1e9), st.integers(0, 10**9)),
        "available": st.booleans(),
        "attributes": str_maps,
    }
    for name, strategy in optional.items():
        if draw(st.booleans()):
            obj[name] = draw(strategy)
    return {**draw(extras), **obj}


@st.composite
def recommendations(draw: st.DrawFn) -> dict[str, Any]:
    slate = draw(st.lists(ids, max_size=8, unique=True))
    obj: dict[str, Any] = {
        "user_id": draw(ids),
        "trigger_event_id": draw(ids),
        "slate_id": draw(ids),
        "items": [
            {"item_id": item, "score": draw(finite), "rank": rank}
            for rank, item in enumerate(slate, start=1)
        ],
        "model_version": draw(ids),
        "index_version": draw(ids),
        "event_ts": draw(st.integers(0, MAX_TS_MS)),
        "generated_at": draw(st.integers(0, MAX_TS_MS)),
        "latency_ms": draw(st.one_of(st.floats(0, 1e6), st.integers(0, 10**6))),
    }
    if draw(st.booleans()):
        obj["next_action"] = draw(
            st.dictionaries(st.sampled_from(EVENT_TYPES), st.floats(0, 1), max_size=6)
        )
    if draw(st.booleans()):
        obj["coalesced_event_ids"] = draw(st.lists(ids, max_size=4))
    return obj


@st.composite
def dead_letters(draw: st.DrawFn) -> dict[str, Any]:
    def b64(raw: bytes | None) -> str | None:
        return None if raw is None else base64.b64encode(raw).decode()

    original = draw(st.one_of(st.none(), st.binary(max_size=64)))
    obj: dict[str, Any] = {
        "original_b64": b64(original),
        "original_key_b64": b64(draw(st.one_of(st.none(), st.binary(max_size=16)))),
        "error": draw(st.sampled_from([code.value for code in ErrorCode])),
        "detail": draw(small_text),
        "source_topic": draw(ids),
        "source_partition": draw(st.integers(0, 1000)),
        "source_offset": draw(st.integers(0, 2**63 - 1)),
        "failed_at": draw(rfc3339(utc_only=True))[0],
    }
    if draw(st.booleans()):
        obj["original_size"] = None if original is None else len(original)
        obj["original_truncated"] = False
    if draw(st.booleans()):
        obj["stage"] = draw(st.one_of(st.none(), ids))
    return obj


VALID = {
    "event": events(),
    "item": items(),
    "recommendation": recommendations(),
    "dlq": dead_letters(),
}

# --- Mutations that make a valid message invalid for both validators ----------------------
too_long_id = "x" * (MAX_ID_LEN + 1)
INVALID_FIELDS: dict[str, dict[str, list[Any]]] = {
    "event": {
        "event_id": ["", too_long_id, 7, None],
        "user_id": [123, [], {}, ""],
        "item_id": [None, 1.5],
        "type": ["like", "VIEW", 1, None],
        "ts": [True, -1, MAX_TS_MS + 1, 1.5, "yesterday", "2024-06-01T12:00:00", [1], None],
        "value": ["4.5", True, [1.0]],
        "context": [
            [],
            "a=b",
            {"k": 1},
            {"": "v"},
            {"k": "v" * (MAX_MAP_VALUE_LEN + 1)},
            {f"k{i}": "v" for i in range(MAX_MAP_LEN + 1)},
        ],
    },
    "item": {
        "item_id": ["", too_long_id, 5],
        "title": ["", "t" * (MAX_TITLE_LEN + 1), None],
        "description": ["d" * (MAX_TEXT_LEN + 1), 3],
        "categories": ["kitchen", [""], [1], ["c"] * (MAX_LIST_LEN + 1), None],
        "price": [-0.01, "9.99", True],
        "available": ["yes", 1, None],
        "attributes": [None, {"k": 1}, {"k" * (MAX_MAP_KEY_LEN + 1): "v"}],
    },
    "recommendation": {
        "items": [
            None,
            [{"item_id": "a", "score": 1.0}],
            [{"item_id": "a", "score": "x", "rank": 1}],
            [{"item_id": "a", "score": 1.0, "rank": 0}],
        ],
        "model_version": ["", None],
        "event_ts": [-1, "1717243200123", MAX_TS_MS + 1],
        "latency_ms": [-0.5, "fast"],
        "next_action": [{"like": 0.5}, {"view": 1.5}, []],
        "coalesced_event_ids": [[""], "e1", ["e"] * (MAX_COALESCED + 1)],
    },
    "dlq": {
        "original_b64": ["not base64!", "abc", 5],
        "error": ["nope", None],
        "detail": [None, "d" * (MAX_TEXT_LEN + 1)],
        "source_topic": ["", 3],
        "source_partition": [-1, "0"],
        "source_offset": [-1, 1.5],
        "failed_at": ["2024-06-01T12:00:00+02:00", "2024-06-01", 0],
        "stage": [""],
    },
}


@st.composite
def invalid(draw: st.DrawFn, name: str) -> dict[str, Any]:
    obj = dict(draw(VALID[name]))
    schema = load(name)
    if draw(st.booleans()):
        del obj[draw(st.sampled_from(sorted(schema["required"])))]
    else:
        field = draw(st.sampled_from(sorted(INVALID_FIELDS[name])))
        obj[field] = draw(st.sampled_from(INVALID_FIELDS[name][field]))
    return obj


# --- Tests --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", SCHEMA_NAMES)
def test_schema_file_is_valid_draft_2020_12(name: str) -> None:
    schema = load(name)
    Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["$id"].endswith(f"/{name}.schema.json")
    assert schema["title"]
    assert schema["description"]
    assert schema["examples"]


@pytest.mark.parametrize("name", SCHEMA_NAMES)
def test_every_example_validates_with_jsonschema_and_pydantic(name: str) -> None:
    for example in load(name)["examples"]:
        VALIDATORS[name].validate(example)
        MODELS[name].model_validate_json(json.dumps(example))


def _required(model: type[BaseModel]) -> set[str]:
    return {name for name, field in model.model_fields.items() if field.is_required()}


@pytest.mark.parametrize("name", SCHEMA_NAMES)
def test_property_names_and_required_sets_agree(name: str) -> None:
    schema = load(name)
    model = MODELS[name]
    assert set(schema["properties"]) == set(model.model_fields)
    assert set(schema["required"]) == _required(model)
    # Forward compatibility: unknown fields are allowed by the schema, ignored by the model.
    assert schema["additionalProperties"] is True
    assert model.model_config.get("extra") == "ignore"


def test_slate_item_agrees_with_the_items_subschema() -> None:
    sub = load("recommendation")["properties"]["items"]["items"]
    assert set(sub["properties"]) == set(SlateItem.model_fields)
    assert set(sub["required"]) == _required(SlateItem)


def test_enums_agree() -> None:
    assert tuple(t.value for t in EventType) == EVENT_TYPES
    assert tuple(load("event")["properties"]["type"]["enum"]) == EVENT_TYPES
    next_action = load("recommendation")["properties"]["next_action"]
    assert tuple(next_action["propertyNames"]["enum"]) == EVENT_TYPES
    assert tuple(load("dlq")["properties"]["error"]["enum"]) == tuple(c.value for c in ErrorCode)


def test_limits_agree() -> None:
    event, item = load("event")["properties"], load("item")["properties"]
    rec, dlq = load("recommendation")["properties"], load("dlq")["properties"]
    for props in (event, item, rec):
        for name in ("event_id", "user_id", "item_id", "trigger_event_id", "slate_id"):
            if name in props:
                assert props[name]["maxLength"] == MAX_ID_LEN, name
    assert item["title"]["maxLength"] == MAX_TITLE_LEN
    assert item["description"]["maxLength"] == MAX_TEXT_LEN
    assert dlq["detail"]["maxLength"] == MAX_TEXT_LEN
    assert item["categories"]["maxItems"] == MAX_LIST_LEN
    for mapping in (event["context"], item["attributes"]):
        assert mapping["maxProperties"] == MAX_MAP_LEN
        assert mapping["propertyNames"]["maxLength"] == MAX_MAP_KEY_LEN
        assert mapping["additionalProperties"]["maxLength"] == MAX_MAP_VALUE_LEN
    assert rec["items"]["maxItems"] == MAX_SLATE_LEN
    assert rec["coalesced_event_ids"]["maxItems"] == MAX_COALESCED
    assert event["ts"]["oneOf"][0]["maximum"] == MAX_TS_MS
    assert event["ts"]["oneOf"][1]["pattern"] == RFC3339_PATTERN
    assert event["ts"]["oneOf"][1]["maxLength"] == MAX_TS_TEXT_LEN
    assert dlq["original_b64"]["pattern"] == dlq["original_key_b64"]["pattern"] == BASE64_PATTERN
    assert dlq["failed_at"]["pattern"] == UTC_TIME_PATTERN


def test_schema_path_rejects_unknown_names() -> None:
    with pytest.raises(ValueError, match="unknown schema 'events'"):
        schema_path("events")


def test_docs_list_every_error_code_and_message() -> None:
    docs = DOCS.read_text(encoding="utf-8")
    for code in ErrorCode:
        assert f"`{code.value}`" in docs, code
    for name in SCHEMA_NAMES:
        assert f"{name}.schema.json" in docs


@pytest.mark.parametrize("name", SCHEMA_NAMES)
@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_generated_valid_messages_pass_both(name: str, data: st.DataObject) -> None:
    obj = data.draw(VALID[name])
    assert schema_accepts(name, obj), obj
    assert model_accepts(name, obj), obj


@pytest.mark.parametrize("name", SCHEMA_NAMES)
@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_generated_invalid_messages_fail_both(name: str, data: st.DataObject) -> None:
    obj = data.draw(invalid(name))
    assert not schema_accepts(name, obj), obj
    assert not model_accepts(name, obj), obj


def test_rules_beyond_the_schema_are_enforced_by_the_models() -> None:
    # Documented in the schema descriptions; the schema itself accepts these.
    rec = load("recommendation")["examples"][0]
    out_of_order = {**rec, "items": [{**s, "rank": 3 - s["rank"]} for s in rec["items"]]}
    repeated = {**rec, "items": [{**s, "item_id": "same"} for s in rec["items"]]}
    dlq = {**load("dlq")["examples"][0], "failed_at": "2024-02-31T00:00:00Z"}
    for name, obj, message in [
        ("recommendation", out_of_order, "must be ranked 1..2 in order"),
        ("recommendation", repeated, "must not repeat an item_id"),
        ("dlq", dlq, "impossible date"),
    ]:
        assert schema_accepts(name, obj)
        with pytest.raises(ValidationError, match=message):
            MODELS[name].model_validate_json(json.dumps(obj))
