"""Shared fixtures: a tiny, learnable interaction log generated in memory."""

from __future__ import annotations

import pytest

from serving.data import Interactions, UserHistory
from serving.types import EVENT_TYPES


def make_tiny_log(users: int = 40, items: int = 30, seed: int = 0) -> Interactions:
    """Users walk the catalog in steps of +1 (mod ``items``): next-item is learnable.

    Lengths vary from 2 to 13 steps; timestamps are epoch ms with growing gaps.
    """
    out = []
    for u in range(users):
        n = 2 + (u * 7 + seed) % 12
        start = (u * 5 + seed) % items
        ids = tuple(f"i{(start + k) % items}" for k in range(n))
        types = tuple(EVENT_TYPES[(u + k) % len(EVENT_TYPES)] for k in range(n))
        ts = tuple(1_700_000_000_000 + u * 1000 + k * k * 60_000 for k in range(n))
        out.append(UserHistory(f"u{u}", ids, types, ts))
    return Interactions(name="tiny", users=tuple(out))


@pytest.fixture
def tiny_log() -> Interactions:
    return make_tiny_log()
