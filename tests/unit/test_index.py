"""ItemIndex: parity with the brute-force reference, mutation semantics, background rebuilds."""

from __future__ import annotations

import threading

import faiss
import numpy as np
import pytest

from serving.index import ItemIndex, exact_topk

D = 64


def clustered(n: int, d: int = D, clusters: int = 50, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((clusters, d)).astype(np.float32)
    x = centers[rng.integers(0, clusters, n)] + 0.5 * rng.standard_normal((n, d))
    return x.astype(np.float32)


def ids(n: int, start: int = 0) -> list[str]:
    return [f"i{j}" for j in range(start, start + n)]


def recall(index: ItemIndex, queries: np.ndarray, k: int) -> float:
    """recall@k of index.search against exact_topk over the index's live rows."""
    live_rows, vectors = index.live_vectors()
    _, pos = exact_topk(queries, vectors, k)
    ref = live_rows[pos]
    res = index.search(queries, k)
    hits = [len(set(r.tolist()) & set(e.tolist())) for r, e in zip(res.rows, ref, strict=True)]
    return sum(hits) / ref.size


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    return clustered(20_000), clustered(100, seed=1)


def test_flat_recall_matches_reference(data: tuple[np.ndarray, np.ndarray]) -> None:
    x, q = data
    index = ItemIndex(D, approx_threshold=10**9)
    index.upsert(ids(len(x)), x)
    assert not index.approximate
    assert recall(index, q, 100) >= 0.99
    ref_scores, _ = exact_topk(q, x, 100)
    np.testing.assert_allclose(index.search(q, 100).scores, ref_scores, rtol=1e-4, atol=1e-3)


def test_ivf_recall_and_updates(data: tuple[np.ndarray, np.ndarray]) -> None:
    x, q = data
    index = ItemIndex(D, approx_threshold=5_000, background=False)
    index.upsert(ids(len(x)), x)
    assert index.approximate
    assert recall(index, q, 100) >= 0.95
    # Updates go into the IVF index in place: a moved item is found at its new place...
    index.upsert(["i7"], q[:1] * 10)
    assert index.search(q[:1], 1).item_ids() == [["i7"]]
    # ...and a removed one is gone at once.
    index.remove(["i7"])
    assert "i7" not in index.search(q[:1], 100).item_ids()[0]
    exact = index.search(q[:1], 5, exact=True)
    assert "i7" not in exact.item_ids()[0]


def test_upsert_remove_semantics() -> None:
    index = ItemIndex(4)
    assert len(index) == 0
    assert index.version == "0-0"
    empty = index.search(np.ones((2, 4), np.float32), 3)
    assert (empty.rows == -1).all()
    assert np.isneginf(empty.scores).all()
    eye = np.eye(4, dtype=np.float32)
    index.upsert(["a", "b", "c"], eye[:3])
    v1 = index.version
    assert len(index) == 3
    assert index.contains("a")
    assert not index.contains("z")
    np.testing.assert_array_equal(index.vector("b"), eye[1])
    res = index.search(eye[:1], 5)
    assert res.item_ids()[0][0] == "a"
    assert sorted(res.item_ids()[0]) == ["a", "b", "c"]  # b, c tie; k > n: padded with -1
    assert res.rows[0, 3:].tolist() == [-1, -1]
    # Replacing a vector keeps the row and the count, bumps the version.
    row_b = index.row("b")
    index.upsert(["b"], eye[:1] * 2)
    assert index.row("b") == row_b
    assert len(index) == 3
    assert index.version != v1
    assert index.search(eye[:1], 1).item_ids() == [["b"]]
    v2 = index.version
    assert index.remove(["b", "nope"]) == 1
    assert index.remove(["b"]) == 0
    assert index.version != v2
    assert not index.contains("b")
    assert index.row("b") == -1
    assert sorted(index.search(eye[:1], 3).item_ids()[0]) == ["a", "c"]
    assert index.rows_of(["a", "b", "zz"]).tolist() == [index.row("a"), -1, -1]
    assert index.rows_of(["b"], live_only=False).tolist() == [row_b]
    # Re-adding a removed item revives its row.
    index.upsert(["b"], eye[3:4])
    assert index.row("b") == row_b
    assert len(index) == 3
    assert index.live_mask().all()
    np.testing.assert_array_equal(index.vectors_of_rows(np.array([[row_b, -1]]))[0, 1], 0.0)


def test_batched_flat_search_matches_faiss_kernel() -> None:
    """Batches of queries take the numpy path, single queries faiss' kernel: same answers."""
    x = clustered(3000, d=8)
    q = clustered(40, d=8, seed=3)
    index = ItemIndex(8)
    index.upsert(ids(3000), x)
    index.remove(ids(100, start=50))
    index.upsert(["tie"], x[7:8])  # an exact tie with i7
    batched = index.search(q, 60)
    single = [index.search(q[j : j + 1], 60) for j in range(len(q))]
    # Same items; order may differ only between equal scores (faiss' heap puts the higher
    # row first, the batched path the lower one, as exact_topk does).
    assert [set(r) for r in batched.item_ids()] == [set(s.item_ids()[0]) for s in single]
    np.testing.assert_allclose(batched.scores, np.vstack([s.scores for s in single]), rtol=1e-5)
    assert not set(ids(100, start=50)) & {i for r in batched.item_ids() for i in r}
    first = index.search(np.repeat(x[7:8], 20, axis=0), 2).item_ids()[0]
    assert first == ["i7", "tie"]
    small = ItemIndex(8)
    small.upsert(ids(30), x[:30])
    small.remove(ids(5))
    res = small.search(q, 40)  # k > live items: -1 padding after the 25 live ones
    assert (res.rows[:, :25] >= 0).all()
    assert (res.rows[:, 25:] == -1).all()
    assert np.isneginf(res.scores[:, 25:]).all()


def test_old_search_results_keep_their_ids_after_growth() -> None:
    index = ItemIndex(2)
    index.upsert(["a"], np.ones((1, 2), np.float32))
    res = index.search(np.ones((1, 2), np.float32), 1)
    index.upsert(ids(5000), np.zeros((5000, 2), np.float32))
    assert res.item_ids() == [["a"]]


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda ix: ix.upsert(["a"], np.ones((1, 3), np.float32)), r"expected vectors of shape"),
        (lambda ix: ix.upsert(["a", "b"], np.ones((1, 4))), r"expected vectors of shape \(2, 4\)"),
        (lambda ix: ix.upsert(["a"], np.array([["x"] * 4])), "expected numeric vectors"),
        (lambda ix: ix.upsert(["a"], np.full((1, 4), np.nan)), "NaN or infinite"),
        (lambda ix: ix.upsert(["a", "a"], np.ones((2, 4))), "distinct item ids"),
        (lambda ix: ix.upsert([""], np.ones((1, 4))), "non-empty string"),
        (lambda ix: ix.search(np.ones((1, 4)), 0), "k >= 1"),
        (lambda ix: ix.search(np.ones(4), 1), r"expected queries of shape \(n, 4\)"),
    ],
)
def test_bad_input_is_rejected(call: object, message: str) -> None:
    index = ItemIndex(4)
    with pytest.raises(ValueError, match=message):
        call(index)  # type: ignore[operator]


