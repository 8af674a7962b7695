"""The events agent's logic for one micro-batch, free of Faust so it can be tested alone.

``prepare`` decodes, validates, dedupes and updates sessions (fast, on the event loop);
the caller runs ``Recommender.recommend`` on the prepared requests in a worker thread; then
``finish`` turns slates into recommendation messages and the session writes to persist.

Accounting, per batch: every message is exactly one of accepted / rejected (DLQ) / duplicate,
and produced = accepted - coalesced (one slate per user per batch: the slate computed after
the user's last event of the batch answers the earlier ones too, listed in
``coalesced_event_ids``).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson

from schemas.codec import DecodeError, Limits, dead_letter, decode_event
from schemas.models import Event
from serving.session import SessionState, event_fingerprint
from serving.types import History
from streamrec.metrics import SLATE_HIT_KS, Metrics


@dataclass(frozen=True, slots=True)
class InMessage:
    """A consumed Kafka message. ``ref`` is the transport's handle (a Faust event)."""

    key: bytes | None
    value: bytes | None
    topic: str
    partition: int
    offset: int
    ref: Any = None


@dataclass(frozen=True, slots=True)
class OutMessage:
    key: bytes | None
    value: bytes
    #: The consumed event this message answers (its Faust event): under exactly-once the
    #: message joins the transaction of that event's partition.
    ref: Any = None


@dataclass
class UserBatch:
    """The accepted events of one user within a batch, and the resulting state."""

    user_id: str
    events: list[Event]
    state: SessionState
    last_ref: Any


@dataclass
class Prepared:
    users: dict[str, UserBatch] = field(default_factory=dict)
    dead_letters: list[OutMessage] = field(default_factory=list)
    accepted: int = 0
    rejected: int = 0
    duplicates: int = 0

    @property
    def histories(self) -> list[tuple[str, History, int]]:
        """``(user_id, history, events ever)`` per user, as ``Recommender.recommend`` takes."""
        return [(u.user_id, u.state.history, u.state.events) for u in self.users.values()]


@dataclass
class Finished:
    recommendations: list[OutMessage]
    session_writes: list[tuple[str, dict[str, Any], Any]]  # (user_id, state json, ref)
    dead_letters: list[OutMessage]
    produced: int
    coalesced: int


class SlateResult(Protocol):
    """What the recommender returns for one user (ids best first, scores aligned)."""

    @property
    def item_ids(self) -> Sequence[str]: ...

    @property
    def scores(self) -> Sequence[float]: ...


#: Slate ids come from a generator seeded once from the OS: ``uuid4`` reads ``os.urandom``
#: for every slate, a system call that hands the GIL to the Kafka consumer thread and cost
#: the event loop up to a switch interval (5 ms) each, most of ``finish`` in the worker.
_ids = random.Random()


#: Version and variant bits of a version 4 UUID (RFC 4122), as ``uuid.UUID(version=4)`` sets
#: them: clear these, then set ``_UUID4_SET``.
_UUID4_CLEAR = ~((0xC000 << 48) | (0xF000 << 64))
_UUID4_SET = (0x8000 << 48) | (4 << 76)


def _slate_id() -> str:
    """A random (version 4 layout) UUID as 32 hex digits, like ``uuid.uuid4().hex``."""
    return f"{(_ids.getrandbits(128) & _UUID4_CLEAR) | _UUID4_SET:032x}"


