"""Wire contracts: JSON Schema files for producers in any language, typed models, and the codec.

``schema_path(name)`` locates a schema file (``event``, ``item``, ``recommendation``, ``dlq``)
inside the installed package.
"""

from __future__ import annotations

from pathlib import Path

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
from schemas.models import (
    DeadLetter,
    ErrorCode,
    Event,
    EventType,
    Item,
    Recommendation,
    SlateItem,
)

SCHEMA_NAMES = ("event", "item", "recommendation", "dlq")


def schema_path(name: str) -> Path:
    """Path of ``schemas/<name>.schema.json``; raises ``ValueError`` for an unknown name."""
    if name not in SCHEMA_NAMES:
        raise ValueError(f"schema_path: unknown schema {name!r}; expected one of {SCHEMA_NAMES}")
    return Path(__file__).with_name(f"{name}.schema.json")


__all__ = [
    "SCHEMA_NAMES",
    "DeadLetter",
    "DecodeError",
    "ErrorCode",
    "Event",
    "EventType",
    "Item",
    "Limits",
    "Recommendation",
    "SlateItem",
    "dead_letter",
    "decode_dead_letter",
    "decode_event",
    "decode_item",
    "decode_recommendation",
    "encode_event",
    "encode_item",
    "encode_recommendation",
    "schema_path",
]
