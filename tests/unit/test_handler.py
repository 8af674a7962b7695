"""The events agent's batch logic without Kafka: accounting, dedupe, coalescing, DLQ."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from schemas.codec import Limits, decode_dead_letter, decode_recommendation
from serving.pipeline import Slate
from serving.session import SessionState
from streamrec.metrics import Metrics
from streams.handler import EventBatchHandler, InMessage

NOW = 1_800_000_000_000


@dataclass(frozen=True)
class FakeSlate:
    item_ids: Sequence[str]
    scores: Sequence[float]


def msg(offset: int, value: bytes | None, key: bytes | None = b"u1") -> InMessage:
    return InMessage(key=key, value=value, topic="events", partition=0, offset=offset, ref=offset)


def event(eid: str, user: str = "u1", item: str = "a", etype: str = "view") -> bytes:
    return json.dumps(
        {"event_id": eid, "user_id": user, "item_id": item, "type": etype, "ts": NOW - 5}
    ).encode()


@pytest.fixture
def metrics() -> Metrics:
    return Metrics.create(CollectorRegistry())


@pytest.fixture
def handler(metrics: Metrics) -> EventBatchHandler:
    return EventBatchHandler(
        limits=Limits(),
        metrics=metrics,
        max_len=5,
        dedupe_window_ms=60_000,
        knows_item=lambda item: item in {"a", "b", "c"},
        clock_ms=lambda: NOW,
    )


class Store:
    def __init__(self) -> None:
        self.data: dict[str, dict[str, Any]] = {}

    def get(self, user: str, ref: Any) -> SessionState:
        return SessionState.from_json(self.data.get(user))


def value(m: Any, name: str, **labels: str) -> float:
    metric = getattr(m, name)
    return float((metric.labels(**labels) if labels else metric)._value.get())


def test_accounting_coalescing_and_dead_letters(
    handler: EventBatchHandler, metrics: Metrics
) -> None:
    store = Store()
    batch = [
        msg(0, event("e1")),
        msg(1, event("e2", item="b")),
        msg(2, b"{oops"),
        msg(3, event("e1")),  # redelivery inside the same batch
        msg(4, event("e3", user="u2", item="c"), key=b"u2"),
        msg(5, event("e4", item="zzz")),  # unknown item
    ]
    prepared = handler.prepare(batch, store.get)
    assert (prepared.accepted, prepared.rejected, prepared.duplicates) == (3, 2, 1)
    assert prepared.accepted + prepared.rejected + prepared.duplicates == len(batch)
    reasons = sorted(decode_dead_letter(d.value).error for d in prepared.dead_letters)
    assert reasons == ["invalid_json", "unknown_item"]
    slates = [FakeSlate(["c", "b"], [2.0, 1.0]), FakeSlate(["a"], [1.0])]
    done = handler.finish(prepared, slates, model_version="m1", index_version="i1")
    assert done.produced == 2
    assert done.coalesced == 1
    assert done.produced == prepared.accepted - done.coalesced
    recs = {r.key: decode_recommendation(r.value) for r in done.recommendations}
    assert recs[b"u1"].trigger_event_id == "e2"
    assert recs[b"u1"].coalesced_event_ids == ("e1",)
    assert [s.item_id for s in recs[b"u1"].items] == ["c", "b"]
    assert [s.rank for s in recs[b"u1"].items] == [1, 2]
    assert recs[b"u2"].model_version == "m1"
    assert recs[b"u2"].index_version == "i1"
    # The session write goes with the user's last event (its partition owns the user).
    writes = {user: (state, ref) for user, state, ref in done.session_writes}
    assert writes["u1"][1] == 1
    assert SessionState.from_json(writes["u1"][0]).last_slate == ("c", "b")
    assert value(metrics, "events_duplicate") == 1
    assert value(metrics, "events_rejected", reason="invalid_json") == 1
    assert value(metrics, "recommendations_coalesced") == 1
    assert value(metrics, "events_consumed", type="view") == 3


def test_duplicates_across_batches_and_online_hits(
    handler: EventBatchHandler, metrics: Metrics
) -> None:
    store = Store()
    prepared = handler.prepare([msg(0, event("e1"))], store.get)
    done = handler.finish(
        prepared, [FakeSlate(["b", "c"], [1.0, 0.5])], model_version="m", index_version="i"
    )
    for user, state, _ in done.session_writes:
        store.data[user] = state
    again = handler.prepare([msg(1, event("e1")), msg(2, event("e2", item="c"))], store.get)
    assert again.duplicates == 1
    assert again.accepted == 1
    # "c" was at rank 2 of the last slate: a hit at k=5 and k=10, not at k=1.
    assert value(metrics, "slates_evaluated") == 1
    assert value(metrics, "slate_hits", k="1") == 0
    assert value(metrics, "slate_hits", k="5") == 1


def test_pipeline_failure_sends_accepted_events_to_the_dlq(
    handler: EventBatchHandler, metrics: Metrics
) -> None:
    prepared = handler.prepare([msg(0, event("e1")), msg(1, event("e2"))], Store().get)
    done = handler.finish(
        prepared, None, model_version="m", index_version="i", error=RuntimeError("boom")
    )
    assert done.produced == 0
    assert not done.recommendations
    letters = [decode_dead_letter(d.value) for d in done.dead_letters]
    assert [d.error for d in letters] == ["pipeline_error", "pipeline_error"]
    assert "boom" in letters[0].detail
    assert "recommend" in letters[0].detail
    assert json.loads(letters[1].original)["event_id"] == "e2"
    # History is kept even though no slate could be made.
    assert len(SessionState.from_json(done.session_writes[0][1]).history) == 2
    assert value(metrics, "events_rejected", reason="pipeline_error") == 2
    assert value(metrics, "events_consumed", type="view") == 0  # each message counted once


def test_slate_count_mismatch_is_a_pipeline_error(handler: EventBatchHandler) -> None:
    prepared = handler.prepare([msg(0, event("e1"))], Store().get)
    done = handler.finish(prepared, [], model_version="m", index_version="i")
    letter = decode_dead_letter(done.dead_letters[0].value)
    assert letter.error == "pipeline_error"
    assert "expected 1 slates, got 0" in letter.detail


def test_slates_keep_the_versions_of_the_pipeline_that_made_them(
    handler: EventBatchHandler,
) -> None:
    """A model swap between the model call and ``finish`` must not relabel the batch."""
    store = Store()
    prepared = handler.prepare(
        [msg(0, event("e1")), msg(1, event("e2", user="u2", item="c"), key=b"u2")], store.get
    )
    slates = [
        Slate("u1", ["b"], [1.0], model_version="enc-old", index_version="idx-old"),
        FakeSlate(["a"], [1.0]),  # carries none: labelled with the given versions
    ]
    done = handler.finish(prepared, slates, model_version="enc-new", index_version="idx-new")
    recs = {r.key: decode_recommendation(r.value) for r in done.recommendations}
    assert (recs[b"u1"].model_version, recs[b"u1"].index_version) == ("enc-old", "idx-old")
    assert (recs[b"u2"].model_version, recs[b"u2"].index_version) == ("enc-new", "idx-new")
