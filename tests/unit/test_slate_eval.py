"""Slate metrics against hand-computed values; the evaluation protocol on a tiny log."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from serving.artifacts import LoadedEncoder, load_model, save_model
from serving.data import EncodedLog, EvalCase, Interactions, ItemVocab, leave_one_out
from serving.encoder import EncoderConfig, SequenceEncoder
from serving.evaluate import evaluate_split
from serving.reranker import MISS, RerankTrainConfig, train_reranker
from serving.slate_eval import (
    calibrate,
    choose_diversity,
    choose_weight,
    evaluate_slates,
    fitted_for_seen_filter,
    mmr_slates,
    plot_tradeoff,
    seen_mask,
    slate_metrics,
    slate_ranks,
    top_k,
    weight_grid,
)

torch.set_num_threads(1)

# Items 1..4: 1 and 2 point the same way, 3 and 4 are orthogonal to them and to each other.
VECS = np.array([[0, 0, 0], [1, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=np.float32)


def test_slate_ranks_hand_computed() -> None:
    slates = np.array([[3, 1, 2], [4, -1, -1], [1, 2, 3]])
    ranks = slate_ranks(slates, np.array([2, 4, 0]))
    assert ranks.tolist() == [2, 0, MISS]  # target 0 (unknown item) never matches padding
    with pytest.raises(ValueError, match=r"slates \(U, S\) and targets \(U,\)"):
        slate_ranks(slates, np.array([1, 2]))


def test_slate_metrics_hand_computed() -> None:
    slates = np.array([[1, 2], [3, 4]])
    m = slate_metrics(slates, np.array([2, 9]), VECS, k=2)
    assert m["HR@2"] == 0.5
    assert m["NDCG@2"] == pytest.approx(0.5 / math.log2(3))
    # user 0: cos(1, 2) = 1 -> distance 0; user 1: orthogonal -> 1. Mean 0.5.
    assert m["ILD@2"] == pytest.approx(0.5)
    assert m["coverage@2"] == 1.0  # items 1..4 of 4
    m1 = slate_metrics(np.array([[1, 3, 2]]), np.array([1]), VECS, k=1)
    assert m1 == {"HR@1": 1.0, "NDCG@1": 1.0, "ILD@1": 0.0, "coverage@1": 0.25}
    with pytest.raises(ValueError, match=r"slates \(U, >= 3\)"):
        slate_metrics(slates, np.array([1, 2]), VECS, k=3)
    with pytest.raises(ValueError, match="at least one slate"):
        slate_metrics(np.zeros((0, 2), np.int64), np.zeros(0, np.int64), VECS, k=2)


def test_top_k_and_mmr_slates() -> None:
    cand = np.array([[1, 2, 3, 4]])
    scores = np.array([[0.9, 0.8, 0.5, -np.inf]])
    assert top_k(cand, scores, 4).tolist() == [[1, 2, 3, -1]]
    assert mmr_slates(cand, scores, VECS, 2, 0.0).tolist() == [[1, 2]]
    # With diversity, item 2 (a duplicate direction of item 1) loses to item 3.
    assert mmr_slates(cand, scores, VECS, 2, 0.6).tolist() == [[1, 3]]
    # Similarity by category alone: 1 and 3 share category 7, so now item 2 wins.
    cats = np.array([[-1], [7], [8], [7], [9]])
    got = mmr_slates(cand, scores, VECS, 2, 0.6, categories=cats, category_weight=1.0)
    assert got.tolist() == [[1, 2]]
    assert mmr_slates(cand, scores, VECS, 2, 0.6, ordering="dpp").tolist() == [[1, 3]]
    with pytest.raises(ValueError, match="expected ordering in"):
        mmr_slates(cand, scores, VECS, 2, 0.6, ordering="bogus")
    with pytest.raises(ValueError, match="no categories for ordering='dpp'"):
        mmr_slates(cand, scores, VECS, 2, 0.6, categories=cats, ordering="dpp")


def test_choose_diversity() -> None:
    curve = [
        {"diversity": 0.0, "NDCG@10": 0.100, "ILD@10": 0.50},
        {"diversity": 0.1, "NDCG@10": 0.099, "ILD@10": 0.60},
        {"diversity": 0.2, "NDCG@10": 0.0985, "ILD@10": 0.70},
        {"diversity": 0.3, "NDCG@10": 0.090, "ILD@10": 0.90},
    ]
    assert choose_diversity(curve, max_loss=0.02)["diversity"] == 0.2
    assert choose_diversity(curve, max_loss=0.0)["diversity"] == 0.0
    # A row's NDCG@10 standard error is kept as a margin: 0.2 is within 2% only by luck.
    noisy = [{**r, "NDCG@10_se": 0.0005 * r["diversity"] / 0.1} for r in curve]
    assert choose_diversity(noisy, max_loss=0.02)["diversity"] == 0.1
    assert choose_diversity(noisy, max_loss=0.02, margin_se=0.0)["diversity"] == 0.2
    with pytest.raises(ValueError, match=r"diversity 0\.0 row"):
        choose_diversity(curve[1:])


@pytest.mark.parametrize("ordering", ["expected", "dcg"])
def test_choose_weight_is_the_largest_within_the_loss(ordering: str) -> None:
    """Candidates in two directions; the likely ones share one, so diversity costs NDCG."""
    rng = np.random.default_rng(5)
    n_items, users, c = 60, 400, 30
    vecs = np.zeros((n_items + 1, 2), np.float32)
    vecs[1:31, 0], vecs[31:, 1] = 1.0, 1.0
    vecs[1:] += rng.normal(0, 0.1, (n_items, 2)).astype(np.float32)
    cand = np.stack([rng.permutation(np.arange(1, n_items + 1))[:c] for _ in range(users)])
    scores = np.where(cand <= 30, 2.0, 0.0) + rng.normal(0, 1.0, cand.shape)
    p = np.exp(scores) / np.exp(scores).sum(axis=1, keepdims=True)
    targets = np.array([row[rng.choice(c, p=pr)] for row, pr in zip(cand, p, strict=True)])

    def ndcg(w: float) -> float:
        slates = mmr_slates(cand, scores, vecs, 10, w, ordering=ordering)
        return slate_metrics(slates, targets, vecs, 10)["NDCG@10"]

    got = choose_weight(
        cand, scores, targets, vecs, temperature=1.0, max_loss=0.02, ordering=ordering,
        margin_se=0.0,
    )  # fmt: skip
    base, at = ndcg(0.0), ndcg(got.diversity)
    assert got.diversity > 0.0
    assert at >= 0.98 * base  # within the loss...
    assert got.ndcg_change == pytest.approx(at / base - 1.0, abs=1e-4)
    assert got.ild_change > 0
    larger = [w for w in weight_grid(ordering) if w > got.diversity]
    assert larger
    assert all(ndcg(w) < 0.98 * base for w in larger)  # ... and the largest such
    assert (got.ordering, got.users, got.max_loss) == (ordering, users, 0.02)
    # The default keeps one standard error of the NDCG@10 change inside the loss: never more.
    safe = choose_weight(cand, scores, targets, vecs, temperature=1.0, ordering=ordering)
    assert (safe.margin_se, got.margin_se) == (1.0, 0.0)
    assert safe.diversity <= got.diversity
    strict = choose_weight(
        cand, scores, targets, vecs, temperature=1.0, max_loss=0.0, users=100, ordering=ordering
    )
    assert strict.users == 100
    assert strict.ndcg_change >= 0.0


@pytest.fixture
def encoder(tmp_path: Path, tiny_log: Interactions) -> LoadedEncoder:
    torch.manual_seed(0)
    items = tiny_log.item_ids()
    model = SequenceEncoder(EncoderConfig(num_items=len(items), dim=16, heads=2, max_len=8))
    save_model(model.eval(), tmp_path / "m", items)
    return load_model(tmp_path / "m", device="cpu")


def test_evaluate_slates_protocol(
    encoder: LoadedEncoder, tiny_log: Interactions, tmp_path: Path
) -> None:
    split = leave_one_out(tiny_log)
    only = evaluate_slates(encoder, split, stages="retrieval", candidates=20)
    # Retrieval-only on the top-C candidates equals the full ranking at k <= C.
    assert only["retrieval"]["NDCG@10"] == pytest.approx(only["retrieval_full"]["NDCG@10"])
    assert only["retrieval"]["HR@10"] == pytest.approx(only["retrieval_full"]["HR@10"])
    assert "rerank" not in only
    with pytest.raises(ValueError, match="a report with a 'curve'"):
        plot_tradeoff(only, tmp_path / "x.png")
    cfg = RerankTrainConfig(candidates=20, prefixes=1, epochs=1)
    rr = train_reranker(encoder, split, cfg, model={"dim": 16, "max_len": 8}).reranker
    rep = evaluate_slates(encoder, split, reranker=rr, candidates=20, grid=(0.0, 0.5, 1.0))
    assert [r["diversity"] for r in rep["curve"]["rerank"]] == [0.0, 0.5, 1.0]
    assert rep["curve"]["rerank"][0]["NDCG@10"] == pytest.approx(rep["rerank"]["NDCG@10"])
    assert rep["diversity"] in (0.0, 0.5, 1.0)
    assert set(rep["lift_over_filtered"]) == set(rep["rerank_filtered"])
    assert rep["category_weight"] == 0.0
    fixed = evaluate_slates(
        encoder, split, reranker=rr, candidates=20, grid=(0.0, 1.0), diversity=0.3
    )
    assert fixed["diversity"] == 0.3
    assert plot_tradeoff(fixed, tmp_path / "c.png").stat().st_size > 1000
    sub = evaluate_slates(
        encoder,
        split,
        reranker=rr,
        candidates=20,
        grid=(0.0,),
        curve_users=10,
        retrieval_curve=False,
        category_weight=0.5,
    )
    assert sub["curve_users"] == 10
    assert sub["category_weight"] == 0.5
    assert set(sub["curve"]) == {"rerank"}
    assert sub["users"] == len(split.test)  # headline rows still use every user
    with pytest.raises(ValueError, match="expected stages in"):
        evaluate_slates(encoder, split, stages="bogus")
    with pytest.raises(ValueError, match="expected a trained reranker"):
        evaluate_slates(encoder, split, stages="rerank")
    rr.net.cfg = replace(rr.cfg, encoder_version="other")
    with pytest.raises(ValueError, match="trained on other"):
        evaluate_slates(encoder, split, reranker=rr, stages="rerank")
    empty = leave_one_out(Interactions("e", tuple(u for u in tiny_log.users if len(u.items) < 3)))
    with pytest.raises(ValueError, match="expected test cases"):
        evaluate_slates(encoder, empty, stages="retrieval")


def test_seen_mask_hand_computed(tiny_log: Interactions) -> None:
    items = tiny_log.item_ids()
    log_ = EncodedLog(tiny_log, ItemVocab(items))
    hist = log_.items[1]  # user 1 has 9 distinct steps
    cand = np.array([[hist[0], hist[2], hist[3], 0], [hist[1], hist[1], 0, hist[4]]])
    cases = [EvalCase(1, 3), EvalCase(1, 2)]
    got = seen_mask(cand, log_, cases)
    assert got.tolist() == [[True, True, False, False], [True, True, False, False]]
    with pytest.raises(ValueError, match="expected candidates"):
        seen_mask(cand[:1], log_, cases)


def test_filtered_rows_equal_history_excluded_full_ranking(
    tmp_path: Path, tiny_log: Interactions
) -> None:
    """With every item a candidate (and a window covering whole histories), retrieval with the
    seen filter is the full ranking with history excluded (no target repeats in the tiny log)."""
    torch.manual_seed(0)
    items = tiny_log.item_ids()
    model = SequenceEncoder(EncoderConfig(num_items=len(items), dim=16, heads=2, max_len=16))
    save_model(model.eval(), tmp_path / "m", items)
    enc = load_model(tmp_path / "m", device="cpu")
    split = leave_one_out(tiny_log)
    rep = evaluate_slates(enc, split, stages="retrieval", candidates=len(items))
    ex = evaluate_split(
        enc.model,
        split,
        EncodedLog(split.data, enc.vocab),
        "test",
        max_len=16,
        exclude_history=True,
    )
    assert rep["seen_share"] > 0
    assert rep["retrieval_filtered"]["NDCG@10"] == pytest.approx(ex.metrics["NDCG@10"])
    assert rep["retrieval_filtered"]["HR@10"] == pytest.approx(ex.metrics["HR@10"])


def test_full_stage_without_a_reranker_orders_what_the_worker_orders(
    encoder: LoadedEncoder, tiny_log: Interactions, tmp_path: Path
) -> None:
    """No reranker: the curve orders the retrieval scores; with ``filter_seen`` the history
    items are dropped first, so its weight-0 row is the seen-filtered retrieval row."""
    split = leave_one_out(tiny_log)
    grid = (0.0, 0.01, 0.1)
    kept = evaluate_slates(encoder, split, candidates=20, grid=grid)
    assert (kept["curve_of"], set(kept["curve"]), kept["ordering"]) == (
        "retrieval",
        {"retrieval"},
        "expected",
    )
    assert kept["seen_filtered"] is False
    assert kept["curve"]["retrieval"][0]["NDCG@10"] == pytest.approx(kept["retrieval"]["NDCG@10"])
    seen = evaluate_slates(encoder, split, candidates=20, grid=grid, filter_seen=True)
    assert seen["seen_share"] > 0
    assert seen["seen_filtered"] is True
    base = seen["curve"]["retrieval"][0]
    assert base["NDCG@10"] == pytest.approx(seen["retrieval_filtered"]["NDCG@10"])
    assert base["ILD@10"] == pytest.approx(seen["retrieval_filtered"]["ILD@10"])
    assert seen["diversity"] in grid
    assert plot_tradeoff(seen, tmp_path / "r.png").stat().st_size > 1000


def test_calibrate_follows_the_seen_filter_the_side_scores_were_fitted_for(
    encoder: LoadedEncoder, tiny_log: Interactions
) -> None:
    split = leave_one_out(tiny_log)
    kept = calibrate(encoder, split, candidates=20)
    assert (kept.weights["retrieval"].ordering, kept.weights["retrieval"].seen_filtered) == (
        "expected",
        False,
    )
    # `streamrec train --filter-seen` records the protocol; calibrate then drops the history
    # items from the candidates before it fits the temperature and the weight.
    encoder.config["covisit_fit"] = {"validation_history": "excluded"}
    assert fitted_for_seen_filter(encoder)
    auto = calibrate(encoder, split, candidates=20)
    assert auto.weights["retrieval"].seen_filtered is True
    assert encoder.config["slate"]["seen_filtered"] is True
    assert auto.fits["retrieval"].nll != pytest.approx(kept.fits["retrieval"].nll)
    forced = calibrate(encoder, split, candidates=20, filter_seen=False)
    assert forced.fits["retrieval"].nll == pytest.approx(kept.fits["retrieval"].nll)
