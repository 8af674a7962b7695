"""Fresh-item slates for the cold-start benchmark: the pipeline's reserved places and the score
boost on tiny hand-computed catalogues (serving.fresh_eval)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from serving.fresh_eval import (
    MISS,
    FixedUserVectors,
    SlateSetup,
    boosted,
    choose_margin,
    clustered_se,
    hit_metrics,
    margin_grid,
    pipeline_slates,
    slate_positions,
)
from serving.types import CachingUserEncoder, Step

# score = first coordinate for the user [1, 0]; the second keeps every vector non-zero.
IDS = ["w1", "w2", "w3", "w4", "f1", "f2", "f3"]
SCORES = [5.0, 4.0, 3.0, 2.0, 1.0, 0.5, 0.2]
FRESH = np.array([False] * 4 + [True] * 3)
USER = np.array([[1.0, 0.0]], np.float32)


def vectors(scores: list[float]) -> np.ndarray:
    return np.array([[s, 1.0] for s in scores], np.float32)


def steps(*items: str) -> list[Step]:
    return [Step(i, "rating", 1_000 * n) for n, i in enumerate(items)]


def slate(
    history: list[Step],
    fresh_slots: int,
    *,
    scores: list[float] = SCORES,
    filter_seen: bool = True,
) -> list[str]:
    setup = SlateSetup(fresh_slots=fresh_slots, slate_size=3, candidates=7, filter_seen=filter_seen)
    return pipeline_slates(IDS, vectors(scores), FRESH, USER, [history], setup)[0]


def test_fixed_user_vectors_is_a_caching_encoder() -> None:
    enc = FixedUserVectors(["a", "b"], np.eye(2, dtype=np.float32), {"u": np.array([1.0, 2.0])})
    assert isinstance(enc, CachingUserEncoder)
    assert enc.dim == 2
    assert enc.encode_users(["u", "u"], [[], []]).tolist() == [[1.0, 2.0], [1.0, 2.0]]
    with pytest.raises(TypeError, match="encode_users"):
        enc.encode([[]])
    with pytest.raises(ValueError, match=r"item vectors \(2, D\)"):
        FixedUserVectors(["a", "b"], np.ones((3, 2)), {})


def test_reserved_places_are_the_last_ones_and_best_fresh_first() -> None:
    history = steps("w4")  # seen (filtered), and a warm item so the user is not cold
    assert slate(history, 0) == ["w1", "w2", "w3"]
    assert slate(history, 1) == ["w1", "w2", "f1"]
    assert slate(history, 2) == ["w1", "f1", "f2"]
    assert slate(history, 3) == ["f1", "f2", "f3"]


def test_reserved_places_skip_seen_fresh_items_and_warm_part_moves_up() -> None:
    # w1 and f1 were seen: the warm part is w2, w3 and the reserved place gets f2.
    assert slate(steps("w1", "f1"), 1) == ["w2", "w3", "f2"]
    # Without filter_seen only the trigger (the last step, f1) is excluded.
    assert slate(steps("w1", "f1"), 1, filter_seen=False) == ["w1", "w2", "f2"]


def test_fresh_item_already_in_the_slate_is_not_repeated() -> None:
    # f3 outscores every warm item, so retrieval puts it first; the reserved place takes the
    # next fresh item, f1, and the warm part keeps its first two places.
    scores = [5.0, 4.0, 3.0, 2.0, 1.0, 0.5, 6.0]
    assert slate(steps("w4"), 0, scores=scores) == ["f3", "w1", "w2"]
    assert slate(steps("w4"), 1, scores=scores) == ["f3", "w1", "f1"]


def test_boost_is_an_additive_margin_inside_the_ordinary_ranking() -> None:
    items, users = boosted(
        np.array([[1.0, 0.0], [0.0, 1.0]]), np.array([[2.0, 1.0]]), np.array([False, True]), 0.5
    )
    assert (users @ items.T).tolist() == [[2.0, 1.5]]
    items, users = boosted(vectors(SCORES), USER, FRESH, 3.6)  # f1 4.6, f2 4.1, f3 3.8
    setup = SlateSetup(fresh_slots=0, slate_size=3, candidates=7)
    assert pipeline_slates(IDS, items, FRESH, users, [steps("w4")], setup) == [["w1", "f1", "f2"]]
    with pytest.raises(ValueError, match=r"fresh \(N,\)"):
        boosted(np.ones((2, 2)), np.ones((1, 2)), np.array([True]), 1.0)


def test_slates_with_diversity_and_categories_keep_the_reserved_place_last() -> None:
    setup = SlateSetup(fresh_slots=1, slate_size=3, candidates=7, diversity=0.2)
    cats = {i: ("drama",) for i in IDS}
    out = pipeline_slates(IDS, vectors(SCORES), FRESH, USER, [steps("w4")], setup, categories=cats)
    assert out[0][-1] == "f1"
    assert set(out[0][:2]) <= {"w1", "w2", "w3"}


def test_pipeline_slates_checks_its_inputs() -> None:
    with pytest.raises(ValueError, match="one user vector per history"):
        pipeline_slates(IDS, vectors(SCORES), FRESH, USER, [], SlateSetup())


def test_positions_and_hit_metrics_hand_computed() -> None:
    pos = slate_positions([["a", "b"], ["c"], ["d", "e"]], ["b", "x", "d"])
    assert pos.tolist() == [1, MISS, 0]
    m = hit_metrics(np.array([0, 9, 10, MISS]))
    assert m["HR@10"] == 0.5
    assert m["NDCG@10"] == pytest.approx((1.0 + 1.0 / math.log2(11)) / 4)
    with pytest.raises(ValueError, match="one target per slate"):
        slate_positions([["a"]], [])
    with pytest.raises(ValueError, match="at least one position"):
        hit_metrics(np.array([], dtype=np.int64))


def test_margin_grid_is_zero_plus_quantiles_of_positive_gaps() -> None:
    grid = margin_grid(np.array([-1.0, 0.0, 1.0, 2.0, 3.0, 4.0, np.inf]), steps=4)
    assert grid == [0.0, 1.75, 2.5, 3.25, 4.0]
    assert margin_grid(np.array([-1.0])) == [0.0]


def test_choose_margin_weighs_cold_and_warm_hit_rates() -> None:
    table = {0.0: (0.0, 0.5), 1.0: (0.5, 0.45), 2.0: (1.0, 0.0)}
    choice = choose_margin([2.0, 0.0, 1.0], lambda m: table[m], cold_weight=0.1)
    assert choice.margin == 1.0  # objectives 0.45, 0.455, 0.1
    assert choice.objective == pytest.approx(0.455)
    assert [c["margin"] for c in choice.curve] == [0.0, 1.0, 2.0]
    assert choose_margin([0.0, 1.0, 2.0], lambda m: table[m], cold_weight=0.0).margin == 0.0
    assert choose_margin([0.0, 1.0, 2.0], lambda m: table[m], cold_weight=1.0).margin == 2.0
    assert choose_margin([3.0, 1.0], lambda m: (0.2, 0.2), cold_weight=0.5).margin == 1.0
    with pytest.raises(ValueError, match="non-empty grid"):
        choose_margin([], lambda m: (0.0, 0.0), 0.5)
    with pytest.raises(ValueError, match="cold_weight in"):
        choose_margin([0.0], lambda m: (0.0, 0.0), 1.5)


def test_clustered_se_hand_computed() -> None:
    # mean 0.75; per-user residual sums: a = 0.25 - 0.75 = -0.5, b = 0.25, c = 0.25
    se = clustered_se(np.array([1.0, 0.0, 1.0, 1.0]), np.array(["a", "a", "b", "c"]))
    assert se == pytest.approx(math.sqrt(0.25 + 0.0625 + 0.0625) / 4)
    # One case per user: the plain standard error sqrt(p (1 - p) / n).
    assert clustered_se(np.array([1.0, 0.0, 0.0, 0.0]), np.arange(4)) == pytest.approx(
        math.sqrt(0.25 * 0.75 / 4)
    )
    with pytest.raises(ValueError, match=r"values \(n,\) and groups \(n,\)"):
        clustered_se(np.array([1.0]), np.array([1, 2]))
