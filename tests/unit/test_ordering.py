"""MMR, expected-gain MMR, the expected NDCG + ILD ordering and greedy DPP against their
references; evaluation helpers."""

from __future__ import annotations

import numpy as np
import pytest

from serving.ordering import (
    coverage,
    diversify,
    dpp,
    dpp_reference,
    expected,
    expected_reference,
    intra_list_diversity,
    log_partition_of,
    mmr,
    mmr_reference,
    xmmr,
    xmmr_reference,
)


def case(seed: int, b: int = 6, c: int = 40, d: int = 8, m: int = 3):
    rng = np.random.default_rng(seed)
    rel = rng.standard_normal((b, c))
    rel[rng.random((b, c)) < 0.1] = -np.inf  # filtered candidates
    rel[0, 5:] = -np.inf  # a user with fewer candidates than the slate
    vec = rng.standard_normal((b, c, d))
    cats = rng.integers(0, 6, (b, c, m))
    cats[..., 1:][rng.random((b, c, m - 1)) < 0.5] = -1
    cats[:, ::3] = -1  # items without categories
    return rel, vec, cats


@pytest.mark.parametrize("diversity", [0.0, 0.3, 0.7, 1.0])
@pytest.mark.parametrize("with_categories", [False, True])
@pytest.mark.parametrize(
    ("fast_path", "reference"),
    [(mmr, mmr_reference), (xmmr, xmmr_reference), (expected, expected_reference)],
)
def test_mmr_matches_reference(
    diversity: float, with_categories: bool, fast_path: object, reference: object
) -> None:
    for seed in range(3):
        rel, vec, cats = case(seed)
        # Reference categories must be distinct per item, as the catalog guarantees.
        cats = np.where(cats == np.roll(cats, 1, axis=2), -1, cats)
        c = cats if with_categories else None
        fast = fast_path(rel, vec, 10, diversity, categories=c, category_weight=0.4)  # type: ignore[operator]
        slow = reference(  # type: ignore[operator]
            rel.tolist(),
            vec.tolist(),
            10,
            diversity,
            categories=c.tolist() if c is not None else None,
            category_weight=0.4,
        )
        assert fast.tolist() == slow


@pytest.mark.parametrize("diversity", [0.0, 0.05, 0.3, 0.7, 1.0])
def test_dpp_matches_reference(diversity: float) -> None:
    for seed in range(3):
        rel, vec, _ = case(seed, c=15, d=4)
        vec[1, 3] = vec[1, 2]  # a duplicate: its gain drops to 0 once its twin is picked
        vec[2] = vec[2] * np.abs(vec[2, :, :1])  # vectors of different norms (cosine only)
        fast = dpp(rel, vec, 10, diversity)
        assert fast.tolist() == dpp_reference(rel.tolist(), vec.tolist(), 10, diversity)


def test_dpp_spreads_clusters_and_falls_back_to_relevance() -> None:
    vec = np.array([[[1.0, 0.0]] * 3 + [[0.0, 1.0]] * 3])
    rel = np.array([[6, 5, 4, 3, 2, 1]], dtype=float)
    assert dpp(rel, vec, 3, 0.0).tolist() == [[0, 1, 2]]
    # Two directions span the space: after one of each, the rest follow by relevance.
    assert dpp(rel, vec, 4, 0.5).tolist() == [[0, 3, 1, 2]]
    assert dpp(np.zeros((0, 3)), np.zeros((0, 3, 2)), 2, 0.5).shape == (0, 2)
    short = dpp(np.array([[1.0, -np.inf]]), np.ones((1, 2, 2)), 3, 0.5)
    assert short.tolist() == [[0, -1, -1]]


