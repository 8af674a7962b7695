"""Artifact round trip, encode() parity with the training forward, and every load error."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from serving.artifacts import ArtifactError, LoadedEncoder, load_model, save_model
from serving.data import EncodedLog, Interactions, ItemVocab, leave_one_out
from serving.encoder import EncoderConfig, SequenceEncoder, collate
from serving.types import Step, UserEncoder

torch.set_num_threads(1)


@pytest.fixture
def saved(tmp_path: Path, tiny_log: Interactions) -> tuple[Path, SequenceEncoder, list[str]]:
    torch.manual_seed(0)
    items = tiny_log.item_ids()
    model = SequenceEncoder(EncoderConfig(num_items=len(items), dim=16, heads=2, max_len=6))
    model.eval()
    save_model(model, tmp_path / "m", items, dataset="tiny", metrics={"NDCG@10": 0.5})
    return tmp_path / "m", model, items


def history(items: list[str], t0: int = 1_700_000_000_000) -> list[Step]:
    return [Step(it, "view", t0 + k * 90_000) for k, it in enumerate(items)]


def test_round_trip_identical_outputs(saved: tuple[Path, SequenceEncoder, list[str]]) -> None:
    path, model, items = saved
    enc = load_model(path, device="cpu")
    config = json.loads((path / "config.json").read_text())
    assert enc.version == config["version"]
    assert enc.version.startswith("enc-" + config["weights_sha256_12"])
    assert config["dataset"] == "tiny"
    assert config["metrics"] == {"NDCG@10": 0.5}
    assert list(enc.item_ids()) == items
    assert enc.dim == 16
    np.testing.assert_array_equal(enc.item_vectors(), model.item_emb.weight[1:].detach().numpy())
    again = load_model(path, device="cpu")
    hist = [history(["i1", "i2", "i3"]), history(["i4"])]
    np.testing.assert_array_equal(enc.encode(hist), again.encode(hist))


def test_satisfies_user_encoder_protocol(saved: tuple[Path, SequenceEncoder, list[str]]) -> None:
    enc: UserEncoder = load_model(saved[0], device="cpu")
    vecs = enc.encode([history(["i1", "i2"])])
    assert vecs.dtype == np.float32
    assert vecs.shape == (1, enc.dim)
    assert enc.item_vectors().dtype == np.float32
    assert enc.item_vectors().shape == (len(enc.item_ids()), enc.dim)


def test_encode_matches_training_forward(
    saved: tuple[Path, SequenceEncoder, list[str]], tiny_log: Interactions
) -> None:
    path, model, items = saved
    enc = load_model(path, device="cpu")
    log = EncodedLog(tiny_log, ItemVocab(items))
    cases = leave_one_out(tiny_log).test[:6]
    feats = [log.prefix(c.user, c.cut, model.cfg.max_len) for c in cases]
    with torch.no_grad():
        expected = model.hidden(collate(feats))[:, -1]
    histories = []
    for c in cases:
        u = tiny_log.users[c.user]
        assert u.ts_ms is not None
        histories.append([Step(u.items[k], u.types[k], u.ts_ms[k]) for k in range(c.cut)])
    torch.testing.assert_close(torch.from_numpy(enc.encode(histories)), expected)


def test_unknown_items_skipped_and_window_kept(
    saved: tuple[Path, SequenceEncoder, list[str]],
) -> None:
    enc = load_model(saved[0], device="cpu")
    base = history(["i1", "i2", "i3"])
    noisy = [base[0], Step("never-seen", "view", base[0].ts_ms + 1), base[1], base[2]]
    np.testing.assert_array_equal(enc.encode([noisy]), enc.encode([base]))
    long = history([f"i{k}" for k in range(10)])
    # the newest max_len steps count, plus the one before them for the first step's time gap
    np.testing.assert_array_equal(enc.encode([long]), enc.encode([long[-enc.max_len - 1 :]]))
    assert not np.array_equal(enc.encode([long]), enc.encode([long[-enc.max_len + 1 :]]))
    empty = enc.encode([[Step("never-seen", "view", 0)], []])
    np.testing.assert_array_equal(empty, np.zeros((2, enc.dim), dtype=np.float32))
    assert enc.encode([]).shape == (0, enc.dim)


def test_save_rejects_wrong_item_count(
    saved: tuple[Path, SequenceEncoder, list[str]], tmp_path: Path
) -> None:
    with pytest.raises(ArtifactError, match="expected 30 item ids for the model, got 2"):
        save_model(saved[1], tmp_path / "x", ["a", "b"])


def test_missing_directory_and_files(
    saved: tuple[Path, SequenceEncoder, list[str]], tmp_path: Path
) -> None:
    with pytest.raises(ArtifactError, match="expected a model directory"):
        load_model(tmp_path / "nowhere")
    path = saved[0]
    (path / "model.safetensors").unlink()
    with pytest.raises(ArtifactError, match=r"expected model.safetensors in .*no such file"):
        load_model(path)
    (path / "items.json").unlink()
    with pytest.raises(ArtifactError, match=r"expected items.json in .*no such file"):
        load_model(path)


def corrupt(path: Path, name: str, content: bytes) -> None:
    (path / name).write_bytes(content)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("model.safetensors", b"\x00garbage-not-safetensors", "readable safetensors in .*model"),
        ("config.json", b"{not json", "valid JSON in .*config.json"),
        ("config.json", b"[]", "config.json to hold a 'model' object"),
        ("items.json", b"[1, 2]", "items.json to hold a list of item id strings"),
        ("items.json", b'["a"]', "expected 30 ids in .*items.json, got 1"),
    ],
)
def test_corrupt_files_name_the_file(
    saved: tuple[Path, SequenceEncoder, list[str]], name: str, content: bytes, message: str
) -> None:
    corrupt(saved[0], name, content)
    with pytest.raises(ArtifactError, match=message):
        load_model(saved[0])


def test_bad_model_settings_and_mismatched_weights(
    saved: tuple[Path, SequenceEncoder, list[str]],
) -> None:
    path = saved[0]
    config = json.loads((path / "config.json").read_text())
    config["model"]["heads"] = 3
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ArtifactError, match=r"valid model settings in .*dim divisible by heads"):
        load_model(path)
    config["model"]["heads"] = 2
    (path / "config.json").write_text(json.dumps(config))
    save_file({"item_emb.weight": torch.zeros(3, 16)}, str(path / "model.safetensors"))
    with pytest.raises(ArtifactError, match=r"weights matching config\.json"):
        load_model(path)


def test_loaded_encoder_is_inference_only(saved: tuple[Path, SequenceEncoder, list[str]]) -> None:
    enc = load_model(saved[0], device="cpu")
    assert isinstance(enc, LoadedEncoder)
    assert not enc.model.training
