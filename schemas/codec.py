"""Decode at the edge: Kafka bytes → typed messages, or a :class:`DecodeError` with a DLQ code.

Every failure a producer can cause surfaces as ``DecodeError`` (never another exception), with a
machine code from :class:`~schemas.models.ErrorCode`, the top-level field at fault, and a detail
that names the field, what was expected and what arrived.

Validation is pydantic's compiled JSON validator on the models in :mod:`schemas.models`, so the
decoder and the models cannot drift apart; the timestamp window travels in the validation
context. Cost on the hot path is one ``model_validate_json`` call plus a key comparison.
"""

from __future__ import annotations

import base64
import json
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import BaseModel, ValidationError

from schemas.models import (
    MAX_TEXT_LEN,
    DeadLetter,
    ErrorCode,
    Event,
    Item,
    Recommendation,
    ms_to_rfc3339,
)

if TYPE_CHECKING:
    from pydantic_core import ErrorDetails

    from streamrec.settings import Settings

__all__ = [
    "DecodeError",
    "ErrorCode",
    "Limits",
    "dead_letter",
    "decode_dead_letter",
    "decode_event",
    "decode_item",
    "decode_recommendation",
    "encode_event",
    "encode_item",
    "encode_recommendation",
]

_DAY_MS = 86_400_000
#: A DLQ record must fit the broker's default 1 MiB message limit after base64 (4/3 growth).
DEFAULT_MAX_ORIGINAL_BYTES = 512 * 1024
_SHOWN_CHARS = 80  # how much of an offending value a detail quotes
_CODES = frozenset(code.value for code in ErrorCode)
M = TypeVar("M", bound=BaseModel)


class DecodeError(Exception):
    """A message that cannot be accepted; ``code`` is the DLQ reason, ``field`` the culprit."""

    def __init__(self, code: ErrorCode, detail: str, field: str | None = None) -> None:
        super().__init__(detail)
        self.code: str = code
        self.field = field
        self.detail = detail

    def __repr__(self) -> str:
        return f"DecodeError(code={self.code!r}, field={self.field!r}, detail={self.detail!r})"


@dataclass(frozen=True)
class Limits:
    """What the decoder accepts beyond the schema: message size and the event-time window."""

    max_bytes: int = 65_536
    max_age_ms: int = int(365.0 * 30 * _DAY_MS)
    max_future_ms: int = 300_000

    @classmethod
    def from_settings(cls, settings: Settings) -> Limits:
        return cls(
            max_bytes=settings.max_message_bytes,
            max_age_ms=int(settings.max_event_age_days * _DAY_MS),
            max_future_ms=int(settings.max_event_future_s * 1000),
        )


# --- Decoding -----------------------------------------------------------------------------
def decode_event(value: bytes | None, key: bytes | None, limits: Limits, now_ms: int) -> Event:
    """Decode a ``streamrec.events`` record; its key must be the UTF-8 bytes of ``user_id``.

    ``ts`` must lie in ``[now_ms - max_age_ms, now_ms + max_future_ms]``.
    """
    _check_size(value, limits)
    context = {"min_ts": now_ms - limits.max_age_ms, "max_ts": now_ms + limits.max_future_ms}
    event = _validate(Event, value, context)
    if key is None:
        raise DecodeError(
            ErrorCode.MISSING_KEY,
            f"key: expected the Kafka key to be the user_id {_show(event.user_id)}, got no key",
            "key",
        )
    if key != event.user_id.encode():
        raise DecodeError(
            ErrorCode.KEY_MISMATCH,
            f"key: expected the Kafka key to equal field 'user_id' {_show(event.user_id)}, "
            f"got {_show_bytes(key)}",
            "key",
        )
    return event


def decode_item(value: bytes | None, key: bytes | None, limits: Limits) -> Item | None:
    """Decode a ``streamrec.items`` record; ``None`` means a tombstone (delete the key's item).

    A tombstone needs a key; otherwise the key is optional but must equal ``item_id``.
    """
    if value is None:
        if key is None:
            raise DecodeError(
                ErrorCode.MISSING_KEY,
                "key: a tombstone (null value) must carry the item_id to delete, got no key",
                "key",
            )
        return None
    _check_size(value, limits)
    item = _validate(Item, value, None)
    if key is not None and key != item.item_id.encode():
        raise DecodeError(
            ErrorCode.KEY_MISMATCH,
            f"key: expected the Kafka key to equal field 'item_id' {_show(item.item_id)}, "
            f"got {_show_bytes(key)}",
            "key",
        )
    return item


def decode_recommendation(value: bytes) -> Recommendation:
    return _validate(Recommendation, value, None)


def decode_dead_letter(value: bytes) -> DeadLetter:
    return _validate(DeadLetter, value, None)


def _check_size(value: bytes | None, limits: Limits) -> None:
    if not value:
        raise DecodeError(
            ErrorCode.EMPTY_VALUE,
            f"message: expected a JSON object, got {'null' if value is None else 'empty'} value",
        )
    if len(value) > limits.max_bytes:
        raise DecodeError(
            ErrorCode.OVERSIZE,
            f"message: expected at most {limits.max_bytes} bytes, got {len(value)}",
        )


def _validate(model: type[M], value: bytes | None, context: Any) -> M:
    if not value:
        raise DecodeError(ErrorCode.EMPTY_VALUE, "message: expected a JSON object, got nothing")
    try:
        return model.model_validate_json(value, context=context)
    except ValidationError as exc:
        raise _translate(value, exc) from exc


