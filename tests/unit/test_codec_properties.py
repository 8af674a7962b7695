"""Property tests of the codec: round trips, total error handling, and the code each fault gets."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.codec import (
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
from schemas.models import MAX_ID_LEN, MAX_TS_MS, ErrorCode, Recommendation
from tests.unit.test_schemas import dead_letters, events, items, recommendations, rfc3339

NOW = 1_717_243_200_000
# A window covering every representable time, for tests that are not about the window.
WIDE = Limits(max_bytes=1 << 20, max_age_ms=NOW, max_future_ms=MAX_TS_MS - NOW)
TIGHT = Limits(max_bytes=1 << 20, max_age_ms=86_400_000, max_future_ms=60_000)
REQUIRED = ("event_id", "user_id", "item_id", "type", "ts")
EXAMPLES = settings(max_examples=120, deadline=None)


def raw(obj: object) -> bytes:
    # ASCII-only JSON, so that cutting it anywhere cannot split a UTF-8 sequence.
    return json.dumps(obj).encode()


def code_of(value: bytes | None, key: bytes | None, limits: Limits = WIDE) -> DecodeError:
    try:
        decode_event(value, key, limits, NOW)
    except DecodeError as err:
        return err
    raise AssertionError(f"accepted {value!r}")


# --- Round trips --------------------------------------------------------------------------
@EXAMPLES
@given(events())
def test_event_round_trip(obj: dict[str, Any]) -> None:
    event = decode_event(raw(obj), obj["user_id"].encode(), WIDE, NOW)
    assert (event.event_id, event.user_id, event.item_id) == (
        obj["event_id"],
        obj["user_id"],
        obj["item_id"],
    )
    assert event.type == obj["type"]
    assert event.value == obj.get("value")
    assert event.context == obj.get("context")
    again = decode_event(encode_event(event), event.user_id.encode(), WIDE, NOW)
    assert again == event


@EXAMPLES
@given(rfc3339())
def test_rfc3339_text_decodes_to_its_instant(pair: tuple[str, int]) -> None:
    text, ms = pair
    obj = {"event_id": "e", "user_id": "u", "item_id": "i", "type": "view", "ts": text}
    assert decode_event(raw(obj), b"u", WIDE, NOW).ts == ms


@EXAMPLES
@given(items())
def test_item_round_trip(obj: dict[str, Any]) -> None:
    item = decode_item(raw(obj), obj["item_id"].encode(), WIDE)
    assert item is not None
    assert item.title == obj["title"]
    assert list(item.categories) == obj.get("categories", [])
    assert item.attributes == obj.get("attributes", {})
    assert decode_item(encode_item(item), item.item_id.encode(), WIDE) == item


@EXAMPLES
@given(recommendations())
def test_recommendation_round_trip(obj: dict[str, Any]) -> None:
    rec = decode_recommendation(raw(obj))
    assert [(s.item_id, s.rank) for s in rec.items] == [
        (s["item_id"], s["rank"]) for s in obj["items"]
    ]
    data = encode_recommendation(rec)
    assert decode_recommendation(data) == rec
    assert Recommendation.model_validate_json(data) == rec


@EXAMPLES
@given(dead_letters())
def test_dead_letter_record_round_trip(obj: dict[str, Any]) -> None:
    record = decode_dead_letter(raw(obj))
    assert decode_dead_letter(record.model_dump_json().encode()) == record


@EXAMPLES
@given(
    value=st.one_of(st.none(), st.binary(max_size=300)),
    key=st.one_of(st.none(), st.binary(max_size=40)),
    code=st.sampled_from(list(ErrorCode)),
    detail=st.text(max_size=50),
    partition=st.integers(0, 1000),
    offset=st.integers(0, 2**63 - 1),
    now_ms=st.integers(0, MAX_TS_MS),
)
def test_dead_letter_recovers_the_original_bytes_exactly(
    value: bytes | None,
    key: bytes | None,
    code: ErrorCode,
    detail: str,
    partition: int,
    offset: int,
    now_ms: int,
) -> None:
    data = dead_letter(
        value, key, (code, detail), "streamrec.events", partition, offset, now_ms=now_ms
    )
    record = decode_dead_letter(data)
    assert record.original == value
    assert record.original_key == key
    assert record.original_size == (None if value is None else len(value))
    assert (record.error, record.detail) == (code, detail)
    assert (record.source_partition, record.source_offset) == (partition, offset)


# --- Nothing but DecodeError escapes ------------------------------------------------------
def only_decode_errors(value: bytes, key: bytes | None) -> list[DecodeError]:
    """Run every decoder; any exception other than DecodeError fails the test by escaping."""
    caught = []
    for decode in (
        lambda: decode_event(value, key, TIGHT, NOW),
        lambda: decode_item(value, key, TIGHT),
        lambda: decode_recommendation(value),
        lambda: decode_dead_letter(value),
    ):
        try:
            decode()
        except DecodeError as err:
            caught.append(err)
    return caught


def assert_well_formed(errors: list[DecodeError]) -> None:
    for err in errors:
        assert err.code in ErrorCode.__members__.values()
        assert err.detail


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200), st.one_of(st.none(), st.binary(max_size=8)))
def test_arbitrary_bytes_raise_only_decode_error(value: bytes, key: bytes | None) -> None:
    assert_well_formed(only_decode_errors(value, key))


@settings(max_examples=200, deadline=None)
@given(events(), st.data())
def test_damaged_messages_raise_only_decode_error(obj: dict[str, Any], data: st.DataObject) -> None:
    value = bytearray(raw(obj))
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(value) - 1))
        value[at] = data.draw(st.integers(0, 255))
    assert_well_formed(only_decode_errors(bytes(value), obj["user_id"].encode()))


# --- Each fault gets its code -------------------------------------------------------------
@EXAMPLES
@given(events(), st.data())
def test_truncated_json_is_invalid_json(obj: dict[str, Any], data: st.DataObject) -> None:
    value = raw(obj)
    cut = data.draw(st.integers(1, len(value) - 1))
    assert code_of(value[:cut], b"u").code == "invalid_json"


@EXAMPLES
@given(
    events(),
    st.sampled_from(REQUIRED),
    st.one_of(st.none(), st.booleans(), st.lists(st.integers(), max_size=2), st.just({})),
)
def test_wrong_types_are_wrong_type(obj: dict[str, Any], field: str, bad: object) -> None:
    # A non-string type is still "not one of the event types".
    expected = "unknown_event_type" if field == "type" else "wrong_type"
    err = code_of(raw({**obj, field: bad}), obj["user_id"].encode())
    assert (err.code, err.field) == (expected, field)


@EXAMPLES
@given(events(), st.sets(st.sampled_from(REQUIRED), min_size=1))
def test_missing_fields_are_missing_field(obj: dict[str, Any], gone: set[str]) -> None:
    value = raw({k: v for k, v in obj.items() if k not in gone})
    err = code_of(value, obj["user_id"].encode())
    assert err.code == "missing_field"
    assert err.field == next(f for f in REQUIRED if f in gone)


@EXAMPLES
@given(
    events(),
    st.sampled_from(("event_id", "user_id", "item_id")),
    st.integers(MAX_ID_LEN + 1, 2000),
)
def test_oversize_fields_are_invalid_value(obj: dict[str, Any], field: str, length: int) -> None:
    err = code_of(raw({**obj, field: "x" * length}), b"x" * length)
    assert (err.code, err.field) == ("invalid_value", field)
    assert str(length) in err.detail


@EXAMPLES
@given(st.binary(min_size=1, max_size=50), st.integers(1, 1000))
def test_messages_over_the_limit_are_oversize(body: bytes, extra: int) -> None:
    limits = Limits(max_bytes=len(body) + extra - 1, max_age_ms=1, max_future_ms=1)
    value = body + b" " * extra
    assert code_of(value, b"u", limits).code == "oversize"


@EXAMPLES
@given(
    events(),
    st.sampled_from(("event_id", "user_id", "item_id")),
    st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xc0\xaf"]),
)
def test_invalid_utf8_anywhere_is_invalid_utf8(obj: dict[str, Any], field: str, bad: bytes) -> None:
    value = raw({**obj, field: "MARK"}).replace(b"MARK", b"a" + bad + b"b")
    assert code_of(value, b"u").code == "invalid_utf8"


@EXAMPLES
@given(events(), st.integers(1, 10**12), st.booleans())
def test_timestamps_outside_the_window_are_out_of_range(
    obj: dict[str, Any], distance: int, future: bool
) -> None:
    ts = NOW + TIGHT.max_future_ms + distance if future else NOW - TIGHT.max_age_ms - distance
    err = code_of(raw({**obj, "ts": ts}), obj["user_id"].encode(), TIGHT)
    assert (err.code, err.field) == ("timestamp_out_of_range", "ts")


@EXAMPLES
@given(events(), st.binary(max_size=20))
def test_any_other_key_is_key_mismatch(obj: dict[str, Any], key: bytes) -> None:
    if key == obj["user_id"].encode():
        key += b"!"
    err = code_of(raw(obj), key)
    assert (err.code, err.field) == ("key_mismatch", "key")
