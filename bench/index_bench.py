"""ItemIndex and Pipeline benchmark: update throughput, search latency, IVF recall, stage times.

    python bench/index_bench.py --json /tmp/index_bench.json [--sizes 100000 1000000]

Data are clustered Gaussian vectors (D=64) generated here. Recall@100 of the IVF index is
measured against the exact flat index on a sample of queries (the flat index is checked
against the numpy reference ``exact_topk`` on a few of them).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from serving.index import ItemIndex, exact_topk
from serving.pipeline import Pipeline, SlateRequest
from serving.types import Step

D = 64


def clustered(n: int, seed: int, clusters: int = 1000) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((clusters, D)).astype(np.float32)
    x = centers[rng.integers(0, clusters, n)]
    x += 0.6 * rng.standard_normal((n, D), dtype=np.float32)
    return x


def percentiles(samples: Sequence[float]) -> dict[str, float]:
    ms = np.asarray(samples) * 1e3
    return {
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "n": len(ms),
    }


def timed(fn: Callable[[], object], reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def bench_index(n: int, approximate: bool, queries: np.ndarray) -> dict[str, Any]:
    x = clustered(n, seed=1)
    ids = [f"i{j}" for j in range(n)]
    index = ItemIndex(D, approx_threshold=n if approximate else 10**9, background=False)
    t = time.perf_counter()
    for s in range(0, n, 100_000):
        index.upsert(ids[s : s + 100_000], x[s : s + 100_000])
    load_s = time.perf_counter() - t
    res: dict[str, Any] = {"n": n, "kind": "ivf" if approximate else "flat", "load_s": load_s}
    if approximate:
        res["nprobe"] = index._ivf.nprobe
        res["nlist"] = index._ivf.nlist
    rng = np.random.default_rng(2)
    fresh = clustered(2000, seed=3)
    # Single-item calls: the shape of the items-topic stream (one message, one upsert).
    new_ids = [f"n{j}" for j in range(1000)]
    t = time.perf_counter()
    for j, item in enumerate(new_ids):
        index.upsert([item], fresh[j : j + 1])
    res["insert_per_s"] = 1000 / (time.perf_counter() - t)
    upd = rng.choice(n, 1000, replace=False)
    t = time.perf_counter()
    for j, r in enumerate(upd.tolist()):
        index.upsert([ids[r]], fresh[1000 + j : 1001 + j])
    res["update_per_s"] = 1000 / (time.perf_counter() - t)
    t = time.perf_counter()
    for item in new_ids:
        index.remove([item])
    res["remove_per_s"] = 1000 / (time.perf_counter() - t)
    t = time.perf_counter()
    index.upsert(new_ids, fresh[:1000])
    res["batch_upsert_1000_per_s"] = 1000 / (time.perf_counter() - t)
    reps1 = 200 if n <= 100_000 else 40
    reps256 = 10 if n <= 100_000 else 4
    res["search_b1_k200"] = percentiles(timed(lambda: index.search(queries[:1], 200), reps1))
    res["search_b256_k200"] = percentiles(timed(lambda: index.search(queries[:256], 200), reps256))
    if approximate:
        sample = queries[:200]
        approx = index.search(sample, 100).rows
        exact = index.search(sample, 100, exact=True).rows
        hits = sum(
            len(set(a) & set(e)) for a, e in zip(approx.tolist(), exact.tolist(), strict=True)
        )
        res["recall_at_100"] = hits / exact.size
        rows, vecs = index.live_vectors()
        _, ref = exact_topk(sample[:5], vecs, 100)
        agree = np.mean(
            [len(set(rows[r]) & set(e)) / 100 for r, e in zip(ref, exact[:5], strict=True)]
        )
        res["flat_vs_numpy_recall_at_100"] = float(agree)
    return res


class MeanEncoder:
    version = "bench-mean"
    dim = D

    def __init__(self, ids: list[str], vectors: np.ndarray) -> None:
        self.ids, self.vectors = ids, vectors
        self.row = {item: j for j, item in enumerate(ids)}

    def item_ids(self) -> Sequence[str]:
        return self.ids

    def item_vectors(self) -> np.ndarray:
        return self.vectors

    def encode(self, histories: Sequence[Sequence[Step]]) -> np.ndarray:
        out = np.zeros((len(histories), D), np.float32)
        for b, h in enumerate(histories):
            rows = [self.row[s.item] for s in h if s.item in self.row]
            if rows:
                out[b] = self.vectors[rows].mean(axis=0)
        return out


def bench_pipeline(n: int, batch: int = 256, reps: int = 5) -> dict[str, Any]:
    x = clustered(n, seed=1)
    ids = [f"i{j}" for j in range(n)]
    stages: dict[str, list[float]] = defaultdict(list)
    pipe = Pipeline.from_encoder(
        MeanEncoder(ids, x),
        None,
        approx_threshold=10**9,
        candidates=200,
        slate_size=10,
        diversity=0.2,
        on_stage=lambda name, s: stages[name].append(s),
    )
    rng = np.random.default_rng(4)
    requests = []
    for u in range(batch):
        items = rng.integers(0, n, 20)
        kinds = ["purchase" if rng.random() < 0.1 else "view" for _ in items]
        history = [
            Step(ids[i], k, 1_700_000_000_000 + j)
            for j, (i, k) in enumerate(zip(items.tolist(), kinds, strict=True))
        ]
        requests.append(SlateRequest(f"u{u}", history))
    pipe.recommend(requests)  # warm-up
    stages.clear()
    total = timed(lambda: pipe.recommend(requests), reps)
    return {
        "n_items": n,
        "batch": batch,
        "candidates": 200,
        "slate": 10,
        "index": "flat",
        "total": percentiles(total),
        "stages_ms": {k: float(np.median(v) * 1e3) for k, v in stages.items()},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--pipeline-items", type=int, default=100_000)
    args = ap.parse_args()
    queries = clustered(256, seed=7)
    report: dict[str, Any] = {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "faiss_threads": faiss.omp_get_max_threads(),
            "gpus": faiss.get_num_gpus(),
        },
        "index": [],
    }
    for n in args.sizes:
        for approximate in (False, True):
            r = bench_index(n, approximate, queries)
            print(json.dumps(r), flush=True)
            report["index"].append(r)
            args.json.write_text(json.dumps(report, indent=2))
    report["pipeline"] = bench_pipeline(args.pipeline_items)
    print(json.dumps(report["pipeline"]), flush=True)
    args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
