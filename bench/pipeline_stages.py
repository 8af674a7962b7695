"""Per-stage cost of ``Pipeline.recommend`` on the stream benchmark's batch shape, no Kafka.

    python bench/pipeline_stages.py [--batch 256] [--items 2000] [--reps 30] [--affinity]
        [--ordering expected|dcg|mmr] [--json OUT]

The batch is what a worker sees in ``streamrec bench stream``: a generated shop (2,000 items
in 12 categories, all in the catalog), 256 users with up to 50 steps of history, 200
candidates, a slate of 10, one fresh (text-embedded) item, ordered by ``--ordering`` at
diversity 0.2 (``dcg``, ``mmr``) or the default weight of ``expected``. The encoder is a
mean of item vectors (the real encoder's cost is the encoder benchmark's business), so the
figures are retrieve, filter, rerank and order. ``--affinity`` gives the encoder the shop's
categories as item attributes and an attribute affinity at weight 2 (``serving.affinity``),
which the covisit stage then applies. Medians over ``--reps`` calls after a warm-up, with
faiss and numpy on one thread as in the worker's model thread on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import faiss
import numpy as np

if __package__ in (None, ""):  # run as a file: make the repo root importable
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.index_bench import MeanEncoder
from serving.affinity import Affinity, AffinityConfig
from serving.catalog import Catalog, ItemMeta
from serving.data import ItemVocab
from serving.ordering import ORDERINGS
from serving.pipeline import DEFAULT_DIVERSITY, FreshItems, Pipeline, SlateRequest
from serving.synthetic import make_shop
from serving.types import Step

D = 64


class AttributeEncoder(MeanEncoder):
    """The mean encoder with a vocabulary and the shop's categories as attribute affinity."""

    def __init__(self, ids: list[str], vectors: np.ndarray, cats: list[int]) -> None:
        super().__init__(ids, vectors)
        self.vocab = ItemVocab(ids)
        attrs = np.zeros((len(ids) + 1, 1), dtype=np.int64)
        attrs[1:, 0] = np.asarray(cats) + 1
        self.affinity = Affinity(attrs, AffinityConfig(weight=2.0))


def build(
    batch: int, n_items: int, seed: int = 3, affinity: bool = False, ordering: str = "expected"
) -> tuple[Pipeline, list[SlateRequest], dict]:
    """A pipeline over a generated shop and one batch of requests; ``stages`` collects times."""
    shop = make_shop(n_items=n_items, n_users=max(batch, 1500), events_per_user=20, seed=seed)
    rng = np.random.default_rng(seed)
    cat_names = sorted({c for i in shop.items for c in i["categories"]})
    centers = rng.standard_normal((len(cat_names), D)).astype(np.float32)
    ids = [i["item_id"] for i in shop.items]
    cat_of = {n: j for j, n in enumerate(cat_names)}
    vecs = np.stack([centers[cat_of[i["categories"][0]]] for i in shop.items])
    vecs += 0.7 * rng.standard_normal(vecs.shape).astype(np.float32)
    catalog = Catalog()
    for item in shop.items:
        catalog.upsert(item["item_id"], ItemMeta(categories=tuple(item["categories"])))
    stages: dict[str, list[float]] = defaultdict(list)
    fresh = FreshItems(D)
    cats = [cat_of[i["categories"][0]] for i in shop.items]
    encoder = AttributeEncoder(ids, vecs, cats) if affinity else MeanEncoder(ids, vecs)
    pipe = Pipeline.from_encoder(
        encoder,
        catalog,
        candidates=200,
        slate_size=10,
        diversity=DEFAULT_DIVERSITY[ordering] if ordering == "expected" else 0.2,
        ordering=ordering,
        on_stage=lambda name, s: stages[name].append(s),
        fresh=fresh,
        fresh_slots=1,
    )
    new = rng.standard_normal((1, D)).astype(np.float32)
    catalog.upsert("new-0", ItemMeta(categories=(cat_names[0],)))
    pipe.index.upsert(["new-0"], new)
    fresh.put("new-0", new[0])
    by_user: dict[str, list[Step]] = defaultdict(list)
    for e in shop.events:
        by_user[e["user_id"]].append(Step(e["item_id"], e["type"], e["ts"]))
    users = list(by_user)[:batch]
    requests = [SlateRequest(u, tuple(by_user[u][-50:])) for u in users]
    return pipe, requests, stages


def run(
    batch: int, n_items: int, reps: int, affinity: bool = False, ordering: str = "expected"
) -> dict[str, Any]:
    pipe, requests, stages = build(batch, n_items, affinity=affinity, ordering=ordering)
    pipe.recommend(requests)  # warm-up
    stages.clear()
    total = []
    for _ in range(reps):
        t = time.perf_counter()
        pipe.recommend(requests)
        total.append(time.perf_counter() - t)
    return {
        "batch": batch,
        "items": n_items,
        "reps": reps,
        "affinity": affinity,
        "ordering": ordering,
        "diversity": pipe.order.diversity,
        "total_ms": float(np.median(total) * 1e3),
        "stages_ms": {k: round(float(np.median(v) * 1e3), 3) for k, v in stages.items()},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--items", type=int, default=2000)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--affinity", action="store_true", help="apply attribute affinity")
    ap.add_argument("--ordering", choices=ORDERINGS, default="expected")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    faiss.omp_set_num_threads(args.threads)
    res = run(args.batch, args.items, args.reps, args.affinity, args.ordering)
    print(json.dumps(res))
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
