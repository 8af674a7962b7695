"""Listwise reranker: training, artifact round trip, pipeline protocol, and every error."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from serving.artifacts import LoadedEncoder, load_model, save_model
from serving.covisit import CoVisitation, CoVisitConfig, sequences_before
from serving.data import EncodedLog, Interactions, ItemVocab, UserHistory, leave_one_out
from serving.encoder import EncoderConfig, SequenceEncoder
from serving.pipeline import Candidates, Pipeline, SlateRequest
from serving.reranker import (
    ItemSide,
    LoggedCandidates,
    RerankerConfig,
    RerankerError,
    RerankerNet,
    RerankInputs,
    RerankTrainConfig,
    TransformerReranker,
    check_inputs,
    heldout_candidates,
    item_side,
    load_reranker,
    log_candidates,
    save_reranker,
    train_reranker,
    training_cases,
    without_seen,
)
from serving.slate_eval import calibrate
from serving.types import EVENT_TYPES, Step
from streamrec.settings import Settings

torch.set_num_threads(1)
FAST = RerankTrainConfig(candidates=20, prefixes=2, epochs=3, patience=3, batch_size=32)
SMALL = {"dim": 16, "heads": 2, "max_len": 8}


@pytest.fixture
def encoder(tmp_path: Path, tiny_log: Interactions) -> LoadedEncoder:
    torch.manual_seed(0)
    items = tiny_log.item_ids()
    model = SequenceEncoder(EncoderConfig(num_items=len(items), dim=16, heads=2, max_len=8))
    save_model(model.eval(), tmp_path / "m", items)
    return load_model(tmp_path / "m", device="cpu")


@pytest.fixture
def trained(encoder: LoadedEncoder, tiny_log: Interactions) -> TransformerReranker:
    cats = {it: [f"c{int(it[1:]) % 3}"] for it in tiny_log.item_ids()}
    prices = {it: float(int(it[1:])) for it in tiny_log.item_ids()}
    result = train_reranker(
        encoder, leave_one_out(tiny_log), FAST, model=SMALL, categories=cats, prices=prices
    )
    return result.reranker


def history(items: list[str], types: list[str] | None = None) -> list[Step]:
    types = types or ["view"] * len(items)
    return [
        Step(it, t, 1_700_000_000_000 + k)
        for k, (it, t) in enumerate(zip(items, types, strict=True))
    ]


def candidates_for(requests: list[SlateRequest], row_ids: list[str], c: int = 6) -> Candidates:
    rng = np.random.default_rng(0)
    b = len(requests)
    rows = np.stack([rng.permutation(len(row_ids))[:c] for _ in range(b)]).astype(np.int64)
    rows[0, -2:] = -1  # padding at the end of the first row
    retr = np.where(rows >= 0, rng.normal(size=rows.shape), -np.inf).astype(np.float32)
    return Candidates(tuple(requests), rows, retr, retr, np.array(row_ids, dtype=object), "v1")


def test_training_lowers_loss_and_reports_metrics(
    encoder: LoadedEncoder, tiny_log: Interactions
) -> None:
    # Enough cases and steps that the loss trend is not batch noise (37 cases drifted up).
    cfg = replace(FAST, epochs=8, patience=8, prefixes=6, lr=3e-3)
    result = train_reranker(encoder, leave_one_out(tiny_log), cfg, model=SMALL)
    losses = [row["loss"] for row in result.history]
    assert len(losses) == cfg.epochs
    assert losses[-1] < 0.9 * losses[0]
    assert result.train_cases > 0
    assert 0.0 < result.train_recall <= 1.0
    assert set(result.valid) == {"retrieval", "rerank"}
    assert result.valid["rerank"]["NDCG@10"] > 0.0
    cfg = result.reranker.cfg
    assert cfg.next_action  # the tiny log has several event types
    assert cfg.encoder_version == encoder.version


def test_side_features_and_round_trip_identical_scores(
    trained: TransformerReranker, encoder: LoadedEncoder, tmp_path: Path
) -> None:
    assert trained.cfg.n_categories == 3
    assert trained.cfg.price_buckets > 1
    model_dir = tmp_path / "m"
    version = save_reranker(trained, model_dir, metrics={"x": 1})
    assert (model_dir / "reranker.safetensors").is_file()
    raw = json.loads((model_dir / "reranker.json").read_text())
    assert raw["version"] == version
    assert raw["model"]["encoder_version"] == encoder.version
    loaded = load_reranker(model_dir)
    assert loaded is not None
    assert loaded.version == version
    assert loaded.meta["categories"] == trained.meta["categories"]
    reqs = [
        SlateRequest("a", history(["i1", "i2", "i3"], ["view", "click", "purchase"])),
        SlateRequest("b", history(["i7"])),
        SlateRequest("cold", []),
    ]
    cands = candidates_for(reqs, list(encoder.item_ids()))
    a, b = trained.score(reqs, cands), loaded.score(reqs, cands)
    np.testing.assert_array_equal(a, b)
    assert a.shape == cands.rows.shape
    assert np.isneginf(a[0, -2:]).all()
    assert np.isfinite(a[cands.rows >= 0]).all()
    probs = loaded.next_action(reqs)
    assert probs.shape == (3, len(EVENT_TYPES))
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(probs, trained.next_action(reqs))
    _, buy = loaded.next_action_and_purchase(reqs)
    assert buy.shape == (3,)
    assert ((buy >= 0) & (buy <= 1)).all()


def test_unknown_candidates_rank_below_known(trained: TransformerReranker) -> None:
    ids = [*trained.vocab.ids, "brand-new"]
    reqs = [SlateRequest("a", history(["i1", "i2"]))]
    rows = np.array([[len(ids) - 1, 0, 1, 2]], dtype=np.int64)
    retr = np.array([[9.0, 1.0, 0.5, 0.1]], dtype=np.float32)
    cands = Candidates(tuple(reqs), rows, retr, retr, np.array(ids, dtype=object), "v")
    scores = trained.score(reqs, cands)
    assert np.isfinite(scores).all()
    assert scores[0, 0] < scores[0, 1:].min()


def test_works_inside_the_pipeline(trained: TransformerReranker, encoder: LoadedEncoder) -> None:
    pipe = Pipeline.from_encoder(
        encoder, candidates=12, slate_size=5, diversity=0.0, reranker=trained
    )
    reqs = [SlateRequest("a", history(["i3", "i4", "i5"])), SlateRequest("b", history(["i20"]))]
    slates = pipe.recommend(reqs)
    assert [s.user_id for s in slates] == ["a", "b"]
    for s in slates:
        assert len(s.item_ids) == 5
        assert s.scores == sorted(s.scores, reverse=True)
    assert "i5" not in slates[0].item_ids  # the trigger is still filtered before reranking
    # The pipeline's order is the reranker's order of the filtered candidates.
    cands = pipe.filter(pipe.retrieve(pipe.encode(tuple(reqs))))
    direct = trained.score(reqs, cands)
    top = np.argsort(-direct[0], kind="stable")[:5]
    assert slates[0].item_ids == [cands.row_ids[cands.rows[0, j]] for j in top]


def test_projection_cache_follows_weight_updates(trained: TransformerReranker) -> None:
    net = trained.net
    items = torch.tensor([[1, 2]])
    with torch.inference_mode():
        before = net.item_vectors(items).clone()
    with torch.no_grad():
        net.item_proj.bias.add_(1.0)
    with torch.inference_mode():
        after = net.item_vectors(items)
    torch.testing.assert_close(after, before + 1.0)
    with torch.no_grad():
        net.item_proj.bias.sub_(1.0)


def test_candidate_logging_and_cases(encoder: LoadedEncoder, tiny_log: Interactions) -> None:
    split = leave_one_out(tiny_log)
    cases = training_cases(split, 2)
    assert all(1 <= cut < split.train_cut[u] for u, cut in cases)
    from serving.data import EncodedLog

    log_ = EncodedLog(tiny_log, encoder.vocab)
    logged = log_candidates(encoder, log_, cases, candidates=30, seq_len=8)
    assert logged.cand.shape == (len(cases), 30)
    assert (logged.target_pos >= 0).all()  # C = N: every target is retrieved
    assert (np.diff(logged.retrieval, axis=1) <= 1e-6).all()  # best first
    sub = logged.take(np.array([0, 1]))
    assert len(sub) == 2
    with pytest.raises(ValueError, match="expected at least one"):
        log_candidates(encoder, log_, [], candidates=5, seq_len=8)
    with pytest.raises(ValueError, match="candidates <= 30"):
        log_candidates(encoder, log_, cases, candidates=31, seq_len=8)
    with pytest.raises(ValueError, match="prefixes >= 1"):
        training_cases(split, 0)


def test_heldout_cases_map_to_the_serving_vocabulary(
    encoder: LoadedEncoder, tiny_log: Interactions, tmp_path: Path
) -> None:
    """A cross-fitted encoder with its own (reversed, smaller) vocabulary: its candidates and
    the history come back as the serving encoder's indices, and they train a reranker."""
    split = leave_one_out(tiny_log)
    torch.manual_seed(1)
    aux_items = list(reversed(tiny_log.item_ids()))[:-3]  # never saw the first three
    aux_model = SequenceEncoder(EncoderConfig(num_items=len(aux_items), dim=16, max_len=8))
    save_model(aux_model.eval(), tmp_path / "aux", aux_items)
    aux = load_model(tmp_path / "aux", device="cpu")
    got = heldout_candidates(aux, split, encoder.vocab, steps=2, candidates=20, seq_len=8)
    cases = [(u, c) for u, t in enumerate(split.train_cut) for c in range(max(1, t - 2), t)]
    assert got.cand.shape == (len(cases), 20)
    log_ = EncodedLog(tiny_log, encoder.vocab)
    unseen = set(encoder.vocab.lookup(tiny_log.item_ids()[:3]).tolist())
    for j, (u, cut) in enumerate(cases):
        ids = [encoder.vocab.ids[i - 1] for i in got.cand[j]]
        assert not unseen & set(got.cand[j].tolist())
        assert set(ids) <= set(aux_items)
        f = log_.prefix(u, cut, 8)
        assert got.seq_items[j, 8 - len(f) :].tolist() == f.items.tolist()
        target = int(log_.items[u][cut])
        pos = int(got.target_pos[j])
        assert (got.cand[j, pos] == target) if pos >= 0 else target not in got.cand[j]
    only = train_reranker(encoder, split, replace(FAST, prefixes=0), model=SMALL, heldout=got)
    assert only.train_cases == int((got.target_pos >= 0).sum())
    both = train_reranker(encoder, split, FAST, model=SMALL, heldout=got)
    assert both.train_cases > only.train_cases
    unseen = train_reranker(encoder, split, replace(FAST, filter_seen=True), model=SMALL)
    assert unseen.train_cases <= train_reranker(encoder, split, FAST, model=SMALL).train_cases
    with pytest.raises(ValueError, match="held-out steps >= 1"):
        heldout_candidates(aux, split, encoder.vocab, steps=0, candidates=20, seq_len=8)
    with pytest.raises(ValueError, match="held-out cases with 10 candidates"):
        train_reranker(encoder, split, replace(FAST, candidates=10), model=SMALL, heldout=got)
    with pytest.raises(ValueError, match="max_len=4 history steps"):
        train_reranker(encoder, split, FAST, model={**SMALL, "max_len": 4}, heldout=got)


