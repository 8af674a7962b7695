"""Slate evaluation: retrieval-only vs retrieval + rerank vs + diversity, on the same candidates.

Protocol (leave-one-out, the split ``serving.evaluate`` uses):

- ``retrieval_full``: the encoder's full-ranking HR/NDCG@{5,10,20} over every item.
- The encoder's top-C items (by dot product) are the candidates of every other row. A target
  outside them is a miss for every method, so the rows differ only in how they order the same C.
- ``retrieval``: the top-k by retrieval score (equals the full ranking's top-k whenever C >= k).
- ``rerank``: the top-k by the reranker's score.
- ``retrieval_filtered`` / ``rerank_filtered``: the same after dropping every candidate the
  user already has in the input history (the pipeline's ``filter_seen``; as in the pipeline,
  the reranker then scores only the candidates left). On logs without
  repeat consumption (MovieLens ratings) a seen item is never the target, so most of what a
  reranker gains over raw retrieval there may be this filter; ``lift_over_filtered`` compares
  ``rerank`` with ``retrieval_filtered`` to tell the two apart.
- ``curve``: the diversity ordering (``serving.ordering``: expected-gain MMR by default, or
  MMR / greedy DPP; cosine of the encoder's item vectors) over the
  rerank (or retrieval) scores for each diversity weight of a grid.

Per slate: HR@k, NDCG@k (one relevant item, IDCG = 1), intra-list diversity (mean pairwise
cosine distance of the encoder's item vectors, ``serving.ordering.intra_list_diversity``) and
catalogue coverage (share of items appearing in any slate). History items are not excluded,
as in ``serving.evaluate``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from serving.affinity import Affinity
from serving.calibration import Calibration, SlateWeight, fit_temperature, store_calibration
from serving.covisit import CoVisitation, batch_booster, sequences_before, summed_booster
from serving.data import EncodedLog, EvalCase, LeaveOneOut
from serving.evaluate import evaluate_split
from serving.ordering import coverage, diversify, dpp, intra_list_diversity
from serving.pipeline import served_affinity, served_table
from serving.reranker import (
    MISS,
    EncoderLike,
    LoggedCandidates,
    TransformerReranker,
    log_candidates,
    score_logged,
)

STAGE = "slate-eval"
STAGES: tuple[str, ...] = ("retrieval", "rerank", "full")
ORDERINGS: tuple[str, ...] = ("expected", "dcg", "mmr", "dpp")
#: Diversity weights of the trade-off curve: dense where the slate changes most, sparse after.
DIVERSITY_GRID: tuple[float, ...] = (
    *(0.0, 0.05, 0.08, 0.1, 0.12, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0),
)
#: The same for "expected", whose weights are on a scale of probabilities (serving.ordering).
EXPECTED_GRID: tuple[float, ...] = (
    *(0.0, 0.001, 0.002, 0.003, 0.005, 0.007, 0.01, 0.015, 0.02, 0.03, 0.05, 0.07, 0.1, 0.2),
)


def curve_grid(ordering: str) -> tuple[float, ...]:
    """The trade-off curve's default weights for ``ordering``."""
    return EXPECTED_GRID if ordering == "expected" else DIVERSITY_GRID


