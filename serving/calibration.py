"""Temperature scaling of a scorer's logits over its candidates (Guo et al., ICML 2017).

The slate orderings ``"expected"`` and ``"dcg"`` (``serving.ordering``) read ``softmax(s / T)``
as the probability of each candidate (``"dcg"``: ``exp((s_i - s_max) / T)``, its ratio to the
best one), so their trade-off weight means the same for every scorer, and for every user, only
if those probabilities are calibrated. Both the encoder and the reranker are trained with a
softmax, but over different sets (the whole catalogue; the retrieved candidates) and with
dropout, and they come out with different sharpness: on Beauty's validation split the
temperature that fits best is 2.0 for the encoder's top-100 and 1.4 for the reranker's.

``fit_temperature`` minimises the mean negative log-likelihood of the true next item among the
candidates (cases whose target was retrieved) over ``log T``, by golden-section search (the NLL
is convex in ``1 / T``). The result is stored beside each artifact as serving metadata
(``"calibration"`` in ``config.json`` / ``reranker.json``); it does not change the weights or
the version id. A missing entry means ``T = 1``.

Beside it, ``"slate"`` records the diversity weight chosen for that scorer and the default
ordering on the same validation cases (``serving.slate_eval.calibrate``: the weight of a grid
with the most ILD@10 whose NDCG@10 loss against pure relevance is within 2% by one standard
error; both fitted on the
candidates left after the seen filter when the model's side scores were fitted for it). How much
diversity costs depends on the catalogue (with ``"dcg"``, 0.15 cost 1.9% NDCG@10 on Beauty with
the reranker and 10% on the demo's session-style shop without one), so the worker reads the
weight from the model unless ``STREAMREC_DIVERSITY`` is set. A missing entry means the
ordering's default.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

STAGE = "calibration"
#: Search interval of the temperature.
T_MIN, T_MAX = 0.05, 50.0


@dataclass(frozen=True, slots=True)
class Calibration:
    """A fitted temperature and what it was fitted on."""

    temperature: float
    nll: float  # mean NLL of the target among the candidates at ``temperature``
    nll_at_1: float  # the same at T = 1
    cases: int  # cases with the target among the candidates
    candidates: int
    split: str = "valid"

    def to_dict(self) -> dict[str, Any]:
        return {k: (round(v, 5) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def _nll(scores: np.ndarray, target: np.ndarray, temperature: float) -> float:
    z = scores / temperature
    top = z.max(axis=1, keepdims=True)
    lse = np.log(np.exp(z - top).sum(axis=1)) + top[:, 0]
    return float((lse - z[np.arange(len(z)), target]).mean())


def fit_temperature(
    scores: np.ndarray, target_pos: np.ndarray, *, split: str = "valid", tol: float = 1e-3
) -> Calibration:
    """``scores (U, C)`` logits (``-inf`` = not a candidate), ``target_pos (U,)`` the target's
    column or a negative value when it was not retrieved (those cases are left out)."""
    scores = np.asarray(scores, dtype=np.float64)
    target_pos = np.asarray(target_pos)
    if scores.ndim != 2 or target_pos.shape != (len(scores),):
        raise ValueError(
            f"{STAGE}: expected scores (U, C) and target_pos (U,), got {scores.shape} and "
            f"{target_pos.shape}"
        )
    hit = target_pos >= 0
    s, t = scores[hit], target_pos[hit].astype(np.int64)
    if len(s) and not np.isfinite(s[np.arange(len(s)), t]).all():
        raise ValueError(f"{STAGE}: expected a finite score for every retrieved target")
    if len(s) == 0:
        raise ValueError(f"{STAGE}: expected cases with the target among the candidates, got none")
    # Invalid candidates get a score no temperature lifts into the softmax.
    s = np.where(np.isfinite(s), s, np.nan)
    s = s - np.nanmax(s, axis=1, keepdims=True)
    s = np.where(np.isnan(s), -1e30, s)
    lo, hi = math.log(T_MIN), math.log(T_MAX)
    ratio = (math.sqrt(5.0) - 1.0) / 2.0
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = _nll(s, t, math.exp(a)), _nll(s, t, math.exp(b))
    while hi - lo > tol:
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = _nll(s, t, math.exp(a))
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = _nll(s, t, math.exp(b))
    temperature = math.exp((lo + hi) / 2.0)
    return Calibration(
        temperature=temperature,
        nll=_nll(s, t, temperature),
        nll_at_1=_nll(s, t, 1.0),
        cases=len(s),
        candidates=scores.shape[1],
        split=split,
    )


def temperature_of(config: dict[str, Any]) -> float:
    """The calibrated temperature in an artifact's JSON, 1.0 when it has none."""
    entry = config.get("calibration")
    if not isinstance(entry, dict):
        return 1.0
    value = float(entry.get("temperature", 1.0))
    if not value > 0:
        raise ValueError(f"{STAGE}: expected a temperature > 0 in the artifact, got {value}")
    return value


@dataclass(frozen=True, slots=True)
class SlateWeight:
    """A diversity weight chosen on validation for one scorer and ordering."""

    diversity: float
    ordering: str
    max_loss: float  # allowed relative NDCG@k loss against diversity 0
    ndcg_change: float  # relative NDCG@k change at ``diversity`` (<= 0)
    ild_change: float  # relative intra-list diversity change at ``diversity``
    users: int  # validation cases the curve was measured on
    k: int = 10
    split: str = "valid"
    seen_filtered: bool = False  # chosen with the user's history items dropped, as served
    margin_se: float = 0.0  # standard errors of the NDCG@k change kept inside max_loss

    def to_dict(self) -> dict[str, Any]:
        return {k: (round(v, 5) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def slate_weight_of(config: dict[str, Any], ordering: str) -> float | None:
    """The diversity weight stored in an artifact's JSON for ``ordering``; None when it has
    none (never chosen, or chosen for another ordering)."""
    entry = config.get("slate")
    if not isinstance(entry, dict) or entry.get("ordering") != ordering:
        return None
    value = float(entry.get("diversity", -1.0))
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{STAGE}: expected a stored diversity in [0, 1], got {value}")
    return value


def store_calibration(path: Path | str, *entries: Calibration | SlateWeight) -> None:
    """Write ``entries`` (a temperature, a chosen slate weight, or both) into the artifact
    JSON at ``path`` in one rewrite (other keys untouched)."""
    p = Path(path)
    config = json.loads(p.read_text())
    for entry in entries:
        config["slate" if isinstance(entry, SlateWeight) else "calibration"] = entry.to_dict()
    tmp = p.with_suffix(p.suffix + ".tmp")
    tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tmp.replace(p)
