"""Attribute affinity: the formula, its fit beside the co-visitation table, storage, serving."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from serving.affinity import Affinity, AffinityConfig
from serving.artifacts import ArtifactError, load_model, save_model
from serving.covisit import (
    CoVisitation,
    CoVisitConfig,
    CoVisitFit,
    batch_booster,
    fit_covisit,
    store_covisit,
    summed_booster,
)
from serving.data import EncodedLog, Interactions, ItemVocab, UserHistory, leave_one_out
from serving.encoder import Batch, EncoderConfig, SequenceEncoder
from serving.evaluate import rank_targets, rank_targets_grid
from serving.pipeline import Pipeline, SlateRequest, served_affinity
from streamrec.cli import app

from .test_covisit import VocabEncoder, steps
from .test_evaluate import one, tiny_train_args, write_events

torch.set_num_threads(1)

# Items 1..5 (row 0 = padding): attribute 1 is everywhere, 2 = brand A, 3 = brand B, 4 = rare.
ATTRS = np.array([[0, 0], [1, 2], [1, 2], [1, 3], [1, 3], [1, 4]], dtype=np.int64)


def reference(attrs: np.ndarray, recent: list[int], cand: int, depth: int, decay: float) -> float:
    """The module doc's formula by plain loops."""
    n = len(attrs) - 1  # row 0 is padding
    df: dict[int, int] = {}
    for row in attrs:
        for a in {int(x) for x in row if x > 0}:
            df[a] = df.get(a, 0) + 1

    def unit(i: int) -> dict[int, float]:
        vec = {int(a): math.log(n / df[int(a)]) for a in attrs[i] if a > 0}
        norm = math.sqrt(sum(v * v for v in vec.values()))
        return {a: v / norm for a, v in vec.items()} if norm > 0 else {}

    profile: dict[int, float] = {}
    for j, item in enumerate(recent[:depth]):
        for a, v in unit(item).items() if item > 0 else ():
            profile[a] = profile.get(a, 0.0) + decay**j * v
    return sum(profile.get(a, 0.0) * v for a, v in unit(cand).items())


def test_boost_matches_the_formula_and_the_dense_form() -> None:
    aff = Affinity(ATTRS, AffinityConfig(depth=2, decay=0.5, weight=1.0))
    recent = np.array([[1, 3, 5], [4, 0, 0], [0, 0, 0]])  # newest first, 0-padded
    items = np.array([[1, 2, 3, 4, 5, 0]] * 3)
    got = aff.boost(recent, items)
    for b in range(3):
        for c, item in enumerate(items[b]):
            want = reference(ATTRS, recent[b].tolist(), int(item), 2, 0.5) if item else 0.0
            assert got[b, c] == pytest.approx(want, abs=1e-6)
    np.testing.assert_allclose(aff.dense_boost(recent)[:, 1:], got[:, :5], atol=1e-6)
    # The attribute every item has weighs nothing; brand A matches brand A only.
    assert got[1, 0] == pytest.approx(0.0, abs=1e-7)  # user of brand B, item of brand A
    assert got[1, 2] > 0.0  # another brand-B item
    assert got[1, 4] == pytest.approx(0.0, abs=1e-7)  # shares only the universal attribute
    assert not got[2].any()
    with pytest.raises(ValueError, match="depth >= 1"):
        AffinityConfig(depth=0)
    with pytest.raises(ValueError, match="unknown settings"):
        AffinityConfig.from_dict({"depth": 2, "bogus": 1})


def test_of_model_and_with_weight() -> None:
    plain = SequenceEncoder(EncoderConfig(num_items=5, dim=8, heads=1))
    assert Affinity.of_model(plain, AffinityConfig()) is None
    model = SequenceEncoder(EncoderConfig(num_items=5, dim=8, heads=1, num_attrs=4, max_attrs=2))
    model.set_attributes(ATTRS)
    aff = Affinity.of_model(model, AffinityConfig(weight=2.0))
    assert aff is not None
    assert aff.weight == 2.0
    np.testing.assert_array_equal(aff.attrs, ATTRS)
    assert aff.with_weight(0.5).weight == 0.5
    assert aff.weight == 2.0


