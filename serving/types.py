"""Types shared by the serving stages. Transport-free: no faust, no kafka imports here."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol, overload, runtime_checkable

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


#: Event-type id -> name (``EVENT_TYPE_ID`` inverted).
EVENT_TYPE_NAME: dict[int, str] = {i: name for name, i in EVENT_TYPE_ID.items()}
_PURCHASE = EVENT_TYPE_ID["purchase"]


class History(Sequence[Step]):
    """A sequence of steps held as three aligned columns, oldest first.

    items: item ids; type_ids: ``EVENT_TYPE_ID`` values; ts_ms: event times. The session
    table stores exactly these columns, so reading a user's history costs no per-step work;
    a :class:`Step` is built only when one is indexed or iterated. Slices are histories.
    Equal to any sequence of the same steps (a list of ``Step`` included).
    """

    __slots__ = ("items", "ts_ms", "type_ids")

    def __init__(
        self,
        items: tuple[str, ...] = (),
        type_ids: tuple[int, ...] = (),
        ts_ms: tuple[int, ...] = (),
    ) -> None:
        if not len(items) == len(type_ids) == len(ts_ms):
            raise ValueError(
                f"history: expected aligned columns, got {len(items)} items, "
                f"{len(type_ids)} types and {len(ts_ms)} timestamps"
            )
        self.items = items
        self.type_ids = type_ids
        self.ts_ms = ts_ms

    @classmethod
    def of(cls, steps: Iterable[Step]) -> History:
        steps = list(steps)
        return cls(
            tuple(s.item for s in steps),
            tuple(EVENT_TYPE_ID[s.type] for s in steps),
            tuple(s.ts_ms for s in steps),
        )

    def appended(self, item: str, type_id: int, ts_ms: int, max_len: int) -> History:
        """This history with one more step, the oldest dropped past ``max_len``."""
        if len(self.items) < max_len:
            return History((*self.items, item), (*self.type_ids, type_id), (*self.ts_ms, ts_ms))
        cut = len(self.items) + 1 - max_len
        return History(
            (*self.items[cut:], item), (*self.type_ids[cut:], type_id), (*self.ts_ms[cut:], ts_ms)
        )

    def purchased_items(self) -> list[str]:
        """Items of the purchase steps, oldest first."""
        return [i for i, t in zip(self.items, self.type_ids, strict=True) if t == _PURCHASE]

    def __len__(self) -> int:
        return len(self.items)

    @overload
    def __getitem__(self, index: int) -> Step: ...

    @overload
    def __getitem__(self, index: slice) -> History: ...

    def __getitem__(self, index: int | slice) -> Step | History:
        if isinstance(index, slice):
            return History(self.items[index], self.type_ids[index], self.ts_ms[index])
        return Step(self.items[index], EVENT_TYPE_NAME[self.type_ids[index]], self.ts_ms[index])

    def __iter__(self) -> Iterator[Step]:
        name = EVENT_TYPE_NAME
        for item, t, ts in zip(self.items, self.type_ids, self.ts_ms, strict=True):
            yield Step(item, name[t], ts)

    def __reversed__(self) -> Iterator[Step]:
        name = EVENT_TYPE_NAME
        for item, t, ts in zip(
            reversed(self.items), reversed(self.type_ids), reversed(self.ts_ms), strict=True
        ):
            yield Step(item, name[t], ts)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, History):
            return (
                self.items == other.items
                and self.type_ids == other.type_ids
                and self.ts_ms == other.ts_ms
            )
        if isinstance(other, Sequence) and not isinstance(other, str | bytes):
            return len(other) == len(self) and all(a == b for a, b in zip(self, other, strict=True))
        return NotImplemented

    def __hash__(self) -> int:
        return hash((self.items, self.type_ids, self.ts_ms))

    def __repr__(self) -> str:
        return f"History({list(self)!r})"


def step_items(history: Sequence[Step]) -> Sequence[str]:
    """The item ids of ``history``, oldest first (a :class:`History`'s own column)."""
    if isinstance(history, History):
        return history.items
    return [s.item for s in history]
