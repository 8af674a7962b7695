"""The worker's recommender: catalog updates reach retrieval at once; cold items by text."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest

from schemas.models import Item
from serving.service import Recommender
from serving.types import Step
from streamrec.settings import Settings

DIM = 8


class TinyEncoder:
    """Items on orthogonal axes; a user vector is the mean of their history's items."""

    version = "tiny-1"
    dim = DIM

    def __init__(self, n: int = 6) -> None:
        self._ids = [f"i{k}" for k in range(n)]
        self._vecs = np.eye(n, DIM, dtype=np.float32)

    def item_ids(self) -> Sequence[str]:
        return self._ids

    def item_vectors(self) -> np.ndarray:
        return self._vecs

    def encode(self, histories: Sequence[Sequence[Step]]) -> np.ndarray:
        row = {i: k for k, i in enumerate(self._ids)}
        out = np.zeros((len(histories), DIM), dtype=np.float32)
        for b, h in enumerate(histories):
            rows = [row[s.item] for s in h if s.item in row]
            if rows:
                out[b] = self._vecs[rows].mean(axis=0)
        return out

    def attribute_vectors(self, categories: Sequence[Sequence[str]]) -> tuple[Any, Any]:
        # No item attributes in this model: nothing to embed a new item from.
        return np.zeros((len(categories), DIM), np.float32), np.zeros(len(categories), bool)


class AxisColdStart:
    """Text 'projection' stand-in: every cold item lands on the axis of item i1."""

    def vectors_for(self, items: Sequence[Item]) -> np.ndarray:
        return np.tile(np.eye(1, DIM, 1, dtype=np.float32), (len(items), 1)) * 0.99


def make(cold: Any = None) -> Recommender:
    settings = Settings(slate_size=3, candidates=6, diversity=0.0)
    return Recommender(TinyEncoder(), settings, None, cold)  # type: ignore[arg-type]


def slate_for(rec: Recommender, *items: str) -> list[str]:
    history = [Step(i, "view", k) for k, i in enumerate(items)]
    return list(rec.recommend([("u", history)])[0].item_ids)


def item(item_id: str, available: bool = True) -> Item:
    return Item(item_id=item_id, title=f"title {item_id}", available=available)


def test_known_items_come_from_model_and_catalog() -> None:
    rec = make()
    assert rec.knows_item("i0")
    assert not rec.knows_item("new")
    rec.upsert_item(item("new"))
    assert rec.knows_item("new")
    assert rec.index_size == 6  # no text model: known, not retrievable


def test_tombstone_and_unavailable_leave_retrieval_at_once() -> None:
    rec = make()
    assert slate_for(rec, "i0", "i1")[0] in {"i0", "i1"}
    rec.delete_item("i1")
    assert "i1" not in slate_for(rec, "i0", "i1")
    rec.upsert_item(item("i0", available=False))
    assert "i0" not in slate_for(rec, "i0", "i2")
    assert rec.index_size == 4
    rec.upsert_item(item("i0"))  # back in stock: its model vector returns
    assert rec.index_size == 5
    assert "i0" in slate_for(rec, "i0", "i2")


def test_cold_item_is_retrievable_from_its_text() -> None:
    rec = make(AxisColdStart())
    version = rec.index_version
    rec.upsert_item(item("brand-new"))
    assert rec.index_version != version
    assert rec.index_size == 7
    # A user deep in i1's neighbourhood gets the new item (i1 itself is the trigger: filtered).
    assert "brand-new" in slate_for(rec, "i1", "i1")
    rec.delete_item("brand-new")
    assert "brand-new" not in slate_for(rec, "i1", "i1")


def test_requires_a_model_dir() -> None:
    with pytest.raises(ValueError, match="model_dir"):
        Recommender.load(Settings(model_dir=None))


def test_history_of_only_cold_items_falls_back_to_the_cold_user_vector() -> None:
    rec = make(AxisColdStart())
    rec.upsert_item(item("brand-new"))
    slate = slate_for(rec, "brand-new")
    assert len(slate) == 3  # the fallback vector ranks real items, not all-zero scores
    scores = rec.recommend([("u", [Step("brand-new", "view", 0)])])[0].scores
    assert max(scores) > 0


def test_new_items_get_a_reserved_slot_even_far_from_the_user() -> None:
    rec = make(AxisColdStart())
    rec.upsert_item(item("brand-new"))
    slate = slate_for(rec, "i3", "i4")
    assert len(slate) == 3
    assert slate[-1] == "brand-new"  # orthogonal to this user, yet shown
    rec.upsert_item(item("brand-new", available=False))
    assert "brand-new" not in slate_for(rec, "i3", "i4")


def test_reserved_slots_can_be_turned_off() -> None:
    settings = Settings(slate_size=3, candidates=6, diversity=0.0, fresh_slots=0)
    rec = Recommender(TinyEncoder(), settings, None, AxisColdStart())  # type: ignore[arg-type]
    rec.upsert_item(item("brand-new"))
    assert "brand-new" not in slate_for(rec, "i3", "i4")