def test_without_seen_drops_history_items() -> None:
    logged = LoggedCandidates(
        seq_items=np.array([[0, 3, 5], [0, 0, 2]]),
        seq_types=np.ones((2, 3), np.int64),
        cand=np.array([[5, 1, 3, 0], [2, 4, 6, 7]]),
        retrieval=np.zeros((2, 4), np.float32),
        target_pos=np.array([1, 0]),
        next_type=np.zeros(2, np.int64),
        purchase=np.zeros(2, np.float32),
        covisit=np.zeros((2, 4), np.float32),
    )
    got = without_seen(logged)
    assert got.cand.tolist() == [[0, 1, 0, 0], [0, 4, 6, 7]]
    assert got.target_pos.tolist() == [1, -1]  # the second target was a history item


def test_training_errors(encoder: LoadedEncoder, tiny_log: Interactions) -> None:
    short = Interactions(
        "short",
        tuple(
            replace(u, items=u.items[:2], types=u.types[:2], ts_ms=u.ts_ms[:2] if u.ts_ms else None)
            for u in tiny_log.users
        ),
    )
    with pytest.raises(ValueError, match="validation cases"):
        train_reranker(encoder, leave_one_out(short), FAST, model=SMALL)
    foreign = Interactions(
        "foreign",
        tuple(
            UserHistory(u.user, tuple("x" + i for i in u.items), u.types, u.ts_ms)
            for u in tiny_log.users
        ),
    )
    with pytest.raises(ValueError, match="target among the top"):
        train_reranker(encoder, leave_one_out(foreign), FAST, model=SMALL)


