"""The transport-free recommendation pipeline:
encode -> retrieve -> covisit -> filter -> rerank -> order.

Each stage is a small class with a stable ``name`` (log text, the ``stage`` metric label, error
text) that maps one frozen dataclass to the next. Everything works on whole batches: one
encoder call, one index search, vectorised filtering and ordering over ``(B, C)`` arrays.

Decisions:
- Filter: items the user purchased (any history step of type ``purchase``) never appear; nor do
  unavailable or retired items (catalog) or removed ones (index). Items merely seen stay
  allowed (repeat views and re-purchase intent are common), except the item of the triggering
  event (the last step), which the user is looking at right now. ``filter_seen=True`` drops
  every history item.
- Co-visitation (``serving.covisit``, when the model has a table with a weight): the user's
  strongest followers that retrieval missed join the candidates (before the filter), and
  each candidate's retrieval score gains ``weight * boost`` from how often it followed the
  user's newest items, before the reranker, which reads the boost itself when it was trained with
  the table (``RerankerConfig.covisit``); a reranker trained without it switches the table
  off unless a weight is given. Every request's trigger step is counted into the table as
  it passes.
- Cold users (no history step on an item the index knows): the encoder is not called for them;
  they get ``fallback_vector`` as their user vector, by default the mean item vector of the
  index at construction (``popularity_vector`` builds a popularity-weighted one).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, ClassVar, Protocol

import numpy as np

from serving.affinity import Affinity
from serving.catalog import Catalog, CatalogRows
from serving.covisit import CoVisitation
from serving.encoder import serving_window
from serving.index import ItemIndex
from serving.ordering import ORDERINGS, diversify, log_partition_of
from serving.types import CachingUserEncoder, History, Step, UserEncoder, step_items

StageCallback = Callable[[str, float], None]


@dataclass(frozen=True, slots=True)
class SlateRequest:
    """A user to recommend for; ``history`` is oldest first, its last step the trigger."""

    user_id: str
    history: Sequence[Step]
    events: int = 0  # events the user ever had (sets the encoder window); 0 = unknown


@dataclass(frozen=True, slots=True)
class Slate:
    """The ordered recommendation for one user; ``scores`` are the rerank scores."""

    user_id: str
    item_ids: list[str]
    scores: list[float]
    model_version: str = ""
    index_version: str = ""


@dataclass(frozen=True, slots=True)
class Encoded:
    requests: tuple[SlateRequest, ...]
    user_vectors: np.ndarray  # (B, D) float32
    cold: np.ndarray  # (B,) bool: got the fallback vector


@dataclass(frozen=True, slots=True)
class Candidates:
    requests: tuple[SlateRequest, ...]
    rows: np.ndarray  # (B, C) int64 index rows, -1 = no candidate (valid ones first)
    retrieval_scores: np.ndarray  # (B, C) float32 user . item, -inf where rows == -1
    scores: np.ndarray  # (B, C) float32 current ranking score, -inf where rows == -1
    row_ids: np.ndarray  # (R,) object item id by row (index snapshot)
    index_version: str
    covisit: np.ndarray | None = None  # (B, C) float32 unweighted co-visitation boost, if any

    @property
    def valid(self) -> np.ndarray:  # (B, C) bool
        return self.rows >= 0


@dataclass(frozen=True, slots=True)
class Ordered:
    candidates: Candidates
    positions: np.ndarray  # (B, S) int64 positions into the candidate axis, -1 padding


class Reranker(Protocol):
    """Scores a candidate set per user; higher is better."""

    def score(self, requests: Sequence[SlateRequest], candidates: Candidates) -> np.ndarray:
        """Returns (B, C) float scores; values at invalid candidates are ignored."""
        ...


class RetrievalScoreReranker:
    """Pass-through: keeps the retrieval inner product as the ranking score."""

    def score(self, requests: Sequence[SlateRequest], candidates: Candidates) -> np.ndarray:
        return candidates.retrieval_scores


def popularity_vector(vectors: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Popularity-weighted mean item vector. vectors: (N, D); counts: (N,) >= 0. Returns (D,)."""
    counts = np.asarray(counts, dtype=np.float64)
    if counts.shape != (len(vectors),) or (counts < 0).any() or counts.sum() <= 0:
        raise ValueError(
            f"popularity: expected {len(vectors)} non-negative counts with a positive sum, "
            f"got shape {counts.shape}"
        )
    return (counts @ np.asarray(vectors, dtype=np.float64) / counts.sum()).astype(np.float32)


