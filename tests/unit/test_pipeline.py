"""Pipeline end to end with a tiny fake encoder, plus the catalog it filters with."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest

from serving.catalog import Catalog, CatalogRows, ItemMeta
from serving.index import ItemIndex
from serving.ordering import expected, log_partition_of
from serving.pipeline import (
    DEFAULT_DIVERSITY,
    Candidates,
    Ordered,
    Pipeline,
    RetrievalScoreReranker,
    SlateRequest,
    popularity_vector,
)
from serving.types import Step

D = 16
CLUSTERS = 8
PER_CLUSTER = 50


class MeanEncoder:
    """User vector = mean of the vectors of the known items in the history."""

    version = "fake-1"
    dim = D

    def __init__(self, ids: list[str], vectors: np.ndarray) -> None:
        self.ids, self.vectors = ids, vectors
        self.table = dict(zip(ids, vectors, strict=True))
        self.calls: list[int] = []

    def item_ids(self) -> Sequence[str]:
        return self.ids

    def item_vectors(self) -> np.ndarray:
        return self.vectors

    def encode(self, histories: Sequence[Sequence[Step]]) -> np.ndarray:
        self.calls.append(len(histories))
        out = np.zeros((len(histories), D), np.float32)
        for b, h in enumerate(histories):
            known = [self.table[s.item] for s in h if s.item in self.table]
            if known:
                out[b] = np.mean(known, axis=0)
        return out


def cluster_of(item: str) -> int:
    return int(item.split("-")[0][1:])


def make_items(clusters: range, seed: int = 0) -> tuple[list[str], np.ndarray]:
    rng = np.random.default_rng(seed)
    centers = np.eye(D, dtype=np.float32) * 5
    ids, vecs = [], []
    for c in clusters:
        for j in range(PER_CLUSTER):
            ids.append(f"c{c}-{j}")
            vecs.append(centers[c] + 0.3 * rng.standard_normal(D))
    return ids, np.asarray(vecs, dtype=np.float32)


def steps(items: Sequence[str], kind: str = "view") -> list[Step]:
    return [Step(i, kind, 1_700_000_000_000 + n) for n, i in enumerate(items)]


@pytest.fixture
def world() -> tuple[MeanEncoder, Catalog]:
    ids, vecs = make_items(range(CLUSTERS))
    catalog = Catalog()
    for item in ids:
        catalog.upsert(item, ItemMeta(categories=(f"cat{cluster_of(item)}",), price=1.0))
    return MeanEncoder(ids, vecs), catalog


def test_end_to_end_rules(world: tuple[MeanEncoder, Catalog]) -> None:
    encoder, catalog = world
    seen: list[tuple[str, float]] = []
    pipe = Pipeline.from_encoder(
        encoder,
        catalog,
        slate_size=10,
        candidates=60,
        diversity=0.3,
        on_stage=lambda name, s: seen.append((name, s)),
    )
    catalog.upsert("c1-3", ItemMeta(available=False))
    catalog.delete("c1-4")
    bought = [f"c1-{j}" for j in range(5, 15)]
    history = steps([f"c1-{j}" for j in range(20, 25)]) + steps(bought, "purchase")
    history += steps(["c1-30"])  # the trigger
    requests = [SlateRequest(f"u{j}", history) for j in range(5)]
    slates = pipe.recommend(requests)
    assert [s.user_id for s in slates] == [f"u{j}" for j in range(5)]
    assert [name for name, _ in seen] == list(Pipeline.STAGES)
    assert all(sec >= 0 for _, sec in seen)
    for slate in slates:
        assert len(slate.item_ids) == 10
        assert len(slate.scores) == 10
        banned = {"c1-3", "c1-4", "c1-30", *bought}
        assert not banned & set(slate.item_ids)
        assert slate.model_version == "fake-1"
        assert slate.index_version == pipe.index.version
        # Recently viewed (not bought) items stay allowed by default.
        assert cluster_of(slate.item_ids[0]) == 1
    assert encoder.calls == [5]


def test_filter_seen_and_small_candidate_sets(world: tuple[MeanEncoder, Catalog]) -> None:
    encoder, catalog = world
    pipe = Pipeline.from_encoder(encoder, catalog, slate_size=5, candidates=5, filter_seen=True)
    viewed = [f"c2-{j}" for j in range(3)]
    slate = pipe.recommend([SlateRequest("u", steps(viewed))])[0]
    assert not set(viewed) & set(slate.item_ids)
    assert len(slate.item_ids) <= 5  # 5 candidates, some filtered: a shorter slate, no padding
    assert pipe.recommend([]) == []


def test_new_cluster_appears_for_user_who_views_it(world: tuple[MeanEncoder, Catalog]) -> None:
    encoder, catalog = world
    # Min-max MMR: the mean-vector encoder's scores are cosines in [-1, 1], not the logits the
    # "dcg" ordering reads as probabilities (at that scale every candidate looks alike to it).
    pipe = Pipeline.from_encoder(encoder, catalog, slate_size=10, diversity=0.2, ordering="mmr")
    new_ids, new_vecs = make_items(range(CLUSTERS, CLUSTERS + 1), seed=9)
    pipe.index.upsert(new_ids, new_vecs)  # e.g. cold-start items from the items topic
    encoder.table.update(zip(new_ids, new_vecs, strict=True))
    viewed = new_ids[:3]
    slate = pipe.recommend([SlateRequest("u", steps(["c0-1", *viewed]))])[0]
    assert {cluster_of(i) for i in slate.item_ids} == {CLUSTERS}


def test_cold_user_gets_fallback_without_encoder_call(world: tuple[MeanEncoder, Catalog]) -> None:
    encoder, _ = world
    ids, vecs = encoder.ids, encoder.vectors
    counts = np.array([100.0 if cluster_of(i) == 5 else 0.0 for i in ids])
    pipe = Pipeline.from_encoder(encoder, None, fallback_vector=popularity_vector(vecs, counts))
    slates = pipe.recommend([SlateRequest("new", []), SlateRequest("odd", steps(["unknown"]))])
    assert encoder.calls == []
    for s in slates:
        assert len(s.item_ids) == 10
        assert {cluster_of(i) for i in s.item_ids} == {5}
    default = Pipeline.from_encoder(encoder).recommend([SlateRequest("new", [])])[0]
    assert len(default.item_ids) == 10


def test_diversity_reaches_more_categories(world: tuple[MeanEncoder, Catalog]) -> None:
    encoder, catalog = world
    history = steps(["c3-1", "c3-2", "c4-1"])
    cats = []
    for div in (0.0, 0.9):
        pipe = Pipeline.from_encoder(encoder, catalog, slate_size=10, diversity=div, mmr_pool=200)
        slate = pipe.recommend([SlateRequest("u", history)])[0]
        cats.append({cluster_of(i) for i in slate.item_ids})
    assert len(cats[1]) > len(cats[0])


def test_mmr_pool_limits_reordering_to_the_best_candidates(
    world: tuple[MeanEncoder, Catalog],
) -> None:
    encoder, catalog = world
    history = steps(["c3-1", "c3-2", "c4-1"])
    pure = Pipeline.from_encoder(encoder, catalog, slate_size=10, diversity=0.0, mmr_pool=12)
    pooled = Pipeline.from_encoder(encoder, catalog, slate_size=10, diversity=0.9, mmr_pool=12)
    best12 = Pipeline.from_encoder(encoder, catalog, slate_size=12, diversity=0.0)
    req = [SlateRequest("u", history)]
    allowed = set(best12.recommend(req)[0].item_ids)
    slate = pooled.recommend(req)[0].item_ids
    assert len(slate) == 10
    assert set(slate) <= allowed
    assert slate[0] == pure.recommend(req)[0].item_ids[0]


class Reversed:
    def score(self, requests: Sequence[SlateRequest], candidates: Candidates) -> np.ndarray:
        return -candidates.retrieval_scores


def test_custom_reranker_drives_the_order(world: tuple[MeanEncoder, Catalog]) -> None:
    encoder, catalog = world
    base = Pipeline.from_encoder(encoder, catalog, diversity=0.0, candidates=20, slate_size=20)
    rev = Pipeline.from_encoder(
        encoder, catalog, diversity=0.0, candidates=20, slate_size=20, reranker=Reversed()
    )
    req = [SlateRequest("u", steps(["c6-1"]))]
    a, b = base.recommend(req)[0], rev.recommend(req)[0]
    assert a.item_ids == b.item_ids[::-1]
    assert isinstance(base.rerank.reranker, RetrievalScoreReranker)


class Recording(Reversed):
    """Reverses the retrieval order and records how many candidates it was asked about."""

    trained_candidates = 8

    def __init__(self) -> None:
        self.widths: list[int] = []

    def score(self, requests: Sequence[SlateRequest], candidates: Candidates) -> np.ndarray:
        self.widths.append(candidates.rows.shape[1])
        return super().score(requests, candidates)


def test_reranker_scores_only_the_best_retrieved(world: tuple[MeanEncoder, Catalog]) -> None:
    encoder, catalog = world
    req = [SlateRequest("u", steps(["c6-1"])), SlateRequest("v", steps(["c2-3", "c2-4"]))]
    base = Pipeline.from_encoder(encoder, catalog, diversity=0.0, candidates=20, slate_size=20)
    retrieved = [s.item_ids for s in base.recommend(req)]
    rec = Recording()
    # Default: as many as the reranker was trained on (8 of the 20 retrieved).
    pipe = Pipeline.from_encoder(
        encoder, catalog, diversity=0.0, candidates=20, slate_size=20, reranker=rec
    )
    assert pipe.rerank.top == 8
    got = [s.item_ids for s in pipe.recommend(req)]
    assert rec.widths == [8]
    for slate, order in zip(got, retrieved, strict=True):
        assert slate[:8] == order[:8][::-1]  # reranked (reversed) on top...
        assert slate[8:] == order[8:]  # ... the rest below, in retrieval order
    # An explicit width wins; one at least C reranks everything.
    wide = Pipeline.from_encoder(
        encoder, catalog, diversity=0.0, candidates=20, slate_size=20, reranker=rec, rerank_top=50
    )
    assert [s.item_ids for s in wide.recommend(req)] == [r[::-1] for r in retrieved]
    assert rec.widths[-1] == 20
    with pytest.raises(ValueError, match="top >= 1"):
        Pipeline.from_encoder(encoder, reranker=rec, rerank_top=0)


class BadShape:
    def score(self, requests: Sequence[SlateRequest], candidates: Candidates) -> np.ndarray:
        return np.zeros((1, 1))


class NaNScores:
    def score(self, requests: Sequence[SlateRequest], candidates: Candidates) -> np.ndarray:
        return np.full(candidates.rows.shape, np.nan)


class WrongDim(MeanEncoder):
    def encode(self, histories: Sequence[Sequence[Step]]) -> np.ndarray:
        return np.zeros((len(histories), D + 1), np.float32)


def test_errors_name_the_stage(world: tuple[MeanEncoder, Catalog]) -> None:
    encoder, _ = world
    req = [SlateRequest("u", steps(["c0-1"]))] * 2
    with pytest.raises(ValueError, match=r"rerank: expected scores \(2, 200\) from BadShape"):
        Pipeline.from_encoder(encoder, reranker=BadShape()).recommend(req)
    with pytest.raises(ValueError, match="rerank: NaNScores returned NaN"):
        Pipeline.from_encoder(encoder, reranker=NaNScores()).recommend(req)
    wrong = WrongDim(encoder.ids, encoder.vectors)
    with pytest.raises(ValueError, match=r"encode: expected user vectors \(2, 16\)"):
        Pipeline.from_encoder(wrong).recommend(req)
    with pytest.raises(ValueError, match="slate_size <= candidates"):
        Pipeline.from_encoder(encoder, slate_size=50, candidates=10)
    with pytest.raises(ValueError, match=r"fallback vector \(16,\)"):
        Pipeline.from_encoder(encoder, fallback_vector=np.zeros(3))
    with pytest.raises(ValueError, match="encoder dim == index dim"):
        Pipeline(encoder, ItemIndex(D + 1))
    short = MeanEncoder(encoder.ids, encoder.vectors)
    short.ids = short.ids[:-1]
    with pytest.raises(ValueError, match=r"expected item_vectors \(399, 16\)"):
        Pipeline.from_encoder(short)
    with pytest.raises(ValueError, match="non-negative counts"):
        popularity_vector(encoder.vectors, np.zeros(3))


class FakeSettings:
    candidates = 30
    slate_size = 4
    diversity = 0.0
    filter_seen = False
    ordering = "mmr"
    rerank_candidates: int | None = None
    covisit_weight: float | None = None
    covisit_candidates = 10
    affinity_weight: float | None = None


def test_from_settings(world: tuple[MeanEncoder, Catalog]) -> None:
    encoder, catalog = world
    pipe = Pipeline.from_settings(encoder, catalog, FakeSettings())
    assert pipe.retrieve.candidates == 30
    assert pipe.order.ordering == "mmr"
    assert pipe.rerank.top is None  # the pass-through stage scores every candidate
    assert len(pipe.recommend([SlateRequest("u", steps(["c0-1"]))])[0].item_ids) == 4


def test_catalog_and_row_view() -> None:
    index = ItemIndex(2)
    index.upsert(["a", "b", "c"], np.eye(3, 2, dtype=np.float32))
    cat = Catalog(max_categories=2, max_log=4)
    rows = CatalogRows(cat, index).refresh()
    assert not rows.blocked.any()
    cat.upsert("a", ItemMeta(available=False, categories=("x", "y", "z", "x")))
    cat.upsert("b", ItemMeta(categories=("y", "y")))
    assert cat.get("b") == ItemMeta(categories=("y", "y"))
    assert "a" in cat
    assert len(cat) == 2
    assert cat.category_id("y") == 1
    assert cat.category_id("z") == -1  # beyond max_categories
    assert cat.category_ids(["a", "b", "q"]).tolist() == [[0, 1], [1, -1], [-1, -1]]
    assert cat.is_available(["a", "b", "q"]).tolist() == [False, True, True]
    rows.refresh()
    assert rows.blocked.tolist() == [True, False, False]
    assert cat.delete("b")
    assert not cat.delete("q")
    index.upsert(["d"], np.ones((1, 2), np.float32))
    cat.upsert("d", ItemMeta(available=False))
    assert cat.changes_since(0) is None  # the log was truncated
    rows.refresh()
    assert rows.blocked.tolist() == [True, True, False, True]
    assert rows.blocked_of(np.array([[0, -1, 9]])).tolist() == [[True, False, False]]
    assert rows.categories_of(np.array([0, -1])).tolist() == [[0, 1], [-1, -1]]
    cat.upsert("b", ItemMeta())  # an upsert revives a retired item
    assert rows.refresh().blocked.tolist() == [True, False, False, True]
    empty = CatalogRows(Catalog(), ItemIndex(2))
    assert empty.categories_of(np.array([1])).tolist() == [[-1] * 4]
    assert empty.blocked_of(np.array([1])).tolist() == [False]


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: Catalog(max_categories=0), "max_categories >= 1"),
        (lambda: Catalog().upsert("", ItemMeta()), "non-empty string item id"),
        (lambda: Catalog().upsert("a", ItemMeta(price=-1.0)), "price >= 0"),
    ],
)
def test_catalog_rejects_bad_input(call: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()  # type: ignore[operator]


def test_expected_ordering_reads_probabilities_over_every_candidate(
    world: tuple[MeanEncoder, Catalog],
) -> None:
    """The order stage orders the best ``mmr_pool`` candidates, but "expected" normalises each
    user's probabilities over all of them (``serving.ordering.log_partition_of``)."""
    encoder, catalog = world
    temp, weight, pool = 10.0, 0.03, 20
    pipe = Pipeline.from_encoder(
        encoder, catalog, slate_size=10, mmr_pool=pool, diversity=weight, ordering="expected"
    )
    pipe.order.temperature = temp  # the dot products (up to ~22) as logits
    seen: list[Candidates] = []
    stage = pipe.order

    class Spy:
        name, slate_size = stage.name, stage.slate_size

        def __call__(self, cands: Candidates) -> Ordered:
            seen.append(cands)
            return stage(cands)

    pipe.order = Spy()  # type: ignore[assignment]
    slate = pipe.recommend([SlateRequest("u", steps(["c3-1", "c3-2", "c4-1"]))])[0]
    cands = seen[0]
    top = np.argsort(-cands.scores, axis=1, kind="stable")[:, :pool]
    rows = np.take_along_axis(cands.rows, top, axis=1)
    rel = np.take_along_axis(cands.scores, top, axis=1)
    vecs = pipe.index.vectors_of_rows(rows)
    assert stage.catalog_rows is not None
    cats = stage.catalog_rows.categories_of(rows)
    log_z = log_partition_of(np.where(cands.valid, cands.scores, -np.inf), temp)
    picks = expected(rel, vecs, 10, weight, categories=cats, temperature=temp, log_partition=log_z)
    assert slate.item_ids == cands.row_ids[rows[0, picks[0]]].tolist()
    # Normalised over the pool alone, the same scores would read as a more confident user.
    pool_only = expected(rel, vecs, 10, weight, categories=cats, temperature=temp)
    assert picks.tolist() != pool_only.tolist()
    assert DEFAULT_DIVERSITY["expected"] < DEFAULT_DIVERSITY["dcg"]
    assert Pipeline.from_encoder(encoder).order.diversity == DEFAULT_DIVERSITY["expected"]
    with pytest.raises(ValueError, match="expected ordering in"):
        Pipeline.from_encoder(encoder, ordering="bogus")


def test_expected_without_a_chosen_weight_falls_back_to_dcg(
    world: tuple[MeanEncoder, Catalog],
) -> None:
    """ "expected" weights only mean something on calibrated scores: a model with none chosen
    is served with dcg at its default, and the start-up source says why."""
    encoder, catalog = world

    class Unset(FakeSettings):
        ordering = "expected"
        diversity = None

    pipe = Pipeline.from_settings(encoder, catalog, Unset())
    assert (pipe.order.ordering, pipe.order.diversity) == ("dcg", DEFAULT_DIVERSITY["dcg"])
    assert pipe.diversity_source.startswith("no weight chosen on validation for ordering")

    class Given(Unset):
        diversity = 0.01

    given = Pipeline.from_settings(encoder, catalog, Given())
    assert (given.order.ordering, given.order.diversity) == ("expected", 0.01)
