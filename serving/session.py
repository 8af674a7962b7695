"""Per-user session state: a bounded recent sequence plus what dedupe and quality need.

Plain Python, transport-free. The Faust table stores ``SessionState.to_json()`` dicts; every
field is bounded, so a user's state never grows without limit whatever they do.

Stored form, version 2 (what ``to_json`` writes): columns, so a read or a write is one
``orjson`` call over flat lists and no per-step Python::

    {"v": 2, "i": [item ids], "t": [event-type ids], "ts": [event ms],  # the history
     "f": [event-id fingerprints], "ft": [their event ms],             # dedupe
     "p": [purchased items], "s": [last slate's items], "n": events ever}

Version 1 (no ``"v"``; written before the columns) still loads:
``{"h": [[item, type id, ts], ...], "e": [[fingerprint, ts], ...], "p", "s", "n"}``. A worker
writes version 2 for any user it updates, so a changelog converts as users come back.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from serving.types import EVENT_TYPE_ID, History, Step

#: Recent event-id fingerprints kept per user for duplicate detection.
MAX_EVENT_IDS = 128
#: Purchased items remembered per user (filtered out of slates).
MAX_PURCHASED = 100
#: The stored form ``to_json`` writes.
FORMAT_VERSION = 2
_PURCHASE = EVENT_TYPE_ID["purchase"]


def event_fingerprint(event_id: str) -> str:
    """A short, stable fingerprint of an event id (64 bits: collisions are negligible among
    the last ``MAX_EVENT_IDS`` events of one user, and it keeps the changelog small)."""
    return hashlib.blake2b(event_id.encode(), digest_size=8).hexdigest()


@dataclass(frozen=True, slots=True)
class SessionState:
    """State of one user. Sequences are oldest-first.

    history: recent interactions, at most ``max_len`` of them (columns, see ``History``).
    purchased: items bought, most recent last, at most ``MAX_PURCHASED``.
    fingerprints, fingerprint_ts: recent event-id fingerprints and their event times, for
    dedupe, at most ``MAX_EVENT_IDS``.
    last_slate: item ids of the slate last sent to this user (online hit rate).
    events: number of accepted events ever (not bounded by the window).
    """

    history: History = field(default_factory=History)
    purchased: tuple[str, ...] = ()
    fingerprints: tuple[str, ...] = ()
    fingerprint_ts: tuple[int, ...] = ()
    last_slate: tuple[str, ...] = ()
    events: int = 0

    @property
    def recent_events(self) -> tuple[tuple[str, int], ...]:
        """``(fingerprint, ts_ms)`` of the recent events, oldest first."""
        return tuple(zip(self.fingerprints, self.fingerprint_ts, strict=True))

    def is_duplicate(
        self, event_id: str, ts_ms: int, window_ms: int, fingerprint: str | None = None
    ) -> bool:
        """True if ``event_id`` was accepted before, within ``window_ms`` of event time."""
        fp = fingerprint or event_fingerprint(event_id)
        if fp not in self.fingerprints:  # the common case, one scan in C
            return False
        return any(
            f == fp and abs(ts_ms - t) <= window_ms
            for f, t in zip(self.fingerprints, self.fingerprint_ts, strict=True)
        )

    def apply(
        self, event_id: str, step: Step, max_len: int, fingerprint: str | None = None
    ) -> SessionState:
        """The state after accepting one event (the caller has ruled out duplicates)."""
        fp = fingerprint or event_fingerprint(event_id)
        return self.accept(fp, step.item, step.type, step.ts_ms, max_len)

    def accept(
        self, fingerprint: str, item: str, event_type: str, ts_ms: int, max_len: int
    ) -> SessionState:
        """:meth:`apply` for an event given by its fields (no ``Step`` built)."""
        type_id = EVENT_TYPE_ID[event_type]
        purchased = self.purchased
        if type_id == _PURCHASE and item not in purchased:
            purchased = (*purchased, item)[-MAX_PURCHASED:]
        fps, fts = self.fingerprints, self.fingerprint_ts
        if len(fps) >= MAX_EVENT_IDS:
            cut = len(fps) + 1 - MAX_EVENT_IDS
            fps, fts = fps[cut:], fts[cut:]
        return SessionState(
            self.history.appended(item, type_id, ts_ms, max_len),
            purchased,
            (*fps, fingerprint),
            (*fts, ts_ms),
            self.last_slate,
            self.events + 1,
        )

    def with_slate(self, item_ids: Sequence[str]) -> SessionState:
        return SessionState(
            self.history,
            self.purchased,
            self.fingerprints,
            self.fingerprint_ts,
            tuple(item_ids),
            self.events,
        )

    def slate_rank(self, item_id: str) -> int | None:
        """1-based rank of ``item_id`` in the last slate, or None if absent."""
        try:
            return self.last_slate.index(item_id) + 1
        except ValueError:
            return None

    # -- table (de)serialisation ---------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        """The stored form (version 2); tuples serialise as JSON arrays."""
        h = self.history
        return {
            "v": FORMAT_VERSION,
            "i": h.items,
            "t": h.type_ids,
            "ts": h.ts_ms,
            "f": self.fingerprints,
            "ft": self.fingerprint_ts,
            "p": self.purchased,
            "s": self.last_slate,
            "n": self.events,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> SessionState:
        """Read a stored session, version 2 or 1; raises ``ValueError`` for another version
        (written by a newer worker) or misaligned columns."""
        if not data:
            return cls()
        version = data.get("v", 1)
        if version == FORMAT_VERSION:
            # The hot read of every batch: the columns come back as ``to_json`` wrote them.
            return cls(
                History(tuple(data["i"]), tuple(data["t"]), tuple(data["ts"])),
                tuple(data["p"]),
                tuple(data["f"]),
                tuple(data["ft"]),
                tuple(data["s"]),
                data["n"],
            )
        if version == 1:
            return cls._from_v1(data)
        raise ValueError(
            f"session: expected stored format version 1 or {FORMAT_VERSION}, got {version!r}"
        )

    @classmethod
    def _from_v1(cls, data: dict[str, Any]) -> SessionState:
        steps = data.get("h", ())
        events = data.get("e", ())
        return cls(
            History(
                tuple(str(i) for i, _, _ in steps),
                tuple(int(t) for _, t, _ in steps),
                tuple(int(ts) for _, _, ts in steps),
            ),
            tuple(str(p) for p in data.get("p", ())),
            tuple(str(f) for f, _ in events),
            tuple(int(t) for _, t in events),
            tuple(str(s) for s in data.get("s", ())),
            int(data.get("n", 0)),
        )