class EncodeStage:
    name: ClassVar[str] = "encode"

    def __init__(self, encoder: UserEncoder, index: ItemIndex, fallback: np.ndarray) -> None:
        self.encoder, self.index, self.fallback = encoder, index, fallback

    def __call__(self, requests: tuple[SlateRequest, ...]) -> Encoded:
        contains = self.index.contains
        cold = np.array(
            [not any(map(contains, step_items(r.history))) for r in requests], dtype=bool
        )
        out = np.empty((len(requests), self.index.dim), dtype=np.float32)
        out[cold] = self.fallback
        warm = np.flatnonzero(~cold)
        if len(warm):
            vecs = self._encode([requests[i] for i in warm])
            if vecs.shape != (len(warm), self.index.dim):
                raise ValueError(
                    f"{self.name}: expected user vectors ({len(warm)}, {self.index.dim}) from "
                    f"encoder {self.encoder.version}, got {vecs.shape}"
                )
            # A history of items the index has but the encoder never saw (cold-start items
            # only) encodes to zeros: treat it as a cold user too.
            empty = ~np.any(vecs, axis=1)
            vecs[empty] = self.fallback
            out[warm] = vecs
            cold[warm[empty]] = True
        return Encoded(requests, out, cold)

    def _encode(self, requests: Sequence[SlateRequest]) -> np.ndarray:
        """An encoder with a per-user cache reads each user's :func:`serving_window`, which
        only grows between restarts, so most events cost it one step; others read the
        whole history (their own ``max_len`` cut applies)."""
        enc = self.encoder
        if not isinstance(enc, CachingUserEncoder):
            return np.array(enc.encode([r.history for r in requests]))
        windows = [
            r.history[-serving_window(r.events, enc.max_len) :] if r.events else r.history
            for r in requests
        ]
        return np.array(enc.encode_users([r.user_id for r in requests], windows))


class RetrieveStage:
    name: ClassVar[str] = "retrieve"

    def __init__(self, index: ItemIndex, candidates: int) -> None:
        self.index, self.candidates = index, candidates

    def __call__(self, encoded: Encoded) -> Candidates:
        res = self.index.search(encoded.user_vectors, self.candidates)
        return Candidates(
            encoded.requests, res.rows, res.scores, res.scores, res.row_ids, res.index_version
        )


class FilterStage:
    name: ClassVar[str] = "filter"

    def __init__(
        self,
        index: ItemIndex,
        rows: CatalogRows | None,
        *,
        filter_seen: bool = False,
        exclude_trigger: bool = True,
    ) -> None:
        self.index, self.catalog_rows = index, rows
        self.filter_seen, self.exclude_trigger = filter_seen, exclude_trigger

    def excluded_items(self, request: SlateRequest) -> list[str]:
        """Item ids this user must not be shown (see module doc)."""
        h = request.history
        if isinstance(h, History):  # the worker's columns: no Step built per history entry
            out = list(h.items) if self.filter_seen else h.purchased_items()
        elif self.filter_seen:
            return [s.item for s in h]
        else:
            out = [s.item for s in h if s.type == "purchase"]
        if self.filter_seen:
            return out
        if self.exclude_trigger and h:
            out.append(h[-1].item)
        return out

    def __call__(self, cands: Candidates) -> Candidates:
        rows = cands.rows
        per_user = [self.excluded_items(r) for r in cands.requests]
        owner = np.repeat(np.arange(len(rows), dtype=np.int64), [len(x) for x in per_user])
        ex_rows = self.index.rows_of([i for x in per_user for i in x], live_only=False)
        known = ex_rows >= 0
        owner, ex_rows = owner[known], ex_rows[known]
        drop = rows < 0
        if len(ex_rows):
            # Each exclusion is compared with its own user's candidates only, (E, C) in all
            # (a user has a handful), then OR-ed per user; ``owner`` is sorted by user.
            hit = rows[owner] == ex_rows[:, None]
            users, first = np.unique(owner, return_index=True)
            drop[users] |= np.logical_or.reduceat(hit, first, axis=0)
        if self.catalog_rows is not None:
            drop |= self.catalog_rows.refresh().blocked_of(rows)
        if not drop.any():
            return cands
        # Survivors keep their order and move to the front (a stable sort on the flag).
        order = np.argsort(drop, axis=1, kind="stable")
        drop = np.take_along_axis(drop, order, axis=1)

        def take(x: np.ndarray, fill: float) -> np.ndarray:
            return np.where(drop, fill, np.take_along_axis(x, order, axis=1))

        retrieval = take(cands.retrieval_scores, -np.inf).astype(np.float32, copy=False)
        return replace(
            cands,
            rows=take(rows, -1).astype(np.int64, copy=False),
            retrieval_scores=retrieval,
            # Retrieval hands one array as both scores (nothing reranked yet): sort it once.
            scores=retrieval
            if cands.scores is cands.retrieval_scores
            else take(cands.scores, -np.inf).astype(np.float32, copy=False),
            covisit=None
            if cands.covisit is None
            else take(cands.covisit, 0.0).astype(np.float32, copy=False),
        )


