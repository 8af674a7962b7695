"""Per-user session state: a bounded recent sequence plus what dedupe and quality need.

Plain Python, transport-free. The Faust table stores ``SessionState.to_json()`` dicts; every
field is bounded, so a user's state never grows without limit whatever they do.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from serving.types import EVENT_TYPE_ID, Step

#: Recent event-id fingerprints kept per user for duplicate detection.
MAX_EVENT_IDS = 128
#: Purchased items remembered per user (filtered out of slates).
MAX_PURCHASED = 100
#: Stored event-type id -> name (``EVENT_TYPE_ID`` inverted).
_TYPE_OF = {i: name for name, i in EVENT_TYPE_ID.items()}


def event_fingerprint(event_id: str) -> str:
    """A short, stable fingerprint of an event id (64 bits: collisions are negligible among
    the last ``MAX_EVENT_IDS`` events of one user, and it keeps the changelog small)."""
    return hashlib.blake2b(event_id.encode(), digest_size=8).hexdigest()


@dataclass(frozen=True, slots=True)
class SessionState:
    """State of one user. Sequences are oldest-first.

    history: recent interactions, at most ``max_len`` of them.
    purchased: items bought, most recent last, at most ``MAX_PURCHASED``.
    recent_events: (fingerprint, ts_ms) of recent events for dedupe.
    last_slate: item ids of the slate last sent to this user (online hit rate).
    events: number of accepted events ever (not bounded by the window).
    """

    history: tuple[Step, ...] = ()
    purchased: tuple[str, ...] = ()
    recent_events: tuple[tuple[str, int], ...] = ()
    last_slate: tuple[str, ...] = ()
    events: int = 0

    def is_duplicate(
        self, event_id: str, ts_ms: int, window_ms: int, fingerprint: str | None = None
    ) -> bool:
        """True if ``event_id`` was accepted before, within ``window_ms`` of event time."""
        fp = fingerprint or event_fingerprint(event_id)
        return any(f == fp and abs(ts_ms - t) <= window_ms for f, t in self.recent_events)

    def apply(
        self, event_id: str, step: Step, max_len: int, fingerprint: str | None = None
    ) -> SessionState:
        """The state after accepting one event (the caller has ruled out duplicates)."""
        history = (*self.history, step)[-max_len:]
        purchased = self.purchased
        if step.type == "purchase" and step.item not in purchased:
            purchased = (*purchased, step.item)[-MAX_PURCHASED:]
        recent = (*self.recent_events, (fingerprint or event_fingerprint(event_id), step.ts_ms))[
            -MAX_EVENT_IDS:
        ]
        return replace(
            self,
            history=history,
            purchased=purchased,
            recent_events=recent,
            events=self.events + 1,
        )

    def with_slate(self, item_ids: Sequence[str]) -> SessionState:
        return replace(self, last_slate=tuple(item_ids))

    def slate_rank(self, item_id: str) -> int | None:
        """1-based rank of ``item_id`` in the last slate, or None if absent."""
        try:
            return self.last_slate.index(item_id) + 1
        except ValueError:
            return None

    # -- table (de)serialisation ---------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {
            "h": [[s.item, EVENT_TYPE_ID[s.type], s.ts_ms] for s in self.history],
            "p": list(self.purchased),
            "e": [[f, t] for f, t in self.recent_events],
            "s": list(self.last_slate),
            "n": self.events,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> SessionState:
        if not data:
            return cls()
        return cls(
            # The hot path of every event (one read per user per batch): values come back as
            # ``to_json`` wrote them (str, int, int), so no per-field conversion.
            history=tuple([Step(i, _TYPE_OF[t], ts) for i, t, ts in data["h"]]),
            purchased=tuple(str(p) for p in data.get("p", ())),
            recent_events=tuple((str(f), int(t)) for f, t in data.get("e", ())),
            last_slate=tuple(str(s) for s in data.get("s", ())),
            events=int(data.get("n", 0)),
        )
