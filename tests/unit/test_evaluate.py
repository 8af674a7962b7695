"""Full-ranking metrics against hand-computed values, and the evaluate command."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from serving.data import Features
from serving.encoder import Batch
from serving.evaluate import metrics_from_ranks, rank_targets
from streamrec.cli import app


def test_metrics_hand_computed() -> None:
    # one user whose target ranks 3rd (0-based rank 2)
    m = metrics_from_ranks(np.array([2]))
    assert m["HR@5"] == 1.0
    assert m["NDCG@5"] == pytest.approx(1 / math.log2(4))
    # ranks 0 (first place), 7 (outside top 5), 30 (miss everywhere)
    m = metrics_from_ranks(np.array([0, 7, 30]))
    assert m["HR@5"] == pytest.approx(1 / 3)
    assert m["NDCG@5"] == pytest.approx(1 / 3)
    assert m["HR@10"] == pytest.approx(2 / 3)
    assert m["NDCG@10"] == pytest.approx((1 + 1 / math.log2(9)) / 3)
    assert m["HR@20"] == pytest.approx(2 / 3)


def test_metrics_need_cases() -> None:
    with pytest.raises(ValueError, match="at least one evaluation case"):
        metrics_from_ranks(np.array([], dtype=np.int64))


class FixedScorer(torch.nn.Module):
    """User vector = one-hot of the newest item's row in a fixed item table."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = torch.nn.Parameter(table)

    def user_vectors(self, batch: Batch) -> torch.Tensor:
        return torch.nn.functional.one_hot(batch.items[:, -1], self.table.shape[1]).float()

    def item_table(self) -> torch.Tensor:
        return self.table


def one(item: int, *history: int) -> Features:
    items = np.array([*history, item], dtype=np.int64)
    ones = np.ones(len(items), dtype=np.int64)
    return Features(items, ones, ones)


def test_rank_targets_full_ranking_history_and_unknown() -> None:
    # 4 items; a user whose newest item is k scores item i with table[i, k].
    table = torch.tensor(
        [
            [0.0, 0.0, 0.0, 0.0, 0.0],  # padding row
            [0.0, 0.9, 0.1, 0.0, 0.0],
            [0.0, 0.8, 0.2, 0.0, 0.0],
            [0.0, 0.7, 0.3, 0.0, 0.0],
            [0.0, 0.6, 0.4, 0.0, 0.0],
        ]
    )
    scorer = FixedScorer(table)
    inputs = [one(1), one(1, 2), one(2), one(1)]
    targets = np.array([3, 3, 1, 0])
    ranks = rank_targets(scorer, inputs, targets)
    # user 0: scores 0.9 0.8 0.7 0.6 -> item 3 is 3rd; user 2: item 1 scores 0.1, last of 4
    assert ranks.tolist() == [2, 2, 3, 5]
    excluded = rank_targets(scorer, inputs, targets, exclude_history=True)
    # user 1 has items 1 and 2 in its history: item 3 moves to first place
    assert excluded.tolist() == [1, 0, 2, 5]
    # the target itself is never excluded, even when it is in the history
    assert rank_targets(scorer, [one(1, 3)], np.array([3]), exclude_history=True).tolist() == [1]
    assert scorer.training  # the evaluator restores the mode it found


def test_rank_targets_length_mismatch() -> None:
    scorer = FixedScorer(torch.zeros(3, 3))
    with pytest.raises(ValueError, match="one target per input, got 1 inputs and 2 targets"):
        rank_targets(scorer, [one(1)], np.array([1, 2]))


def write_events(path: Path, users: int = 30, items: int = 12) -> Path:
    lines = []
    for u in range(users):
        for k in range(3 + u % 5):
            rec = {
                "event_id": f"{u}-{k}",
                "user_id": f"u{u}",
                "item_id": f"i{(u + k) % items}",
                "type": "view" if k % 2 else "click",
                "ts": 1_700_000_000_000 + 60_000 * k,
            }
            lines.append(json.dumps(rec))
    path.write_text("\n".join(lines) + "\n")
    return path