def test_new_item_embedded_from_its_categories_without_text(tmp_path: Any) -> None:
    """A model trained with item attributes gives a new catalog item the mean embedding of its
    known categories (no text projection needed); unknown categories leave it unretrievable."""
    import torch

    from serving.artifacts import load_model, save_model
    from serving.data import ItemVocab, attribute_table
    from serving.encoder import EncoderConfig, SequenceEncoder

    torch.manual_seed(0)
    ids = [f"i{k}" for k in range(6)]
    attrs = {i: [f"cat{k % 2}"] for k, i in enumerate(ids)}
    table, names = attribute_table(ItemVocab(ids), attrs, max_attrs=2)
    model = SequenceEncoder(
        EncoderConfig(num_items=6, dim=DIM, heads=1, max_len=4, num_attrs=2, max_attrs=2)
    )
    model.set_attributes(table)
    save_model(model.eval(), tmp_path / "m", ids, attributes=names)
    encoder = load_model(tmp_path / "m", device="cpu")
    rec = Recommender(encoder, Settings(slate_size=3, candidates=6, diversity=0.0))
    rec.upsert_item(Item(item_id="new", title="New", categories=["cat1", "unseen"]))
    rec.upsert_item(Item(item_id="odd", title="Odd", categories=["unseen"]))
    assert rec.index_size == 7
    want, ok = encoder.attribute_vectors([["cat1"]])
    assert ok.tolist() == [True]
    assert encoder.attribute_index == {"cat0": 1, "cat1": 2}
    np.testing.assert_allclose(want[0], model.attr_emb.weight[2].detach().numpy())  # type: ignore[union-attr]
    assert rec.knows_item("odd")  # accepted in events, just not retrievable


class TableEncoder(TinyEncoder):
    """TinyEncoder with an (empty) co-visitation table at weight 1, as ``streamrec train``
    stores one."""

    def __init__(self, version: str = "tiny-cv") -> None:
        from serving.covisit import CoVisitation, CoVisitConfig
        from serving.data import ItemVocab

        super().__init__()
        self.version = version
        self.vocab = ItemVocab(self._ids)
        self.covisit = CoVisitation(len(self._ids), CoVisitConfig(weight=1.0))


def pair_count(rec: Recommender, a: str, b: str) -> float:
    table = rec._pipeline.covisit.table
    assert table is not None
    table.flush(force=True)
    vocab = rec._pipeline.covisit.vocab
    return float(table.lookup(np.array([vocab[a]]), np.array([vocab[b]]))[0])


def test_covisit_counts_are_saved_and_read_back_after_a_restart(
    tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    settings = Settings(
        slate_size=3, candidates=6, diversity=0.0, data_dir=tmp_path, covisit_snapshot_s=0
    )
    rec = Recommender(TableEncoder(), settings)  # type: ignore[arg-type]
    for _ in range(3):
        slate_for(rec, "i1", "i2")
    assert pair_count(rec, "i1", "i2") == 3.0  # counted online, not trained
    assert not (tmp_path / "covisit").exists()  # snapshot_s 0: never saved by itself
    path = rec.save_covisit(wait=True)
    assert path == tmp_path / "covisit" / "tiny-cv" / "covisit.safetensors"
    assert path.is_file()
    assert not path.with_name(path.name + ".tmp").exists()

    again = Recommender(TableEncoder(), settings)  # type: ignore[arg-type]
    assert pair_count(again, "i1", "i2") == 3.0
    assert again._pipeline.covisit.weight == 1.0
    # Another model version never reads them.
    other = Recommender(TableEncoder("tiny-other"), settings)  # type: ignore[arg-type]
    assert pair_count(other, "i1", "i2") == 0.0
    # A broken file: the trained counts, and a warning that says so.
    path.write_bytes(b"not safetensors")
    with caplog.at_level("WARNING", logger="streamrec.service"):
        broken = Recommender(TableEncoder(), settings)  # type: ignore[arg-type]
    assert pair_count(broken, "i1", "i2") == 0.0
    assert "saved counts ignored" in caplog.text


def test_covisit_counts_are_saved_every_snapshot_interval(tmp_path: Any) -> None:
    settings = Settings(
        slate_size=3, candidates=6, diversity=0.0, data_dir=tmp_path, covisit_snapshot_s=0.001
    )
    rec = Recommender(TableEncoder(), settings)  # type: ignore[arg-type]
    import time

    time.sleep(0.01)
    slate_for(rec, "i3", "i4")
    assert rec._saving is not None
    rec._saving.join()
    assert (tmp_path / "covisit" / "tiny-cv" / "covisit.safetensors").is_file()
    # Saves of later model versions keep the newest three versions' counts.
    for k in range(4):
        time.sleep(0.01)  # distinct modification times
        Recommender(TableEncoder(f"tiny-{k}"), settings).save_covisit(wait=True)  # type: ignore[arg-type]
    kept = sorted(d.name for d in (tmp_path / "covisit").iterdir())
    assert kept == ["tiny-1", "tiny-2", "tiny-3"]


def test_start_up_names_affinity_and_warns_when_the_weights_assume_a_seen_filter(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from serving.affinity import Affinity, AffinityConfig

    encoder = TableEncoder()
    attrs = np.zeros((len(encoder._ids) + 1, 1), dtype=np.int64)
    attrs[1:, 0] = 1 + np.arange(len(encoder._ids)) % 2
    encoder.affinity = Affinity(attrs, AffinityConfig(weight=2.0))  # type: ignore[attr-defined]
    encoder.config = {"covisit_fit": {"validation_history": "excluded"}}  # type: ignore[attr-defined]
    with caplog.at_level("INFO", logger="streamrec.service"):
        Recommender(encoder, Settings(slate_size=3, candidates=6))  # type: ignore[arg-type]
    assert "attribute affinity weight 2" in caplog.text
    assert "STREAMREC_FILTER_SEEN=1" in caplog.text
    caplog.clear()
    with caplog.at_level("INFO", logger="streamrec.service"):
        Recommender(encoder, Settings(slate_size=3, candidates=6, filter_seen=True))  # type: ignore[arg-type]
    assert "attribute affinity weight 2" in caplog.text
    assert "STREAMREC_FILTER_SEEN=1" not in caplog.text