def below_scored(scored: np.ndarray, retrieval: np.ndarray) -> np.ndarray:
    """Scores that rank candidates the reranker did not score below every one it did (per row:
    under the row's lowest finite ``scored`` value, 0 when it has none), in the order of their
    ``retrieval`` scores (tanh keeps them within 1 of each other); -inf where ``retrieval`` is
    not finite."""
    floor = np.where(np.isfinite(scored), scored, np.inf).min(axis=1, keepdims=True)
    floor = np.where(np.isfinite(floor), floor, 0.0)
    return np.where(np.isfinite(retrieval), floor - 1.0 + np.tanh(retrieval) * 0.5, -np.inf)


class RerankStage:
    """Scores each user's candidates with the reranker.

    ``top``: rerank only each user's ``top`` best candidates by retrieval score (a reranker
    trained on the top-100 has never seen rank 150, and its cost grows with C, the
    candidates' self-attention with C squared); the others keep their retrieval order below
    every reranked candidate. None reranks all of them.
    """

    name: ClassVar[str] = "rerank"

    def __init__(self, reranker: Reranker, top: int | None = None) -> None:
        if top is not None and top < 1:
            raise ValueError(f"{self.name}: expected top >= 1 or None, got {top}")
        self.reranker = reranker
        self.top = top

    def __call__(self, cands: Candidates) -> Candidates:
        c = cands.rows.shape[1]
        if self.top is None or self.top >= c:
            return replace(cands, scores=self._score(cands))
        order = np.argsort(-cands.retrieval_scores, axis=1, kind="stable")
        head, tail = order[:, : self.top], order[:, self.top :]

        def cols(x: np.ndarray, at: np.ndarray) -> np.ndarray:
            return np.take_along_axis(x, at, axis=1)

        sub = replace(
            cands,
            rows=cols(cands.rows, head),
            retrieval_scores=cols(cands.retrieval_scores, head),
            scores=cols(cands.scores, head),
            covisit=cols(cands.covisit, head) if cands.covisit is not None else None,
        )
        top_scores = self._score(sub)
        rest = below_scored(top_scores, cols(cands.retrieval_scores, tail))
        scores = np.empty(cands.rows.shape, dtype=np.float32)
        np.put_along_axis(scores, head, top_scores, axis=1)
        np.put_along_axis(scores, tail, rest.astype(np.float32), axis=1)
        return replace(cands, scores=np.where(cands.valid, scores, -np.inf).astype(np.float32))

    def _score(self, cands: Candidates) -> np.ndarray:
        scores = np.asarray(self.reranker.score(cands.requests, cands), dtype=np.float32)
        if scores.shape != cands.rows.shape:
            raise ValueError(
                f"{self.name}: expected scores {cands.rows.shape} from "
                f"{type(self.reranker).__name__}, got {scores.shape}"
            )
        valid = cands.valid
        if not np.isfinite(scores[valid]).all():
            raise ValueError(
                f"{self.name}: {type(self.reranker).__name__} returned NaN or infinite scores "
                "for valid candidates"
            )
        return np.where(valid, scores, -np.inf).astype(np.float32)


def served_table(
    table: CoVisitation | None, reranker: object | None = None, weight: float | None = None
) -> CoVisitation | None:
    """The co-visitation table a pipeline applies: ``table`` read at ``weight`` when one is
    given; else at its stored weight, except under a reranker trained without the table
    (``RerankerConfig.covisit``), which never saw boosted retrieval scores. None when off
    (no table, or weight 0)."""
    if not isinstance(table, CoVisitation):
        return None
    if weight is not None:
        table = table.with_weight(weight)
    elif reranker is not None and not getattr(getattr(reranker, "cfg", None), "covisit", False):
        return None
    return table if table.config.weight > 0 else None


def served_affinity(
    affinity: Affinity | None, reranker: object | None = None, weight: float | None = None
) -> Affinity | None:
    """The attribute affinity a pipeline applies: read at ``weight`` when one is given, else
    at its stored weight; never under a reranker (it reads the candidates' categories itself
    and was trained on scores without affinity). None when off."""
    if not isinstance(affinity, Affinity) or reranker is not None:
        return None
    if weight is not None:
        affinity = affinity.with_weight(weight)
    return affinity if affinity.weight > 0 else None


