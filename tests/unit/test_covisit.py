"""Co-visitation counts (serving.covisit): against a slow reference, online = offline, files,
the evaluator's boost, the validation fit, the pipeline stage and the CLI."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from serving.artifacts import ArtifactError, load_model
from serving.covisit import (
    FILE,
    CoVisitation,
    CoVisitConfig,
    CoVisitError,
    batch_booster,
    fit_covisit,
    recent_items,
    sequences_before,
    store_covisit,
)
from serving.data import (
    EncodedLog,
    Interactions,
    ItemVocab,
    UserHistory,
    leave_one_out,
    load_interactions,
)
from serving.encoder import Batch
from serving.evaluate import rank_targets
from serving.pipeline import Pipeline, RetrievalScoreReranker, SlateRequest
from serving.slate_eval import calibrate
from serving.types import Step
from streamrec.cli import app

from .test_evaluate import FixedScorer, one, tiny_train_args, write_events


def reference_counts(
    seqs: list[list[int]], window: int, decay: float, top_k: int
) -> dict[tuple[int, int], float]:
    """Pair counts by plain loops; each row cut to its top_k (largest count, then smaller b)."""
    counts: dict[tuple[int, int], float] = defaultdict(float)
    for s in seqs:
        for i, a in enumerate(s):
            for w in range(1, window + 1):
                if i + w < len(s) and a > 0 and s[i + w] > 0:
                    counts[(a, s[i + w])] += decay ** (w - 1)
    rows: dict[int, list[tuple[int, float]]] = defaultdict(list)
    for (a, b), c in counts.items():
        rows[a].append((b, c))
    kept = {}
    for a, pairs in rows.items():
        for b, c in sorted(pairs, key=lambda p: (-p[1], p[0]))[:top_k]:
            kept[(a, b)] = c
    return kept


def as_dict(table: CoVisitation) -> dict[tuple[int, int], float]:
    span = table.num_items + 1
    return {
        (int(k // span), int(k % span)): float(c)
        for k, c in zip(table.keys, table.counts, strict=True)
    }


def random_seqs(rng: np.random.Generator, n_items: int, users: int) -> list[list[int]]:
    return [
        [int(x) for x in rng.integers(0, n_items + 1, size=rng.integers(1, 12))]
        for _ in range(users)
    ]


@pytest.mark.parametrize(("window", "decay", "top_k"), [(1, 1.0, 100), (3, 0.5, 100), (3, 0.5, 2)])
def test_build_matches_reference(window: int, decay: float, top_k: int) -> None:
    rng = np.random.default_rng(3)
    seqs = random_seqs(rng, 9, 60)
    cfg = CoVisitConfig(window=window, decay=decay, top_k=top_k)
    table = CoVisitation.build([np.array(s) for s in seqs], 9, cfg)
    ref = reference_counts(seqs, window, decay, top_k)
    got = as_dict(table)
    assert got.keys() == ref.keys()
    for pair, count in ref.items():
        assert got[pair] == pytest.approx(count)
    assert np.all(np.diff(table.keys) > 0)


def test_boost_matches_formula_and_dense() -> None:
    rng = np.random.default_rng(5)
    seqs = random_seqs(rng, 15, 80)
    cfg = CoVisitConfig(window=3, decay=0.5, lookback=3, lookback_decay=0.5)
    table = CoVisitation.build([np.array(s) for s in seqs], 15, cfg)
    ref = reference_counts(seqs, 3, 0.5, 200)
    recent = rng.integers(0, 16, size=(7, 3))
    cands = rng.integers(0, 16, size=(7, 11))
    got = table.boost(recent, cands)
    for b in range(7):
        for c in range(11):
            want = sum(
                0.5**j * math.log1p(ref.get((int(recent[b, j]), int(cands[b, c])), 0.0))
                for j in range(3)
                if recent[b, j] > 0 and cands[b, c] > 0
            )
            assert got[b, c] == pytest.approx(want, abs=1e-5)
    dense = table.dense_boost(recent)
    assert dense.shape == (7, 16)
    np.testing.assert_allclose(np.take_along_axis(dense, cands, 1)[cands > 0], got[cands > 0], 1e-5)
    assert not dense[:, 0].any()


def test_online_counts_equal_a_rebuild() -> None:
    """Observing every later step one by one gives the counts of a build on the whole log."""
    rng = np.random.default_rng(11)
    seqs = [[int(x) for x in rng.integers(1, 13, size=rng.integers(2, 10))] for _ in range(40)]
    cfg = CoVisitConfig(window=3, decay=0.5, top_k=1000)
    table = CoVisitation.build([np.array(s[:1]) for s in seqs], 12, cfg)
    assert len(table) == 0
    table.merge_every = 7  # several merges on the way
    for s in seqs:
        for i in range(1, len(s)):
            table.observe(s[:i], s[i])
            table.flush()
    table.flush(force=True)
    full = CoVisitation.build([np.array(s) for s in seqs], 12, cfg)
    assert as_dict(table).keys() == as_dict(full).keys()
    np.testing.assert_allclose(table.counts, full.counts, rtol=1e-6)
    assert table.observed == sum(min(3, i) for s in seqs for i in range(1, len(s)))


def test_pending_counts_wait_for_a_merge_and_unknown_items_are_ignored() -> None:
    table = CoVisitation(5, CoVisitConfig(), merge_every=100, merge_after_s=3600.0)
    table.observe([1, 2], 3)
    table.observe([0, 9], 4)  # unknown / out of range items count nothing
    table.observe([1], 99)
    assert table.lookup(np.array([2]), np.array([3]))[0] == 0.0  # not merged yet
    assert not table.flush()
    assert table.flush(force=True)
    assert table.lookup(np.array([2, 1, 9]), np.array([3, 3, 4])).tolist() == [1.0, 0.5, 0.0]
    assert len(table) == 2


def test_max_pairs_drops_the_weakest() -> None:
    table = CoVisitation(20, CoVisitConfig(max_pairs=10))
    for b in range(1, 13):
        for _ in range(b):
            table.observe([1], b + 1)
    table.flush(force=True)
    assert len(table) == 9  # 12 pairs > 10: cut to 90% of the budget
    kept = sorted(int(k % 21) for k in table.keys)
    assert kept == list(range(5, 14))  # the 9 most frequent successors of item 1


def test_save_load_and_errors(tmp_path: Path) -> None:
    cfg = CoVisitConfig(weight=2.0, lookback=2)
    table = CoVisitation.build([np.array([1, 2, 3]), np.array([2, 3])], 4, cfg)
    table.observe([3], 4)  # pending counts are saved too
    table.save(tmp_path)
    back = CoVisitation.load(tmp_path, cfg.to_dict())
    assert back is not None
    assert back.num_items == 4
    assert back.config == cfg
    assert as_dict(back) == as_dict(table)
    assert (3, 4) in as_dict(back)
    assert CoVisitation.load(tmp_path / "nothing", cfg.to_dict()) is None
    with pytest.raises(CoVisitError, match="unknown settings"):
        CoVisitation.load(tmp_path, {"weight": 1.0, "typo": 3})
    (tmp_path / FILE).write_bytes(b"not safetensors")
    with pytest.raises(CoVisitError, match="readable table"):
        CoVisitation.load(tmp_path, cfg.to_dict())
    with pytest.raises(ValueError, match="expected decays"):
        CoVisitConfig(decay=0.0)
    with pytest.raises(ValueError, match="sorted distinct keys"):
        CoVisitation(4, cfg, np.array([3, 2]), np.array([1.0, 1.0]))


def test_followers_are_the_largest_boosts_minus_the_excluded() -> None:
    rng = np.random.default_rng(3)
    table = CoVisitation.build(random_seqs(rng, 30, 200), 30, CoVisitConfig(top_k=8))
    recent = rng.integers(0, 31, size=(16, 3))
    exclude = rng.integers(0, 31, size=(16, 5))
    items, boosts = table.followers(table.user_gains(recent), exclude, 4)
    dense = table.dense_boost(recent)
    for b in range(16):
        allowed = dense[b].copy()
        allowed[exclude[b][exclude[b] > 0]] = 0.0
        want = np.sort(allowed[allowed > 0])[::-1][:4]
        got = boosts[b][items[b] > 0]
        np.testing.assert_allclose(got, want, rtol=1e-5)  # best first
        np.testing.assert_allclose(dense[b][items[b][items[b] > 0]], got, rtol=1e-5)
        assert not set(items[b][items[b] > 0].tolist()) & set(exclude[b].tolist())
    assert table.followers(table.user_gains(recent), exclude, 0)[0].shape == (16, 0)


def test_recent_items_newest_first() -> None:
    items = torch.tensor([[0, 0, 4, 5], [1, 2, 3, 7]])
    assert recent_items(items, 3).tolist() == [[5, 4, 0], [7, 3, 2]]
    assert recent_items(items[:, -1:], 2).tolist() == [[5, 0], [7, 0]]


def test_rank_targets_with_boost() -> None:
    """The boost changes the full ranking exactly as the formula says."""
    table_vecs = torch.tensor(
        [[0.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.9, 0.0], [0.0, 0.8, 0.0], [0.0, 0.7, 0.0]]
    )
    scorer = FixedScorer(table_vecs)  # newest item 1: scores items 1.0 0.9 0.8 0.7
    cv = CoVisitation.build([np.array([1, 4])], 4, CoVisitConfig(weight=0.5))
    inputs, targets = [one(1)], np.array([4])
    assert rank_targets(scorer, inputs, targets).tolist() == [3]
    # item 4 followed item 1 once: +0.5 * log(2) = 0.347 -> 1.047, above everything
    boosted = rank_targets(scorer, inputs, targets, boost=batch_booster(cv))
    assert boosted.tolist() == [0]
    cv_small = cv.with_weight(0.2)  # +0.139 -> 0.839: above item 3 (0.8) only
    assert rank_targets(scorer, inputs, targets, boost=batch_booster(cv_small)).tolist() == [2]


def chain_log(users: int = 40, items: int = 10) -> Interactions:
    """Each user walks i, i+1, i+2, ... (mod items): the next item follows from the last."""
    seqs = []
    for u in range(users):
        ids = tuple(f"i{(u + k) % items}" for k in range(4 + u % 3))
        seqs.append(UserHistory(f"u{u}", ids, ("view",) * len(ids), None))
    return Interactions("chain", tuple(seqs))


def test_sequences_before_and_fit_choose_a_weight() -> None:
    data = chain_log()
    split = leave_one_out(data)
    vocab = ItemVocab([f"i{k}" for k in range(10)])
    log_ = EncodedLog(data, vocab)
    valid = sequences_before(split, log_, "valid")
    test = sequences_before(split, log_, "test")
    for u, case in enumerate(split.test):
        assert len(test[u]) == case.cut
        assert len(valid[u]) == case.cut - 1
    with pytest.raises(ValueError, match="split 'valid' or 'test'"):
        sequences_before(split, log_, "train")

    class Blind(torch.nn.Module):
        """Ranks items by index whoever the user is: only the co-visitation table knows."""

        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.stack([torch.arange(11.0), torch.zeros(11)], 1))

        def user_vectors(self, batch: Batch) -> torch.Tensor:
            return torch.tensor([[0.01, 0.0]]).expand(batch.items.shape[0], 2)

        def item_table(self) -> torch.Tensor:
            return self.w

    fit = fit_covisit(Blind(), split, log_, 10, max_len=10)
    assert fit.ndcg_by_weight[0.0] < 0.5
    assert fit.table.config.weight > 0
    assert fit.ndcg_by_weight[fit.table.config.weight] > 0.9
    assert fit.users == len(split.valid)
    assert fit.to_dict()["weight"] == fit.table.config.weight


class VocabEncoder:
    """A UserEncoder with a vocabulary and a co-visitation table: every user vector scores
    every item 0, so the table alone orders the slate."""

    version = "enc-test"
    dim = 2
    temperature = 1.0

    def __init__(self, covisit: CoVisitation | None) -> None:
        self.ids = [f"i{k}" for k in range(6)]
        self.vocab = ItemVocab(self.ids)
        self.covisit = covisit

    def item_ids(self) -> list[str]:
        return self.ids

    def item_vectors(self) -> np.ndarray:
        return np.zeros((6, 2), dtype=np.float32)

    def encode(self, histories: object) -> np.ndarray:
        return np.ones((len(histories), 2), dtype=np.float32)  # type: ignore[arg-type]


def steps(*items: str) -> list[Step]:
    return [Step(i, "view", 1_700_000_000_000 + k) for k, i in enumerate(items)]


def test_pipeline_stage_boosts_and_counts_online() -> None:
    # i0 -> i4 seen twice, i0 -> i2 once (model indices are position + 1)
    seqs = [np.array([1, 5]), np.array([1, 5]), np.array([1, 3])]
    table = CoVisitation.build(seqs, 6, CoVisitConfig(weight=1.0))
    table.merge_after_s = 0.0
    pipe = Pipeline.from_encoder(VocabEncoder(table), candidates=6, slate_size=3, diversity=0.0)
    assert "covisit" in Pipeline.STAGES
    assert pipe.covisit.weight == 1.0
    slate = pipe.recommend([SlateRequest("u", steps("i0"))])[0]
    assert slate.item_ids[:2] == ["i4", "i2"]
    assert slate.scores[0] == pytest.approx(math.log1p(2.0))
    # The worker counts what it serves: i5 after i1, three times, becomes i1's best follower.
    for _ in range(3):
        pipe.recommend([SlateRequest("v", steps("i1", "i5"))])
    assert pipe.recommend([SlateRequest("w", steps("i1"))])[0].item_ids[0] == "i5"
    # Index rows added later (a new catalogue item) are looked up as they appear: an item
    # the table does not know gets no boost, the known ones keep theirs.
    pipe.index.upsert(["fresh"], np.zeros((1, 2), dtype=np.float32))
    assert pipe.recommend([SlateRequest("x", steps("i0"))])[0].item_ids[:2] == ["i4", "i2"]
    rows = np.array([[6, 4, -1]])  # the new row, i4's row, no candidate
    assert pipe.covisit._items_of(rows, pipe.index.row_ids()).tolist() == [[0, 5, 0]]

    off = Pipeline.from_encoder(
        VocabEncoder(table), candidates=6, slate_size=3, diversity=0.0, covisit_weight=0.0
    )
    assert off.covisit.table is None
    # Fitted on retrieval scores: with a reranker it applies only when asked for.
    params = {"candidates": 6, "slate_size": 3, "diversity": 0.0}
    reranked = Pipeline.from_encoder(
        VocabEncoder(table), reranker=RetrievalScoreReranker(), **params
    )
    assert reranked.covisit.table is None
    asked = Pipeline.from_encoder(
        VocabEncoder(table), reranker=RetrievalScoreReranker(), covisit_weight=0.5, **params
    )
    assert asked.covisit.weight == 0.5
    assert off.recommend([SlateRequest("u", steps("i0"))])[0].scores == [0.0, 0.0, 0.0]


def test_pipeline_adds_the_followers_retrieval_missed_and_filters_them() -> None:
    seqs = [np.array([1, 5]), np.array([1, 5]), np.array([1, 3])]  # i0 -> i4 (2), i0 -> i2
    table = CoVisitation.build(seqs, 6, CoVisitConfig(weight=1.0))
    params = {"candidates": 1, "slate_size": 1, "diversity": 0.0}
    pipe = Pipeline.from_encoder(VocabEncoder(table), **params)
    assert Pipeline.STAGES.index("covisit") < Pipeline.STAGES.index("filter")
    # Retrieval keeps one item (all score 0); the table adds i0's followers, best first.
    assert pipe.recommend([SlateRequest("u", steps("i0"))])[0].item_ids == ["i4"]
    retrieved = pipe.retrieve(pipe.encode((SlateRequest("u", steps("i0")),)))
    assert retrieved.rows.shape == (1, 1)
    grown = pipe.covisit(retrieved, np.ones((1, 2), np.float32))
    assert grown.rows.shape[1] == 3
    assert sorted(grown.row_ids[grown.rows[0]].tolist())[1:] == ["i2", "i4"]
    assert grown.covisit is not None
    assert grown.covisit[0].max() == pytest.approx(math.log1p(2.0))
    # The filter sees the added candidates: a purchased follower stays out.
    bought = [Step("i4", "purchase", 1), Step("i0", "view", 2)]
    assert pipe.recommend([SlateRequest("v", bought)])[0].item_ids == ["i2"]
    # So does a follower removed from the index.
    pipe.index.remove(["i4"])
    assert pipe.recommend([SlateRequest("w", steps("i0"))])[0].item_ids == ["i2"]
    none = Pipeline.from_encoder(VocabEncoder(table), covisit_candidates=0, **params)
    # Without: retrieval's one item is i0 (row 0 of equal scores), the trigger, filtered.
    assert none.retrieve(none.encode((SlateRequest("u", steps("i0")),))).rows.tolist() == [[0]]
    assert none.recommend([SlateRequest("u", steps("i0"))])[0].item_ids == []


def test_cli_covisit_and_evaluate_rows(tmp_path: Path) -> None:
    runner = CliRunner()
    data = write_events(tmp_path / "events.jsonl")
    model = tmp_path / "model"
    args = ["--data", str(data), "--format", "events"]
    result = runner.invoke(app, tiny_train_args(data, model))
    assert result.exit_code == 0, result.output
    assert "co-visitation: " in result.output
    config = json.loads((model / "config.json").read_text())
    # Items here follow each other deterministically (i, i+1, ...): the table must help.
    assert config["covisit"]["weight"] > 0
    fit = config["covisit_fit"]["validation_ndcg10_by_weight"]
    assert fit[f"{config['covisit']['weight']:g}"] > fit["0"]
    assert (model / FILE).is_file()

    # The stored calibration was fitted on the scores the order stage reads: with the boost.
    loaded = load_model(model, device="cpu")
    split = leave_one_out(load_interactions(data, "events"))
    with_boost = calibrate(loaded, split, candidates=12).fits["retrieval"].temperature
    assert with_boost == pytest.approx(config["calibration"]["temperature"], rel=1e-3)
    loaded.covisit = None
    without = calibrate(loaded, split, candidates=12).fits["retrieval"].temperature
    assert without != pytest.approx(with_boost, rel=1e-3)

    out = tmp_path / "report.json"
    result = runner.invoke(
        app, ["evaluate", "--model", str(model), *args, "--json", str(out), "--device", "cpu"]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["covisit"]["extra"]["covisit"] == "online"
    assert report["covisit"]["metrics"]["NDCG@10"] > report["metrics"]["NDCG@10"]
    result = runner.invoke(
        app, ["evaluate", "--model", str(model), *args, "--json", str(out), "--covisit", "off"]
    )
    assert result.exit_code == 0
    assert "covisit" not in json.loads(out.read_text())
    bad = runner.invoke(app, ["evaluate", "--model", str(model), *args, "--covisit", "x"])
    assert bad.exit_code == 2
    assert "expected --covisit in" in bad.output

    # `streamrec covisit` refits a model in place; a model without a table evaluates alone.
    result = runner.invoke(app, ["covisit", "--model", str(model), *args, "--window", "1"])
    assert result.exit_code == 0, result.output
    assert json.loads((model / "config.json").read_text())["covisit"]["window"] == 1
    plain = tmp_path / "plain"
    result = runner.invoke(app, tiny_train_args(data, plain, "--no-covisit"))
    assert result.exit_code == 0
    assert "covisit" not in json.loads((plain / "config.json").read_text())
    assert not (plain / FILE).exists()
    store_covisit(plain, CoVisitation(12, CoVisitConfig(weight=0.0)))
    assert json.loads((plain / "config.json").read_text())["covisit"]["weight"] == 0.0
    assert load_model(plain).covisit is not None
    store_covisit(plain, CoVisitation(7, CoVisitConfig(weight=1.0)))  # another catalogue
    with pytest.raises(ArtifactError, match="co-visitation table over the model's 12 items"):
        load_model(plain)
