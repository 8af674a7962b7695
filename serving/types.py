"""Types shared by the serving stages. Transport-free: no faust, no kafka imports here."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

#: Event types of the wire contract, in a fixed order: the position is the model's type id
#: (0 is reserved for padding).
EVENT_TYPES: tuple[str, ...] = (
    "view",
    "click",
    "add_to_cart",
    "remove_from_cart",
    "purchase",
    "rating",
)
EVENT_TYPE_ID: dict[str, int] = {name: i + 1 for i, name in enumerate(EVENT_TYPES)}


@dataclass(frozen=True, slots=True)
class Step:
    """One interaction in a user's history (oldest first in a sequence)."""

    item: str
    type: str  # one of EVENT_TYPES
    ts_ms: int  # event time, epoch milliseconds UTC


class UserEncoder(Protocol):
    """What the stream pipeline needs from a sequence encoder.

    ``item_vectors()[i]`` is the embedding of ``item_ids()[i]``; a user's retrieval score for
    item ``i`` is ``encode([...])[b] @ item_vectors()[i]``.
    """

    @property
    def version(self) -> str: ...

    @property
    def dim(self) -> int: ...

    def item_ids(self) -> Sequence[str]: ...

    def item_vectors(self) -> np.ndarray:  # (N, D) float32
        ...

    def encode(self, histories: Sequence[Sequence[Step]]) -> np.ndarray:  # (B, D) float32
        """Encode a batch of histories; steps on items the model does not know are skipped."""
        ...


@runtime_checkable
class CachingUserEncoder(UserEncoder, Protocol):
    """An encoder that keeps per-user state between calls (``serving.artifacts``)."""

    @property
    def max_len(self) -> int: ...

    def encode_users(
        self, keys: Sequence[str], histories: Sequence[Sequence[Step]]
    ) -> np.ndarray:  # (B, D) float32, equal to ``encode(histories)``
        ...