class CoVisitStage:
    """Adds each user's ``add`` strongest followers (``serving.covisit``) the retrieval missed
    to the candidates (scored ``user . item`` like the rest), adds ``weight * boost`` to every
    candidate's retrieval score (and current score), hands the unweighted boost on for the
    reranker (``Candidates.covisit``) and counts each request's newest step into the table.
    With an ``affinity`` (``serving.affinity``) it also adds ``affinity weight * affinity``.
    Without either it passes through. It runs before the filter, which then treats the
    added candidates like the retrieved ones."""

    name: ClassVar[str] = "covisit"

    def __init__(
        self,
        table: CoVisitation | None,
        vocab: dict[str, int] | None,
        index: ItemIndex | None = None,
        add: int = 0,
        affinity: Affinity | None = None,
    ) -> None:
        if (table is not None or affinity is not None) and vocab is None:
            raise ValueError(
                f"{self.name}: expected the encoder's item vocabulary with a table or affinity"
            )
        if add < 0:
            raise ValueError(f"{self.name}: expected add >= 0 followers per user, got {add}")
        self.table = table if table is not None and table.config.weight > 0 else None
        self.affinity = affinity if affinity is not None and affinity.weight > 0 else None
        self.vocab: dict[str, int] = vocab or {}
        self.index, self.add = index, add
        self._row_index = np.zeros(0, dtype=np.int64)  # -1 = not looked up yet
        self._item_row = np.zeros(0, dtype=np.int64)  # model index -> index row (_rows_of)
        self._ids = np.empty(len(self.vocab) + 1, dtype=object)  # model index -> item id
        for item, i in self.vocab.items():
            if 0 < i < len(self._ids):
                self._ids[i] = item

    @property
    def weight(self) -> float:
        return self.table.config.weight if self.table is not None else 0.0

    def _items_of(self, rows: np.ndarray, row_ids: np.ndarray) -> np.ndarray:
        """Model item index of each candidate row (0 = no row, or an item the table does
        not know). Index rows are append-only, so each row is looked up once."""
        if len(self._row_index) < len(row_ids):
            grown = np.full(len(row_ids), -1, dtype=np.int64)
            grown[: len(self._row_index)] = self._row_index
            self._row_index = grown
        safe = np.maximum(rows, 0)
        found = self._row_index[safe]
        missing = np.unique(safe[found < 0])
        if len(missing):
            get = self.vocab.get
            self._row_index[missing] = [get(row_ids[r], 0) for r in missing.tolist()]
            found = self._row_index[safe]
        return np.where(rows >= 0, found, 0)

    def newest(self, requests: Sequence[SlateRequest], depth: int) -> np.ndarray:
        """``(B, depth)`` each user's newest item indices, newest first, 0-padded (0 also
        for an item the table does not know)."""
        out = np.zeros((len(requests), depth), dtype=np.int64)
        get = self.vocab.get
        if not depth:
            return out
        for b, req in enumerate(requests):
            hist = req.history
            # Only the tail is read: a plain step sequence is not copied whole.
            tail = (
                hist.items[-depth:]
                if isinstance(hist, History)
                else [s.item for s in hist[-depth:]]
            )
            for j, item in enumerate(reversed(tail)):
                out[b, j] = get(item, 0)
        return out

    def _expand(
        self,
        table: CoVisitation,
        index: ItemIndex,
        cands: Candidates,
        gains: tuple[np.ndarray, np.ndarray],
        items: np.ndarray,
        users: np.ndarray,
    ) -> tuple[Candidates, np.ndarray]:
        """``cands`` with each user's strongest followers that are not candidates yet added
        after its valid candidates, and the model item index of every candidate."""
        follow, _ = table.followers(gains, items, self.add)
        rows = self._rows_of(index, follow)
        # A row added to the index after this batch's search is not in its row_ids snapshot.
        rows[rows >= len(cands.row_ids)] = -1
        keep = rows >= 0
        if not keep.any():
            return cands, items
        score = np.einsum("bd,bkd->bk", users, index.vectors_of_rows(rows)).astype(np.float32)
        col = cands.valid.sum(axis=1)[:, None] + np.cumsum(keep, axis=1) - 1
        width = max(cands.rows.shape[1], int(col[keep].max()) + 1)
        b = np.nonzero(keep)[0]

        def grown(x: np.ndarray, fill: float, new: np.ndarray) -> np.ndarray:
            out = np.full((len(x), width), fill, dtype=x.dtype)
            out[:, : x.shape[1]] = x
            out[b, col[keep]] = new[keep]
            return out

        retrieval = grown(cands.retrieval_scores, -np.inf, score)
        same = cands.scores is cands.retrieval_scores
        out = replace(
            cands,
            rows=grown(cands.rows, -1, rows),
            retrieval_scores=retrieval,
            scores=retrieval if same else grown(cands.scores, -np.inf, score),
        )
        return out, grown(items, 0, follow)

    def _rows_of(self, index: ItemIndex, items: np.ndarray) -> np.ndarray:
        """Live index row of each model item index (-1: none, removed, or 0). An item keeps
        its row for the index's life, so each is looked up once; liveness is read per call."""
        if len(self._item_row) != len(self._ids):
            self._item_row = np.full(len(self._ids), -2, dtype=np.int64)  # -2: not looked up
        found = self._item_row[items]
        missing = np.unique(items[(found == -2) & (items > 0)])
        if len(missing):
            self._item_row[missing] = index.rows_of(self._ids[missing].tolist(), live_only=False)
            found = self._item_row[items]
        live = index.live_mask()
        ok = (found >= 0) & (items > 0)
        ok[ok] &= found[ok] < len(live)
        ok[ok] &= live[found[ok]]
        return np.where(ok, found, -1)

    def __call__(self, cands: Candidates, user_vectors: np.ndarray | None = None) -> Candidates:
        """Add followers (with ``user_vectors (B, D)`` and an index), boost the candidates,
        then count each request's newest step after the steps before it (one read of the
        histories serves all three)."""
        table, affinity = self.table, self.affinity
        if table is None and affinity is None:
            return cands
        depth = affinity.config.depth if affinity is not None else 0
        if table is not None:
            table.flush()
            depth = max(depth, table.config.lookback, table.config.window + 1)
        newest = self.newest(cands.requests, depth)
        items = self._items_of(cands.rows, cands.row_ids)
        boost = None
        if table is not None:
            cfg = table.config
            gains = table.user_gains(newest[:, : cfg.lookback])
            if self.add and self.index is not None and user_vectors is not None:
                cands, items = self._expand(table, self.index, cands, gains, items, user_vectors)
            boost = table.boost(newest[:, : cfg.lookback], items, gains)
            weighted = np.float32(self.weight) * boost
            for row in newest[:, : cfg.window + 1].tolist():
                table.observe(row[:0:-1], row[0])
        else:
            weighted = np.zeros(items.shape, dtype=np.float32)
        if affinity is not None:
            near = affinity.boost(newest[:, : affinity.config.depth], items)
            weighted += np.float32(affinity.weight) * near
        valid = cands.valid
        retrieval = np.where(valid, cands.retrieval_scores + weighted, -np.inf).astype(np.float32)
        scores = (
            retrieval
            if cands.scores is cands.retrieval_scores
            else np.where(valid, cands.scores + weighted, -np.inf).astype(np.float32)
        )
        return replace(
            cands,
            retrieval_scores=retrieval,
            scores=scores,
            covisit=np.where(valid, boost, 0.0).astype(np.float32) if boost is not None else None,
        )


