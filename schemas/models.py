"""Typed wire messages: the Python side of the JSON Schema files in this package.

The schema files are the contract for producers in any language; these models are what Python
code holds after decoding. ``tests/unit/test_schemas.py`` keeps the two in sync (same property
names, required sets, enums and limits; the schema examples validate against both).

Unknown fields are ignored on every message so that producers can add fields before streamrec
learns about them (forward compatibility). All models are frozen.
"""

from __future__ import annotations

import base64
import re
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationInfo,
    model_validator,
)
from pydantic_core import PydanticCustomError

# --- Limits (mirrored in the schema files; the sync test compares them) ------------------
MAX_ID_LEN = 256
MAX_TITLE_LEN = 1000
MAX_TEXT_LEN = 10_000  # item description, DLQ detail
MAX_LIST_LEN = 64  # item categories
MAX_MAP_LEN = 64  # event context, item attributes
MAX_MAP_KEY_LEN = 256
MAX_MAP_VALUE_LEN = 1000
MAX_SLATE_LEN = 1000
MAX_COALESCED = 1024
MAX_TS_TEXT_LEN = 64
#: 9999-12-31T23:59:59.999Z: the last instant an RFC 3339 timestamp can write.
MAX_TS_MS = 253_402_300_799_999


class EventType(StrEnum):
    """Event types, in the order of ``serving.types.EVENT_TYPES`` (the model's type ids)."""

    VIEW = "view"
    CLICK = "click"
    ADD_TO_CART = "add_to_cart"
    REMOVE_FROM_CART = "remove_from_cart"
    PURCHASE = "purchase"
    RATING = "rating"


class ErrorCode(StrEnum):
    """Machine-readable reasons a message lands in the DLQ (``dlq.schema.json`` ``error``).

    The values double as the ``reason`` label of ``streamrec_events_rejected_total``.
    """

    EMPTY_VALUE = "empty_value"
    OVERSIZE = "oversize"
    INVALID_UTF8 = "invalid_utf8"
    INVALID_JSON = "invalid_json"
    NOT_AN_OBJECT = "not_an_object"
    MISSING_FIELD = "missing_field"
    WRONG_TYPE = "wrong_type"
    INVALID_VALUE = "invalid_value"
    UNKNOWN_EVENT_TYPE = "unknown_event_type"
    TIMESTAMP_OUT_OF_RANGE = "timestamp_out_of_range"
    MISSING_KEY = "missing_key"
    KEY_MISMATCH = "key_mismatch"
    UNKNOWN_ITEM = "unknown_item"
    PIPELINE_ERROR = "pipeline_error"


# --- Timestamps ---------------------------------------------------------------------------
# RFC 3339 section 5.6 (the "T" may be lower case; fractions of any length are truncated to ms).
RFC3339_PATTERN = (
    r"^(\d{4})-(\d{2})-(\d{2})[Tt](\d{2}):(\d{2}):(\d{2})(?:\.(\d+))?([Zz]|[+-]\d{2}:\d{2})$"
)
_RFC3339 = re.compile(RFC3339_PATTERN)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)
_NOT_RFC3339 = "not an RFC 3339 timestamp"
TS_EXPECTED = "expected epoch milliseconds or an RFC 3339 timestamp with timezone"


def rfc3339_to_ms(text: str) -> int:
    """Parse an RFC 3339 timestamp into epoch milliseconds UTC (fraction truncated to ms).

    Raises ``ValueError`` naming what is wrong: not RFC 3339, no timezone, impossible date.
    """
    m = _RFC3339.match(text) if len(text) <= MAX_TS_TEXT_LEN else None
    if m is None:
        naive = len(text) <= MAX_TS_TEXT_LEN and _RFC3339.match(text + "Z") is not None
        raise ValueError("timestamp has no timezone" if naive else _NOT_RFC3339)
    offset = m.group(8)
    if len(offset) > 1 and (int(offset[1:3]) > 23 or int(offset[4:6]) > 59):
        raise ValueError(f"timezone offset {offset} is out of range")
    try:
        # The pattern has vetted the syntax; the C parser checks the calendar and is fast.
        # It truncates sub-microsecond digits, and the floor division below truncates to ms.
        dt = datetime.fromisoformat(text.upper())
    except ValueError as exc:
        raise ValueError(f"impossible date or time ({exc})") from exc
    return (dt - _EPOCH) // _MS


def ms_to_rfc3339(ms: int) -> str:
    """Epoch milliseconds → ``YYYY-MM-DDTHH:MM:SS.mmmZ``."""
    dt = _EPOCH + timedelta(milliseconds=ms)
    return f"{dt:%Y-%m-%dT%H:%M:%S}.{ms % 1000:03d}Z"


