"""Complementary items: co-occurrence counts, top-M, files, anchors and slate filling."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from serving.bundles import (
    BUNDLES_FILE,
    BundleConfig,
    BundleError,
    Bundles,
    cart_anchors,
    cooccurrence,
    fill_slate,
)
from serving.data import Interactions, UserHistory
from serving.types import Step

MIN = 60_000


def _log() -> Interactions:
    # u1: a(view) b(cart) c(purchase), then a 2-hour silence, d(view).
    # u2: a(cart) b(removed) c(view) — a removal has weight 0.
    # u3: no times: the whole sequence is one session.
    return Interactions(
        name="hand",
        users=(
            UserHistory(
                "u1",
                ("a", "b", "c", "d"),
                ("view", "add_to_cart", "purchase", "view"),
                (0, MIN, 2 * MIN, 122 * MIN),
            ),
            UserHistory(
                "u2", ("a", "b", "c"), ("add_to_cart", "remove_from_cart", "view"), (0, 1, 2)
            ),
            UserHistory("u3", ("c", "d", "c"), ("view", "view", "view"), None),
        ),
    )


def test_cooccurrence_counts_on_a_hand_made_log() -> None:
    pairs = cooccurrence(_log(), BundleConfig(window=5))
    # a–b: u1 view×cart = 3; u2 cart×removal = 0 (skipped).
    assert pairs["a"]["b"] == pytest.approx(3.0)
    # a–c: u1 view×purchase = 5, u2 cart×view = 3.
    assert pairs["a"]["c"] == pytest.approx(8.0)
    # b–c: u1 cart×purchase = 15.
    assert pairs["b"]["c"] == pytest.approx(15.0)
    # c–d: u1 split by the 2 h silence; u3 c–d and d–c, both views: 1 + 1.
    assert pairs["c"]["d"] == pytest.approx(2.0)
    assert pairs["d"]["c"] == pytest.approx(2.0)
    assert "a" not in pairs.get("d", {})
    assert "c" not in pairs["c"]  # no self pairs (u3's c…c)
    # A window of 1 keeps adjacent steps only: u1's a–c pair goes; u2's a–c was two apart too.
    assert "c" not in cooccurrence(_log(), BundleConfig(window=1))["a"]


def test_fit_normalises_and_keeps_top_m() -> None:
    bundles = Bundles.fit(_log(), BundleConfig(top_m=1))
    pairs = cooccurrence(_log(), BundleConfig())
    total = {k: sum(v.values()) for k, v in pairs.items()}
    [(best, score)] = bundles.complements("b")
    assert best == "c"
    assert score == pytest.approx(15.0 / math.sqrt(total["b"] * total["c"]))
    assert bundles.complements("unknown") == []
    assert len(bundles) == 4


def test_save_load_round_trip_and_errors(tmp_path: Path) -> None:
    assert Bundles.load(tmp_path) is None
    bundles = Bundles.fit(_log(), BundleConfig(window=3, top_m=2))
    bundles.save(tmp_path)
    loaded = Bundles.load(tmp_path)
    assert loaded is not None
    assert loaded.cfg.window == 3
    assert loaded.cfg.top_m == 2
    assert [o for o, _ in loaded.complements("a")] == [o for o, _ in bundles.complements("a")]
    (tmp_path / BUNDLES_FILE).write_text(json.dumps({"items": {}}))
    with pytest.raises(BundleError, match="KeyError: 'config'"):
        Bundles.load(tmp_path)
    (tmp_path / BUNDLES_FILE).write_text("[")
    with pytest.raises(BundleError, match="JSONDecodeError"):
        Bundles.load(tmp_path)


def test_config_is_checked() -> None:
    with pytest.raises(BundleError, match="expected window >= 1"):
        BundleConfig(window=0)


def test_cart_anchors() -> None:
    h = [
        Step("x", "view", 0),
        Step("a", "add_to_cart", 1),
        Step("b", "add_to_cart", 2),
        Step("b", "remove_from_cart", 3),
        Step("c", "purchase", 4),
    ]
    assert cart_anchors(h) == ["c", "a"]
    assert cart_anchors(h, max_anchors=1) == ["c"]
    assert cart_anchors([*h, Step("y", "view", 5)]) == []
    assert cart_anchors([]) == []


def test_fill_slate_no_duplicates_blocked_and_fallback() -> None:
    bundles = Bundles(
        {"a": [("s1", 0.9), ("p", 0.8), ("z", 0.5)], "b": [("s2", 0.95), ("s1", 0.1)]}
    )
    slate = ["p", "q", "r", "s", "t"]
    # Last 3 slots: s2 (0.95, from b), s1 (0.9), p is already kept, z is blocked → fallback r.
    assert fill_slate(slate, ["a", "b"], bundles, m=3, blocked={"z"}) == [
        "p",
        "q",
        "s2",
        "s1",
        "r",
    ]
    # The anchors themselves are never suggested; no anchors = unchanged.
    assert fill_slate(["a", "x"], ["b"], Bundles({"b": [("a", 1.0)]}), m=1) == ["a", "x"]
    assert fill_slate(slate, [], bundles, m=3) == slate
    assert fill_slate(slate, ["a"], bundles, m=0) == slate
    assert fill_slate(["p"], ["a"], bundles, m=5) == ["s1"]
    with pytest.raises(BundleError, match="expected m >= 0 slots to fill, got -1"):
        fill_slate(slate, ["a"], bundles, m=-1)