def _check_ordering(ordering: str) -> None:
    if ordering not in ORDERINGS:
        raise ValueError(f"pipeline: expected ordering in {list(ORDERINGS)}, got {ordering!r}")


class OrderStage:
    name: ClassVar[str] = "order"

    def __init__(
        self,
        index: ItemIndex,
        rows: CatalogRows | None,
        *,
        slate_size: int,
        diversity: float,
        category_weight: float = 0.5,
        pool: int = 50,
        ordering: str = "expected",
        temperature: float = 1.0,
    ) -> None:
        """pool: the ordering considers only the ``pool`` best-scored candidates (>= slate_size).
        ordering: ``"expected"`` (expected NDCG + ILD, ``serving.ordering.expected``),
        ``"dcg"`` (expected-gain MMR, ``serving.ordering.xmmr``) or ``"mmr"``;
        temperature: the calibrated temperature of the scores it orders (not read by ``"mmr"``).
        ``"expected"`` reads each user's probabilities over all its candidates, not the pool."""
        _check_ordering(ordering)
        self.pool, self.ordering, self.temperature = pool, ordering, temperature
        self.index, self.catalog_rows = index, rows
        self.slate_size, self.diversity, self.category_weight = (
            slate_size,
            diversity,
            category_weight,
        )

    def __call__(self, cands: Candidates) -> Ordered:
        if self.diversity == 0.0:
            # Pure relevance: a stable sort gives the same answer as MMR without the vectors.
            order = np.argsort(-cands.scores, axis=1, kind="stable")[:, : self.slate_size]
            pos = np.where(np.take_along_axis(cands.valid, order, axis=1), order, -1)
            return Ordered(cands, pos.astype(np.int64))
        # MMR only ever picks among the best few: run it on the top ``pool`` by score (its
        # cost grows with candidates x slate size), then map picks back to candidate positions.
        pool = min(cands.scores.shape[1], max(self.pool, self.slate_size))
        top = np.argsort(-cands.scores, axis=1, kind="stable")[:, :pool]
        rows = np.take_along_axis(cands.rows, top, axis=1)
        rel = np.take_along_axis(cands.scores, top, axis=1)
        vectors = self.index.vectors_of_rows(rows)
        cats = self.catalog_rows.categories_of(rows) if self.catalog_rows is not None else None
        log_z = (
            log_partition_of(np.where(cands.valid, cands.scores, -np.inf), self.temperature)
            if self.ordering == "expected"
            else None
        )
        picks = diversify(
            self.ordering,
            rel,
            vectors,
            self.slate_size,
            self.diversity,
            categories=cats,
            category_weight=self.category_weight,
            temperature=self.temperature,
            log_partition=log_z,
        )
        positions = np.where(picks >= 0, np.take_along_axis(top, np.maximum(picks, 0), 1), -1)
        return Ordered(cands, positions.astype(np.int64))


