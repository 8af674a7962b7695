"""Session state: bounded, dedupe within a window, JSON round trip (hypothesis)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from serving.session import MAX_EVENT_IDS, MAX_PURCHASED, SessionState
from serving.types import EVENT_TYPES, Step

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
    assert len(state.history) <= 15