def _net(n: int = 5, **over: object) -> RerankerNet:
    cfg = RerankerConfig(num_items=n, item_dim=4, dim=8, heads=2, max_len=4, **over)  # type: ignore[arg-type]
    side = ItemSide(
        np.zeros(n + 1, np.float32), np.zeros((n + 1, 4), np.int64), np.zeros(n + 1, np.int64)
    )
    return RerankerNet(cfg, torch.zeros(n + 1, 4), side)


def test_invalid_shapes_and_settings_raise() -> None:
    net = _net()
    ok = RerankInputs(
        torch.ones(2, 3, dtype=torch.long),
        torch.ones(2, 3, dtype=torch.long),
        torch.ones(2, 4, dtype=torch.long),
        torch.zeros(2, 4),
    )
    check_inputs(ok)
    with pytest.raises(ValueError, match=r"cand_items and retrieval \(B, C\)"):
        check_inputs(replace(ok, retrieval=torch.zeros(2, 5)))
    with pytest.raises(ValueError, match=r"seq_items and seq_types \(2, L\)"):
        check_inputs(replace(ok, seq_items=torch.ones(3, 3, dtype=torch.long)))
    with pytest.raises(ValueError, match="at most max_len=4"):
        net(
            replace(
                ok,
                seq_items=torch.ones(2, 5, dtype=torch.long),
                seq_types=torch.ones(2, 5, dtype=torch.long),
            )
        )
    with pytest.raises(ValueError, match="item table"):
        RerankerNet(net.cfg, torch.zeros(3, 4), ItemSide(*[np.zeros(0)] * 3))
    side = ItemSide(np.zeros(6, np.float32), np.zeros((6, 4), np.int64), np.zeros(6, np.int64))
    with pytest.raises(ValueError, match="popularity and price_bucket"):
        RerankerNet(net.cfg, torch.zeros(6, 4), replace(side, popularity=np.zeros(5)))
    with pytest.raises(ValueError, match="categories"):
        RerankerNet(net.cfg, torch.zeros(6, 4), replace(side, categories=np.zeros((6, 2))))
    with pytest.raises(ValueError, match="num_items >= 1"):
        RerankerConfig(num_items=0, item_dim=4)
    with pytest.raises(ValueError, match="divisible by heads"):
        RerankerConfig(num_items=3, item_dim=4, dim=10, heads=3)
    with pytest.raises(ValueError, match="max_len >= 1"):
        RerankerConfig(num_items=3, item_dim=4, max_len=0)
    with pytest.raises(ValueError, match="extra"):
        RerankerConfig.from_dict({"num_items": 3, "item_dim": 4, "bogus": 1})
    with pytest.raises(ValueError, match="counts"):
        item_side(ItemVocab(["a", "b"]), np.zeros(2))
    with pytest.raises(ValueError, match="5 item ids"):
        TransformerReranker(net, ["a"])
    rr = TransformerReranker(net, ["a", "b", "c", "d", "e"])
    reqs = [SlateRequest("u", history(["a"]))]
    bad = Candidates(
        tuple(reqs),
        np.zeros((2, 3), np.int64),
        np.zeros((2, 3), np.float32),
        np.zeros((2, 3), np.float32),
        np.array(["a"], dtype=object),
        "v",
    )
    with pytest.raises(ValueError, match=r"\(1, C\)"):
        rr.score(reqs, bad)


