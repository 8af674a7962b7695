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
ORDERINGS: tuple[str, ...] = ("mmr", "dcg", "dpp")
#: Diversity weights of the trade-off curve: dense where the slate changes most, sparse after.
DIVERSITY_GRID: tuple[float, ...] = (
    *(0.0, 0.05, 0.08, 0.1, 0.12, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0),
)


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


def slate_metrics(
    slates: np.ndarray, targets: np.ndarray, item_vectors: np.ndarray, k: int = 10
) -> dict[str, float]:
    """HR@k, NDCG@k, ILD@k and coverage@k of ``slates (U, >=k) int64`` (item indices, -1 pad).

    ``item_vectors (N + 1, D)`` are indexed by item index (row 0 = padding); coverage is over
    the N real items. Slates shorter than k items score ILD over the items they have.
    """
    slates = np.asarray(slates)
    if slates.ndim != 2 or slates.shape[1] < k or k < 1:
        raise ValueError(f"{STAGE}: expected slates (U, >= {k}) and k >= 1, got {slates.shape}")
    if len(slates) == 0:
        raise ValueError(f"{STAGE}: expected at least one slate, got none")
    top = slates[:, :k]
    ranks = slate_ranks(top, targets)
    hit = ranks < k
    gains = np.where(hit, 1.0 / np.log2(np.minimum(ranks, k) + 2.0), 0.0)
    vecs = np.asarray(item_vectors)[np.maximum(top, 0)]
    vecs = np.where((top >= 0)[:, :, None], vecs, 0.0)
    ild = np.asarray(intra_list_diversity(vecs), dtype=np.float64)
    full = (top >= 0).all(axis=1)
    return {
        f"HR@{k}": float(hit.mean()),
        f"NDCG@{k}": float(gains.mean()),
        f"ILD@{k}": float(ild[full].mean()) if full.any() else 0.0,
        f"coverage@{k}": coverage(top.tolist(), len(item_vectors) - 1),
    }


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
    ordering: str = "dcg",
    temperature: float = 1.0,
    chunk: int = 1024,
) -> np.ndarray:
    """``(U, k)`` MMR slates over ``cand (U, C)`` with relevance ``scores (U, C)``; with
    ``ordering='dcg'`` expected-gain MMR (``serving.ordering.xmmr``), with ``ordering='dpp'``
    greedy DPP slates (``serving.ordering.dpp``, vectors only) instead.

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
    grid: Sequence[float] = DIVERSITY_GRID,
    categories: np.ndarray | None = None,
    category_weight: float = 0.5,
    ordering: str = "dcg",
    temperature: float = 1.0,
) -> list[dict[str, float]]:
    """One metrics row per diversity weight: ``{"diversity", HR@k, NDCG@k, ILD@k, coverage@k}``."""
    rows = []
    for lam in grid:
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
        rows.append({"diversity": float(lam), **slate_metrics(slates, targets, item_vectors, k)})
    return rows


def choose_diversity(
    curve: Sequence[dict[str, float]], *, max_loss: float = 0.02, k: int = 10
) -> dict[str, float]:
    """The curve row with the highest ILD whose NDCG@k is within ``max_loss`` (relative) of the
    diversity = 0 row. ``curve`` must contain diversity 0."""
    base = [r for r in curve if r["diversity"] == 0.0]
    if not base:
        raise ValueError(
            f"{STAGE}: expected a diversity 0.0 row in the curve, got weights "
            f"{[r['diversity'] for r in curve]}"
        )
    floor = (1.0 - max_loss) * base[0][f"NDCG@{k}"]
    ok = [r for r in curve if r[f"NDCG@{k}"] >= floor]
    return max(ok, key=lambda r: (r[f"ILD@{k}"], -r["diversity"]))


#: Weights tried when choosing a scorer's diversity weight on validation (``calibrate``).
WEIGHT_GRID: tuple[float, ...] = (0.0, 0.02, 0.04, 0.06, 0.08, 0.1, 0.12, 0.15, 0.2, 0.25, 0.3)
#: Validation cases the weight's trade-off curve is measured on (a seeded subset above it).
WEIGHT_USERS = 10_000


@dataclass(frozen=True)
class Calibrated:
    """What :func:`calibrate` fitted, per scorer ('retrieval', 'rerank')."""

    fits: dict[str, Calibration]  # score temperatures
    weights: dict[str, SlateWeight]  # diversity weights of the "dcg" ordering


def choose_weight(
    cand: np.ndarray,
    scores: np.ndarray,
    targets: np.ndarray,
    item_vectors: np.ndarray,
    *,
    temperature: float,
    max_loss: float = 0.02,
    k: int = 10,
    grid: Sequence[float] = WEIGHT_GRID,
    users: int = WEIGHT_USERS,
    seed: int = 0,
) -> SlateWeight:
    """The largest "dcg" weight of ``grid`` whose NDCG@k over ``cand``/``scores`` is within
    ``max_loss`` (relative) of pure relevance (:func:`choose_diversity`), on a seeded subset of
    at most ``users`` rows."""
    rows = np.arange(len(cand))
    if len(rows) > users:
        rows = np.sort(np.random.default_rng(seed).choice(len(rows), users, replace=False))
    curve = tradeoff_curve(
        cand[rows],
        scores[rows],
        targets[rows],
        item_vectors,
        k=k,
        grid=sorted({0.0, *grid}),
        ordering="dcg",
        temperature=temperature,
    )
    chosen = choose_diversity(curve, max_loss=max_loss, k=k)
    base = curve[0]
    return SlateWeight(
        diversity=chosen["diversity"],
        ordering="dcg",
        max_loss=max_loss,
        ndcg_change=_relative(chosen[f"NDCG@{k}"], base[f"NDCG@{k}"]) or 0.0,
        ild_change=_relative(chosen[f"ILD@{k}"], base[f"ILD@{k}"]) or 0.0,
        users=len(rows),
        k=k,
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
) -> Calibrated:
    """Fit the temperature of the retrieval scores (and the reranker's) on the VALIDATION
    cases' top-``candidates`` (``serving.calibration``), then choose each scorer's "dcg"
    diversity weight on the same cases at that temperature (:func:`choose_weight`, NDCG@10
    loss within ``max_loss``). With ``model_dir`` both are stored in its ``config.json`` /
    ``reranker.json``; the loaded ``encoder`` and ``reranker`` take them at once either way."""
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
    scored = {"retrieval": (logged, logged.retrieval)}
    if reranker is not None:
        rr_table = serving_table(encoder, reranker)
        rr_logged = (
            logged
            if rr_table is table and affinity is None
            else log_candidates(
                encoder, log_, at, candidates=candidates, seq_len=seq_len, covisit=rr_table
            )
        )
        scored["rerank"] = (rr_logged, score_logged(reranker.net, rr_logged))
    fits = {
        name: fit_temperature(scores, cands.target_pos) for name, (cands, scores) in scored.items()
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
    grid: Sequence[float] = DIVERSITY_GRID,
    max_loss: float = 0.02,
    retrieval_curve: bool = True,
    curve_users: int | None = None,
    seed: int = 0,
    category_weight: float = 0.0,
    ordering: str = "dcg",
) -> dict[str, Any]:
    """The slate report (JSON-ready) for ``which`` ('valid' or 'test') leave-one-out cases.

    stages: 'retrieval' (retrieval only), 'rerank' (+ reranker on the same candidates) or
    'full' (+ the MMR trade-off curve and the row at ``diversity``; when ``diversity`` is None
    the weight is chosen by :func:`choose_diversity` with ``max_loss``).
    ``retrieval_curve`` adds the curve of MMR over retrieval scores; ``curve_users`` computes
    the curves on a seeded random subset of that many users (MMR is the slow part; the
    headline rows always use every user, and the curve's relative changes compare rows of the
    same subset). ``category_weight > 0`` blends the category Jaccard of the reranker's item
    categories into MMR's similarity, as the pipeline's order stage does with catalogue
    categories; ILD is still measured on the encoder's vectors. ``ordering='dcg'`` builds the
    curve with expected-gain MMR, ``ordering='dpp'`` with the greedy DPP (the weight is then
    that ordering's trade-off).
    """
    if stages not in STAGES:
        raise ValueError(f"{STAGE}: expected stages in {list(STAGES)}, got {stages!r}")
    if stages != "retrieval" and reranker is None:
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
    if stages == "retrieval" or reranker is None:
        report["seconds"] = round(time.perf_counter() - started, 1)
        return report
    report["reranker_version"] = reranker.version
    t0 = time.perf_counter()
    scores = score_logged(reranker.net, logged)
    report["rerank_seconds"] = round(time.perf_counter() - t0, 2)
    report["rerank"] = slate_metrics(top_k(logged.cand, scores, k), targets, vectors, k)
    # The pipeline filters before it reranks: the reranker scores only the unseen candidates.
    unseen = replace(logged, cand=np.where(seen, 0, logged.cand))
    report["rerank_filtered"] = slate_metrics(
        top_k(logged.cand, score_logged(reranker.net, unseen), k), targets, vectors, k
    )
    for key, base in (("lift", "retrieval"), ("lift_over_filtered", "retrieval_filtered")):
        report[key] = {
            name: _relative(report["rerank"][name], report[base][name]) for name in report[base]
        }
    if stages == "full":
        grid = sorted({0.0, *grid, *([diversity] if diversity is not None else [])})
        sub = np.arange(len(cases))
        if curve_users is not None and curve_users < len(cases):
            sub = np.sort(np.random.default_rng(seed).choice(len(cases), curve_users, False))
        report["curve_users"] = len(sub)
        cand, tgt = logged.cand[sub], targets[sub]
        cats = None
        if category_weight > 0:
            item_cats = reranker.net.item_categories.cpu().numpy()
            cats = np.where(item_cats > 0, item_cats, -1)
        report["category_weight"] = category_weight
        report["ordering"] = ordering
        # "dcg" reads each scorer's scores at its calibrated temperature (1.0 if uncalibrated).
        temps = {
            "rerank": reranker.temperature,
            "retrieval": float(getattr(encoder, "temperature", 1.0)),
        }
        report["temperature"] = temps
        curve = tradeoff_curve(
            cand,
            scores[sub],
            tgt,
            vectors,
            k=k,
            grid=grid,
            categories=cats,
            category_weight=category_weight,
            ordering=ordering,
            temperature=temps["rerank"],
        )
        report["curve"] = {"rerank": curve}
        if retrieval_curve:
            report["curve"]["retrieval"] = tradeoff_curve(
                cand,
                logged.retrieval[sub],
                tgt,
                vectors,
                k=k,
                grid=grid,
                categories=cats,
                category_weight=category_weight,
                ordering=ordering,
                temperature=temps["retrieval"],
            )
        if diversity is None:
            chosen = choose_diversity(curve, max_loss=max_loss, k=k)
        else:
            chosen = next(r for r in curve if r["diversity"] == diversity)
        report["diversity"] = chosen["diversity"]
        report["at_diversity"] = {
            **chosen,
            "NDCG_change": _relative(chosen[f"NDCG@{k}"], curve[0][f"NDCG@{k}"]),
            "ILD_change": _relative(chosen[f"ILD@{k}"], curve[0][f"ILD@{k}"]),
        }
    report["seconds"] = round(time.perf_counter() - started, 1)
    return report


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
        ordering = {"dcg": "expected-gain MMR", "mmr": "MMR", "dpp": "DPP"}.get(
            report.get("ordering", "mmr"), "MMR"
        )
        ax.plot(xs, ys, style, label=f"{name} + {ordering}", markersize=4)
        for r, x, y in zip(rows, xs, ys, strict=True):
            if name == "rerank":
                ax.annotate(f"{r['diversity']:.2f}", (x, y), fontsize=7, alpha=0.7)
    if "diversity" in report:
        chosen = report["at_diversity"]
        ax.scatter(
            [chosen[f"ILD@{k}"]],
            [chosen[f"NDCG@{k}"]],
            s=120,
            facecolors="none",
            edgecolors="red",
            label=f"weight {report['diversity']:.2f}",
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