def slate_ranks(slates: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """``(U,) int64`` 0-based position of ``targets (U,)`` in ``slates (U, S)``, MISS if absent.

    ``slates`` hold item indices with -1 padding; a target <= 0 (unknown item) is a miss.
    """
    slates, targets = np.asarray(slates), np.asarray(targets)
    if slates.ndim != 2 or targets.shape != (len(slates),):
        raise ValueError(
            f"{STAGE}: expected slates (U, S) and targets (U,), got {slates.shape} "
            f"and {targets.shape}"
        )
    hit = (slates == targets[:, None]) & (targets[:, None] > 0)
    return np.where(hit.any(axis=1), hit.argmax(axis=1), MISS).astype(np.int64)


def _gains(ranks: np.ndarray, k: int) -> np.ndarray:
    """``(U,)`` NDCG@k of each slate's one target at 0-based ``ranks`` (IDCG = 1)."""
    return np.where(ranks < k, 1.0 / np.log2(np.minimum(ranks, k) + 2.0), 0.0)


def slate_metrics(
    slates: np.ndarray, targets: np.ndarray, item_vectors: np.ndarray, k: int = 10
) -> dict[str, float]:
    """HR@k, NDCG@k, ILD@k and coverage@k of ``slates (U, >=k) int64`` (item indices, -1 pad).

    ``item_vectors (N + 1, D)`` are indexed by item index (row 0 = padding); coverage is over
    the N real items. Slates shorter than k items score ILD over the items they have.
    """
    return _metrics_and_gains(slates, targets, item_vectors, k)[0]


def _metrics_and_gains(
    slates: np.ndarray, targets: np.ndarray, item_vectors: np.ndarray, k: int
) -> tuple[dict[str, float], np.ndarray]:
    """:func:`slate_metrics` and the per-slate NDCG@k gains it averages."""
    slates = np.asarray(slates)
    if slates.ndim != 2 or slates.shape[1] < k or k < 1:
        raise ValueError(f"{STAGE}: expected slates (U, >= {k}) and k >= 1, got {slates.shape}")
    if len(slates) == 0:
        raise ValueError(f"{STAGE}: expected at least one slate, got none")
    top = slates[:, :k]
    ranks = slate_ranks(top, targets)
    hit = ranks < k
    gains = _gains(ranks, k)
    vecs = np.asarray(item_vectors)[np.maximum(top, 0)]
    vecs = np.where((top >= 0)[:, :, None], vecs, 0.0)
    ild = np.asarray(intra_list_diversity(vecs), dtype=np.float64)
    full = (top >= 0).all(axis=1)
    metrics = {
        f"HR@{k}": float(hit.mean()),
        f"NDCG@{k}": float(gains.mean()),
        f"ILD@{k}": float(ild[full].mean()) if full.any() else 0.0,
        f"coverage@{k}": coverage(top.tolist(), len(item_vectors) - 1),
    }
    return metrics, gains


def seen_mask(cand: np.ndarray, log_: EncodedLog, cases: Sequence[EvalCase]) -> np.ndarray:
    """``(U, C) bool``: candidate ``cand[u, j]`` occurs in case ``u``'s input steps ``[0, cut)``."""
    cand = np.asarray(cand)
    if cand.ndim != 2 or len(cand) != len(cases):
        raise ValueError(
            f"{STAGE}: expected candidates ({len(cases)}, C) for the cases, got {cand.shape}"
        )
    out = np.zeros(cand.shape, dtype=bool)
    for j, c in enumerate(cases):
        out[j] = np.isin(cand[j], log_.items[c.user][: c.cut]) & (cand[j] > 0)
    return out


def top_k(cand: np.ndarray, scores: np.ndarray, k: int) -> np.ndarray:
    """``(U, k)`` items of ``cand (U, C)`` with the highest ``scores (U, C)`` (stable ties)."""
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    picked = np.take_along_axis(cand, order, axis=1)
    return np.where(np.take_along_axis(np.isfinite(scores), order, axis=1), picked, -1)


def mmr_slates(
    cand: np.ndarray,
    scores: np.ndarray,
    item_vectors: np.ndarray,
    k: int,
    diversity: float,
    *,
    categories: np.ndarray | None = None,
    category_weight: float = 0.5,
    ordering: str = "expected",
    temperature: float = 1.0,
    chunk: int = 1024,
) -> np.ndarray:
    """``(U, k)`` diversified slates over ``cand (U, C)`` with relevance ``scores (U, C)``:
    ``ordering='expected'`` expected NDCG + ILD over each user's probabilities among its C
    candidates (``serving.ordering.expected``), ``'dcg'`` expected-gain MMR
    (``serving.ordering.xmmr``), ``'mmr'`` min-max MMR, ``'dpp'`` greedy DPP slates
    (``serving.ordering.dpp``, vectors only).

    ``categories (N + 1, M)`` distinct category ids per item (-1 = none) make the similarity
    the pipeline's blend of cosine and category Jaccard (``serving.ordering.mmr``).
    Chunked over users: ``mmr`` works in float64 on (U, C, D), which for every test user at
    once would need gigabytes.
    """
    if ordering not in ORDERINGS:
        raise ValueError(f"{STAGE}: expected ordering in {list(ORDERINGS)}, got {ordering!r}")
    if ordering == "dpp" and categories is not None:
        raise ValueError(f"{STAGE}: expected no categories for ordering='dpp', got a table")
    if diversity == 0.0:
        return top_k(cand, scores, k)
    out = np.full((len(cand), k), -1, dtype=np.int64)
    vecs = np.asarray(item_vectors, dtype=np.float32)
    for start in range(0, len(cand), chunk):
        sl = slice(start, start + chunk)
        rows = np.maximum(cand[sl], 0)
        if ordering == "dpp":
            picks = dpp(scores[sl], vecs[rows], k, diversity)
        else:
            picks = diversify(
                ordering,
                scores[sl],
                vecs[rows],
                k,
                diversity,
                categories=categories[rows] if categories is not None else None,
                category_weight=category_weight,
                temperature=temperature,
            )
        got = np.take_along_axis(cand[sl], np.maximum(picks, 0), axis=1)
        out[sl] = np.where(picks >= 0, got, -1)
    return out


def tradeoff_curve(
    cand: np.ndarray,
    scores: np.ndarray,
    targets: np.ndarray,
    item_vectors: np.ndarray,
    *,
    k: int = 10,
    grid: Sequence[float] | None = None,
    categories: np.ndarray | None = None,
    category_weight: float = 0.5,
    ordering: str = "expected",
    temperature: float = 1.0,
) -> list[dict[str, float]]:
    """One metrics row per diversity weight of ``grid`` (default: :func:`curve_grid`):
    ``{"diversity", HR@k, NDCG@k, ILD@k, coverage@k}``, and with a weight-0 row in the grid
    ``NDCG@k_se``: the standard error of each row's mean NDCG@k change from it (paired over
    the same users), which :func:`choose_diversity` keeps as a margin."""
    rows, gains = [], []
    for lam in curve_grid(ordering) if grid is None else grid:
        slates = mmr_slates(
            cand,
            scores,
            item_vectors,
            k,
            float(lam),
            categories=categories,
            category_weight=category_weight,
            ordering=ordering,
            temperature=temperature,
        )
        metrics, per_user = _metrics_and_gains(slates, targets, item_vectors, k)
        rows.append({"diversity": float(lam), **metrics})
        gains.append(per_user)
    base = next((g for r, g in zip(rows, gains, strict=True) if r["diversity"] == 0.0), None)
    if base is not None:
        for row, per_user in zip(rows, gains, strict=True):
            change = per_user - base
            row[f"NDCG@{k}_se"] = float(change.std() / np.sqrt(len(change)))
    return rows


#: Standard errors of the NDCG@k change a chosen weight keeps between its validation loss and
#: ``max_loss``: a weight chosen at the edge of 2% on validation lands on either side of it
#: out of sample (on Beauty one standard error is 0.3 points of the 2%).
MARGIN_SE = 1.0


def choose_diversity(
    curve: Sequence[dict[str, float]],
    *,
    max_loss: float = 0.02,
    k: int = 10,
    margin_se: float = MARGIN_SE,
) -> dict[str, float]:
    """The curve row with the highest ILD whose NDCG@k is within ``max_loss`` (relative) of the
    diversity = 0 row by ``margin_se`` standard errors of its change (``NDCG@k_se`` of
    :func:`tradeoff_curve`; a row without it has no margin). ``curve`` must contain
    diversity 0."""
    base = [r for r in curve if r["diversity"] == 0.0]
    if not base:
        raise ValueError(
            f"{STAGE}: expected a diversity 0.0 row in the curve, got weights "
            f"{[r['diversity'] for r in curve]}"
        )
    floor = (1.0 - max_loss) * base[0][f"NDCG@{k}"]
    ok = [r for r in curve if r[f"NDCG@{k}"] - margin_se * r.get(f"NDCG@{k}_se", 0.0) >= floor]
    return max(ok, key=lambda r: (r[f"ILD@{k}"], -r["diversity"]))


#: Weights tried when choosing a scorer's diversity weight on validation (``calibrate``), per
#: ordering.
WEIGHT_GRID: tuple[float, ...] = (0.0, 0.02, 0.04, 0.06, 0.08, 0.1, 0.12, 0.15, 0.2, 0.25, 0.3)
EXPECTED_WEIGHT_GRID: tuple[float, ...] = (
    *(0.0, 0.001, 0.002, 0.003, 0.004, 0.005, 0.006, 0.007, 0.008, 0.009, 0.01),
    *(0.012, 0.015, 0.02, 0.03),
)
#: The ordering ``calibrate`` chooses a weight for: the order stage's default.
CALIBRATED_ORDERING = "expected"


def weight_grid(ordering: str) -> tuple[float, ...]:
    """The weights :func:`choose_weight` tries for ``ordering``."""
    return EXPECTED_WEIGHT_GRID if ordering == "expected" else WEIGHT_GRID


#: Validation cases the weight's trade-off curve is measured on (a seeded subset above it).
WEIGHT_USERS = 50_000


@dataclass(frozen=True)
class Calibrated:
    """What :func:`calibrate` fitted, per scorer ('retrieval', 'rerank')."""

    fits: dict[str, Calibration]  # score temperatures
    weights: dict[str, SlateWeight]  # diversity weights of CALIBRATED_ORDERING


def choose_weight(
    cand: np.ndarray,
    scores: np.ndarray,
    targets: np.ndarray,
    item_vectors: np.ndarray,
    *,
    temperature: float,
    max_loss: float = 0.02,
    k: int = 10,
    ordering: str = CALIBRATED_ORDERING,
    grid: Sequence[float] | None = None,
    users: int = WEIGHT_USERS,
    seed: int = 0,
    seen_filtered: bool = False,
    margin_se: float = MARGIN_SE,
) -> SlateWeight:
    """The ``ordering`` weight of ``grid`` (default :func:`weight_grid`) with the most ILD@k
    whose NDCG@k over ``cand``/``scores`` is within ``max_loss`` (relative) of pure relevance
    by ``margin_se`` standard errors (:func:`choose_diversity`), on a seeded subset of at most
    ``users`` rows.
    ``seen_filtered`` is recorded: the caller dropped the history items from ``scores``."""
    rows = np.arange(len(cand))
    if len(rows) > users:
        rows = np.sort(np.random.default_rng(seed).choice(len(rows), users, replace=False))
    curve = tradeoff_curve(
        cand[rows],
        scores[rows],
        targets[rows],
        item_vectors,
        k=k,
        grid=sorted({0.0, *(weight_grid(ordering) if grid is None else grid)}),
        ordering=ordering,
        temperature=temperature,
    )
    chosen = choose_diversity(curve, max_loss=max_loss, k=k, margin_se=margin_se)
    base = curve[0]
    return SlateWeight(
        diversity=chosen["diversity"],
        ordering=ordering,
        max_loss=max_loss,
        ndcg_change=_relative(chosen[f"NDCG@{k}"], base[f"NDCG@{k}"]) or 0.0,
        ild_change=_relative(chosen[f"ILD@{k}"], base[f"ILD@{k}"]) or 0.0,
        users=len(rows),
        k=k,
        seen_filtered=seen_filtered,
        margin_se=margin_se,
    )


def serving_affinity(encoder: EncoderLike, reranker: object | None = None) -> Affinity | None:
    """The encoder's attribute affinity as the pipeline applies it by default
    (:func:`serving.pipeline.served_affinity`: never under a reranker)."""
    return served_affinity(getattr(encoder, "affinity", None), reranker)


def serving_table(
    encoder: EncoderLike, reranker: TransformerReranker | None = None
) -> CoVisitation | None:
    """The encoder's co-visitation table as the pipeline applies it by default
    (:func:`serving.pipeline.served_table`)."""
    return served_table(getattr(encoder, "covisit", None), reranker)


def calibrate(
    encoder: EncoderLike,
    split: LeaveOneOut,
    *,
    reranker: TransformerReranker | None = None,
    candidates: int = 100,
    model_dir: Path | str | None = None,
    max_loss: float = 0.02,
    filter_seen: bool | None = None,
) -> Calibrated:
    """Fit the temperature of the retrieval scores (and the reranker's) on the VALIDATION
    cases' top-``candidates`` (``serving.calibration``), then choose each scorer's diversity
    weight for :data:`CALIBRATED_ORDERING` on the same cases at that temperature
    (:func:`choose_weight`, NDCG@10 loss within ``max_loss``). With ``model_dir`` both are
    stored in its ``config.json`` / ``reranker.json``; the loaded ``encoder`` and ``reranker``
    take them at once either way.

    ``filter_seen``: fit both on what a worker with ``STREAMREC_FILTER_SEEN=1`` orders (the
    user's history items dropped from the candidates, and the reranker scoring the rest);
    None: as the model's side scores were fitted (:func:`fitted_for_seen_filter`)."""
    if filter_seen is None:
        filter_seen = fitted_for_seen_filter(encoder)
    cases = split.cases("valid")
    if not cases:
        raise ValueError(f"{STAGE}: expected validation cases (users with >= 3 steps), got none")
    log_ = EncodedLog(split.data, encoder.vocab)
    # Each scorer is fitted on what it reads when it serves: retrieval on its scores with the
    # table (the order stage's input without a reranker), the reranker on candidates with the
    # table only when it was trained with it (otherwise the worker leaves the table off).
    seq_len = reranker.cfg.max_len if reranker is not None else 1
    at = [(c.user, c.cut) for c in cases]
    table, affinity = serving_table(encoder), serving_affinity(encoder)
    logged = log_candidates(
        encoder,
        log_,
        at,
        candidates=candidates,
        seq_len=seq_len,
        covisit=table,
        affinity=affinity,
    )
    seen = seen_mask(logged.cand, log_, cases) if filter_seen else None
    scored = {
        "retrieval": (
            logged,
            logged.retrieval if seen is None else np.where(seen, -np.inf, logged.retrieval),
        )
    }
    if reranker is not None:
        rr_table = serving_table(encoder, reranker)
        rr_logged = (
            logged
            if rr_table is table and affinity is None
            else log_candidates(
                encoder, log_, at, candidates=candidates, seq_len=seq_len, covisit=rr_table
            )
        )
        if seen is None:
            scored["rerank"] = (rr_logged, score_logged(reranker.net, rr_logged))
        else:
            rr_seen = seen if rr_logged is logged else seen_mask(rr_logged.cand, log_, cases)
            scored["rerank"] = (rr_logged, unseen_scores(reranker, rr_logged, rr_seen))
    fits = {
        name: fit_temperature(scores, _served_target(cands.target_pos, scores))
        for name, (cands, scores) in scored.items()
    }
    targets = np.array([log_.target(c) for c in cases], dtype=np.int64)
    vectors = encoder.model.item_table().detach().float().cpu().numpy()
    weights = {
        name: choose_weight(
            cands.cand,
            scores,
            targets,
            vectors,
            temperature=fits[name].temperature,
            max_loss=max_loss,
            seen_filtered=filter_seen,
        )
        for name, (cands, scores) in scored.items()
    }
    if reranker is not None:
        reranker.temperature = fits["rerank"].temperature
        reranker.slate = weights["rerank"].to_dict()
    config = getattr(encoder, "config", None)
    if isinstance(config, dict):
        config["calibration"] = fits["retrieval"].to_dict()
        config["slate"] = weights["retrieval"].to_dict()
    if model_dir is not None:
        for name, file in (("retrieval", "config.json"), ("rerank", "reranker.json")):
            if name in fits:
                store_calibration(Path(model_dir) / file, fits[name], weights[name])
    return Calibrated(fits, weights)


def unseen_scores(
    reranker: TransformerReranker, logged: LoggedCandidates, seen: np.ndarray
) -> np.ndarray:
    """``(U, C)`` the reranker's scores as a worker with ``STREAMREC_FILTER_SEEN=1`` computes
    them: the pipeline filters before it reranks, so the reranker scores only the candidates
    not in ``seen (U, C)``; seen ones score -inf."""
    unseen = replace(logged, cand=np.where(seen, 0, logged.cand))
    return np.where(seen, -np.inf, score_logged(reranker.net, unseen))


def fitted_for_seen_filter(encoder: EncoderLike) -> bool:
    """Whether the encoder's side-score weights were fitted for a worker that filters seen
    items (``streamrec train --filter-seen``: ``covisit_fit.validation_history`` = excluded)."""
    config = getattr(encoder, "config", None)
    fit = config.get("covisit_fit") if isinstance(config, dict) else None
    return isinstance(fit, dict) and fit.get("validation_history") == "excluded"


def _served_target(target_pos: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """``target_pos`` with the cases whose target the filters dropped (score -inf) marked
    as not retrieved."""
    rows = np.arange(len(target_pos))
    kept = np.isfinite(scores[rows, np.maximum(target_pos, 0)])
    return np.where((target_pos >= 0) & kept, target_pos, -1)


def _relative(new: float, old: float) -> float | None:
    return round(new / old - 1.0, 4) if old > 0 else None


def evaluate_slates(
    encoder: EncoderLike,
    split: LeaveOneOut,
    *,
    reranker: TransformerReranker | None = None,
    which: str = "test",
    stages: str = "full",
    candidates: int = 100,
    k: int = 10,
    diversity: float | None = None,
    grid: Sequence[float] | None = None,
    max_loss: float = 0.02,
    retrieval_curve: bool = True,
    curve_users: int | None = None,
    seed: int = 0,
    category_weight: float = 0.0,
    ordering: str = "expected",
    filter_seen: bool = False,
) -> dict[str, Any]:
    """The slate report (JSON-ready) for ``which`` ('valid' or 'test') leave-one-out cases.

    stages: 'retrieval' (retrieval only), 'rerank' (+ reranker on the same candidates) or
    'full' (+ the diversity trade-off curve of the scores the order stage sees, the
    reranker's or, without one, retrieval's, and the row at ``diversity``; when ``diversity``
    is None the weight is chosen by :func:`choose_diversity` with ``max_loss``).
    ``filter_seen``: the curves order what a worker with ``STREAMREC_FILTER_SEEN=1`` orders
    (history items dropped; the headline rows report both ways regardless).
    ``retrieval_curve`` adds the curve over retrieval scores beside the reranker's;
    ``curve_users`` computes the curves on a seeded random subset of that many users (the
    ordering is the slow part; the
    headline rows always use every user, and the curve's relative changes compare rows of the
    same subset). ``category_weight > 0`` blends the category Jaccard of the reranker's item
    categories into MMR's similarity, as the pipeline's order stage does with catalogue
    categories; ILD is still measured on the encoder's vectors. ``ordering`` names the
    ordering the curve is built with (``serving.ordering``; 'dpp' is the greedy DPP); the
    weight is that ordering's, and ``grid`` defaults to :func:`curve_grid`.
    """
    if stages not in STAGES:
        raise ValueError(f"{STAGE}: expected stages in {list(STAGES)}, got {stages!r}")
    if stages == "rerank" and reranker is None:
        raise ValueError(f"{STAGE}: expected a trained reranker for stages={stages!r}, got none")
    if reranker is not None and reranker.cfg.encoder_version not in ("", encoder.version):
        raise ValueError(
            f"{STAGE}: expected a reranker trained on encoder {encoder.version}, got one "
            f"trained on {reranker.cfg.encoder_version}"
        )
    started = time.perf_counter()
    cases = split.cases(which)
    if not cases:
        raise ValueError(f"{STAGE}: expected {which} cases (users with >= 3 steps), got none")
    log_ = EncodedLog(split.data, encoder.vocab)
    table, affinity = serving_table(encoder, reranker), serving_affinity(encoder, reranker)
    if table is not None:
        # Counted from every step before the held-out one, as the worker counts them.
        seqs = sequences_before(split, log_, which)
        table = CoVisitation.build(seqs, table.num_items, table.config)
    full = evaluate_split(
        encoder.model,
        split,
        log_,
        which,
        max_len=encoder.max_len,
        boost=summed_booster(
            batch_booster(table) if table is not None else None,
            affinity.booster() if affinity is not None else None,
        ),
    )
    logged: LoggedCandidates = log_candidates(
        encoder,
        log_,
        [(c.user, c.cut) for c in cases],
        candidates=candidates,
        seq_len=reranker.cfg.max_len if reranker is not None else 1,
        covisit=table,
        affinity=affinity,
    )
    targets = np.array([log_.target(c) for c in cases], dtype=np.int64)
    vectors = encoder.model.item_table().detach().float().cpu().numpy()
    report: dict[str, Any] = {
        "split": which,
        "users": len(cases),
        "candidates": candidates,
        "k": k,
        "encoder_version": encoder.version,
        f"recall@{candidates}": float((logged.target_pos >= 0).mean()),
        "covisit": {"weight": table.config.weight, "pairs": len(table), "counts": "online"}
        if table is not None
        else None,
        "affinity": affinity.to_config() if affinity is not None else None,
        "retrieval_full": full.metrics,
        "retrieval": slate_metrics(top_k(logged.cand, logged.retrieval, k), targets, vectors, k),
    }
    seen = seen_mask(logged.cand, log_, cases)
    report["seen_share"] = float(seen.mean())
    report["retrieval_filtered"] = slate_metrics(
        top_k(logged.cand, np.where(seen, -np.inf, logged.retrieval), k), targets, vectors, k
    )
    # The order stage's input per scorer: what the worker orders (no history items when it
    # filters seen items).
    ordered = {
        "retrieval": np.where(seen, -np.inf, logged.retrieval) if filter_seen else logged.retrieval
    }
    if reranker is not None and stages != "retrieval":
        report["reranker_version"] = reranker.version
        t0 = time.perf_counter()
        scores = score_logged(reranker.net, logged)
        report["rerank_seconds"] = round(time.perf_counter() - t0, 2)
        report["rerank"] = slate_metrics(top_k(logged.cand, scores, k), targets, vectors, k)
        filtered = unseen_scores(reranker, logged, seen)
        report["rerank_filtered"] = slate_metrics(
            top_k(logged.cand, filtered, k), targets, vectors, k
        )
        for key, base in (("lift", "retrieval"), ("lift_over_filtered", "retrieval_filtered")):
            report[key] = {
                name: _relative(report["rerank"][name], report[base][name]) for name in report[base]
            }
        ordered["rerank"] = filtered if filter_seen else scores
    if stages == "full":
        temps = {"retrieval": float(getattr(encoder, "temperature", 1.0))}
        if reranker is not None:
            temps["rerank"] = reranker.temperature
        primary = "rerank" if "rerank" in ordered else "retrieval"
        report |= _diversity_curves(
            logged.cand,
            {name: got for name, got in ordered.items() if name == primary or retrieval_curve},
            temps,
            targets,
            vectors,
            primary=primary,
            k=k,
            grid=curve_grid(ordering) if grid is None else grid,
            diversity=diversity,
            max_loss=max_loss,
            users=curve_users,
            seed=seed,
            categories=_category_table(reranker) if category_weight > 0 else None,
            category_weight=category_weight,
            ordering=ordering,
        )
        report["seen_filtered"] = filter_seen
    report["seconds"] = round(time.perf_counter() - started, 1)
    return report


def _category_table(reranker: TransformerReranker | None) -> np.ndarray:
    """``(N + 1, M)`` the reranker's item categories, -1 for none."""
    if reranker is None:
        raise ValueError(f"{STAGE}: expected a reranker for category_weight > 0 (its item "
                         "categories), got none")  # fmt: skip
    item_cats = reranker.net.item_categories.cpu().numpy()
    return np.where(item_cats > 0, item_cats, -1)


def _diversity_curves(
    cand: np.ndarray,
    scored: dict[str, np.ndarray],
    temps: dict[str, float],
    targets: np.ndarray,
    vectors: np.ndarray,
    *,
    primary: str,
    k: int,
    grid: Sequence[float],
    diversity: float | None,
    max_loss: float,
    users: int | None,
    seed: int,
    categories: np.ndarray | None,
    category_weight: float,
    ordering: str,
) -> dict[str, Any]:
    """The trade-off curve of each scorer in ``scored`` and the ``primary`` scorer's row at
    ``diversity`` (chosen on its curve by :func:`choose_diversity` when None)."""
    weights = sorted({0.0, *grid} | ({diversity} if diversity is not None else set()))
    sub = np.arange(len(cand))
    if users is not None and users < len(cand):
        sub = np.sort(np.random.default_rng(seed).choice(len(cand), users, False))
    curves = {
        name: tradeoff_curve(
            cand[sub],
            scores[sub],
            targets[sub],
            vectors,
            k=k,
            grid=weights,
            categories=categories,
            category_weight=category_weight,
            ordering=ordering,
            temperature=temps[name],
        )
        for name, scores in scored.items()
    }
    curve = curves[primary]
    if diversity is None:
        chosen = choose_diversity(curve, max_loss=max_loss, k=k)
    else:
        chosen = next(r for r in curve if r["diversity"] == diversity)
    return {
        "curve_users": len(sub),
        "category_weight": category_weight,
        "ordering": ordering,
        # "expected" and "dcg" read each scorer's scores at its calibrated temperature.
        "temperature": temps,
        "curve": curves,
        "curve_of": primary,
        "diversity": chosen["diversity"],
        "at_diversity": {
            **chosen,
            "NDCG_change": _relative(chosen[f"NDCG@{k}"], curve[0][f"NDCG@{k}"]),
            "ILD_change": _relative(chosen[f"ILD@{k}"], curve[0][f"ILD@{k}"]),
        },
    }


def plot_tradeoff(report: dict[str, Any], path: Path | str, *, title: str = "") -> Path:
    """PNG of NDCG@k against intra-list diversity as the ordering's diversity weight varies
    (``report['curve']``)."""
    if "curve" not in report:
        raise ValueError(f"{STAGE}: expected a report with a 'curve' (stages='full'), got none")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = report["k"]
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    for name, style in (("retrieval", "s--"), ("rerank", "o-")):
        if name not in report["curve"]:
            continue
        rows = report["curve"][name]
        xs = [r[f"ILD@{k}"] for r in rows]
        ys = [r[f"NDCG@{k}"] for r in rows]
        ordering = {
            "expected": "expected NDCG + ILD",
            "dcg": "expected-gain MMR",
            "mmr": "MMR",
            "dpp": "DPP",
        }.get(report.get("ordering", "mmr"), "MMR")
        ax.plot(xs, ys, style, label=f"{name} + {ordering}", markersize=4)
        for r, x, y in zip(rows, xs, ys, strict=True):
            if name == report.get("curve_of", "rerank"):
                ax.annotate(f"{r['diversity']:g}", (x, y), fontsize=7, alpha=0.7)
    if "diversity" in report:
        chosen = report["at_diversity"]
        ax.scatter(
            [chosen[f"ILD@{k}"]],
            [chosen[f"NDCG@{k}"]],
            s=120,
            facecolors="none",
            edgecolors="red",
            label=f"weight {report['diversity']:g}",
        )
    ax.set_xlabel(f"intra-list diversity @{k} (mean pairwise cosine distance)")
    ax.set_ylabel(f"NDCG@{k}")
    ax.set_title(title or f"relevance vs diversity ({report['split']}, C={report['candidates']})")
    ax.grid(alpha=0.3)
    ax.legend()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def write_report(report: dict[str, Any], path: Path | str) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    return out
