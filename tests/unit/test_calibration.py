"""Temperature scaling: recovers the temperature the targets were drawn at; artifact storage."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from serving.calibration import (
    SlateWeight,
    fit_temperature,
    slate_weight_of,
    store_calibration,
    temperature_of,
)
from serving.ordering import xmmr, xmmr_reference


@pytest.mark.parametrize("true_t", [0.5, 1.0, 2.5])
def test_fit_recovers_the_sampling_temperature(true_t: float) -> None:
    rng = np.random.default_rng(int(true_t * 10))
    logits = rng.normal(0.0, 2.0, (6000, 30))
    logits[:, 25:] = -np.inf  # not candidates
    p = np.exp(logits / true_t - np.max(logits / true_t, axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    target = np.array([rng.choice(30, p=row) for row in p])
    target[:500] = -1  # retrieval missed: left out
    cal = fit_temperature(logits, target)
    assert cal.temperature == pytest.approx(true_t, rel=0.08)
    assert cal.cases == 5500
    assert cal.candidates == 30
    assert cal.nll <= cal.nll_at_1 + 1e-6  # T = 1 is on the search interval


def test_fit_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match=r"scores \(U, C\) and target_pos \(U,\)"):
        fit_temperature(np.zeros(3), np.zeros(3))
    with pytest.raises(ValueError, match="target among the candidates, got none"):
        fit_temperature(np.zeros((2, 3)), np.array([-1, -1]))
    with pytest.raises(ValueError, match="finite score for every retrieved target"):
        fit_temperature(np.array([[0.0, -np.inf]]), np.array([1]))


def test_stored_beside_the_artifact(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"version": "enc-x", "model": {"dim": 4}}))
    assert temperature_of(json.loads(path.read_text())) == 1.0  # never calibrated
    rng = np.random.default_rng(0)
    store_calibration(path, fit_temperature(rng.normal(size=(50, 5)), rng.integers(0, 5, 50)))
    config = json.loads(path.read_text())
    assert config["version"] == "enc-x"  # the rest is untouched
    assert config["model"] == {"dim": 4}
    assert temperature_of(config) == config["calibration"]["temperature"] > 0
    with pytest.raises(ValueError, match="temperature > 0"):
        temperature_of({"calibration": {"temperature": 0.0}})


def test_slate_weight_stored_beside_the_temperature(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"version": "enc-x", "calibration": {"temperature": 1.5}}))
    assert slate_weight_of(json.loads(path.read_text()), "dcg") is None  # never chosen
    weight = SlateWeight(0.08, "dcg", 0.02, -0.0193, 0.214, 500)
    store_calibration(path, weight)
    config = json.loads(path.read_text())
    assert temperature_of(config) == 1.5  # the temperature is untouched
    assert config["slate"]["users"] == 500
    assert slate_weight_of(config, "dcg") == 0.08
    assert slate_weight_of(config, "mmr") is None  # chosen for another ordering
    with pytest.raises(ValueError, match=r"stored diversity in \[0, 1\], got 1.5"):
        slate_weight_of({"slate": {"ordering": "dcg", "diversity": 1.5}}, "dcg")


def test_ordering_reads_logits_at_the_temperature() -> None:
    rng = np.random.default_rng(3)
    rel, vec = rng.normal(size=(4, 20)), rng.normal(size=(4, 20, 6))
    for t in (0.5, 2.0):
        hot = xmmr(rel, vec, 8, 0.2, temperature=t)
        assert hot.tolist() == xmmr(rel / t, vec, 8, 0.2).tolist()
        assert hot.tolist() == xmmr_reference(rel.tolist(), vec.tolist(), 8, 0.2, temperature=t)
    with pytest.raises(ValueError, match="temperature > 0"):
        xmmr(rel, vec, 8, 0.2, temperature=0.0)