class EventBatchHandler:
    """Turns a micro-batch of raw events into DLQ records, session writes and slates."""

    name = "events"

    def __init__(
        self,
        *,
        limits: Limits,
        metrics: Metrics,
        max_len: int,
        dedupe_window_ms: int,
        knows_item: Callable[[str], bool],
        clock_ms: Callable[[], int] = lambda: int(time.time() * 1000),
    ) -> None:
        self.limits = limits
        self.metrics = metrics
        self.max_len = max_len
        self.dedupe_window_ms = dedupe_window_ms
        self.knows_item = knows_item
        self.clock_ms = clock_ms
        # Labelled children resolved once: ``labels()`` takes a lock and builds a key per call.
        self._consumed: dict[str, Any] = {}
        self._hits = [(k, metrics.slate_hits.labels(k=str(k))) for k in SLATE_HIT_KS]

    def _reject(
        self, prepared: Prepared, msg: InMessage, code: str, detail: str, stage: str
    ) -> None:
        prepared.dead_letters.append(
            OutMessage(
                msg.key,
                dead_letter(
                    msg.value,
                    msg.key,
                    (code, detail),
                    msg.topic,
                    msg.partition,
                    msg.offset,
                    stage=stage,
                    now_ms=self.clock_ms(),
                ),
                msg.ref,
            )
        )
        prepared.rejected += 1
        self.metrics.events_rejected.labels(reason=code).inc()

    def prepare(
        self, batch: Sequence[InMessage], get_state: Callable[[str, Any], SessionState]
    ) -> Prepared:
        """Decode, validate, dedupe and apply each message to its user's session.

        ``get_state(user_id, ref)`` reads the stored session; ``ref`` is the message's
        transport handle (the store may need it to find the partition)."""
        prepared = Prepared()
        now_ms = self.clock_ms()
        max_len, window_ms = self.max_len, self.dedupe_window_ms
        users = prepared.users
        # Online quality, counted once per batch: how many events met a last slate, and the
        # rank each one's item had in it (0: absent).
        evaluated = 0
        ranks: list[int] = []
        for msg in batch:
            try:
                event = decode_event(msg.value, msg.key, self.limits, now_ms)
            except DecodeError as exc:
                self._reject(prepared, msg, exc.code, exc.detail, "decode")
                continue
            if not self.knows_item(event.item_id):
                self._reject(
                    prepared,
                    msg,
                    "unknown_item",
                    f"field 'item_id': expected an item in the catalog or the model, "
                    f"got {event.item_id!r}; publish it to the items topic first",
                    "validate",
                )
                continue
            user_id = event.user_id
            user = users.get(user_id)
            state = user.state if user is not None else get_state(user_id, msg.ref)
            fp = event_fingerprint(event.event_id)
            if state.is_duplicate(event.event_id, event.ts, window_ms, fp):
                prepared.duplicates += 1
                self.metrics.events_duplicate.inc()
                continue
            # Online quality: was this item in the slate we last sent the user?
            if state.last_slate:
                evaluated += 1
                ranks.append(state.slate_rank(event.item_id) or 0)
            state = state.accept(fp, event.item_id, event.type.value, event.ts, max_len)
            if user is None:
                user = users[user_id] = UserBatch(user_id, [event], state, msg.ref)
            else:
                user.events.append(event)
                user.state = state
                user.last_ref = msg.ref
            prepared.accepted += 1
        if evaluated:
            self.metrics.slates_evaluated.inc(evaluated)
            for k, hits in self._hits:
                n = sum(1 for r in ranks if 0 < r <= k)
                if n:
                    hits.inc(n)
        return prepared

    def finish(
        self,
        prepared: Prepared,
        slates: Sequence[SlateResult] | None,
        *,
        model_version: str,
        index_version: str,
        error: BaseException | None = None,
    ) -> Finished:
        """Build the outgoing messages for the users of ``prepared``.

        ``slates`` is aligned with ``prepared.users``; when the recommender failed
        (``error``), every accepted event goes to the DLQ with ``pipeline_error`` and sessions
        are still saved, so history is not lost. ``model_version`` / ``index_version`` label
        slates that do not carry their own (``serving.pipeline.Slate`` does).
        """
        users = list(prepared.users.values())
        writes: list[tuple[str, dict[str, Any], Any]] = []
        recs: list[OutMessage] = []
        dlq: list[OutMessage] = []
        coalesced = 0
        if error is not None or slates is None or len(slates) != len(users):
            detail = (
                f"stage 'recommend': {type(error).__name__}: {error}"
                if error is not None
                else f"stage 'recommend': expected {len(users)} slates, "
                f"got {None if slates is None else len(slates)}"
            )
            for user in users:
                writes.append((user.user_id, user.state.to_json(), user.last_ref))
                for event in user.events:
                    dlq.append(
                        OutMessage(
                            user.user_id.encode(),
                            dead_letter(
                                event.model_dump_json().encode(),
                                user.user_id.encode(),
                                ("pipeline_error", detail),
                                "",
                                -1,
                                -1,
                                stage="recommend",
                                now_ms=self.clock_ms(),
                            ),
                            user.last_ref,
                        )
                    )
                    self.metrics.events_rejected.labels(reason="pipeline_error").inc()
            return Finished([], writes, dlq, 0, 0)

        now_ms = self.clock_ms()
        # Counted here, not in prepare: an event the pipeline failed on is a rejection
        # (pipeline_error), so every message lands in exactly one counter.
        consumed: dict[str, int] = {}
        for user, slate in zip(users, slates, strict=True):
            for event in user.events:
                t = event.type.value
                consumed[t] = consumed.get(t, 0) + 1
            state = user.state.with_slate(slate.item_ids)
            writes.append((user.user_id, state.to_json(), user.last_ref))
            trigger = user.events[-1]
            others = [e.event_id for e in user.events[:-1]]
            coalesced += len(others)
            # Built as a plain dict: validating 10 slate entries per message through pydantic
            # costs more than the rest of the event's handling; tests decode these messages
            # with the schema models to keep them in contract.
            rec: dict[str, Any] = {
                "user_id": user.user_id,
                "trigger_event_id": trigger.event_id,
                "slate_id": _slate_id(),
                "items": [
                    {
                        "item_id": item,
                        "score": float(score) if math.isfinite(score) else 0.0,
                        "rank": rank,
                    }
                    for rank, (item, score) in enumerate(
                        zip(slate.item_ids, slate.scores, strict=True), start=1
                    )
                ],
                # The versions of the pipeline that made this slate: a hot swap landing
                # between the model call and here must not relabel it.
                "model_version": getattr(slate, "model_version", "") or model_version,
                "index_version": getattr(slate, "index_version", "") or index_version,
                "event_ts": trigger.ts,
                "generated_at": now_ms,
                "latency_ms": float(max(0, now_ms - trigger.ts)),
            }
            if others:
                rec["coalesced_event_ids"] = others
            recs.append(OutMessage(user.user_id.encode(), orjson.dumps(rec), user.last_ref))
            self.metrics.end_to_end_latency.observe(max(0.0, (now_ms - trigger.ts) / 1000.0))
        for t, n in consumed.items():
            child = self._consumed.get(t)
            if child is None:
                child = self._consumed[t] = self.metrics.events_consumed.labels(type=t)
            child.inc(n)
        self.metrics.recommendations_produced.inc(len(recs))
        if coalesced:
            self.metrics.recommendations_coalesced.inc(coalesced)
        return Finished(recs, writes, dlq, len(recs), coalesced)