def test_bad_construction_and_unknown_vector() -> None:
    with pytest.raises(ValueError, match="positive dimension"):
        ItemIndex(0)
    with pytest.raises(ValueError, match="rebuild_growth > 1"):
        ItemIndex(4, rebuild_growth=1.0)
    with pytest.raises(KeyError, match="no live item 'x'"):
        ItemIndex(4).vector("x")


def test_background_rebuild_swaps_atomically_and_replays_updates(
    data: tuple[np.ndarray, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    x, q = data
    x = x[:6000]
    index = ItemIndex(D, approx_threshold=5_000, background=True)
    release = threading.Event()
    started = threading.Event()
    train = ItemIndex._train_ivf

    def slow_train(self: ItemIndex, vectors: np.ndarray) -> object:
        started.set()
        assert release.wait(20)
        return train(self, vectors)

    monkeypatch.setattr(ItemIndex, "_train_ivf", slow_train)
    index.upsert(ids(len(x)), x)  # crosses the threshold: a build starts in the background
    assert started.wait(10)
    assert index.building
    assert not index.approximate
    # The flat index keeps serving and taking updates while the build runs.
    assert (index.search(q, 10).rows >= 0).all()
    target = q[0] * 20
    index.upsert(["new"], target[None])  # added during the build
    index.upsert(["i1"], -target[None])  # moved during the build
    index.remove(["i2"])  # removed during the build
    assert index.search(target[None], 1).item_ids() == [["new"]]
    release.set()
    index.wait_for_build(20)
    assert index.approximate
    assert index.search(target[None], 1).item_ids() == [["new"]]
    assert "i1" not in index.search(target[None], 100).item_ids()[0]
    assert index.search(-target[None], 1).item_ids() == [["i1"]]
    found = index.search(x[2:3], 100).item_ids()[0]
    assert "i2" not in found
    assert len(index) == 6000


def test_failed_build_keeps_flat_serving(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(self: ItemIndex, vectors: np.ndarray) -> object:
        raise MemoryError("no room")

    monkeypatch.setattr(ItemIndex, "_train_ivf", boom)
    index = ItemIndex(4, approx_threshold=3, background=True)
    index.upsert(ids(3), np.eye(4, dtype=np.float32)[:3])
    assert index._build_thread is not None
    index._build_thread.join(10)
    assert isinstance(index.build_error, MemoryError)
    with pytest.raises(RuntimeError, match="background IVF build failed: no room"):
        index.wait_for_build(10)
    assert not index.approximate
    assert index.search(np.eye(4, dtype=np.float32)[:1], 1).item_ids() == [["i0"]]


def test_ivf_dropped_when_catalogue_shrinks() -> None:
    x = clustered(3000, d=8)
    index = ItemIndex(8, approx_threshold=2000, background=False)
    index.upsert(ids(3000), x)
    assert index.approximate
    index.remove(ids(2500))
    assert not index.approximate
    assert len(index) == 500
    assert recall(index, x[:5], 20) >= 0.99


def test_device_mirror_path_matches_flat() -> None:
    """The GPU code path, run on CPU with a cloned index standing in for the device copy."""
    x = clustered(3000, d=8)
    q = clustered(20, d=8, seed=3)
    mirror = ItemIndex(8, use_gpu=True, _gpu_to_device=faiss.clone_index, gpu_refresh_rows=50)
    flat = ItemIndex(8, use_gpu=False)
    rng = np.random.default_rng(5)
    for ix in (mirror, flat):
        ix.upsert(ids(3000), x)
    mirror.search(q, 10)  # makes the device copy
    for step in range(4):  # appends, overwrites and removals after the copy, then a refresh
        fresh = rng.standard_normal((30, 8)).astype(np.float32)
        moved = ids(30, start=step * 100)
        for ix in (mirror, flat):
            ix.upsert(ids(10, start=5000 + step * 10), fresh[:10])
            ix.upsert(moved, fresh)
            ix.remove(ids(5, start=2000 + step * 10))
        a, b = mirror.search(q, 25), flat.search(q, 25)
        # Same items; order may differ only between near-equal scores (CPU vs faiss rounding).
        assert [set(r) for r in a.item_ids()] == [set(r) for r in b.item_ids()]
        np.testing.assert_allclose(a.scores, b.scores, rtol=1e-5, atol=1e-5)