class FreshItems:
    """Items the encoder never saw (embedded from their text), offered reserved slots.

    Inside the full catalogue a text-projected vector rarely reaches a user's top 10 (ridge
    projections shrink towards the mean), yet among new items it ranks them well; so new
    items get ``fresh_slots`` places of their own in every slate, filled by user-vector score.
    Written by the catalog thread, read by the model thread: snapshots are copied under a lock.
    """

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self._lock = threading.Lock()
        self._vectors: dict[str, np.ndarray] = {}
        self._snapshot: tuple[list[str], np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self._vectors)

    def put(self, item_id: str, vector: np.ndarray) -> None:
        vec = np.asarray(vector, dtype=np.float32).reshape(-1)
        if vec.shape != (self.dim,):
            raise ValueError(f"fresh items: expected a ({self.dim},) vector, got {vec.shape}")
        with self._lock:
            self._vectors[item_id] = vec
            self._snapshot = None

    def remove(self, item_id: str) -> None:
        with self._lock:
            if self._vectors.pop(item_id, None) is not None:
                self._snapshot = None

    def snapshot(self) -> tuple[list[str], np.ndarray]:
        """(ids, (F, D) float32 vectors) at this moment."""
        with self._lock:
            if self._snapshot is None:
                ids = list(self._vectors)
                vecs = (
                    np.stack([self._vectors[i] for i in ids])
                    if ids
                    else np.zeros((0, self.dim), np.float32)
                )
                self._snapshot = (ids, vecs)
            return self._snapshot


@dataclass(frozen=True, slots=True)
class _FreshChoices:
    ids: list[str]  # new item ids (a FreshItems snapshot)
    best: list[list[int]]  # (B, top) positions into ids, best first
    scores: list[list[float]]  # (B, top) user . item, aligned with best


class PipelineSettings(Protocol):
    """The settings fields the pipeline reads (``streamrec.settings.Settings`` has them)."""

    @property
    def candidates(self) -> int: ...
    @property
    def slate_size(self) -> int: ...
    @property
    def diversity(self) -> float | None: ...
    @property
    def filter_seen(self) -> bool: ...
    @property
    def ordering(self) -> str: ...
    @property
    def rerank_candidates(self) -> int | None: ...
    @property
    def covisit_weight(self) -> float | None: ...
    @property
    def covisit_candidates(self) -> int: ...
    @property
    def affinity_weight(self) -> float | None: ...


#: Diversity weight per ordering for a scorer that has none chosen on validation
#: (``serving.calibration``). The orderings' weights are on different scales: "expected" reads
#: probabilities (Beauty and ML-100K choose 0.008-0.01), "dcg" ratios to the best candidate.
DEFAULT_DIVERSITY: dict[str, float] = {"expected": 0.005, "dcg": 0.15, "mmr": 0.15}


def _stored_ordering(scorer: object) -> str | None:
    """The ordering the scorer's stored diversity weight was chosen for, if any."""
    entry = getattr(scorer, "slate", None)
    if entry is None:
        config = getattr(scorer, "config", None)
        entry = config.get("slate") if isinstance(config, dict) else None
    return entry.get("ordering") if isinstance(entry, dict) else None


def resolve_slate(setting: float | None, ordering: str, scorer: object) -> tuple[str, float, str]:
    """The slate's ordering, its diversity weight and where the weight came from: ``setting``
    when given, else the weight chosen on validation for ``ordering`` and stored with
    ``scorer`` (its ``slate_weight(ordering)``), else the ordering's
    :data:`DEFAULT_DIVERSITY`. "expected" reads absolute probabilities, whose scale means
    nothing without a weight chosen on the model's calibrated scores, so without one the slate
    is ordered by "dcg" at its default instead."""
    _check_ordering(ordering)
    if setting is not None:
        return ordering, setting, "settings"
    stored = getattr(scorer, "slate_weight", None)
    weight = stored(ordering) if callable(stored) else None
    if weight is not None:
        version = getattr(scorer, "version", "the model")
        return ordering, float(weight), f"chosen on validation for {version}"
    hint = f"`streamrec calibrate` chooses one for {ordering!r}"
    if ordering == "expected":
        why = f"no weight chosen on validation for ordering {ordering!r}, so dcg at its default"
        return "dcg", DEFAULT_DIVERSITY["dcg"], f"{why}; {hint}"
    other = _stored_ordering(scorer)
    if other is not None and other != ordering:
        why = f"default; the model's weight was chosen for ordering {other!r}"
        return ordering, DEFAULT_DIVERSITY[ordering], f"{why}: {hint}"
    return ordering, DEFAULT_DIVERSITY[ordering], "default"