def test_grid_ranks_equal_one_pass_per_weighting() -> None:
    rng = np.random.default_rng(0)
    scorer_table = torch.tensor(rng.normal(size=(6, 6)), dtype=torch.float32)
    scorer_table[0] = 0

    class Scorer(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.t = torch.nn.Parameter(scorer_table)

        def user_vectors(self, batch: Batch) -> torch.Tensor:
            return self.t[batch.items[:, -1]]

        def item_table(self) -> torch.Tensor:
            return self.t

    table = CoVisitation.build([np.array([1, 2, 3, 4, 5, 1, 3])], 5, CoVisitConfig())
    aff = Affinity(ATTRS, AffinityConfig())
    inputs = [one(1, 3), one(2), one(4, 5, 1), one(5, 2)]
    targets = np.array([2, 3, 5, 1])
    boosts = [batch_booster(table.with_weight(1.0)), aff.booster(1.0)]
    weights = [(0.0, 0.0), (1.0, 0.0), (0.0, 3.0), (2.0, 1.5)]
    for excl in (False, True):
        grid = rank_targets_grid(
            Scorer(), inputs, targets, boosts=boosts, weights=weights, exclude_history=excl
        )
        for g, (wt, wa) in enumerate(weights):
            one_pass = summed_booster(
                batch_booster(table.with_weight(wt)) if wt else None,
                aff.booster(wa) if wa else None,
            )
            want = rank_targets(Scorer(), inputs, targets, boost=one_pass, exclude_history=excl)
            np.testing.assert_array_equal(grid[g], want)


def brand_log(users: int = 60) -> Interactions:
    """Each user buys items of one brand (items b0-*, b1-*, b2-*), in random order: the
    next item is not predictable from the last one, but its brand is."""
    rng = np.random.default_rng(1)
    seqs = []
    for u in range(users):
        brand = u % 3
        picks = rng.choice(8, size=5, replace=False)
        ids = tuple(f"b{brand}-{k}" for k in picks)
        seqs.append(UserHistory(f"u{u}", ids, ("view",) * len(ids), None))
    return Interactions("brands", tuple(seqs))


def test_fit_chooses_affinity_where_brands_predict() -> None:
    data = brand_log()
    vocab = ItemVocab([f"b{b}-{k}" for b in range(3) for k in range(8)])
    split = leave_one_out(data)
    log_ = EncodedLog(data, vocab)
    attrs = np.zeros((len(vocab) + 1, 1), dtype=np.int64)
    for item, i in vocab.index.items():
        attrs[i, 0] = 1 + int(item[1])  # the brand

    class Blind(torch.nn.Module):
        """Ranks items by index whoever the user is: only the side scores know the brand."""

        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(
                torch.stack([torch.arange(len(vocab) + 1.0), torch.zeros(len(vocab) + 1)], 1)
            )

        def user_vectors(self, batch: Batch) -> torch.Tensor:
            return torch.tensor([[0.01, 0.0]]).expand(batch.items.shape[0], 2)

        def item_table(self) -> torch.Tensor:
            return self.w

    aff = Affinity(attrs, AffinityConfig())
    fit = fit_covisit(
        Blind(), split, log_, len(vocab), max_len=8, affinity=aff, affinity_grid=(1.0, 2.0)
    )
    assert fit.affinity is not None
    assert fit.affinity.weight > 0
    assert fit.ndcg_by_affinity[fit.affinity.weight] > fit.ndcg_by_affinity[0.0]
    assert fit.affinity_gain == pytest.approx(
        fit.ndcg_by_affinity[fit.affinity.weight] / fit.ndcg_by_affinity[0.0] - 1.0
    )
    assert fit.to_dict()["affinity_weight"] == fit.affinity.weight
    # The pair chosen is the best of the whole grid, and excluded history is recorded.
    excl = fit_covisit(
        Blind(),
        split,
        log_,
        len(vocab),
        max_len=8,
        affinity=aff,
        affinity_grid=(1.0, 2.0),
        exclude_history=True,
    )
    assert excl.to_dict()["validation_history"] == "excluded"
    assert fit.to_dict()["validation_history"] == "kept"


def test_store_and_load_with_the_model(tmp_path: Path) -> None:
    model = SequenceEncoder(EncoderConfig(num_items=5, dim=8, heads=1, num_attrs=4, max_attrs=2))
    model.set_attributes(ATTRS)
    save_model(model, tmp_path / "m", ["a", "b", "c", "d", "e"], attributes=["w", "x", "y", "z"])
    table = CoVisitation(5, CoVisitConfig(weight=1.0))
    aff = Affinity(ATTRS, AffinityConfig(depth=3, weight=2.5))

    store_covisit(tmp_path / "m", table, CoVisitFit(table, {0.0: 0.1, 1.0: 0.2}, 9, aff, {}))
    loaded = load_model(tmp_path / "m")
    assert loaded.affinity is not None
    assert loaded.affinity.config == AffinityConfig(depth=3, weight=2.5)
    np.testing.assert_array_equal(loaded.affinity.attrs, ATTRS)
    # Refitted without affinity: the stale settings go.
    store_covisit(tmp_path / "m", table, CoVisitFit(table, {0.0: 0.1, 1.0: 0.2}, 9))
    assert load_model(tmp_path / "m").affinity is None
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["affinity"] = {"depth": -1}
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ArtifactError, match="valid affinity settings"):
        load_model(tmp_path / "m")