def _ts_value(value: Any, info: ValidationInfo) -> int:
    """Normalise ``ts`` to epoch ms and check it against the window in the validation context.

    The error types are :class:`ErrorCode` values so the codec can report them unchanged.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        ms = value
    elif isinstance(value, float) and value.is_integer():
        # JSON Schema counts 1700000000000.0 as an integer; so do we.
        ms = int(value)
    elif isinstance(value, str):
        try:
            ms = rfc3339_to_ms(value)
        except ValueError as exc:
            reason = str(exc)
            template = TS_EXPECTED if reason == _NOT_RFC3339 else TS_EXPECTED + " ({reason})"
            raise PydanticCustomError(
                ErrorCode.INVALID_VALUE, template, {"reason": reason}
            ) from exc
    else:
        raise PydanticCustomError(ErrorCode.WRONG_TYPE, TS_EXPECTED)
    lo, hi = 0, MAX_TS_MS
    ctx = info.context
    if ctx is not None:
        lo, hi = max(lo, ctx["min_ts"]), min(hi, ctx["max_ts"])
    if not lo <= ms <= hi:
        raise PydanticCustomError(
            ErrorCode.TIMESTAMP_OUT_OF_RANGE,
            "expected a time between {lo} and {hi}",
            {"lo": ms_to_rfc3339(lo), "hi": ms_to_rfc3339(hi)},
        )
    return ms


# --- Field types --------------------------------------------------------------------------
Id = Annotated[str, Field(strict=True, min_length=1, max_length=MAX_ID_LEN)]
MapKey = Annotated[str, Field(strict=True, min_length=1, max_length=MAX_MAP_KEY_LEN)]
MapValue = Annotated[str, Field(strict=True, max_length=MAX_MAP_VALUE_LEN)]
StrMap = Annotated[dict[MapKey, MapValue], Field(max_length=MAX_MAP_LEN)]
Finite = Annotated[float, Field(strict=True, allow_inf_nan=False)]
NonNegative = Annotated[float, Field(strict=True, allow_inf_nan=False, ge=0)]
EpochMs = Annotated[int, Field(strict=True, ge=0, le=MAX_TS_MS)]
Count = Annotated[int, Field(strict=True, ge=0)]

BASE64_PATTERN = r"^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$"
UTC_TIME_PATTERN = r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d+)?Z$"


def _check_utc_time(text: str) -> str:
    rfc3339_to_ms(text)  # the pattern cannot rule out 2024-02-31
    return text


B64 = Annotated[str, Field(strict=True, pattern=BASE64_PATTERN)]
UtcTime = Annotated[
    str, Field(strict=True, pattern=UTC_TIME_PATTERN), AfterValidator(_check_utc_time)
]


class _Wire(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")


class Event(_Wire):
    """One user interaction on ``streamrec.events`` (Kafka key = ``user_id``)."""

    event_id: Id
    user_id: Id
    item_id: Id
    type: EventType
    ts: Annotated[int, BeforeValidator(_ts_value)]  # epoch ms UTC, whatever form arrived
    value: Finite | None = None
    context: StrMap | None = None


class Item(_Wire):
    """A catalog entry on ``streamrec.items`` (Kafka key = ``item_id``; null value deletes)."""

    item_id: Id
    title: Annotated[str, Field(strict=True, min_length=1, max_length=MAX_TITLE_LEN)]
    description: Annotated[str, Field(strict=True, max_length=MAX_TEXT_LEN)] | None = None
    categories: Annotated[
        tuple[Annotated[str, Field(strict=True, min_length=1, max_length=MAX_ID_LEN)], ...],
        Field(max_length=MAX_LIST_LEN),
    ] = ()
    price: NonNegative | None = None
    available: Annotated[bool, Field(strict=True)] = True
    attributes: StrMap = Field(default_factory=dict)


class SlateItem(_Wire):
    item_id: Id
    score: Finite
    rank: Annotated[int, Field(strict=True, ge=1)]  # 1-based position in the slate


class Recommendation(_Wire):
    """A slate on ``streamrec.recommendations`` (Kafka key = ``user_id``)."""

    user_id: Id
    trigger_event_id: Id
    slate_id: Id
    items: Annotated[tuple[SlateItem, ...], Field(max_length=MAX_SLATE_LEN)]
    model_version: Id
    index_version: Id
    event_ts: EpochMs
    generated_at: EpochMs
    latency_ms: NonNegative
    next_action: dict[EventType, Annotated[float, Field(strict=True, ge=0, le=1)]] | None = None
    coalesced_event_ids: Annotated[tuple[Id, ...], Field(max_length=MAX_COALESCED)] | None = None

    @model_validator(mode="after")
    def _ranks_in_order(self) -> Recommendation:
        # Consumers index the slate by rank; the schema cannot express this, so it lives here.
        ranks = [s.rank for s in self.items]
        if ranks != list(range(1, len(ranks) + 1)):
            raise ValueError(f"items must be ranked 1..{len(ranks)} in order, got ranks {ranks}")
        if len({s.item_id for s in self.items}) != len(ranks):
            raise ValueError("items must not repeat an item_id")
        return self


class DeadLetter(_Wire):
    """A rejected message on ``streamrec.events.dlq``: its bytes, why, and where it came from."""

    original_b64: B64 | None
    original_key_b64: B64 | None
    original_size: Count | None = None  # bytes of the original value before any truncation
    original_truncated: Annotated[bool, Field(strict=True)] = False
    error: ErrorCode
    detail: Annotated[str, Field(strict=True, max_length=MAX_TEXT_LEN)]
    # null when the failure is no longer tied to one source record (a whole batch failed).
    source_topic: Id | None
    source_partition: Count | None
    source_offset: Count | None
    failed_at: UtcTime
    stage: Id | None = None

    @property
    def original(self) -> bytes | None:
        return None if self.original_b64 is None else _b64decode(self.original_b64)

    @property
    def original_key(self) -> bytes | None:
        return None if self.original_key_b64 is None else _b64decode(self.original_key_b64)


def _b64decode(text: str) -> bytes:
    # The field pattern admits only canonical base64, so this cannot fail on a valid model.
    return base64.b64decode(text, validate=True)