class Pipeline:
    """encode -> retrieve -> covisit -> filter -> rerank -> order over a batch of requests."""

    STAGES: ClassVar[tuple[str, ...]] = (
        "encode",
        "retrieve",
        "covisit",
        "filter",
        "rerank",
        "order",
    )

    def __init__(
        self,
        encoder: UserEncoder,
        index: ItemIndex,
        catalog: Catalog | None = None,
        *,
        candidates: int = 200,
        slate_size: int = 10,
        diversity: float | None = None,
        filter_seen: bool = False,
        exclude_trigger: bool = True,
        category_weight: float = 0.5,
        reranker: Reranker | None = None,
        fallback_vector: np.ndarray | None = None,
        on_stage: StageCallback | None = None,
        mmr_pool: int = 50,
        ordering: str = "expected",
        fresh: FreshItems | None = None,
        fresh_slots: int = 1,
        rerank_top: int | None = None,
        diversity_source: str = "argument",
        covisit_weight: float | None = None,
        covisit_candidates: int = 10,
        affinity_weight: float | None = None,
    ) -> None:
        """``diversity``: the order stage's weight; None: the ordering's
        :data:`DEFAULT_DIVERSITY`.
        ``rerank_top``: candidates per user the reranker scores (``RerankStage``); None:
        as many as the reranker was trained on (its ``trained_candidates``), else all.
        ``diversity_source``: where ``diversity`` came from, for the start-up log.
        ``covisit_weight``: weight of the encoder's co-visitation table (its ``covisit``);
        None: the weight stored with it, or off with a reranker trained without the table
        (``RerankerConfig.covisit``); 0: off. ``covisit_candidates``: each user's strongest
        followers in the table added to the retrieved candidates when retrieval missed them.
        ``affinity_weight``: weight of the encoder's attribute affinity (its ``affinity``);
        None: the weight stored with it; 0: off; never applied under a reranker."""
        if encoder.dim != index.dim:
            raise ValueError(
                f"pipeline: expected encoder dim == index dim, got {encoder.dim} and {index.dim}"
            )
        _check_ordering(ordering)
        if diversity is None:
            diversity = DEFAULT_DIVERSITY[ordering]
        if not (1 <= slate_size <= candidates) or not 0.0 <= diversity <= 1.0:
            raise ValueError(
                "pipeline: expected 1 <= slate_size <= candidates and diversity in [0, 1], got "
                f"slate_size={slate_size}, candidates={candidates}, diversity={diversity}"
            )
        if fallback_vector is None:
            _, vecs = index.live_vectors()
            fallback_vector = vecs.mean(axis=0) if len(vecs) else np.zeros(index.dim, np.float32)
        fallback_vector = np.asarray(fallback_vector, dtype=np.float32)
        if fallback_vector.shape != (index.dim,):
            raise ValueError(
                f"pipeline: expected fallback vector ({index.dim},), got {fallback_vector.shape}"
            )
        self.encoder, self.index, self.catalog = encoder, index, catalog
        self.on_stage = on_stage
        self.diversity_source = diversity_source
        self.fresh, self.fresh_slots = fresh, max(0, min(fresh_slots, slate_size))
        rows = CatalogRows(catalog, index) if catalog is not None else None
        self.encode = EncodeStage(encoder, index, fallback_vector)
        self.retrieve = RetrieveStage(index, candidates)
        self.filter = FilterStage(
            index, rows, filter_seen=filter_seen, exclude_trigger=exclude_trigger
        )
        if rerank_top is None:
            rerank_top = getattr(reranker, "trained_candidates", None)
        self.rerank = RerankStage(reranker or RetrievalScoreReranker(), rerank_top)
        table = served_table(getattr(encoder, "covisit", None), reranker, covisit_weight)
        vocab = getattr(encoder, "vocab", None)
        affinity = served_affinity(getattr(encoder, "affinity", None), reranker, affinity_weight)
        self.covisit = CoVisitStage(
            table, getattr(vocab, "index", None), index, covisit_candidates, affinity
        )
        self.order = OrderStage(
            index,
            rows,
            slate_size=slate_size,
            diversity=diversity,
            category_weight=category_weight,
            pool=mmr_pool,
            ordering=ordering,
            # The order stage sees the reranker's scores, or the retriever's without one.
            temperature=float(getattr(reranker or encoder, "temperature", 1.0)),
        )

    @classmethod
    def from_encoder(
        cls,
        encoder: UserEncoder,
        catalog: Catalog | None = None,
        *,
        approx_threshold: int = 100_000,
        **params: Any,
    ) -> Pipeline:
        """Build the index from ``encoder.item_vectors()`` / ``item_ids()`` (IVF built inline
        when the catalogue is already above ``approx_threshold``), then the pipeline.
        ``params`` are the keyword arguments of ``Pipeline.__init__``."""
        index = ItemIndex(encoder.dim, approx_threshold=approx_threshold, background=False)
        ids = list(encoder.item_ids())
        vecs = np.asarray(encoder.item_vectors(), dtype=np.float32)
        if vecs.shape != (len(ids), encoder.dim):
            raise ValueError(
                f"pipeline: expected item_vectors ({len(ids)}, {encoder.dim}) from encoder "
                f"{encoder.version}, got {vecs.shape}"
            )
        index.upsert(ids, vecs)
        index.background = True
        return cls(encoder, index, catalog, **params)

    @classmethod
    def from_settings(
        cls,
        encoder: UserEncoder,
        catalog: Catalog | None,
        settings: PipelineSettings,
        **params: Any,
    ) -> Pipeline:
        """``from_encoder`` with candidates, slate_size, diversity, filter_seen and ordering
        from settings. Unset ``diversity`` is the weight stored with the scorer whose scores
        the order stage sees (:func:`resolve_slate`, which may change the ordering)."""
        ordering, diversity, source = resolve_slate(
            settings.diversity, settings.ordering, params.get("reranker") or encoder
        )
        return cls.from_encoder(
            encoder,
            catalog,
            candidates=settings.candidates,
            slate_size=settings.slate_size,
            diversity=diversity,
            filter_seen=settings.filter_seen,
            ordering=ordering,
            rerank_top=settings.rerank_candidates,
            covisit_weight=settings.covisit_weight,
            covisit_candidates=settings.covisit_candidates,
            affinity_weight=settings.affinity_weight,
            diversity_source=source,
            **params,
        )

    def _timed(self, name: str, t0: float) -> float:
        t1 = time.perf_counter()
        if self.on_stage is not None:
            self.on_stage(name, t1 - t0)
        return t1

    def recommend(self, requests: Sequence[SlateRequest]) -> list[Slate]:
        """One slate per request, in request order."""
        reqs = tuple(requests)
        if not reqs:
            return []
        t = time.perf_counter()
        encoded = self.encode(reqs)
        t = self._timed(self.encode.name, t)
        cands = self.retrieve(encoded)
        t = self._timed(self.retrieve.name, t)
        cands = self.covisit(cands, encoded.user_vectors)
        t = self._timed(self.covisit.name, t)
        cands = self.filter(cands)
        t = self._timed(self.filter.name, t)
        cands = self.rerank(cands)
        t = self._timed(self.rerank.name, t)
        ordered = self.order(cands)
        slates = self._slates(ordered, self._fresh_choices(encoded))
        self._timed(self.order.name, t)
        return slates

    def _fresh_choices(self, encoded: Encoded) -> _FreshChoices | None:
        """Each user's best-scoring new items, best first, with room for excluded ones."""
        if self.fresh is None or not self.fresh_slots or not len(self.fresh):
            return None
        ids, vecs = self.fresh.snapshot()
        if not ids:
            return None
        scores = encoded.user_vectors @ vecs.T  # (B, F)
        top = min(len(ids), self.fresh_slots + 32)
        best = np.argsort(-scores, axis=1)[:, :top]
        return _FreshChoices(ids, best.tolist(), np.take_along_axis(scores, best, 1).tolist())

    def _slates(self, ordered: Ordered, fresh: _FreshChoices | None) -> list[Slate]:
        c = ordered.candidates
        pos = ordered.positions
        ok = pos >= 0
        safe = np.maximum(pos, 0)
        rows = np.take_along_axis(c.rows, safe, axis=1)
        # Whole-matrix tolist() once: per-row numpy slicing and conversion cost more than
        # the slates themselves at 256 users.
        scores = np.take_along_axis(c.scores, safe, axis=1).tolist()
        ids = c.row_ids[np.where(ok, rows, 0)].tolist() if len(c.row_ids) else None
        counts = ok.sum(axis=1).tolist()  # picks are packed left, so the first n are real
        model_version = self.encoder.version
        out = []
        for b, req in enumerate(c.requests):
            n = counts[b]
            item_ids = ids[b][:n] if ids is not None else []
            item_scores = scores[b][:n]
            if fresh is not None:
                item_ids, item_scores = self._reserve_fresh(req, item_ids, item_scores, fresh, b)
            out.append(Slate(req.user_id, item_ids, item_scores, model_version, c.index_version))
        return out

    def _reserve_fresh(
        self,
        request: SlateRequest,
        item_ids: list[str],
        scores: list[float],
        fresh: _FreshChoices,
        b: int,
    ) -> tuple[list[str], list[float]]:
        """Put the user's best new items (not in the slate, not excluded) into the last
        ``fresh_slots`` places."""
        picks: list[int] = []
        excluded: list[str] | None = None
        for n, j in enumerate(fresh.best[b]):
            item = fresh.ids[j]
            if item in item_ids:
                continue
            if excluded is None:  # the history scan, once per user and only if needed
                excluded = self.filter.excluded_items(request)
            if item in excluded:
                continue
            picks.append(n)
            if len(picks) == self.fresh_slots:
                break
        if not picks:
            return item_ids, scores
        keep = max(0, min(len(item_ids), self.order.slate_size - len(picks)))
        return (
            [*item_ids[:keep], *(fresh.ids[fresh.best[b][n]] for n in picks)],
            [*scores[:keep], *(fresh.scores[b][n] for n in picks)],
        )
