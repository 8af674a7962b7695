"""Offline check of how new (text-embedded) items reach a slate: reserved places or a boost.

The slates come from :class:`serving.pipeline.Pipeline` itself, built the way
``serving.service.Recommender`` builds it: every item (warm ones and new ones with their
projected vectors) is in the index, and the new ones are also in :class:`FreshItems`, which
gives them ``fresh_slots`` places at the end of every slate. Nothing of the placement rule is
re-implemented here, so the position of a target in a slate is the pipeline's own.

What this module adds around the pipeline:

- :class:`FixedUserVectors`: a stand-in encoder holding user vectors computed beforehand (one
  per request key). The pipeline can then be run for any scorer, so baselines get exactly the
  same slate construction: popularity is ``user = [1, 0]``, ``item = [count, 1]``; random is
  random vectors; a text profile is text vectors.
- :func:`boosted`: a score boost for new items as one extra coordinate, ``item = [v, m]`` for a
  new item (``[v, 0]`` otherwise) and ``user = [u, 1]``, so that every new item's score is
  ``u · v + m`` inside the ordinary retrieval, filter and order stages.
- :func:`pipeline_slates`, :func:`slate_positions`, :func:`hit_metrics`: run, locate the
  target, score HR@k / NDCG@k (one relevant item, IDCG = 1).
- :func:`clustered_se`: the standard error of a mean over cases correlated within users.
- :func:`choose_margin`: the boost margin with the best HR@k on validation cases, where cold and
  warm targets are weighed by how often each occurs in the log.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from serving.catalog import Catalog, ItemMeta
from serving.pipeline import FreshItems, Pipeline, SlateRequest
from serving.types import Step

STAGE = "fresh-eval"
MISS = -1


class FixedUserVectors:
    """A ``CachingUserEncoder`` that returns user vectors computed beforehand, by request key.

    ``user_vectors[keys[b]]`` is the vector of the request whose ``user_id`` is ``keys[b]``.
    The pipeline calls :meth:`encode_users` because this class has ``max_len``; the window it
    passes is ignored. Plain :meth:`encode` has no keys to look up and refuses.
    """

    version = "fixed-user-vectors"

    def __init__(
        self,
        item_ids: Sequence[str],
        item_vectors: np.ndarray,
        user_vectors: Mapping[str, np.ndarray],
    ) -> None:
        vecs = np.asarray(item_vectors, dtype=np.float32)
        if vecs.ndim != 2 or len(vecs) != len(item_ids):
            raise ValueError(
                f"{STAGE}: expected item vectors ({len(item_ids)}, D), got {vecs.shape}"
            )
        self._ids, self._vectors = list(item_ids), vecs
        self._users = user_vectors
        self.max_len = 1_000_000

    @property
    def dim(self) -> int:
        return int(self._vectors.shape[1])

    def item_ids(self) -> Sequence[str]:
        return self._ids

    def item_vectors(self) -> np.ndarray:
        return self._vectors

    def encode(self, histories: Sequence[Sequence[Step]]) -> np.ndarray:
        raise TypeError(f"{STAGE}: FixedUserVectors needs request keys; use encode_users")

    def encode_users(self, keys: Sequence[str], histories: Sequence[Sequence[Step]]) -> np.ndarray:
        if not keys:
            return np.zeros((0, self.dim), np.float32)
        return np.stack([np.asarray(self._users[k], dtype=np.float32) for k in keys])


def boosted(
    item_vectors: np.ndarray, user_vectors: np.ndarray, fresh: np.ndarray, margin: float
) -> tuple[np.ndarray, np.ndarray]:
    """``(N, D + 1)`` items and ``(B, D + 1)`` users whose inner product is ``u · v`` plus
    ``margin`` where ``fresh (N,) bool`` is set."""
    items = np.asarray(item_vectors, dtype=np.float32)
    users = np.asarray(user_vectors, dtype=np.float32)
    fresh = np.asarray(fresh, dtype=bool)
    if fresh.shape != (len(items),) or users.ndim != 2 or users.shape[1] != items.shape[1]:
        raise ValueError(
            f"{STAGE}: expected items (N, D), users (B, D) and fresh (N,), got "
            f"{items.shape}, {users.shape} and {fresh.shape}"
        )
    extra = np.where(fresh, np.float32(margin), np.float32(0.0))[:, None]
    return (
        np.concatenate([items, extra], axis=1),
        np.concatenate([users, np.ones((len(users), 1), np.float32)], axis=1),
    )


@dataclass(frozen=True, slots=True)
class SlateSetup:
    """How the pipeline is built for one evaluation (the serving settings it reads)."""

    fresh_slots: int = 1
    slate_size: int = 10
    candidates: int = 200
    diversity: float = 0.0
    filter_seen: bool = True
    ordering: str = "expected"
    rerank_candidates: int | None = None
    covisit_weight: float | None = None
    covisit_candidates: int = 10
    affinity_weight: float | None = None


def pipeline_slates(
    item_ids: Sequence[str],
    item_vectors: np.ndarray,
    fresh: np.ndarray,
    user_vectors: np.ndarray,
    histories: Sequence[Sequence[Step]],
    setup: SlateSetup,
    *,
    categories: Mapping[str, Sequence[str]] | None = None,
    batch: int = 256,
) -> list[list[str]]:
    """The pipeline's slate (item ids, in slate order) for each ``histories[b]``, whose user
    vector is ``user_vectors[b]``.

    ``item_vectors (N, D)`` cover every item, new ones included (the service puts projected
    vectors into the index too); ``fresh (N,) bool`` marks the new ones, which also go into
    :class:`FreshItems`. ``categories`` (item → names) fill a :class:`Catalog`, which MMR reads
    when ``setup.diversity > 0``.
    """
    users = np.asarray(user_vectors, dtype=np.float32)
    fresh = np.asarray(fresh, dtype=bool)
    if len(users) != len(histories) or fresh.shape != (len(item_ids),):
        raise ValueError(
            f"{STAGE}: expected one user vector per history and one fresh flag per item, got "
            f"{len(users)} vectors, {len(histories)} histories, {fresh.shape} flags"
        )
    keys = [str(b) for b in range(len(users))]
    encoder = FixedUserVectors(item_ids, item_vectors, dict(zip(keys, users, strict=True)))
    catalog = None
    if categories is not None:
        catalog = Catalog()
        for item in item_ids:
            catalog.upsert(item, ItemMeta(categories=tuple(categories.get(item, ()))))
    pool = FreshItems(encoder.dim)
    vecs = encoder.item_vectors()
    for row in np.flatnonzero(fresh):
        pool.put(item_ids[int(row)], vecs[row])
    pipeline = Pipeline.from_settings(
        encoder, catalog, setup, fresh=pool, fresh_slots=setup.fresh_slots
    )
    out: list[list[str]] = []
    for start in range(0, len(users), batch):
        reqs = [
            SlateRequest(keys[b], histories[b])
            for b in range(start, min(start + batch, len(users)))
        ]
        out.extend(list(s.item_ids) for s in pipeline.recommend(reqs))
    return out


def slate_positions(slates: Sequence[Sequence[str]], targets: Sequence[str]) -> np.ndarray:
    """``(B,) int64`` 0-based position of ``targets[b]`` in ``slates[b]``; MISS when absent."""
    if len(slates) != len(targets):
        raise ValueError(f"{STAGE}: expected one target per slate, got {len(targets)}")
    out = np.full(len(slates), MISS, dtype=np.int64)
    for b, (slate, target) in enumerate(zip(slates, targets, strict=True)):
        if target in slate:
            out[b] = list(slate).index(target)
    return out


def hit_metrics(positions: np.ndarray, k: int = 10) -> dict[str, float]:
    """HR@k and NDCG@k from slate positions (MISS or >= k: no hit)."""
    pos = np.asarray(positions)
    if len(pos) == 0:
        raise ValueError(f"{STAGE}: expected at least one position, got none")
    hit = (pos >= 0) & (pos < k)
    gain = np.where(hit, 1.0 / np.log2(np.where(hit, pos, 0) + 2.0), 0.0)
    return {f"HR@{k}": float(hit.mean()), f"NDCG@{k}": float(gain.mean())}


def clustered_se(values: np.ndarray, groups: np.ndarray) -> float:
    """Standard error of ``mean(values)`` when cases within a group (a user) are correlated:
    ``sqrt(sum_g (sum_{i in g} (v_i - mean))^2) / n`` (the cluster-robust CR0 form; with one
    case per group it is the plain ``sqrt(var / n)``)."""
    v = np.asarray(values, dtype=np.float64)
    g = np.asarray(groups)
    if v.ndim != 1 or g.shape != v.shape or len(v) == 0:
        raise ValueError(
            f"{STAGE}: expected values (n,) and groups (n,), n >= 1, got {v.shape}, {g.shape}"
        )
    _, owner = np.unique(g, return_inverse=True)
    per_group = np.bincount(owner, weights=v - v.mean())
    return float(np.sqrt((per_group**2).sum()) / len(v))


def margin_grid(gaps: np.ndarray, steps: int = 20) -> list[float]:
    """0 and the ``1/steps … 100%`` quantiles of the positive ``gaps`` (per case: how far the
    best new item's score is below the score that enters the slate), rounded to 4 decimals."""
    g = np.asarray(gaps, dtype=np.float64)
    g = g[np.isfinite(g) & (g > 0)]
    grid = {0.0}
    if len(g):
        grid |= {round(float(q), 4) for q in np.quantile(g, np.arange(1, steps + 1) / steps)}
    return sorted(grid)


@dataclass(frozen=True, slots=True)
class MarginChoice:
    margin: float
    objective: float  # w · HR(cold) + (1 − w) · HR(warm) at the chosen margin
    curve: list[dict[str, float]]  # per margin: margin, cold HR, warm HR, objective


def choose_margin(
    grid: Sequence[float],
    hit_rates: Callable[[float], tuple[float, float]],
    cold_weight: float,
) -> MarginChoice:
    """The margin of ``grid`` with the highest ``w · cold + (1 − w) · warm`` hit rate, where
    ``hit_rates(m)`` returns ``(cold HR, warm HR)`` on VALIDATION cases and ``w`` is the share of
    cold targets in the log. Ties go to the smaller margin."""
    if not grid or not 0.0 <= cold_weight <= 1.0:
        raise ValueError(
            f"{STAGE}: expected a non-empty grid and cold_weight in [0, 1], got {len(grid)} "
            f"margins and {cold_weight}"
        )
    curve, best = [], None
    for m in sorted(grid):
        cold, warm = hit_rates(m)
        obj = cold_weight * cold + (1.0 - cold_weight) * warm
        curve.append({"margin": m, "cold HR": cold, "warm HR": warm, "objective": obj})
        if best is None or obj > best[1] + 1e-12:
            best = (m, obj)
    assert best is not None
    return MarginChoice(best[0], best[1], curve)


__all__ = [
    "MISS",
    "FixedUserVectors",
    "MarginChoice",
    "SlateSetup",
    "boosted",
    "choose_margin",
    "clustered_se",
    "hit_metrics",
    "margin_grid",
    "pipeline_slates",
    "slate_positions",
]
