"""Slate ordering: maximal marginal relevance (MMR), plus diversity/coverage metrics.

Each step picks the candidate maximising

    (1 - diversity) * rel_norm(c) - diversity * max_{s in slate} sim(c, s)

where ``rel_norm`` is the relevance min-max scaled to [0, 1] over the user's valid candidates
(so it is commensurate with a similarity), and ``sim`` is the cosine of the item embeddings,
blended with the Jaccard overlap of the items' category sets when both items have categories:
``(1 - category_weight) * cos + category_weight * jaccard``. The first pick is always the most
relevant candidate (the max over an empty slate is undefined). Ties go to the lower candidate
position, so ``diversity = 0`` reproduces a stable sort by relevance.

``mmr`` and ``xmmr`` are the batched fast paths; ``mmr_reference`` and ``xmmr_reference`` are
the slow pure-Python definitions they are tested against.

``xmmr`` (ordering ``"dcg"``) is MMR with the two terms in the units of what is measured: the
relevance of candidate ``c`` at slate position ``t`` is its probability relative to the best
candidate, ``q(c) = exp((rel(c) - max rel) / T)`` (the scores are logits: both the encoder and
the reranker are trained with a softmax over items; ``T`` is the scorer's temperature fitted on
validation, ``serving.calibration``, so that q is a calibrated probability ratio), times
the NDCG discount of the position relative to the first, ``g(t) = 1 / log2(t + 2)``; the
diversity term is what the candidate adds to the slate's intra-list diversity, the summed
distance ``1 - sim`` to the items already picked, scaled by ``k - 1`` (the most pairs an item
joins) so it stays in [0, 2]. Each step picks the candidate maximising

    (1 - diversity) * g(t) * q(c) + diversity * sum_{s in slate} (1 - sim(c, s)) / (k - 1)

so a likely item is hard to push out near the top (g is large and the slate small), and the
unlikely tail of a slate goes to items unlike the rest. Min-max scaling (``mmr``) instead
makes the 10th-best candidate look almost as relevant as the best whenever the pool's scores
spread wide.

``expected`` (ordering ``"expected"``, the default) keeps ``xmmr``'s form but reads each
candidate's absolute probability, ``p(c) = exp(rel(c) / T) / sum_j exp(rel(j) / T)`` over the
user's candidates, instead of its ratio to the best one. ``xmmr`` gives every user the same
trade-off: the top of a confident user's list (p = 0.4, 0.05, ...) and of an uncertain one's
(0.02, 0.019, ...) look alike to it once divided by the best. Summed over users, the
objective ``sum_t g(t) p(c_t) + weight' * ILD`` is the evaluation's mean NDCG@k plus a weight on
its mean ILD@k, so the greedy spends diversity where it costs the least expected NDCG: on the
users whose next item is uncertain. On Beauty's validation split, at the same NDCG@10 loss it
gives about twice the ILD@10 gain of ``xmmr`` (docs/reranker.md). Its weights are on another
scale (a probability is far below the ratio 1 of the best candidate): 0.005-0.01 where ``xmmr``
takes 0.05-0.15. When ``relevance`` holds only part of a user's candidates (the order stage
orders the best 50 of 200), ``log_partition`` gives the log of the sum over all of them, so a
pool cut from a flat list is not read as a confident one.

``dpp`` is the alternative ordering: greedy MAP inference of a determinantal point process with
kernel ``L = diag(q) S diag(q)``, ``S`` the cosine of the item vectors and
``q = exp(alpha * rel_norm)``, ``alpha = (1 - diversity) / (2 * diversity)`` (Chen et al.,
NeurIPS 2018: the log-det objective ``(1 - d) * sum(rel) + d * log det S_Y`` up to scale). Each
step adds the candidate with the largest gain in ``log det L_Y``, maintained with incremental
Cholesky rows (one (B, C) product per step, as MMR). ``dpp_reference`` recomputes the
determinants with ``numpy.linalg.slogdet``.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable, Sequence

import numpy as np

STAGE = "order"


def _check(relevance: np.ndarray, vectors: np.ndarray, k: int, diversity: float) -> None:
    if relevance.ndim != 2 or vectors.ndim != 3 or vectors.shape[:2] != relevance.shape:
        raise ValueError(
            f"{STAGE}: expected relevance (B, C) and vectors (B, C, D), got "
            f"{relevance.shape} and {vectors.shape}"
        )
    if k < 0 or not 0.0 <= diversity <= 1.0:
        raise ValueError(f"{STAGE}: expected k >= 0 and diversity in [0, 1], got {k}, {diversity}")


def _similarity_to(
    unit: np.ndarray,
    cats: np.ndarray | None,
    n_cats: np.ndarray | None,
    pick: np.ndarray,
    category_weight: float,
) -> np.ndarray:
    """sim(c, pick) for every candidate c of every row: (B, C) float64.

    unit: (B, C, D) float32 unit vectors; cats: (B, C, M) distinct ids, negative = padding;
    n_cats: (B, C) categories per candidate; pick: (B,) a candidate position per row.
    """
    batch = np.arange(len(pick))
    cos = np.matmul(unit, unit[batch, pick][:, :, None])[..., 0]
    if cats is None or n_cats is None:
        return cos.astype(np.float64)
    picked = cats[batch, pick]  # (B, M)
    inter = np.zeros(cos.shape, dtype=np.int64)
    # |cats(c) ∩ cats(pick)|: both sets hold distinct ids, so one membership test per
    # category of the pick counts the overlap; padding of the pick never counts.
    for m in range(picked.shape[1]):
        p = picked[:, m]
        inter += (cats == p[:, None, None]).any(axis=2) & (p >= 0)[:, None]
    n_pick = n_cats[batch, pick][:, None]
    union = n_cats + n_pick - inter
    known = (n_cats > 0) & (n_pick > 0)
    jac = inter / np.where(union > 0, union, 1)
    return np.where(known, (1.0 - category_weight) * cos + category_weight * jac, cos)


def mmr(
    relevance: np.ndarray,
    vectors: np.ndarray,
    k: int,
    diversity: float,
    *,
    categories: np.ndarray | None = None,
    category_weight: float = 0.5,
) -> np.ndarray:
    """Batched MMR.

    relevance: (B, C) float, ``-inf``/NaN marks an invalid candidate.
    vectors: (B, C, D) float item embeddings.
    categories: (B, C, M) int distinct category ids per candidate, -1 padding.
    Returns (B, k) int64 candidate positions in pick order, -1 once a row runs out.

    Similarities are computed per step, only against the item just picked (k matrix-vector
    products instead of all C x C pairs: k is the slate, C the pool), and in float32: item
    embeddings are float32 already and cosines agree with the float64 reference to ~1e-7.
    Relevance normalisation and the running scores stay float64 (they are only (B, C)).
    """
    return diversify(
        "mmr",
        relevance,
        vectors,
        k,
        diversity,
        categories=categories,
        category_weight=category_weight,
    )


def xmmr(
    relevance: np.ndarray,
    vectors: np.ndarray,
    k: int,
    diversity: float,
    *,
    categories: np.ndarray | None = None,
    category_weight: float = 0.5,
    temperature: float = 1.0,
) -> np.ndarray:
    """Batched expected-gain MMR (module doc, ordering ``"dcg"``); same contract as
    :func:`mmr`. ``relevance`` must be logits (adding a constant to a row changes nothing),
    ``temperature`` > 0 their scorer's calibrated temperature."""
    return diversify(
        "dcg",
        relevance,
        vectors,
        k,
        diversity,
        categories=categories,
        category_weight=category_weight,
        temperature=temperature,
    )


