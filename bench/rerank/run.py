"""Reranker benchmark: encoder -> logged candidates -> listwise reranker -> slate evaluation.

    python -m bench.rerank.run --dataset ml-100k --json reports/rerank-ml100k.json \
        --model /tmp/enc-ml100k        # reuses an encoder directory when it holds one

Trains the encoder with moderate settings unless ``--model`` already holds one, trains the
reranker on the encoder's top-C candidates for the training prefixes, chooses the MMR weight on
the VALIDATION split (largest ILD within ``--max-loss`` relative NDCG@10 of no diversity), then
reports the test split: retrieval-only vs rerank on the same candidates, + MMR at the chosen
weight, the whole trade-off curve (PNG), and the reranker's latency at B=256 x C=200.

``--heldout-steps 2`` adds cross-fitted training cases (``serving.reranker.heldout_candidates``):
a second encoder with the first one's saved settings is trained (into ``--heldout-model``, or
reused from there) on every user's training part minus its last two steps, and logs the
candidates for those two steps, which it never fitted.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Annotated

# One BLAS thread: MMR's many small batched products are slower with a contended thread pool.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "2")

if __package__ in (None, ""):  # run as a file: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np
import torch
import typer
from rich.console import Console

from serving.artifacts import LoadedEncoder, load_model, save_model
from serving.data import (
    leave_one_out,
    load_interactions,
    load_item_attributes,
)
from serving.encoder import EncoderConfig
from serving.pipeline import Candidates, SlateRequest
from serving.reranker import (
    LoggedCandidates,
    RerankTrainConfig,
    TransformerReranker,
    cross_fitted_encoder,
    heldout_candidates,
    save_reranker,
    train_reranker,
)
from serving.slate_eval import calibrate, evaluate_slates, plot_tradeoff, write_report
from serving.train import TrainConfig, train_encoder
from serving.types import Step

DATASETS: dict[str, tuple[str, str]] = {
    "beauty": ("s3rec/Beauty.txt.gz", "s3rec"),
    "yelp": ("s3rec/Yelp.txt.gz", "s3rec"),
    "ml-100k": ("ml-100k/u.data.gz", "ml-100k"),
}
DEFAULT_ROOT = Path(os.environ.get("STREAMREC_DATA", "/work/shared/data"))
console = Console()


def item_categories(dataset: str, root: Path) -> dict[str, list[str]]:
    """Category names per item where the dataset ships them (ML genres, S3-Rec attribute ids)."""
    if dataset == "ml-100k":
        return load_item_attributes(root / "ml-100k/u.item", "ml-100k")
    name = {"beauty": "Beauty", "yelp": "Yelp"}[dataset]
    return load_item_attributes(root / f"s3rec/{name}_item2attributes.json.gz", "s3rec")


def latency(
    encoder: LoadedEncoder, reranker: TransformerReranker, histories: list[list[Step]]
) -> dict[str, float]:
    """Median / p90 ms of ``reranker.score`` for B=len(histories) users x C=200 candidates."""
    vecs = encoder.encode(histories)
    table = encoder.item_vectors()
    scores = vecs @ table.T
    rows = np.argsort(-scores, axis=1)[:, :200].astype(np.int64)
    retr = np.take_along_axis(scores, rows, axis=1).astype(np.float32)
    reqs = tuple(SlateRequest(str(i), h) for i, h in enumerate(histories))
    cands = Candidates(reqs, rows, retr, retr, np.asarray(encoder.item_ids(), dtype=object), "b")
    reranker.score(reqs, cands)  # warm-up: projection cache, row map, allocator
    times = []
    for _ in range(10):
        t0 = time.perf_counter()
        reranker.score(reqs, cands)
        times.append((time.perf_counter() - t0) * 1000)
    return {
        "batch": len(reqs),
        "candidates": 200,
        "median_ms": round(float(np.median(times)), 1),
        "p90_ms": round(float(np.percentile(times, 90)), 1),
        "threads": torch.get_num_threads(),
    }


def main(
    dataset: Annotated[str, typer.Option(help=f"one of {sorted(DATASETS)}")] = "ml-100k",
    json_out: Annotated[Path, typer.Option("--json", help="report path")] = Path(
        "reports/rerank.json"
    ),
    plot: Annotated[Path | None, typer.Option(help="PNG path (default: next to --json)")] = None,
    model: Annotated[Path | None, typer.Option(help="encoder dir to reuse or create")] = None,
    data_root: Path = DEFAULT_ROOT,
    candidates: int = 100,
    prefixes: int = 10,
    epochs: int = 20,
    patience: int = 3,
    dim: int = 32,
    layers: int = 1,
    max_len: Annotated[int, typer.Option(help="history steps the reranker reads")] = 50,
    filter_seen: Annotated[
        bool, typer.Option(help="train on candidates minus the history window's items")
    ] = False,
    enc_epochs: int = 12,
    enc_negatives: Annotated[int, typer.Option(help="0 = full softmax")] = 256,
    max_loss: float = 0.02,
    curve_users: Annotated[int | None, typer.Option(help="users in the MMR curves")] = 4000,
    threads: int = 2,
    heldout_steps: Annotated[
        int, typer.Option(help="cross-fitted training cases per user (0 = none)")
    ] = 0,
    category_weight: Annotated[
        float, typer.Option(help="category Jaccard share of MMR's similarity (0 = vectors)")
    ] = 0.0,
    ordering: Annotated[
        str, typer.Option(help="expected | dcg | mmr | dpp: the diversity curve's ordering")
    ] = "expected",
    heldout_model: Annotated[
        Path | None, typer.Option(help="cross-fitted encoder dir (default: <model>-heldout)")
    ] = None,
    covisit: Annotated[
        bool,
        typer.Option(
            help="read the encoder's co-visitation table (boosted candidates + boost feature) "
            "when it has one; --no-covisit trains the reranker on the encoder's scores alone"
        ),
    ] = True,
) -> None:
    if dataset not in DATASETS:
        raise typer.BadParameter(
            f"bench: expected --dataset in {sorted(DATASETS)}, got {dataset!r}"
        )
    torch.set_num_threads(threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    t_start = time.perf_counter()
    rel, fmt = DATASETS[dataset]
    data = load_interactions(data_root / rel, fmt)
    split = leave_one_out(data)
    model_dir = model or Path(f"/tmp/streamrec-rerank-{dataset}")
    if not (model_dir / "model.safetensors").is_file():
        console.print(f"training the encoder into {model_dir}")
        cfg = EncoderConfig(num_items=len(data.item_ids()), use_time=data.has_time)
        tcfg = TrainConfig(
            epochs=enc_epochs, eval_every=4, patience=1, negatives=enc_negatives, progress=False
        )
        res, vocab, _ = train_encoder(split, cfg, tcfg)
        save_model(res.model, model_dir, vocab.ids, dataset=dataset, train=tcfg.to_dict())
    encoder = load_model(model_dir, device="cpu")
    cats = item_categories(dataset, data_root)
    rcfg = RerankTrainConfig(
        candidates=candidates,
        prefixes=prefixes,
        epochs=epochs,
        patience=patience,
        filter_seen=filter_seen,
    )
    heldout: LoggedCandidates | None = None
    aux_dir = heldout_model or model_dir.with_name(model_dir.name + "-heldout")
    if heldout_steps:
        aux = cross_fitted_encoder(encoder, split, aux_dir)
        heldout = heldout_candidates(
            aux,
            split,
            encoder.vocab,
            steps=heldout_steps,
            candidates=candidates,
            seq_len=max_len,
            covisit=encoder.covisit if covisit else None,  # a weight-0 table reads as none
        )
        console.print(
            f"{len(heldout)} cross-fitted cases, recall@{candidates} "
            f"{float((heldout.target_pos >= 0).mean()):.3f}"
        )
    result = train_reranker(
        encoder,
        split,
        rcfg,
        model={
            "dim": dim,
            "layers": layers,
            "max_len": max_len,
            **({} if covisit else {"covisit": False}),
        },
        categories=cats,
        heldout=heldout,
    )
    version = save_reranker(result.reranker, model_dir, metrics={"valid": result.valid})
    console.print(f"reranker {version}: valid {result.valid}")
    # The "expected" and "dcg" orderings read both scorers' logits at their validation-fitted
    # temperatures.
    fits = calibrate(
        encoder, split, reranker=result.reranker, candidates=candidates, model_dir=model_dir
    )
    console.print({name: cal.to_dict() for name, cal in fits.fits.items()})
    valid = evaluate_slates(
        encoder,
        split,
        reranker=result.reranker,
        which="valid",
        candidates=candidates,
        max_loss=max_loss,
        retrieval_curve=False,
        curve_users=curve_users,
        category_weight=category_weight,
        ordering=ordering,
    )
    weight = float(valid["diversity"])
    test = evaluate_slates(
        encoder,
        split,
        reranker=result.reranker,
        which="test",
        candidates=candidates,
        diversity=weight,
        curve_users=curve_users,
        category_weight=category_weight,
        ordering=ordering,
    )
    hist = [
        [Step(it, t, 0) for it, t in zip(u.items, u.types, strict=True)][-50:]
        for u in data.users[:256]
    ]
    payload = {
        "dataset": dataset,
        "data": str(data_root / rel),
        "encoder": {
            "dir": str(model_dir),
            "version": encoder.version,
            "metrics": encoder.config.get("metrics", {}),
        },
        "calibration": {name: cal.to_dict() for name, cal in fits.fits.items()},
        "slate_weight": {name: w.to_dict() for name, w in fits.weights.items()},
        "reranker": {
            "version": version,
            "config": result.reranker.cfg.to_dict(),
            "train": rcfg.to_dict(),
            "best_epoch": result.best_epoch,
            "train_cases": result.train_cases,
            "train_recall": result.train_recall,
            "train_seconds": result.seconds,
            "history": result.history,
            "heldout_steps": heldout_steps,
            "heldout_encoder": str(aux_dir) if heldout_steps else None,
            "heldout_recall": (
                float((heldout.target_pos >= 0).mean()) if heldout is not None else None
            ),
        },
        "diversity_chosen_on_valid": weight,
        "valid": valid,
        "test": test,
        "latency_B256_C200": latency(encoder, result.reranker, hist),
        "wall_seconds": round(time.perf_counter() - t_start, 1),
    }
    write_report(payload, json_out)
    png = plot or json_out.with_suffix(".png")
    plot_tradeoff(test, png, title=f"{dataset}: relevance vs diversity (test, C={candidates})")
    t = test
    console.print(
        {
            "retrieval": t["retrieval"],
            "retrieval_filtered": t["retrieval_filtered"],
            "rerank": t["rerank"],
            "lift": t["lift"],
            "lift_over_filtered": t["lift_over_filtered"],
            "at_diversity": t["at_diversity"],
            "latency": payload["latency_B256_C200"],
        }
    )
    console.print(f"wrote {json_out} and {png}")


if __name__ == "__main__":
    typer.run(main)