def _translate(value: bytes, exc: ValidationError) -> DecodeError:
    """Map pydantic's first error to our code; UTF-8 is checked only once something failed."""
    try:
        value.decode()
    except UnicodeDecodeError as bad:
        return DecodeError(
            ErrorCode.INVALID_UTF8,
            f"message: expected UTF-8 text, got byte 0x{value[bad.start]:02x} "
            f"at offset {bad.start}",
        )
    errors = exc.errors(include_url=False)
    err = errors[0]
    loc = err["loc"]
    kind = err["type"]
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    if kind == "json_invalid":
        reason = err["msg"].removeprefix("Invalid JSON: ")
        return DecodeError(ErrorCode.INVALID_JSON, f"message: expected valid JSON, got {reason}")
    if not loc:
        if kind == "model_type":
            return DecodeError(
                ErrorCode.NOT_AN_OBJECT,
                f"message: expected a JSON object, got {_json_type(err['input'])}",
            )
        # A rule over several fields (e.g. slate ranks): no single field to blame.
        return DecodeError(ErrorCode.INVALID_VALUE, f"message: {_lower_first(err['msg'])}")
    field = str(loc[0])
    path = ".".join(str(part) for part in loc)
    if kind == "missing":
        return DecodeError(
            ErrorCode.MISSING_FIELD, f"field '{path}': required, but absent{more}", field
        )
    return DecodeError(
        _code_for(kind, loc),
        f"field '{path}': {_lower_first(err['msg'])}, got {_show_input(err)}{more}",
        field,
    )


def _code_for(kind: str, loc: tuple[int | str, ...]) -> ErrorCode:
    if kind in _CODES:
        return ErrorCode(kind)
    if kind == "enum" and loc == ("type",):
        return ErrorCode.UNKNOWN_EVENT_TYPE
    # A wrong type deep inside a container (a number among the context values) is a bad entry
    # of a field whose own type is right.
    if len(loc) == 1 and (kind.endswith("_type") or kind == "int_from_float"):
        return ErrorCode.WRONG_TYPE
    return ErrorCode.INVALID_VALUE


def _lower_first(msg: str) -> str:
    return msg[:1].lower() + msg[1:]


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list | tuple):
        return "an array"
    return "an object"


def _show_input(err: ErrorDetails) -> str:
    value = err["input"]
    if isinstance(value, dict | list):
        return _json_type(value)
    return _show(value)


def _show(value: object) -> str:
    if isinstance(value, str) and len(value) > _SHOWN_CHARS:
        return f"{json.dumps(value[:_SHOWN_CHARS], ensure_ascii=False)}… ({len(value)} chars)"
    text = json.dumps(value, ensure_ascii=False, default=str)
    if len(text) > _SHOWN_CHARS:
        return f"{text[:_SHOWN_CHARS]}… ({len(text)} chars)"
    return text


def _show_bytes(raw: bytes) -> str:
    try:
        return _show(raw.decode())
    except UnicodeDecodeError:
        return f"non-UTF-8 bytes {raw[:_SHOWN_CHARS]!r}"


# --- Encoding -----------------------------------------------------------------------------
def encode_event(event: Event) -> bytes:
    return event.__pydantic_serializer__.to_json(event, exclude_none=True)


def encode_item(item: Item) -> bytes:
    return item.__pydantic_serializer__.to_json(item, exclude_none=True)


def encode_recommendation(rec: Recommendation) -> bytes:
    return rec.__pydantic_serializer__.to_json(rec, exclude_none=True)


def dead_letter(
    value: bytes | None,
    key: bytes | None,
    error: DecodeError | tuple[str, str],
    topic: str | None,
    partition: int | None,
    offset: int | None,
    stage: str | None = None,
    now_ms: int | None = None,
    *,
    max_original_bytes: int = DEFAULT_MAX_ORIGINAL_BYTES,
) -> bytes:
    """Build the ``streamrec.events.dlq`` record for a rejected message.

    ``error`` is a :class:`DecodeError` or ``(code, detail)`` (codes the worker raises itself,
    such as ``unknown_item`` or ``pipeline_error``). The original value is kept exactly, cut to
    ``max_original_bytes`` (``original_truncated`` then says so) so the record itself fits the
    broker's message limit. An unknown origin (``None``, an empty topic, a negative partition
    or offset, as Kafka clients report it) is written as null. Raises ``ValueError`` for a code
    outside :class:`ErrorCode`.
    """
    if isinstance(error, DecodeError):
        code, detail = error.code, error.detail
    else:
        code, detail = error
    if code not in _CODES:
        raise ValueError(f"dead_letter: unknown error code {code!r}; expected one of ErrorCode")
    if now_ms is None:
        now_ms = time.time_ns() // 1_000_000
    truncated = value is not None and len(value) > max_original_bytes
    kept = value[:max_original_bytes] if value is not None else None
    record = DeadLetter(
        original_b64=_b64(kept),
        original_key_b64=_b64(key),
        original_size=None if value is None else len(value),
        original_truncated=truncated,
        error=ErrorCode(code),
        detail=detail[:MAX_TEXT_LEN],
        source_topic=topic or None,
        source_partition=None if partition is None or partition < 0 else partition,
        source_offset=None if offset is None or offset < 0 else offset,
        failed_at=ms_to_rfc3339(now_ms),
        stage=stage,
    )
    # Nulls stay: original_b64 is required and null means "the value was null".
    return record.__pydantic_serializer__.to_json(record)


def _b64(raw: bytes | None) -> str | None:
    return None if raw is None else base64.b64encode(raw).decode("ascii")
