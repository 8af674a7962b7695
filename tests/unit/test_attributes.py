"""Item attributes: loaders, the attribute table, and the encoder's side-information path."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from serving.artifacts import load_model, save_model
from serving.data import (
    DataError,
    Interactions,
    ItemVocab,
    attribute_table,
    leave_one_out,
    load_item_attributes,
)
from serving.encoder import EncoderConfig, SequenceEncoder, collate
from serving.train import TrainConfig, train_encoder
from serving.types import Step

torch.set_num_threads(1)


def test_s3rec_attributes_gz(tmp_path: Path) -> None:
    path = tmp_path / "Beauty_item2attributes.json.gz"
    with gzip.open(path, "wt") as fh:
        json.dump({"1": [3, 4], "2": [4]}, fh)
    assert load_item_attributes(path, "s3rec") == {"1": ["3", "4"], "2": ["4"]}


def test_movielens_genres(tmp_path: Path) -> None:
    (tmp_path / "u.genre").write_text("unknown|0\nAction|1\nComedy|2\n\n")
    (tmp_path / "u.item").write_text(
        "1|Toy Story (1995)|01-Jan-1995||http://x|0|0|1\n2|Heat (1995)|01-Jan-1995||http://y|0|1|1\n"
        "3|Misérables, Les (1995)|01-Jan-1995||http://z|1|0|0\n",
        encoding="latin-1",
    )
    assert load_item_attributes(tmp_path / "u.item", "ml-100k") == {
        "1": ["Comedy"],
        "2": ["Action", "Comedy"],
        "3": ["unknown"],
    }


def test_items_dump_categories(tmp_path: Path) -> None:
    path = tmp_path / "items.jsonl"
    path.write_text(
        json.dumps({"item_id": "a", "title": "A", "categories": ["x", "y"]})
        + "\n\n"
        + json.dumps({"item_id": "b", "title": "B"})
        + "\n"
    )
    assert load_item_attributes(path, "items") == {"a": ["x", "y"], "b": []}
    path.write_text('{"title": "no id"}\n')
    with pytest.raises(DataError, match=r"item message with item_id at .*items.jsonl:1"):
        load_item_attributes(path, "items")


def test_attribute_errors(tmp_path: Path) -> None:
    path = tmp_path / "a.json"
    path.write_text("[1, 2]")
    with pytest.raises(DataError, match="JSON object item -> attributes"):
        load_item_attributes(path, "s3rec")
    path.write_text("{nope")
    with pytest.raises(DataError, match="expected a JSON object in"):
        load_item_attributes(path, "s3rec")
    with pytest.raises(DataError, match="attribute format s3rec, ml-100k or items, got 'csv'"):
        load_item_attributes(path, "csv")


def test_attribute_table_caps_dedupes_and_numbers_from_one() -> None:
    vocab = ItemVocab(["a", "b", "c"])
    table, names = attribute_table(vocab, {"a": ["x", "y", "x", "z"], "c": ["y"]}, max_attrs=2)
    assert names == ["x", "y"]
    assert table.tolist() == [[0, 0], [1, 2], [0, 0], [2, 0]]


def test_encoder_config_checks_attribute_sizes() -> None:
    with pytest.raises(ValueError, match="num_attrs and max_attrs both 0 or both positive"):
        EncoderConfig(num_items=3, num_attrs=4)


def test_item_vector_is_id_plus_mean_attribute() -> None:
    torch.manual_seed(0)
    model = SequenceEncoder(EncoderConfig(num_items=3, dim=8, heads=1, num_attrs=2, max_attrs=2))
    model.set_attributes(np.array([[0, 0], [1, 2], [0, 0], [2, 0]]))
    table = model.item_table().detach()
    ids, attrs = model.item_emb.weight.detach(), model.attr_emb.weight.detach()  # type: ignore[union-attr]
    torch.testing.assert_close(table[1], ids[1] + (attrs[1] + attrs[2]) / 2)
    torch.testing.assert_close(table[2], ids[2])
    torch.testing.assert_close(table[3], ids[3] + attrs[2])
    assert not table[0].any()
    with pytest.raises(ValueError, match=r"attribute table \(4, 2\) with indices in \[0, 2\]"):
        model.set_attributes(np.array([[0, 0], [1, 3], [0, 0], [0, 0]]))


def test_train_with_attributes_round_trips(tmp_path: Path, tiny_log: Interactions) -> None:
    """Training installs the table, the artifact keeps it (a buffer in the safetensors), and
    the loaded model serves the same vectors, cached or not."""
    attrs = {item: [f"c{int(item[1:]) % 3}"] for item in tiny_log.item_ids()}
    cfg = EncoderConfig(num_items=len(tiny_log.item_ids()), dim=16, heads=2, max_len=8)
    result, vocab, _ = train_encoder(
        leave_one_out(tiny_log), cfg, TrainConfig(epochs=2, progress=False), attrs, max_attrs=2
    )
    model = result.model.eval()
    assert (model.cfg.num_attrs, model.cfg.max_attrs) == (3, 2)
    save_model(model, tmp_path / "m", vocab.ids)
    loaded = load_model(tmp_path / "m", device="cpu", cache_users=4)
    np.testing.assert_array_equal(loaded.item_vectors(), model.item_table().detach().numpy()[1:])
    history = [Step("i1", "view", 1_000), Step("i2", "click", 9_000)]
    with torch.no_grad():
        want = model.user_vectors(collate([loaded._model_inputs(history)])).numpy()
    np.testing.assert_allclose(loaded.encode([history]), want, atol=1e-6)
    np.testing.assert_allclose(
        loaded.encode_users(["u"], [history[:1]]), loaded.encode([history[:1]]), atol=1e-6
    )
    np.testing.assert_allclose(loaded.encode_users(["u"], [history]), want, atol=1e-6)
    with pytest.raises(ValueError, match="attributes for some of the 30 items, got none"):
        train_encoder(leave_one_out(tiny_log), cfg, TrainConfig(epochs=1), {"zz": ["q"]})


def test_attribute_names_artifact_errors(tmp_path: Path) -> None:
    from serving.artifacts import ArtifactError

    model = SequenceEncoder(EncoderConfig(num_items=3, dim=8, heads=1, num_attrs=2, max_attrs=1))
    with pytest.raises(ArtifactError, match="expected 2 attribute names for the model, got 1"):
        save_model(model, tmp_path / "m", ["a", "b", "c"], attributes=["x"])
    save_model(model, tmp_path / "m", ["a", "b", "c"], attributes=["x", "y"])
    assert load_model(tmp_path / "m").attribute_index == {"x": 1, "y": 2}
    (tmp_path / "m" / "attributes.json").write_text('["x"]')
    with pytest.raises(ArtifactError, match="expected 2 attribute names in"):
        load_model(tmp_path / "m")


def test_item_rows_equal_the_table_rows() -> None:
    """Inference embeds only the batch's rows; they must be the table's, bit for bit."""
    torch.manual_seed(0)
    cfg = EncoderConfig(num_items=5, dim=8, heads=1, num_attrs=3, max_attrs=2)
    model = SequenceEncoder(cfg).eval()
    model.set_attributes(np.array([[0, 0], [1, 2], [3, 0], [0, 0], [2, 3], [1, 0]]))
    items = torch.tensor([[0, 1, 2, 3], [5, 4, 4, 0]])
    torch.testing.assert_close(model.item_rows(items), model.item_table()[items], rtol=0, atol=0)
    plain = SequenceEncoder(EncoderConfig(num_items=5, dim=8, heads=1)).eval()
    torch.testing.assert_close(plain.item_rows(items), plain.item_table()[items], rtol=0, atol=0)
