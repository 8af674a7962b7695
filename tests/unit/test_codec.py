"""Every error code of the codec, reached through the public functions, plus the happy paths."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import ValidationError

from schemas.codec import (
    DEFAULT_MAX_ORIGINAL_BYTES,
    DecodeError,
    Limits,
    dead_letter,
    decode_dead_letter,
    decode_event,
    decode_item,
    decode_recommendation,
    encode_event,
    encode_item,
    encode_recommendation,
)
from schemas.models import ErrorCode, Event, EventType, Item, Recommendation, SlateItem
from streamrec.settings import load_settings

NOW = 1_717_243_200_000  # 2024-06-01T12:00:00Z
LIMITS = Limits(max_bytes=1024, max_age_ms=86_400_000, max_future_ms=60_000)
GOOD: dict[str, Any] = {
    "event_id": "e1",
    "user_id": "u1",
    "item_id": "i1",
    "type": "view",
    "ts": NOW - 1000,
}


def raw(obj: object) -> bytes:
    return json.dumps(obj).encode()


def event_error(value: bytes | None, key: bytes | None = b"u1") -> DecodeError:
    with pytest.raises(DecodeError) as info:
        decode_event(value, key, LIMITS, NOW)
    return info.value


def field_error(field: str, value: object) -> DecodeError:
    return event_error(raw({**GOOD, field: value}))


def assert_error(err: DecodeError, code: str, field: str | None, *mentions: str) -> None:
    assert err.code == code
    assert err.field == field
    assert err.detail == str(err)
    if field is not None:
        assert f"'{field}" in err.detail or err.detail.startswith(f"{field}:"), err.detail
    for text in mentions:
        assert text in err.detail, err.detail


# --- Happy paths --------------------------------------------------------------------------
def test_minimal_event_decodes_with_optional_fields_absent() -> None:
    event = decode_event(raw(GOOD), b"u1", LIMITS, NOW)
    assert (event.event_id, event.user_id, event.item_id) == ("e1", "u1", "i1")
    assert event.type is EventType.VIEW
    assert event.ts == NOW - 1000
    assert event.value is None
    assert event.context is None


def test_value_and_context_are_kept() -> None:
    event = decode_event(
        raw({**GOOD, "value": 4, "context": {"device": "ios"}}), b"u1", LIMITS, NOW
    )
    assert event.value == 4.0
    assert isinstance(event.value, float)
    assert event.context == {"device": "ios"}


def test_null_optional_fields_mean_absent() -> None:
    event = decode_event(raw({**GOOD, "value": None, "context": None}), b"u1", LIMITS, NOW)
    assert event.value is None
    assert event.context is None


def test_unknown_fields_are_ignored() -> None:
    event = decode_event(raw({**GOOD, "x_new": {"nested": [1]}}), b"u1", LIMITS, NOW)
    assert "x_new" not in event.model_dump()
    assert b"x_new" not in encode_event(event)


def test_models_are_frozen() -> None:
    event = decode_event(raw(GOOD), b"u1", LIMITS, NOW)
    with pytest.raises(ValueError, match="frozen"):
        event.user_id = "u2"


@pytest.mark.parametrize(
    ("text", "expected_ms"),
    [
        ("2024-06-01T11:59:00Z", NOW - 60_000),
        ("2024-06-01t11:59:00z", NOW - 60_000),
        ("2024-06-01T13:59:00+02:00", NOW - 60_000),
        ("2024-06-01T06:29:00-05:30", NOW - 60_000),
        ("2024-06-01T11:59:00.5Z", NOW - 59_500),
        ("2024-06-01T11:59:00.123999999Z", NOW - 60_000 + 123),
    ],
)
def test_rfc3339_timestamps_become_utc_epoch_ms(text: str, expected_ms: int) -> None:
    assert decode_event(raw({**GOOD, "ts": text}), b"u1", LIMITS, NOW).ts == expected_ms


def test_integral_float_ts_is_accepted_as_json_schema_does() -> None:
    assert decode_event(raw({**GOOD, "ts": float(NOW)}), b"u1", LIMITS, NOW).ts == NOW


def test_ts_window_edges_are_inclusive() -> None:
    for ts in (NOW - LIMITS.max_age_ms, NOW + LIMITS.max_future_ms):
        assert decode_event(raw({**GOOD, "ts": ts}), b"u1", LIMITS, NOW).ts == ts


def test_limits_from_settings() -> None:
    settings = load_settings(max_message_bytes=4096, max_event_age_days=2, max_event_future_s=1.5)
    assert Limits.from_settings(settings) == Limits(4096, 2 * 86_400_000, 1500)
    assert Limits.from_settings(load_settings()) == Limits()


# --- One test per error code --------------------------------------------------------------
@pytest.mark.parametrize("value", [None, b""])
def test_empty_value(value: bytes | None) -> None:
    assert_error(event_error(value), "empty_value", None, "expected a JSON object")


def test_oversize() -> None:
    big = raw({**GOOD, "context": {"pad": "x" * 2000}})
    assert_error(event_error(big), "oversize", None, "at most 1024 bytes", str(len(big)))


def test_invalid_utf8() -> None:
    value = raw(GOOD).replace(b'"u1"', b'"u\xff"')
    assert_error(event_error(value), "invalid_utf8", None, "UTF-8", "0xff")


@pytest.mark.parametrize(
    "value", [b"{", b'{"a":1,}', b"\xef\xbb\xbf{}", b"undefined", b'{"event_id": "\\ud800"}']
)
def test_invalid_json(value: bytes) -> None:
    assert_error(event_error(value), "invalid_json", None, "expected valid JSON")


@pytest.mark.parametrize(
    ("value", "got"),
    [(b"[]", "an array"), (b'"x"', "a string"), (b"null", "null"), (b"1", "a number")],
)
def test_not_an_object(value: bytes, got: str) -> None:
    assert_error(event_error(value), "not_an_object", None, "expected a JSON object", got)


@pytest.mark.parametrize("field", ["event_id", "user_id", "item_id", "type", "ts"])
def test_missing_field(field: str) -> None:
    obj = {k: v for k, v in GOOD.items() if k != field}
    assert_error(event_error(raw(obj)), "missing_field", field, "required")


def test_missing_fields_are_counted() -> None:
    assert_error(event_error(b"{}"), "missing_field", "event_id", "and 4 more problem(s)")


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("event_id", 7, "valid string"),
        ("user_id", None, "valid string"),
        ("item_id", ["i1"], "valid string"),
        ("ts", True, "epoch milliseconds or an RFC 3339 timestamp"),
        ("ts", [NOW], "epoch milliseconds or an RFC 3339 timestamp"),
        ("value", "4.5", "valid number"),
        ("value", True, "valid number"),
        ("ts", 1.5, "epoch milliseconds"),
        ("context", ["a"], "should be an object"),
    ],
)
def test_wrong_type(field: str, value: object, expected: str) -> None:
    assert_error(field_error(field, value), "wrong_type", field, expected)


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("event_id", "", "at least 1 character"),
        ("user_id", "u" * 257, "at most 256 characters"),
        ("ts", "yesterday", 'timezone, got "yesterday"'),
        ("ts", "2024-02-30T00:00:00Z", "impossible date"),
        ("ts", "2024-06-01T12:00:00+24:00", "offset +24:00 is out of range"),
        ("value", float("nan"), "finite number"),
        ("context", {"k": 1}, "valid string"),
        ("context", {"": "v"}, "at least 1 character"),
        ("context", {f"k{i}": "v" for i in range(65)}, "at most 64 items"),
    ],
)
def test_invalid_value(field: str, value: object, expected: str) -> None:
    assert_error(field_error(field, value), "invalid_value", field, expected)


def test_naive_timestamp_is_rejected() -> None:
    err = field_error("ts", "2024-06-01T11:59:00")
    assert_error(err, "invalid_value", "ts", "has no timezone", "2024-06-01T11:59:00")


def test_ts_longer_than_any_rfc3339_text_is_rejected_without_parsing() -> None:
    err = field_error("ts", "2" * 100)
    assert_error(err, "invalid_value", "ts", "RFC 3339 timestamp with timezone", "(100 chars)")


@pytest.mark.parametrize("value", ["like", "View", ""])
def test_unknown_event_type(value: str) -> None:
    assert_error(field_error("type", value), "unknown_event_type", "type", "'view'", value)


@pytest.mark.parametrize(
    "ts",
    [
        NOW - LIMITS.max_age_ms - 1,
        NOW + LIMITS.max_future_ms + 1,
        -1,
        "1970-01-01T00:00:00Z",
        "9999-12-31T23:59:59.999Z",
    ],
)
def test_timestamp_out_of_range(ts: object) -> None:
    err = field_error("ts", ts)
    assert_error(
        err, "timestamp_out_of_range", "ts", "2024-05-31T12:00:00.000Z", "2024-06-01T12:01:00.000Z"
    )


def test_model_without_a_window_still_bounds_ts() -> None:
    with pytest.raises(ValidationError) as info:
        Event.model_validate({**GOOD, "ts": -5})
    assert info.value.errors()[0]["type"] == "timestamp_out_of_range"
    assert Event.model_validate({**GOOD, "ts": 0}).ts == 0


def test_missing_key() -> None:
    assert_error(event_error(raw(GOOD), key=None), "missing_key", "key", "user_id", "no key")


@pytest.mark.parametrize("key", [b"u2", b"", b"\xff"])
def test_key_mismatch(key: bytes) -> None:
    assert_error(event_error(raw(GOOD), key=key), "key_mismatch", "key", "'user_id'", '"u1"')


def test_body_errors_win_over_key_errors() -> None:
    assert event_error(b"[]", key=None).code == "not_an_object"


# --- Items --------------------------------------------------------------------------------
ITEM: dict[str, Any] = {"item_id": "sku-1", "title": "Shoe"}


def item_error(value: bytes | None, key: bytes | None = b"sku-1") -> DecodeError:
    with pytest.raises(DecodeError) as info:
        decode_item(value, key, LIMITS)
    return info.value


def test_item_defaults() -> None:
    item = decode_item(raw(ITEM), b"sku-1", LIMITS)
    assert item == Item(item_id="sku-1", title="Shoe")
    assert item.categories == ()
    assert item.price is None
    assert item.available is True
    assert item.attributes == {}


def test_item_without_key_is_accepted() -> None:
    item = decode_item(raw({**ITEM, "price": 3}), None, LIMITS)
    assert item is not None
    assert item.price == 3.0


def test_tombstone_is_none() -> None:
    assert decode_item(None, b"sku-1", LIMITS) is None


def test_tombstone_needs_a_key() -> None:
    assert_error(item_error(None, key=None), "missing_key", "key", "tombstone")


def test_empty_item_value_is_not_a_tombstone() -> None:
    assert_error(item_error(b""), "empty_value", None, "empty")


def test_item_oversize() -> None:
    assert_error(item_error(b" " * 2000), "oversize", None, "1024")


def test_item_key_mismatch() -> None:
    assert_error(item_error(raw(ITEM), key=b"sku-2"), "key_mismatch", "key", "'item_id'")


@pytest.mark.parametrize(
    ("field", "value", "code"),
    [
        ("price", -1, "invalid_value"),
        ("price", "9.99", "wrong_type"),
        ("title", "", "invalid_value"),
        ("categories", ["ok", ""], "invalid_value"),
        ("categories", "kitchen", "wrong_type"),
        ("available", "yes", "wrong_type"),
        ("attributes", {"colour": 3}, "invalid_value"),
    ],
)
def test_item_field_errors(field: str, value: object, code: str) -> None:
    assert_error(item_error(raw({**ITEM, field: value})), code, field)


# --- Recommendations and dead letters -----------------------------------------------------
def rec() -> Recommendation:
    return Recommendation(
        user_id="u1",
        trigger_event_id="e1",
        slate_id="s1",
        items=(
            SlateItem(item_id="a", score=2.0, rank=1),
            SlateItem(item_id="b", score=1.0, rank=2),
        ),
        model_version="m1",
        index_version="x1",
        event_ts=NOW,
        generated_at=NOW + 12,
        latency_ms=12.0,
        next_action={EventType.VIEW: 0.9, EventType.PURCHASE: 0.1},
    )


def test_recommendation_round_trip_and_nulls_left_out() -> None:
    data = encode_recommendation(rec())
    assert decode_recommendation(data) == rec()
    assert b"coalesced_event_ids" not in data
    assert json.loads(data)["next_action"] == {"view": 0.9, "purchase": 0.1}


def test_decode_recommendation_errors() -> None:
    with pytest.raises(DecodeError) as info:
        decode_recommendation(b"")
    assert_error(info.value, "empty_value", None)
    bad = json.loads(encode_recommendation(rec()))
    bad["items"][1]["rank"] = 5
    with pytest.raises(DecodeError) as info:
        decode_recommendation(raw(bad))
    # A whole-message rule: no single field to blame.
    assert_error(info.value, "invalid_value", None, "ranked 1..2")


def test_encode_event_and_item_are_compact_utf8_json() -> None:
    event = decode_event(raw({**GOOD, "context": {"città": "Zürich"}}), b"u1", LIMITS, NOW)
    data = encode_event(event)
    assert "Zürich".encode() in data
    assert b": " not in data
    item = decode_item(raw({**ITEM, "categories": ["a"]}), None, LIMITS)
    assert item is not None
    assert json.loads(encode_item(item))["categories"] == ["a"]


def test_dead_letter_from_decode_error_keeps_bytes_and_reason() -> None:
    value = b'{"user_id": "u\xff"}'
    err = event_error(value, key=b"k\x00")
    record = decode_dead_letter(
        dead_letter(value, b"k\x00", err, "streamrec.events", 2, 41, stage="decode", now_ms=NOW)
    )
    assert record.original == value
    assert record.original_key == b"k\x00"
    assert record.original_size == len(value)
    assert record.original_truncated is False
    assert record.error == ErrorCode.INVALID_UTF8
    assert record.detail == err.detail
    assert (record.source_topic, record.source_partition, record.source_offset) == (
        "streamrec.events",
        2,
        41,
    )
    assert record.failed_at == "2024-06-01T12:00:00.000Z"
    assert record.stage == "decode"


def test_dead_letter_for_null_value_and_worker_codes() -> None:
    data = dead_letter(None, None, ("pipeline_error", "rerank: CUDA OOM"), "t", 0, 0, now_ms=0)
    record = decode_dead_letter(data)
    assert record.original is None
    assert record.original_key is None
    assert record.original_size is None
    assert record.error == "pipeline_error"
    assert json.loads(data)["original_b64"] is None
    assert record.failed_at == "1970-01-01T00:00:00.000Z"


@pytest.mark.parametrize(
    ("topic", "partition", "offset"), [("", -1, -1), (None, None, None), ("", -1001, -1)]
)
def test_dead_letter_with_unknown_origin_writes_nulls(
    topic: str | None, partition: int | None, offset: int | None
) -> None:
    data = dead_letter(b"x", b"u", ("pipeline_error", "boom"), topic, partition, offset)
    obj = json.loads(data)
    assert (obj["source_topic"], obj["source_partition"], obj["source_offset"]) == (None,) * 3
    assert decode_dead_letter(data).source_offset is None


def test_dead_letter_stamps_the_current_time_by_default() -> None:
    record = decode_dead_letter(dead_letter(b"x", None, ("unknown_item", "i9"), "t", 0, 0))
    assert record.failed_at.startswith("20")
    assert record.failed_at.endswith("Z")


def test_dead_letter_truncates_huge_values() -> None:
    value = bytes(range(256)) * 10
    record = decode_dead_letter(
        dead_letter(value, None, ("oversize", "big"), "t", 0, 0, max_original_bytes=1000)
    )
    assert record.original == value[:1000]
    assert record.original_size == len(value)
    assert record.original_truncated is True
    assert DEFAULT_MAX_ORIGINAL_BYTES * 4 // 3 < 1024 * 1024


def test_dead_letter_cuts_long_details() -> None:
    record = decode_dead_letter(dead_letter(b"x", None, ("invalid_value", "d" * 20_000), "t", 0, 0))
    assert len(record.detail) == 10_000


def test_dead_letter_rejects_unknown_codes() -> None:
    with pytest.raises(ValueError, match="unknown error code 'oops'"):
        dead_letter(b"x", None, ("oops", "?"), "t", 0, 0)


def test_decode_dead_letter_errors() -> None:
    with pytest.raises(DecodeError) as info:
        decode_dead_letter(b'{"error": "nope"}')
    assert info.value.code == "missing_field"
    assert info.value.field == "original_b64"