@pytest.mark.parametrize("order", [mmr, xmmr])
def test_zero_diversity_is_relevance_order(order: object) -> None:
    rel, vec, _ = case(7)
    picks = order(rel, vec, 10, 0.0)  # type: ignore[operator]
    for r, p in zip(rel, picks, strict=True):
        valid = np.isfinite(r)
        want = [j for j in np.argsort(-r, kind="stable") if valid[j]][:10]
        assert p[: len(want)].tolist() == want
        assert (p[len(want) :] == -1).all()


def test_diversity_spreads_clusters() -> None:
    # Two tight clusters; the most relevant items all sit in cluster A.
    vec = np.array([[[1.0, 0.0]] * 5 + [[0.0, 1.0]] * 5])
    rel = np.array([[10, 9, 8, 7, 6, 5, 4, 3, 2, 1]], dtype=float)
    assert mmr(rel, vec, 2, 0.0).tolist() == [[0, 1]]
    assert mmr(rel, vec, 2, 0.8).tolist() == [[0, 5]]
    plain = intra_list_diversity(vec[0, [0, 1]])
    diverse = intra_list_diversity(vec[0, [0, 5]])
    assert plain == pytest.approx(0.0)
    assert diverse == pytest.approx(1.0)


def test_expected_gain_keeps_likely_items_and_diversifies_the_tail() -> None:
    # Cluster A holds the two likely items; the rest are unlikely, and one candidate far
    # down the pool (logit -20) stretches the pool's score range.
    vec = np.array([[[1.0, 0.0]] * 6 + [[0.0, 1.0]] * 4 + [[1.0, 0.0]]])
    rel = np.array([[5.0, 4.5, 1.2, 1.1, 1.0, 0.9, 0.8, 0.7, 0.6, 0.5, -20.0]])
    picks = xmmr(rel, vec, 4, 0.2)[0].tolist()
    # Item 1 is 0.61 as likely as the best and keeps second place; the unlikely tail
    # (< 0.03 of the best) gives way to the other cluster.
    assert picks[:3] == [0, 1, 6]
    # Min-max MMR at the same weight puts cluster B's best (0.015 as likely as the best)
    # above item 1: after scaling by the range, 4.5 and 0.8 look alike.
    assert mmr(rel, vec, 4, 0.2)[0].tolist()[:2] == [0, 6]
    assert diversify("dcg", rel, vec, 4, 0.2).tolist() == xmmr(rel, vec, 4, 0.2).tolist()
    assert diversify("mmr", rel, vec, 4, 0.2).tolist() == mmr(rel, vec, 4, 0.2).tolist()
    # Logits: a constant added to a row changes nothing.
    assert xmmr(rel + 100.0, vec, 4, 0.2).tolist() == xmmr(rel, vec, 4, 0.2).tolist()


@pytest.mark.parametrize("diversity", [0.005, 0.02, 0.1])
@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_expected_matches_reference_at_its_weights(diversity: float, temperature: float) -> None:
    # Its weights sit near 0.01 (probabilities are small); a pool's partition may be given.
    for seed in range(3):
        rel, vec, cats = case(seed)
        cats = np.where(cats == np.roll(cats, 1, axis=2), -1, cats)
        log_z = log_partition_of(rel, temperature) + np.linspace(0.0, 2.0, len(rel))
        for part in (None, log_z):
            fast = expected(
                rel, vec, 10, diversity, categories=cats, temperature=temperature,
                log_partition=part,
            )  # fmt: skip
            slow = expected_reference(
                rel.tolist(), vec.tolist(), 10, diversity, categories=cats.tolist(),
                temperature=temperature, log_partition=None if part is None else part.tolist(),
            )  # fmt: skip
            assert fast.tolist() == slow


