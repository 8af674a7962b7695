"""Effect of complement filling on HR@10 for the step after an add_to_cart / purchase.

    python bench/coldstart/bundles.py --json reports/bundles-synthetic.json

Data: the synthetic shop (``serving.synthetic.make_shop``), the only log here with event
types. Train users come from ``seed``, test users from ``seed + 100`` (same catalogue ids and
categories, fresh sequences). The encoder and the bundles are fitted on the train users only.
Cases: every test position whose previous event is a cart or purchase. Baseline slate =
encoder top-10 (nothing excluded); bundled = the same slate with its last ``m`` slots given to
complements of the just-carted items (``serving.bundles.fill_slate``).
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Annotated

if __package__ in (None, ""):  # run as a file: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np
import torch
import typer
from rich.console import Console

from serving.artifacts import load_model, save_model
from serving.bundles import BundleConfig, Bundles, cart_anchors, fill_slate
from serving.data import leave_one_out, load_interactions
from serving.encoder import EncoderConfig
from serving.evaluate import write_json
from serving.synthetic import make_shop, write_jsonl
from serving.train import TrainConfig, train_encoder
from serving.types import Step

console = Console()


def main(
    json_out: Annotated[Path, typer.Option("--json", help="report path")] = Path(
        "reports/bundles-synthetic.json"
    ),
    n_items: int = 300,
    n_users: int = 600,
    events_per_user: int = 30,
    seed: int = 0,
    epochs: int = 20,
    threads: int = 2,
) -> None:
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    train_shop = make_shop(n_items, n_users, events_per_user, seed=seed)
    test_shop = make_shop(n_items, n_users // 2, events_per_user, seed=seed + 100)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = load_interactions(write_jsonl(train_shop.events, root / "train.jsonl"), "events")
        test = load_interactions(write_jsonl(test_shop.events, root / "test.jsonl"), "events")
        cfg = EncoderConfig(num_items=len(data.item_ids()), dim=32, max_len=30)
        train_cfg = TrainConfig(
            epochs=epochs, patience=3, eval_every=2, progress=False, device="cpu", seed=seed
        )
        result, vocab, _ = train_encoder(leave_one_out(data), cfg, train_cfg)
        save_model(result.model, root / "model", vocab.ids)
        encoder = load_model(root / "model", device="cpu")
    ids = np.array(encoder.item_ids())
    vectors = encoder.item_vectors()

    histories, targets, anchors = [], [], []
    for u in test.users:
        ts = u.ts_ms or (0,) * len(u.items)
        steps = [Step(i, t, s) for i, t, s in zip(u.items, u.types, ts, strict=True)]
        for t in range(2, len(steps)):
            a = cart_anchors(steps[:t])
            if a:
                histories.append(steps[:t])
                targets.append(steps[t].item)
                anchors.append(a)
    users = encoder.encode(histories)
    top = np.argsort(-(users @ vectors.T), axis=1)[:, :10]
    slates = [list(ids[row]) for row in top]

    def hr(sl: list[list[str]]) -> float:
        return float(np.mean([t in s for t, s in zip(targets, sl, strict=True)]))

    results: dict[str, float] = {"encoder top-10": round(hr(slates), 4)}
    for window in (3, 5):
        bundles = Bundles.fit(data, BundleConfig(window=window))
        for m in (1, 2, 3, 5):
            filled = [fill_slate(s, a, bundles, m) for s, a in zip(slates, anchors, strict=True)]
            results[f"+ bundles window={window} m={m}"] = round(hr(filled), 4)
        only = [fill_slate(s, a, bundles, 10) for s, a in zip(slates, anchors, strict=True)]
        results[f"bundles only (window={window}, m=10)"] = round(hr(only), 4)
    for k, v in results.items():
        console.print(f"{k:40s} HR@10={v:.4f}")
    payload = {
        "data": f"synthetic shop: {n_items} items, {n_users} train users, "
        f"{n_users // 2} test users, {events_per_user} events each",
        "cases": len(targets),
        "encoder": {
            "model": cfg.to_dict(),
            "best_epoch": result.best_epoch,
            "train_seconds": result.seconds,
        },
        "hr10": results,
        "wall_seconds": round(time.perf_counter() - t0, 1),
    }
    write_json(payload, json_out)
    console.print(f"{len(targets)} cases; wrote {json_out}")


if __name__ == "__main__":
    typer.run(main)