def test_pipeline_adds_affinity_without_a_reranker_only() -> None:
    encoder = VocabEncoder(None)  # every item scores 0 for everyone
    attrs = np.array([[0], [1], [1], [2], [2], [3], [3]], dtype=np.int64)  # i0,i1 | i2,i3 | ..
    encoder.affinity = Affinity(attrs, AffinityConfig(weight=1.0))  # type: ignore[attr-defined]
    pipe = Pipeline.from_encoder(encoder, candidates=6, slate_size=3, diversity=0.0)
    # The newest item is i2 (attribute 2): i3 shares it and leads the slate.
    slate = pipe.recommend([pipe_request("u", "i0", "i2")])[0]
    assert slate.item_ids[0] == "i3"
    off = Pipeline.from_encoder(
        encoder, candidates=6, slate_size=3, diversity=0.0, affinity_weight=0.0
    )
    assert off.covisit.affinity is None
    assert served_affinity(encoder.affinity, reranker=object()) is None  # type: ignore[attr-defined]
    assert served_affinity(None) is None


def pipe_request(user: str, *items: str) -> SlateRequest:
    return SlateRequest(user, steps(*items))


def test_cli_fits_and_evaluates_affinity(tmp_path: Path) -> None:
    runner = CliRunner()
    data = write_events(tmp_path / "events.jsonl")
    items = sorted({json.loads(line)["item_id"] for line in data.read_text().splitlines()})
    attrs = tmp_path / "items.jsonl"
    attrs.write_text(
        "\n".join(json.dumps({"item_id": i, "categories": [f"c{int(i[1:]) % 4}"]}) for i in items)
        + "\n"
    )
    model = tmp_path / "model"
    source = ["--data", str(data), "--format", "events"]
    args = tiny_train_args(data, model, "--attributes", str(attrs), "--attributes-format", "items")
    result = runner.invoke(app, [*args, "--filter-seen"])
    assert result.exit_code == 0, result.output
    assert "attribute affinity: weight" in result.output
    assert "history excluded" in result.output
    config = json.loads((model / "config.json").read_text())
    assert config["covisit_fit"]["validation_history"] == "excluded"
    assert "validation_ndcg10_by_affinity_weight" in config["covisit_fit"]
    if config["affinity"]["weight"] > 0:
        out = tmp_path / "report.json"
        result = runner.invoke(
            app,
            ["evaluate", "--model", str(model), *source, "--json", str(out)],
        )
        assert result.exit_code == 0, result.output
        assert json.loads(out.read_text())["affinity"]["extra"]["affinity"]["weight"] > 0
    result = runner.invoke(
        app,
        ["covisit", "--model", str(model), *source, "--no-affinity"],
    )
    assert result.exit_code == 0, result.output
    assert "affinity" not in json.loads((model / "config.json").read_text())