def expected(
    relevance: np.ndarray,
    vectors: np.ndarray,
    k: int,
    diversity: float,
    *,
    categories: np.ndarray | None = None,
    category_weight: float = 0.5,
    temperature: float = 1.0,
    log_partition: np.ndarray | None = None,
) -> np.ndarray:
    """Batched expected NDCG + ILD ordering (module doc, ordering ``"expected"``); same
    contract as :func:`xmmr`. ``log_partition (B,)``: ``log sum exp(score / T)`` over each
    user's whole candidate set when ``relevance`` is only part of it; by default the sum runs
    over the row's valid candidates."""
    return diversify(
        "expected",
        relevance,
        vectors,
        k,
        diversity,
        categories=categories,
        category_weight=category_weight,
        temperature=temperature,
        log_partition=log_partition,
    )


def log_partition_of(scores: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """``(B,)`` ``log sum exp(score / T)`` over each row's finite scores (-inf for a row with
    none): the ``log_partition`` of :func:`expected` for a pool cut from these rows."""
    s = np.asarray(scores, dtype=np.float64) / temperature
    finite = np.isfinite(s)
    hi = np.where(finite, s, -np.inf).max(axis=1)
    safe_hi = np.where(np.isfinite(hi), hi, 0.0)
    total = np.where(finite, np.exp(np.where(finite, s, 0.0) - safe_hi[:, None]), 0.0).sum(1)
    with np.errstate(divide="ignore"):
        return np.where(total > 0, np.log(total) + safe_hi, -np.inf)


#: What :func:`diversify` accepts.
ORDERINGS: tuple[str, ...] = ("expected", "dcg", "mmr")


def diversify(
    ordering: str,
    relevance: np.ndarray,
    vectors: np.ndarray,
    k: int,
    diversity: float,
    *,
    categories: np.ndarray | None = None,
    category_weight: float = 0.5,
    temperature: float = 1.0,
    log_partition: np.ndarray | None = None,
) -> np.ndarray:
    """``expected`` (``ordering="expected"``), ``xmmr`` (``"dcg"``), both over ``relevance``
    at ``temperature``, or ``mmr`` (``"mmr"``, which reads no temperature).
    ``log_partition`` is read by ``"expected"`` only."""
    if ordering not in ORDERINGS:
        raise ValueError(f"{STAGE}: expected ordering in {list(ORDERINGS)}, got {ordering!r}")
    scaled = np.asarray(relevance, dtype=np.float64)
    if ordering != "mmr":
        if not temperature > 0:
            raise ValueError(f"{STAGE}: expected temperature > 0, got {temperature}")
        scaled = scaled / temperature
    if ordering == "expected" and log_partition is not None:
        log_partition = np.asarray(log_partition, dtype=np.float64)
        if log_partition.shape != scaled.shape[:1]:
            raise ValueError(
                f"{STAGE}: expected log_partition of shape ({scaled.shape[0]},), got "
                f"{log_partition.shape}"
            )
    return _greedy(
        scaled,
        vectors,
        k,
        diversity,
        ordering,
        categories=categories,
        category_weight=category_weight,
        log_partition=log_partition if ordering == "expected" else None,
    )


def _relative_relevance(
    relevance: np.ndarray, avail: np.ndarray, kind: str, log_partition: np.ndarray | None = None
) -> np.ndarray:
    """Per row: min-max scaled to [0, 1] (``mmr``), ``exp(rel - max)`` (``dcg``) or
    ``exp(rel - log_partition)`` (``expected``, the softmax over the row by default); 0 where
    invalid. ``mmr``: 1 everywhere on a row whose valid scores are all equal."""
    hi = np.where(avail, relevance, -np.inf).max(axis=1, keepdims=True)
    if kind in ("dcg", "expected"):
        shifted = np.where(avail, relevance, 0.0) - np.where(np.isfinite(hi), hi, 0.0)
        ratio = np.where(avail, np.exp(shifted), 0.0)
        if kind == "dcg":
            return ratio
        if log_partition is None:
            total = ratio.sum(axis=1, keepdims=True)
            return ratio / np.where(total > 0, total, 1.0)
        # exp(rel - log Z) = ratio * exp(max - log Z); a row without candidates stays 0.
        lift = np.where(np.isfinite(hi[:, 0]), hi[:, 0] - log_partition, 0.0)
        return ratio * np.exp(np.minimum(lift, 0.0))[:, None]
    lo = np.where(avail, relevance, np.inf).min(axis=1, keepdims=True)
    span = hi - lo
    safe_span = np.where(span > 0, span, 1.0)
    rel = np.where(span > 0, (relevance - lo) / safe_span, 1.0)
    return np.where(avail, rel, 0.0)


def _greedy(
    relevance: np.ndarray,
    vectors: np.ndarray,
    k: int,
    diversity: float,
    kind: str,
    *,
    categories: np.ndarray | None,
    category_weight: float,
    log_partition: np.ndarray | None = None,
) -> np.ndarray:
    relevance = np.asarray(relevance, dtype=np.float64)
    vectors = np.asarray(vectors)
    _check(relevance, vectors, k, diversity)
    b, c = relevance.shape
    out = np.full((b, k), -1, dtype=np.int64)
    if b == 0 or c == 0 or k == 0:
        return out
    avail = np.isfinite(relevance)
    rel = _relative_relevance(relevance, avail, kind, log_partition)
    x = np.asarray(vectors, dtype=np.float32)
    norms = np.sqrt(np.einsum("bcd,bcd->bc", x, x))
    unit = x / np.where(norms > 0, norms, 1.0)[..., None]
    cats = n_cats = None
    if categories is not None:
        cats = np.asarray(categories)
        if cats.shape[:2] != (b, c) or cats.ndim != 3:
            raise ValueError(f"{STAGE}: expected categories (B, C, M), got {cats.shape}")
        # Drop category columns that are padding everywhere (most items have one category
        # out of max_categories slots): the per-step overlap test scales with M.
        cats = cats[..., (cats >= 0).any(axis=(0, 1))]
        n_cats = (cats >= 0).sum(axis=2)
    # mmr: the max similarity to the slate; dcg and expected: the summed distance to it.
    pairs = max(k - 1, 1)
    acc = np.zeros((b, c))
    batch = np.arange(b)
    steps = min(k, c)
    for t in range(steps):
        if t == 0:
            score = rel
        elif kind != "mmr":
            gain = 1.0 / math.log2(t + 2)
            score = (1.0 - diversity) * gain * rel + diversity * (acc / pairs)
        else:
            score = (1.0 - diversity) * rel - diversity * acc
        score = np.where(avail, score, -np.inf)
        pick = score.argmax(axis=1)
        ok = avail[batch, pick]
        if not ok.any():
            break
        out[:, t] = np.where(ok, pick, -1)
        avail[batch[ok], pick[ok]] = False
        if t + 1 == steps:
            break  # the last pick's similarities would never be read
        sim = _similarity_to(unit, cats, n_cats, pick, category_weight)
        if kind != "mmr":
            acc = np.where(ok[:, None], acc + (1.0 - sim), acc)
        else:
            acc = np.where(ok[:, None], np.maximum(acc, sim) if t else sim, acc)
    return out


def _dpp_quality(relevance: np.ndarray, diversity: float) -> tuple[np.ndarray, np.ndarray]:
    """``(avail (B, C) bool, log q (B, C) float64)`` of the DPP kernel from raw relevance."""
    avail = np.isfinite(relevance)
    lo = np.where(avail, relevance, np.inf).min(axis=1, keepdims=True)
    hi = np.where(avail, relevance, -np.inf).max(axis=1, keepdims=True)
    span = hi - lo
    safe = np.where(avail, relevance, 0.0) - np.where(np.isfinite(lo), lo, 0.0)
    rel = np.where(span > 0, safe / np.where(span > 0, span, 1.0), 1.0)
    alpha = (1.0 - diversity) / (2.0 * diversity)
    return avail, np.where(avail, alpha * rel, 0.0)


def dpp(
    relevance: np.ndarray, vectors: np.ndarray, k: int, diversity: float, *, eps: float = 1e-9
) -> np.ndarray:
    """Batched greedy DPP (see module doc); same contract as :func:`mmr`.

    ``diversity = 0`` is the relevance order. Once every remaining candidate's gain is below
    ``eps`` (its vector lies in the span of the slate's), the rest follow by relevance.
    """
    relevance = np.asarray(relevance, dtype=np.float64)
    vectors = np.asarray(vectors)
    _check(relevance, vectors, k, diversity)
    b, c = relevance.shape
    out = np.full((b, k), -1, dtype=np.int64)
    if b == 0 or c == 0 or k == 0:
        return out
    if diversity == 0.0:
        order = np.argsort(-np.where(np.isfinite(relevance), relevance, -np.inf), 1, "stable")
        top = order[:, :k]
        ok = np.isfinite(np.take_along_axis(relevance, top, axis=1))
        out[:, : top.shape[1]] = np.where(ok, top, -1)
        return out
    avail, log_q = _dpp_quality(relevance, diversity)
    # Scale q so the best candidate has q = 1: the gains are then <= 1 and never overflow.
    log_q = log_q - np.where(avail, log_q, -np.inf).max(axis=1, keepdims=True).clip(min=-1e30)
    q = np.where(avail, np.exp(log_q), 0.0)
    x = np.asarray(vectors, dtype=np.float64)
    norms = np.sqrt(np.einsum("bcd,bcd->bc", x, x))
    unit = x / np.where(norms > 0, norms, 1.0)[..., None]
    gain = q * q  # d_i^2 = L_ii - |c_i|^2, the Schur complement of each candidate
    chol = np.zeros((b, min(k, c), c))
    batch = np.arange(b)
    for t in range(min(k, c)):
        score = np.where(gain > eps, np.log(np.maximum(gain, eps)), -1e6 + log_q)
        score = np.where(avail, score, -np.inf)
        pick = score.argmax(axis=1)
        ok = avail[batch, pick]
        if not ok.any():
            break
        out[:, t] = np.where(ok, pick, -1)
        avail[batch[ok], pick[ok]] = False
        # e = (L[pick, :] - c[:, pick] . c) / sqrt(gain[pick]); L[pick, j] = q_p q_j cos(p, j)
        row = q[batch, pick][:, None] * q * np.einsum("bcd,bd->bc", unit, unit[batch, pick])
        row -= np.einsum("bt,btc->bc", chol[batch, :t, pick], chol[:, :t, :])
        d = np.sqrt(np.maximum(gain[batch, pick], eps))[:, None]
        e = np.where(ok[:, None], row / d, 0.0)
        chol[:, t, :] = e
        gain = gain - e * e
    return out


def dpp_reference(
    relevance: Sequence[Sequence[float]],
    vectors: Sequence[Sequence[Sequence[float]]],
    k: int,
    diversity: float,
    *,
    eps: float = 1e-9,
) -> list[list[int]]:
    """Slow greedy DPP: every step evaluates ``log det L_{Y + j}`` for each candidate j."""
    rel = np.asarray(relevance, dtype=np.float64)
    slates = []
    for u in range(len(rel)):
        avail, log_q = _dpp_quality(rel[u : u + 1], max(diversity, 1e-12))
        v = np.asarray(vectors[u], dtype=np.float64)
        n = np.linalg.norm(v, axis=1, keepdims=True)
        unit = v / np.where(n > 0, n, 1.0)
        q = np.exp(log_q[0] - log_q[0][avail[0]].max()) if avail.any() else np.ones(len(v))
        kernel = q[:, None] * (unit @ unit.T) * q[None, :]
        chosen: list[int] = []
        left = [j for j in range(len(v)) if avail[0, j]]
        if diversity == 0.0:
            chosen = sorted(left, key=lambda j: (-rel[u, j], j))[:k]
            left = []
        base = 0.0
        while left and len(chosen) < k:
            best, best_gain = -1, -math.inf
            for j in left:
                ys = [*chosen, j]
                sign, logdet = np.linalg.slogdet(kernel[np.ix_(ys, ys)])
                gain = logdet - base if sign > 0 else -math.inf
                if gain < math.log(eps):
                    gain = -1e6 + float(log_q[0, j])
                if gain > best_gain + 1e-9:  # rounding noise is no preference: lower j wins
                    best, best_gain = j, gain
            chosen.append(best)
            left.remove(best)
            sign, logdet = np.linalg.slogdet(kernel[np.ix_(chosen, chosen)])
            base = logdet if sign > 0 else base
        slates.append(chosen + [-1] * (k - len(chosen)))
    return slates


def mmr_reference(
    relevance: Sequence[Sequence[float]],
    vectors: Sequence[Sequence[Sequence[float]]],
    k: int,
    diversity: float,
    *,
    categories: Sequence[Sequence[Sequence[int]]] | None = None,
    category_weight: float = 0.5,
) -> list[list[int]]:
    """Slow pure-Python MMR, one user and one candidate at a time (same contract as ``mmr``)."""
    return _greedy_reference(relevance, vectors, k, diversity, "mmr", categories, category_weight)


def xmmr_reference(
    relevance: Sequence[Sequence[float]],
    vectors: Sequence[Sequence[Sequence[float]]],
    k: int,
    diversity: float,
    *,
    categories: Sequence[Sequence[Sequence[int]]] | None = None,
    category_weight: float = 0.5,
    temperature: float = 1.0,
) -> list[list[int]]:
    """Slow pure-Python expected-gain MMR (same contract as ``xmmr``)."""
    scaled = [[r / temperature for r in rels] for rels in relevance]
    return _greedy_reference(scaled, vectors, k, diversity, "dcg", categories, category_weight)


def expected_reference(
    relevance: Sequence[Sequence[float]],
    vectors: Sequence[Sequence[Sequence[float]]],
    k: int,
    diversity: float,
    *,
    categories: Sequence[Sequence[Sequence[int]]] | None = None,
    category_weight: float = 0.5,
    temperature: float = 1.0,
    log_partition: Sequence[float] | None = None,
) -> list[list[int]]:
    """Slow pure-Python expected NDCG + ILD ordering (same contract as ``expected``)."""
    scaled = [[r / temperature for r in rels] for rels in relevance]
    return _greedy_reference(
        scaled, vectors, k, diversity, "expected", categories, category_weight, log_partition
    )


def _greedy_reference(
    relevance: Sequence[Sequence[float]],
    vectors: Sequence[Sequence[Sequence[float]]],
    k: int,
    diversity: float,
    kind: str,
    categories: Sequence[Sequence[Sequence[int]]] | None,
    category_weight: float,
    log_partition: Sequence[float] | None = None,
) -> list[list[int]]:
    slates = []
    for u, rels in enumerate(relevance):
        valid = [j for j, r in enumerate(rels) if math.isfinite(r)]
        lo = min((rels[j] for j in valid), default=0.0)
        hi = max((rels[j] for j in valid), default=0.0)
        if kind == "dcg":
            norm = {j: math.exp(rels[j] - hi) for j in valid}
        elif kind == "expected":
            if log_partition is None:
                log_z = hi + math.log(sum(math.exp(rels[j] - hi) for j in valid) or 1.0)
            else:
                log_z = log_partition[u]
            norm = {j: math.exp(rels[j] - log_z) for j in valid}
        else:
            norm = {j: (rels[j] - lo) / (hi - lo) if hi > lo else 1.0 for j in valid}
        units = []
        for v in vectors[u]:
            n = math.sqrt(sum(x * x for x in v))
            units.append([x / n for x in v] if n > 0 else [0.0] * len(v))
        cats = [{x for x in cs if x >= 0} for cs in categories[u]] if categories else None

        def sim(i: int, j: int, units: list[list[float]] = units, cats: object = cats) -> float:
            s = sum(a * b for a, b in zip(units[i], units[j], strict=True))
            if isinstance(cats, list) and cats[i] and cats[j]:
                jac = len(cats[i] & cats[j]) / len(cats[i] | cats[j])
                s = (1.0 - category_weight) * s + category_weight * jac
            return s

        chosen: list[int] = []
        left = list(valid)
        while left and len(chosen) < k:
            best, best_score = -1, -math.inf
            t = len(chosen)
            for j in left:
                if not chosen:
                    score = norm[j]
                elif kind != "mmr":
                    spread = sum(1.0 - sim(j, s) for s in chosen) / (k - 1)
                    score = (1.0 - diversity) * norm[j] / math.log2(t + 2) + diversity * spread
                else:
                    penalty = max(sim(j, s) for s in chosen)
                    score = (1.0 - diversity) * norm[j] - diversity * penalty
                if score > best_score:
                    best, best_score = j, score
            chosen.append(best)
            left.remove(best)
        slates.append(chosen + [-1] * (k - len(chosen)))
    return slates


def intra_list_diversity(slate_vectors: np.ndarray) -> np.ndarray | float:
    """Mean pairwise cosine distance (1 - cos) within a slate.

    slate_vectors: (S, D) -> float, or (B, S, D) -> (B,) float64. Slates with < 2 items score 0.
    """
    x = np.asarray(slate_vectors, dtype=np.float64)
    single = x.ndim == 2
    if single:
        x = x[None]
    if x.ndim != 3:
        raise ValueError(f"{STAGE}: expected slate vectors (S, D) or (B, S, D), got {x.shape}")
    s = x.shape[1]
    if s < 2:
        out = np.zeros(x.shape[0])
    else:
        norms = np.linalg.norm(x, axis=2, keepdims=True)
        u = x / np.where(norms > 0, norms, 1.0)
        cos = np.einsum("bsd,btd->bst", u, u)
        iu = np.triu_indices(s, k=1)
        out = (1.0 - cos[:, iu[0], iu[1]]).mean(axis=1)
    return float(out[0]) if single else out


def coverage(slates: Iterable[Iterable[Hashable]], n_items: int) -> float:
    """Share of the catalogue (``n_items``) that appears in at least one slate."""
    if n_items <= 0:
        raise ValueError(f"{STAGE}: expected n_items > 0, got {n_items}")
    seen: set[Hashable] = set()
    for slate in slates:
        seen.update(x for x in slate if not (isinstance(x, int | np.integer) and x < 0))
    return len(seen) / n_items