def tiny_train_args(data: Path, out: Path, *extra: str) -> list[str]:
    """``streamrec train`` on an events file with a tiny model, on CPU, without a bar."""
    return [
        "train",
        *("--data", str(data), "--format", "events", "--out", str(out)),
        *("--epochs", "2", "--dim", "8", "--heads", "1", "--max-len", "6"),
        *("--device", "cpu", "--no-progress", *extra),
    ]


def test_cli_train_then_evaluate(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    runner = CliRunner()
    data = write_events(tmp_path / "events.jsonl")
    model = tmp_path / "model"
    train_args = tiny_train_args(data, model)
    result = runner.invoke(app, train_args)
    assert result.exit_code == 0, result.output
    # Without a progress bar every epoch is logged.
    assert "encoder epoch 1 " in caplog.text
    assert "encoder epoch 2 " in caplog.text
    assert (model / "model.safetensors").is_file()
    config = json.loads((model / "config.json").read_text())
    assert config["dataset"] == "events"
    assert config["model"]["use_time"] is True
    assert set(config["metrics"]["test"]) >= {"HR@10", "NDCG@10"}
    assert set(config["metrics"]["test_history_excluded"]) >= {"HR@10", "NDCG@10"}
    assert config["model"]["num_attrs"] == 0

    out = tmp_path / "report.json"
    eval_args = [
        "evaluate",
        "--model",
        str(model),
        "--data",
        str(data),
        "--format",
        "events",
        "--json",
        str(out),
        "--split",
        "valid",
        "--device",
        "cpu",
    ]
    result = runner.invoke(app, eval_args)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["split"] == "valid"
    assert report["users"] == 30
    assert report["exclude_history"] is False
    assert report["extra"]["model_version"] == config["version"]

    short = write_events(tmp_path / "short.jsonl", users=3)
    short.write_text("\n".join(short.read_text().splitlines()[:2]) + "\n")
    result = runner.invoke(
        app, ["evaluate", "--model", str(model), "--data", str(short), "--format", "events"]
    )
    assert result.exit_code == 2
    assert "users with >= 3 interactions" in result.output


def test_cli_errors(tmp_path: Path) -> None:
    runner = CliRunner()
    data = write_events(tmp_path / "events.jsonl")
    result = runner.invoke(
        app, ["train", "--data", str(data), "--format", "parquet", "--out", str(tmp_path / "m")]
    )
    assert result.exit_code == 2
    assert "expected format in" in result.output
    result = runner.invoke(
        app,
        ["evaluate", "--model", str(tmp_path / "none"), "--data", str(data), "--format", "events"],
    )
    assert result.exit_code == 2
    assert "expected a model directory" in result.output
    result = runner.invoke(
        app,
        [
            "evaluate",
            "--model",
            str(tmp_path),
            "--data",
            str(data),
            "--format",
            "events",
            "--split",
            "train",
        ],
    )
    assert result.exit_code == 2
    assert "expected --split test or valid" in result.output


def test_cli_train_with_item_attributes(tmp_path: Path) -> None:
    data = write_events(tmp_path / "events.jsonl")
    items = tmp_path / "items.jsonl"
    items.write_text(
        "\n".join(
            json.dumps({"item_id": f"i{k}", "title": f"t{k}", "categories": [f"c{k % 4}"]})
            for k in range(40)
        )
    )
    model = tmp_path / "model"
    args = ["train", "--data", str(data), "--format", "events", "--out", str(model)]
    args += ["--epochs", "1", "--dim", "8", "--heads", "1", "--max-len", "6", "--no-progress"]
    result = CliRunner().invoke(
        app, [*args, "--attributes", str(items), "--attributes-format", "items"]
    )
    assert result.exit_code == 0, result.output
    config = json.loads((model / "config.json").read_text())
    assert config["model"]["num_attrs"] >= 2
    assert config["model"]["max_attrs"] == 8
    # train fits the retrieval scores' temperature on validation for the "dcg" ordering
    assert "retrieval scores: temperature" in result.output
    assert config["calibration"]["temperature"] > 0
    assert config["calibration"]["split"] == "valid"
    bad = CliRunner().invoke(app, [*args, "--attributes", str(items), "--attributes-format", "x"])
    assert bad.exit_code == 2
    assert "attribute format s3rec, ml-100k or items" in bad.output
