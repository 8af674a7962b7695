"""Session state: bounded, dedupe within a window, JSON round trip (hypothesis), the stored
format's versions, and the columnar ``History``."""

from __future__ import annotations

import json

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from serving.session import FORMAT_VERSION, MAX_EVENT_IDS, MAX_PURCHASED, SessionState
from serving.types import EVENT_TYPE_ID, EVENT_TYPES, History, Step, step_items

steps = st.builds(
    Step,
    item=st.text(min_size=1, max_size=12),
    type=st.sampled_from(EVENT_TYPES),
    ts_ms=st.integers(min_value=0, max_value=2**45),
)


def test_apply_appends_and_bounds_history() -> None:
    state = SessionState()
    for i in range(80):
        state = state.apply(f"e{i}", Step(f"i{i}", "view", 1000 + i), max_len=50)
    assert len(state.history) == 50
    assert state.history[0].item == "i30"
    assert state.history[-1].item == "i79"
    assert state.events == 80
    assert len(state.recent_events) == 80  # below MAX_EVENT_IDS: nothing evicted yet


def test_purchases_are_remembered_once_and_bounded() -> None:
    state = SessionState()
    state = state.apply("a", Step("x", "purchase", 1), 50)
    state = state.apply("b", Step("x", "purchase", 2), 50)
    assert state.purchased == ("x",)
    for i in range(MAX_PURCHASED + 20):
        state = state.apply(f"p{i}", Step(f"y{i}", "purchase", 3 + i), 50)
    assert len(state.purchased) == MAX_PURCHASED
    assert state.purchased[-1] == f"y{MAX_PURCHASED + 19}"


def test_duplicate_within_window_only() -> None:
    state = SessionState().apply("evt-1", Step("x", "view", 10_000), 50)
    assert state.is_duplicate("evt-1", 10_500, window_ms=1000)
    assert not state.is_duplicate("evt-1", 20_000, window_ms=1000)
    assert not state.is_duplicate("evt-2", 10_000, window_ms=1000)


def test_recent_event_ids_are_bounded() -> None:
    state = SessionState()
    for i in range(MAX_EVENT_IDS * 3):
        state = state.apply(f"e{i}", Step("x", "view", i), 5)
    assert len(state.recent_events) == MAX_EVENT_IDS
    assert not state.is_duplicate("e0", 0, 10**9)
    assert state.is_duplicate(f"e{MAX_EVENT_IDS * 3 - 1}", 0, 10**9)


def test_slate_rank() -> None:
    state = SessionState().with_slate(["a", "b", "c"])
    assert state.slate_rank("a") == 1
    assert state.slate_rank("c") == 3
    assert state.slate_rank("z") is None


def test_empty_json_is_fresh_state() -> None:
    assert SessionState.from_json(None) == SessionState()
    assert SessionState.from_json({}) == SessionState()


@settings(max_examples=150, deadline=None)
@given(
    history=st.lists(steps, max_size=20),
    slate=st.lists(st.text(min_size=1, max_size=8), max_size=10),
)
def test_json_round_trip(history: list[Step], slate: list[str]) -> None:
    state = SessionState()
    for i, step in enumerate(history):
        state = state.apply(f"ev{i}", step, max_len=15)
    state = state.with_slate(slate)
    assert SessionState.from_json(state.to_json()) == state
    # As the table stores it: JSON bytes (Faust's codec is orjson), lists for tuples.
    assert SessionState.from_json(orjson.loads(orjson.dumps(state.to_json()))) == state
    assert len(state.history) <= 15
    assert list(state.history) == history[-15:]


def _v1(state: SessionState) -> dict[str, object]:
    """``state`` as the version-1 code wrote it (rows of [item, type id, ts], no "v")."""
    return {
        "h": [[s.item, EVENT_TYPE_ID[s.type], s.ts_ms] for s in state.history],
        "p": list(state.purchased),
        "e": [[f, t] for f, t in state.recent_events],
        "s": list(state.last_slate),
        "n": state.events,
    }


@settings(max_examples=100, deadline=None)
@given(history=st.lists(steps, max_size=20), slate=st.lists(st.text(max_size=8), max_size=10))
def test_version_1_sessions_still_load(history: list[Step], slate: list[str]) -> None:
    state = SessionState()
    for i, step in enumerate(history):
        state = state.apply(f"ev{i}", step, max_len=15)
    state = state.with_slate(slate)
    stored = json.loads(json.dumps(_v1(state)))
    loaded = SessionState.from_json(stored)
    assert loaded == state
    # Updated by a new worker, it is written back as version 2.
    assert loaded.apply("next", Step("x", "view", 1), 15).to_json()["v"] == FORMAT_VERSION


def test_a_version_1_session_keeps_dedupe_and_purchases() -> None:
    stored = {
        "h": [["a", EVENT_TYPE_ID["purchase"], 1000]],
        "p": ["a"],
        "e": [
            [SessionState().apply("evt-1", Step("a", "purchase", 1000), 5).fingerprints[0], 1000]
        ],
        "s": ["b"],
        "n": 7,
    }
    state = SessionState.from_json(stored)
    assert state.is_duplicate("evt-1", 1000, window_ms=10)
    assert state.purchased == ("a",)
    assert state.history == [Step("a", "purchase", 1000)]
    assert state.slate_rank("b") == 1
    assert state.events == 7


def test_unknown_format_version_is_refused() -> None:
    with pytest.raises(ValueError, match="expected stored format version 1 or 2, got 3"):
        SessionState.from_json({"v": 3, "i": []})


def test_misaligned_history_columns_are_refused() -> None:
    data = SessionState().apply("e", Step("a", "view", 1), 5).to_json()
    data["ts"] = []
    with pytest.raises(ValueError, match="expected aligned columns, got 1 items, 1 types and 0"):
        SessionState.from_json(data)


def test_history_behaves_as_a_sequence_of_steps() -> None:
    steps_ = [Step("a", "view", 1), Step("b", "purchase", 2), Step("c", "click", 3)]
    h = History.of(steps_)
    assert len(h) == 3
    assert h[0] == steps_[0]
    assert h[-1] == steps_[-1]
    assert list(h) == steps_
    assert list(reversed(h)) == steps_[::-1]
    assert h[1:] == steps_[1:]
    assert isinstance(h[1:], History)
    assert h == steps_
    assert h == History.of(steps_)
    assert h != steps_[:2]
    assert hash(h) == hash(History.of(steps_))
    assert h.purchased_items() == ["b"]
    assert step_items(h) == ("a", "b", "c")
    assert step_items(steps_) == ["a", "b", "c"]
    assert h.appended("d", EVENT_TYPE_ID["view"], 4, max_len=3) == [
        *steps_[1:],
        Step("d", "view", 4),
    ]
    assert h.appended("d", EVENT_TYPE_ID["view"], 4, max_len=5)[-1] == Step("d", "view", 4)
    assert "Step(item='a'" in repr(h)