def test_item_side_tables() -> None:
    vocab = ItemVocab(["a", "b", "c"])
    side, cats, edges = item_side(
        vocab,
        np.array([0, 4, 1, 0]),
        categories={"a": ["x", "y", "x"], "c": ["y"], "zz": ["q"]},
        prices={"a": 1.0, "b": 10.0, "c": 100.0},
        price_buckets=2,
    )
    assert cats == {"x": 1, "y": 2}
    assert side.categories[1].tolist() == [1, 2, 0, 0]
    assert side.categories[3].tolist() == [2, 0, 0, 0]
    assert side.popularity[1] == pytest.approx(1.0)
    assert side.popularity[2] == pytest.approx(np.log(2) / np.log(5))
    assert side.popularity[3] == 0.0
    assert edges == [10.0]
    assert side.price_bucket.tolist() == [0, 1, 2, 2]


def test_load_errors(trained: TransformerReranker, tmp_path: Path) -> None:
    model_dir = tmp_path / "m"
    assert load_reranker(tmp_path / "nothing") is None
    save_reranker(trained, model_dir)
    cfg_path = model_dir / "reranker.json"
    good = cfg_path.read_text()
    cfg_path.write_text("{not json")
    with pytest.raises(RerankerError, match="readable JSON"):
        load_reranker(model_dir)
    cfg_path.write_text("[]")
    with pytest.raises(RerankerError, match="JSON object"):
        load_reranker(model_dir)
    cfg_path.write_text(json.dumps({"model": 3}))
    with pytest.raises(RerankerError, match="'model' object"):
        load_reranker(model_dir)
    raw = json.loads(good)
    cfg_path.write_text(json.dumps(raw | {"model": raw["model"] | {"dim": 7}}))
    with pytest.raises(RerankerError, match="valid settings"):
        load_reranker(model_dir)
    cfg_path.write_text(json.dumps(raw | {"model": raw["model"] | {"num_items": 3}}))
    with pytest.raises(RerankerError, match=r"items\.json with 3 ids"):
        load_reranker(model_dir)
    cfg_path.write_text(json.dumps(raw | {"model": raw["model"] | {"encoder_version": "old"}}))
    with pytest.raises(RerankerError, match="trained on old"):
        load_reranker(model_dir)
    cfg_path.write_text(json.dumps(raw | {"model": raw["model"] | {"dim": 32, "heads": 2}}))
    with pytest.raises(RerankerError, match="weights matching"):
        load_reranker(model_dir)
    cfg_path.write_text(good)
    (model_dir / "reranker.safetensors").write_bytes(b"garbage")
    with pytest.raises(RerankerError, match="readable safetensors"):
        load_reranker(model_dir)