def test_expected_diversifies_the_uncertain_user_not_the_confident_one() -> None:
    # Two users with the same pool of candidates and scores. User 0's pool is all of its
    # candidates (its best has p = 0.29); user 1's was cut from a long flat list holding 40
    # times the pool's mass (its best has p = 0.007). Cluster A = 0-5, cluster B = 6-9.
    vec = np.array([[[1.0, 0.0]] * 6 + [[0.0, 1.0]] * 4] * 2)
    top = [6.0, 5.5, 5.2, 5.1, 5.0, 4.9, 3.6, 3.5, 3.4, 3.3]
    rel = np.array([top, top])
    flat = log_partition_of(rel) + np.log(40.0)  # user 1's pool was cut from a flat list
    part = np.array([log_partition_of(rel)[0], flat[1]])
    picks = expected(rel, vec, 4, 0.02, log_partition=part).tolist()
    assert picks[0] == [0, 1, 2, 3]  # confident: the likely items stay
    assert picks[1][:2] == [0, 6]  # uncertain: cluster B comes in second
    # Expected-gain MMR reads both users alike (the same ratios to the best).
    rows = xmmr(rel, vec, 4, 0.2).tolist()
    assert rows[0] == rows[1]
    # Without the partition the pool looks confident too: the two users are alike again.
    alike = expected(rel, vec, 4, 0.02).tolist()
    assert alike[0] == alike[1] == picks[0]
    # Logits: a constant added to a row (and to its partition) changes nothing.
    again = expected(rel + 50.0, vec, 4, 0.02, log_partition=part + 50.0).tolist()
    assert again == picks
    assert diversify("expected", rel, vec, 4, 0.02, log_partition=part).tolist() == picks


def test_log_partition_of() -> None:
    s = np.array([[1.0, 2.0, -np.inf], [-np.inf, -np.inf, -np.inf], [0.0, 0.0, 0.0]])
    got = log_partition_of(s, temperature=2.0)
    np.testing.assert_allclose(got[[0, 2]], [np.log(np.exp(0.5) + np.exp(1.0)), np.log(3.0)])
    assert got[1] == -np.inf


def test_helpers() -> None:
    assert intra_list_diversity(np.ones((1, 4))) == 0.0
    batch = intra_list_diversity(np.array([[[1, 0], [0, 1]], [[1, 0], [1, 0]]], dtype=float))
    np.testing.assert_allclose(batch, [1.0, 0.0])
    assert coverage([["a", "b"], ["b", "c"]], 6) == 0.5
    assert coverage([[1, 2, -1]], 4) == 0.5
    assert mmr(np.zeros((0, 3)), np.zeros((0, 3, 2)), 2, 0.5).shape == (0, 2)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: mmr(np.zeros(3), np.zeros((1, 3, 2)), 1, 0.5), r"relevance \(B, C\)"),
        (lambda: mmr(np.zeros((1, 3)), np.zeros((1, 3, 2)), 1, 1.5), r"diversity in \[0, 1\]"),
        (
            lambda: mmr(np.zeros((1, 3)), np.zeros((1, 3, 2)), 1, 0.5, categories=np.zeros((1, 3))),
            r"categories \(B, C, M\)",
        ),
        (lambda: dpp(np.zeros((1, 3)), np.zeros((1, 3, 2)), 1, -0.1), r"diversity in \[0, 1\]"),
        (lambda: xmmr(np.zeros((1, 3)), np.zeros((1, 3, 2)), 1, 2.0), r"diversity in \[0, 1\]"),
        (
            lambda: diversify("dpp", np.zeros((1, 3)), np.zeros((1, 3, 2)), 1, 0.5),
            r"ordering in \['expected', 'dcg', 'mmr'\]",
        ),
        (
            lambda: expected(np.zeros((2, 3)), np.zeros((2, 3, 2)), 1, 0.5, log_partition=[0.0]),
            r"log_partition of shape \(2,\)",
        ),
        (lambda: expected(np.zeros((1, 3)), np.zeros((1, 3, 2)), 1, 0.5, temperature=0), "> 0"),
        (lambda: intra_list_diversity(np.zeros(3)), r"\(S, D\) or \(B, S, D\)"),
        (lambda: coverage([["a"]], 0), "n_items > 0"),
    ],
)
def test_bad_input_is_rejected(call: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()  # type: ignore[operator]