def test_cli_train_then_evaluate(tmp_path: Path) -> None:
    import typer

    from serving.synthetic import make_shop, write_jsonl
    from streamrec.commands import rerank

    app = typer.Typer()
    app.command("noop")(lambda: None)
    rerank.register(app)
    shop = make_shop(n_items=48, n_users=40, events_per_user=8)
    events = write_jsonl(shop.events, tmp_path / "ev.jsonl")
    runner = CliRunner()
    from serving.data import load_interactions

    data = load_interactions(events, "events")
    items = data.item_ids()
    save_model(
        SequenceEncoder(EncoderConfig(num_items=len(items), dim=16, max_len=8)),
        tmp_path / "m",
        items,
    )
    args = ["--model", str(tmp_path / "m"), "--data", str(events), "--format", "events"]
    res = runner.invoke(app, ["evaluate-slates", *args, "--stages", "rerank"])
    assert res.exit_code == 2
    assert "train-reranker" in res.output
    res = runner.invoke(
        app,
        [
            "train-reranker",
            *args,
            "--epochs",
            "1",
            "--prefixes",
            "1",
            "--candidates",
            "20",
            "--dim",
            "16",
            "--no-progress",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "saved rr-" in res.output
    out = tmp_path / "r.json"
    res = runner.invoke(
        app,
        [
            "evaluate-slates",
            *args,
            "--candidates",
            "20",
            "--json",
            str(out),
            "--plot",
            str(tmp_path / "p.png"),
        ],
    )
    assert res.exit_code == 0, res.output
    report = json.loads(out.read_text())
    assert {"retrieval", "rerank", "curve", "diversity"} <= set(report)
    assert (tmp_path / "p.png").stat().st_size > 1000
    for bad, msg in (
        (["--stages", "nope"], "--stages"),
        (["--split", "x"], "--split"),
        (["--stages", "rerank", "--plot", "p.png"], "--stages full with --plot"),
    ):
        res = runner.invoke(app, ["evaluate-slates", *args, *bad])
        assert res.exit_code == 2
        assert msg in res.output
    res = runner.invoke(
        app,
        [
            "train-reranker",
            "--model",
            str(tmp_path / "none"),
            "--data",
            str(events),
            "--format",
            "events",
        ],
    )
    assert res.exit_code == 2


def test_serving_caches_match_the_training_path(trained: TransformerReranker) -> None:
    """Inference mode uses cached per-item tables; eval without them must give the same."""
    net = trained.net.eval()
    reqs = [SlateRequest("a", history(["i1", "i2", "i3"])), SlateRequest("b", history(["i9"]))]
    cands = candidates_for(reqs, list(trained.vocab.ids))
    x = trained.inputs(reqs, cands)
    with torch.no_grad():
        slow = net(x)[0]
    with torch.inference_mode():
        fast = net(x)[0]
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)


def test_calibration_is_stored_beside_both_models_and_read_by_the_pipeline(
    trained: TransformerReranker, encoder: LoadedEncoder, tiny_log: Interactions, tmp_path: Path
) -> None:
    model_dir = tmp_path / "m"  # the encoder fixture's directory
    save_reranker(trained, model_dir)
    loaded = load_reranker(model_dir)
    assert loaded is not None
    assert (encoder.temperature, loaded.temperature) == (1.0, 1.0)  # never calibrated
    fits = calibrate(
        encoder, leave_one_out(tiny_log), reranker=loaded, candidates=20, model_dir=model_dir
    )
    t_enc, t_rr = fits.fits["retrieval"].temperature, fits.fits["rerank"].temperature
    assert encoder.temperature == pytest.approx(t_enc, rel=1e-4)  # in memory at once
    assert loaded.temperature == t_rr
    again, again_rr = load_model(model_dir, device="cpu"), load_reranker(model_dir)
    assert again_rr is not None
    assert again.version == encoder.version  # weights and version untouched
    assert again.temperature == pytest.approx(t_enc, rel=1e-4)
    assert again_rr.temperature == pytest.approx(t_rr, rel=1e-4)
    # The order stage reads the scorer whose scores it orders.
    with_rr = Pipeline.from_encoder(again, reranker=again_rr)
    assert with_rr.order.temperature == pytest.approx(t_rr, rel=1e-4)
    assert Pipeline.from_encoder(again).order.temperature == pytest.approx(t_enc, rel=1e-4)
    # ... and so does the diversity weight chosen on validation, unless the settings give one.
    w_enc, w_rr = fits.weights["retrieval"], fits.weights["rerank"]
    assert (again.slate_weight("expected"), again_rr.slate_weight("expected")) == (
        w_enc.diversity,
        w_rr.diversity,
    )
    assert again.slate_weight("mmr") is None  # chosen for the default ordering only
    assert w_rr.ndcg_change >= -w_rr.max_loss
    chosen = Pipeline.from_settings(again, None, Settings(), reranker=again_rr)
    assert chosen.order.diversity == w_rr.diversity
    assert chosen.diversity_source.startswith("chosen on validation")
    given = Pipeline.from_settings(again, None, Settings(diversity=0.3), reranker=again_rr)
    assert (given.order.diversity, given.diversity_source) == (0.3, "settings")
    other = Pipeline.from_settings(again, None, Settings(ordering="mmr"), reranker=again_rr)
    assert other.order.diversity == 0.15
    assert other.diversity_source == (
        "default; the model's weight was chosen for ordering 'expected': `streamrec calibrate` "
        "chooses one for 'mmr'"
    )


def with_table(encoder: LoadedEncoder, tiny_log: Interactions, weight: float = 2.0) -> CoVisitation:
    """Give the encoder a table built from the training steps (what ``streamrec train`` stores)."""
    split = leave_one_out(tiny_log)
    log_ = EncodedLog(tiny_log, encoder.vocab)
    table = CoVisitation.build(
        sequences_before(split, log_, "valid"), len(encoder.vocab), CoVisitConfig(weight=weight)
    )
    encoder.covisit = table
    return table


def test_logged_boosts_leave_out_the_case_s_own_future(
    encoder: LoadedEncoder, tiny_log: Interactions
) -> None:
    table = with_table(encoder, tiny_log)
    split = leave_one_out(tiny_log)
    log_ = EncodedLog(tiny_log, encoder.vocab)
    cases = training_cases(split, 3)
    logged = log_candidates(
        encoder, log_, cases, candidates=30, seq_len=8, covisit=table, counted_to=split.train_cut
    )
    cfg = table.config
    for j, (u, cut) in enumerate(cases):
        # The table a worker holds when this case's event arrives (up to the top-k cut, which
        # keeps every pair of this small log): everyone's training steps, this user's before cut.
        seqs = sequences_before(split, log_, "valid")
        seqs[u] = seqs[u][:cut]
        then = CoVisitation.build(seqs, len(encoder.vocab), cfg)
        recent = np.array([log_.items[u][:cut][::-1][: cfg.lookback]])
        recent = np.pad(recent, ((0, 0), (0, cfg.lookback - recent.shape[1])))
        want = then.boost(recent, logged.cand[j : j + 1])[0]
        np.testing.assert_allclose(logged.covisit[j], want, atol=1e-5)
    # Without the correction the case's own next steps would feed its boosts.
    leaky = log_candidates(encoder, log_, cases, candidates=30, seq_len=8, covisit=table)

    def by_item(x: LoggedCandidates) -> np.ndarray:
        dense = np.zeros((len(x), len(encoder.vocab) + 1), np.float32)
        np.put_along_axis(dense, x.cand, x.covisit, axis=1)
        return dense

    assert (by_item(leaky) >= by_item(logged) - 1e-6).all()
    assert (by_item(leaky) > by_item(logged) + 1e-6).any()
    # Retrieval is the boosted score, best first, and the candidates are its top.
    assert (np.diff(logged.retrieval, axis=1) <= 1e-5).all()
    plain = log_candidates(encoder, log_, cases, candidates=30, seq_len=8)
    order = np.argsort(-plain.retrieval, axis=1)
    assert not np.array_equal(np.take_along_axis(plain.cand, order, 1), logged.cand)
    assert (plain.covisit == 0).all()


def test_reranker_trained_with_the_table_reads_it(
    encoder: LoadedEncoder, tiny_log: Interactions, tmp_path: Path
) -> None:
    with_table(encoder, tiny_log)
    result = train_reranker(encoder, leave_one_out(tiny_log), FAST, model=SMALL)
    rr = result.reranker
    assert rr.cfg.covisit
    assert rr.meta["covisit_weight"] == 2.0
    reqs = [SlateRequest("a", history(["i3", "i4", "i5"])), SlateRequest("b", history(["i20"]))]
    cands = candidates_for(reqs, encoder.item_ids())
    boost = np.zeros(cands.rows.shape, np.float32)
    boost[:, 1] = 3.0
    with_boost = rr.score(reqs, replace(cands, covisit=boost))
    assert not np.allclose(with_boost[:, 1], rr.score(reqs, cands)[:, 1])
    # No boost array reads as zeros.
    np.testing.assert_allclose(
        rr.score(reqs, cands), rr.score(reqs, replace(cands, covisit=np.zeros_like(boost)))
    )
    save_reranker(rr, encoder_dir := tmp_path / "m2")
    (encoder_dir / "items.json").write_text(json.dumps(encoder.item_ids()))
    loaded = load_reranker(encoder_dir)
    assert loaded is not None
    assert loaded.cfg.covisit
    np.testing.assert_allclose(
        loaded.score(reqs, replace(cands, covisit=boost)), with_boost, atol=1e-5
    )
    # Without the table, or asked not to read it.
    off = train_reranker(encoder, leave_one_out(tiny_log), FAST, model={**SMALL, "covisit": False})
    assert not off.reranker.cfg.covisit
    assert off.reranker.meta["covisit_weight"] == 0.0
    encoder.covisit = None
    with pytest.raises(ValueError, match="co-visitation table for covisit=True"):
        train_reranker(encoder, leave_one_out(tiny_log), FAST, model={**SMALL, "covisit": True})


def test_pipeline_boosts_before_a_reranker_trained_with_the_table(
    encoder: LoadedEncoder, tiny_log: Interactions
) -> None:
    table = with_table(encoder, tiny_log)
    rr = train_reranker(encoder, leave_one_out(tiny_log), FAST, model=SMALL).reranker
    pipe = Pipeline.from_encoder(encoder, candidates=12, slate_size=5, diversity=0.0, reranker=rr)
    assert pipe.covisit.weight == 2.0
    assert Pipeline.STAGES.index("covisit") < Pipeline.STAGES.index("rerank")
    reqs = [SlateRequest("a", history(["i3", "i4", "i5"])), SlateRequest("b", history(["i20"]))]
    cands = pipe.filter(pipe.retrieve(pipe.encode(tuple(reqs))))
    vocab = encoder.vocab.index
    before = table.lookup(np.array([vocab["i4"]]), np.array([vocab["i5"]]))[0]
    boosted = pipe.covisit(cands)
    table.flush(force=True)  # counted the requests' newest steps: i4 -> i5 once more
    assert table.lookup(np.array([vocab["i4"]]), np.array([vocab["i5"]]))[0] == before + 1
    assert boosted.covisit is not None
    assert boosted.covisit.shape == cands.rows.shape
    valid = cands.valid
    np.testing.assert_allclose(
        boosted.retrieval_scores[valid],
        (cands.retrieval_scores + 2.0 * boosted.covisit)[valid],
        rtol=1e-6,
    )
    assert (boosted.covisit[valid] > 0).any()
    slates = pipe.recommend(reqs)
    assert all(len(s.item_ids) == 5 for s in slates)
    # A reranker trained without the table switches it off unless a weight is given.
    plain = train_reranker(
        encoder, leave_one_out(tiny_log), FAST, model={**SMALL, "covisit": False}
    )
    kw = {"candidates": 12, "slate_size": 5, "diversity": 0.0, "reranker": plain.reranker}
    assert Pipeline.from_encoder(encoder, **kw).covisit.table is None
    assert Pipeline.from_encoder(encoder, covisit_weight=1.0, **kw).covisit.weight == 1.0


def test_heldout_cases_read_the_serving_table_in_its_own_indices(
    encoder: LoadedEncoder, tiny_log: Interactions, tmp_path: Path
) -> None:
    """A cross-fitted encoder with another item order reads the serving model's table: its
    cases' boosts are the table's, in the serving vocabulary, without their own later steps."""
    table = with_table(encoder, tiny_log)
    split = leave_one_out(tiny_log)
    torch.manual_seed(1)
    aux_items = list(reversed(tiny_log.item_ids()))
    aux_model = SequenceEncoder(EncoderConfig(num_items=len(aux_items), dim=16, max_len=8))
    save_model(aux_model.eval(), tmp_path / "aux", aux_items)
    aux = load_model(tmp_path / "aux", device="cpu")
    got = heldout_candidates(
        aux, split, encoder.vocab, steps=2, candidates=20, seq_len=8, covisit=table
    )
    log_ = EncodedLog(tiny_log, encoder.vocab)
    cfg = table.config
    cases = [(u, c) for u, t in enumerate(split.train_cut) for c in range(max(1, t - 2), t)]
    assert (got.covisit > 0).any()
    for j, (u, cut) in enumerate(cases):
        seqs = sequences_before(split, log_, "valid")
        seqs[u] = seqs[u][:cut]
        then = CoVisitation.build(seqs, len(encoder.vocab), cfg)
        recent = np.zeros((1, cfg.lookback), np.int64)
        newest = log_.items[u][:cut][::-1][: cfg.lookback]
        recent[0, : len(newest)] = newest
        np.testing.assert_allclose(got.covisit[j], then.boost(recent, got.cand[j : j + 1])[0])
    result = train_reranker(encoder, split, replace(FAST, prefixes=0), model=SMALL, heldout=got)
    assert result.reranker.cfg.covisit


def test_cross_fitted_encoder_and_the_cli_cross_fit(tmp_path: Path) -> None:
    """``train-reranker --cross-fit``: a second encoder with the model's settings and item
    attributes, trained without each user's last two training steps, logs the training cases;
    it is reused on the next run and refused when it was made for another model."""
    import typer

    from serving.data import load_interactions
    from serving.reranker import cross_fitted_encoder, model_attributes
    from serving.synthetic import make_shop, write_jsonl
    from serving.train import TrainConfig, train_encoder
    from streamrec.commands import rerank

    shop = make_shop(n_items=48, n_users=40, events_per_user=8)
    events = write_jsonl(shop.events, tmp_path / "ev.jsonl")
    data = load_interactions(events, "events")
    split = leave_one_out(data)
    attrs = {it: [f"c{k % 3}", f"d{k % 2}"] for k, it in enumerate(data.item_ids())}
    tcfg = TrainConfig(epochs=1, eval_every=1, patience=1, progress=False)
    res, vocab, _ = train_encoder(
        split,
        EncoderConfig(num_items=len(vocab_ids := data.item_ids()), dim=16, max_len=8),
        tcfg,
        attrs,
        4,
    )
    assert len(vocab_ids) == len(vocab.ids)
    save_model(
        res.model, tmp_path / "m", vocab.ids, train=tcfg.to_dict(), attributes=res.attributes
    )
    encoder = load_model(tmp_path / "m")
    assert model_attributes(encoder) == {it: attrs[it] for it in vocab.ids}
    aux = cross_fitted_encoder(encoder, split, tmp_path / "aux")
    assert aux.config["dataset"] == f"cross-fit of {encoder.version}"
    assert aux.model.cfg.num_attrs == encoder.model.cfg.num_attrs
    assert cross_fitted_encoder(encoder, split, tmp_path / "aux").version == aux.version  # reused
    other = load_model(tmp_path / "m")
    other._version = "enc-other"
    with pytest.raises(ValueError, match="made for enc-other"):
        cross_fitted_encoder(other, split, tmp_path / "aux")

    app = typer.Typer()
    app.command("noop")(lambda: None)
    rerank.register(app)
    args = ["--model", str(tmp_path / "m"), "--data", str(events), "--format", "events"]
    small = ["--epochs", "1", "--candidates", "20", "--dim", "16", "--no-progress"]
    res_cli = CliRunner().invoke(app, ["train-reranker", *args, *small, "--cross-fit"])
    assert res_cli.exit_code == 0, res_cli.output
    assert f"cross-fitted encoder: {tmp_path / 'm-cross-fit'}" in res_cli.output
    assert (tmp_path / "m-cross-fit" / "model.safetensors").is_file()
    saved = json.loads((tmp_path / "m" / "reranker.json").read_text())
    assert saved["meta"]["train"]["prefixes"] == 0  # cross-fitted cases only


def test_calibration_fits_retrieval_with_the_table_whatever_the_reranker(
    encoder: LoadedEncoder, tiny_log: Interactions
) -> None:
    """The retrieval temperature stored with the model is for retrieval as served without a
    reranker (with the table), also when a reranker trained without the table is calibrated;
    that reranker's own fit reads candidates without the table, as the worker serves it."""
    with_table(encoder, tiny_log)
    split = leave_one_out(tiny_log)
    alone = calibrate(encoder, split, candidates=20)
    plain = train_reranker(encoder, split, FAST, model={**SMALL, "covisit": False}).reranker
    both = calibrate(encoder, split, reranker=plain, candidates=20)
    assert both.fits["retrieval"].temperature == alone.fits["retrieval"].temperature
    encoder.covisit = None
    no_table = calibrate(encoder, split, reranker=plain, candidates=20)
    assert no_table.fits["rerank"].temperature == both.fits["rerank"].temperature
    assert no_table.fits["retrieval"].temperature != both.fits["retrieval"].temperature
