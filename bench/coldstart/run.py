"""Item cold start: can a never-seen item be retrieved from its text alone?

    python bench/coldstart/run.py --dataset ml-100k --json reports/coldstart-ml-100k.json

Protocol (same for every method):
1. Pick 10% of the items with interactions at random (``--seed``) as COLD; drop every
   interaction with them from the log. The rest is the warm log.
2. Train the sequence encoder on the warm log (leave-one-out, early stop on validation
   NDCG@10; small/fast settings by default, see the options).
3. Fit the text projection on the warm items (``serving.text.fit_text_projection``, written
   into the model directory exactly as ``streamrec fit-text`` does) and project the cold items.
4. Cases: positions of the FULL log whose target is a cold item and whose prefix holds at
   least one warm item (capped at ``--max-cases`` by random sampling). The user is encoded
   from the prefix (cold items in it are unknown to the encoder and skipped). Ranking is over
   the FULL catalogue: warm ID vectors + cold projected vectors; items in the prefix are
   excluded (MovieLens users rate a movie once), the target never is.

Methods on the same cases: popularity (warm counts; a cold item has count 0, so this is what
serving without cold start does), random, a text-only user profile (mean MiniLM vector of the
last ``max_len`` prefix items, cosine to every item's text: oracle-free, no ID model), and the
encoder with cold vectors from ridge (raw and norm-matched), text-kNN (mean ID vector of the
10 nearest warm items in text space) and a small MLP. ``cold-only`` columns rank the target
among cold items only: does the text vector separate cold items from each other.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated

if __package__ in (None, ""):  # run as a file: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np
import torch
import typer
from rich.console import Console
from rich.table import Table
from safetensors.numpy import load_file, save_file

from serving.artifacts import load_model, save_model
from serving.data import Interactions, UserHistory, leave_one_out, load_interactions
from serving.encoder import EncoderConfig
from serving.evaluate import evaluate_split, metrics_from_ranks, write_json
from serving.text import (
    ColdStart,
    TextEncoder,
    TextProjection,
    count_interactions,
    fit_text_projection,
    item_text,
    load_items,
)
from serving.train import TrainConfig, train_encoder
from serving.types import Step

DATASETS: dict[str, tuple[str, str, str]] = {
    # name: (interactions path, interactions format, items path) under the data root
    "ml-100k": ("ml-100k/u.data.gz", "ml-100k", "ml-100k/u.item"),
    "ml-1m": ("ml-1m", "ml-1m", "ml-1m/movies.dat"),
}
DEFAULT_ROOT = Path(os.environ.get("STREAMREC_DATA", "/work/shared/data"))
console = Console()
log = logging.getLogger("bench.coldstart")


class CachedText:
    """A :class:`TextEncoder` with a per-dataset disk cache (safetensors matrix + JSON list of
    the texts), so reruns of the benchmark skip the slow CPU encoding."""

    def __init__(self, cache_dir: Path, dataset: str) -> None:
        self.inner = TextEncoder(batch_size=64)
        self.matrix_path = cache_dir / f"{dataset}-minilm.safetensors"
        self.texts_path = cache_dir / f"{dataset}-minilm.json"
        self.seconds = 0.0
        self.memory: dict[str, np.ndarray] = {}
        if self.matrix_path.is_file() and self.texts_path.is_file():
            x = load_file(str(self.matrix_path))["x"]
            self.memory = dict(zip(json.loads(self.texts_path.read_text()), x, strict=True))

    @property
    def dim(self) -> int:
        return self.inner.dim

    @property
    def name(self) -> str:
        return self.inner.name

    def encode(self, texts: Sequence[str]) -> np.ndarray:  # (n, 384) float32
        todo = sorted({t for t in texts if t not in self.memory})
        if todo:
            started = time.perf_counter()
            self.memory.update(zip(todo, self.inner.encode(todo), strict=True))
            self.seconds += time.perf_counter() - started
            self.matrix_path.parent.mkdir(parents=True, exist_ok=True)
            keys = list(self.memory)
            save_file({"x": np.stack([self.memory[k] for k in keys])}, str(self.matrix_path))
            self.texts_path.write_text(json.dumps(keys))
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.stack([self.memory[t] for t in texts]).astype(np.float32)


def drop_items(data: Interactions, cold: set[str]) -> Interactions:
    """The log without any interaction on ``cold`` items (users left empty are dropped)."""
    users = []
    for u in data.users:
        keep = [i for i, it in enumerate(u.items) if it not in cold]
        if not keep:
            continue
        users.append(
            UserHistory(
                u.user,
                tuple(u.items[i] for i in keep),
                tuple(u.types[i] for i in keep),
                tuple(u.ts_ms[i] for i in keep) if u.ts_ms is not None else None,
            )
        )
    return Interactions(name=f"{data.name}-warm", users=tuple(users))


def fit_mlp(x: np.ndarray, y: np.ndarray, seed: int, epochs: int = 300) -> torch.nn.Module:
    """A 384 → 256 → D MLP regressor (MSE, AdamW, weight decay, early stop on 10% held out)."""
    torch.manual_seed(seed)
    net = torch.nn.Sequential(
        torch.nn.Linear(x.shape[1], 256),
        torch.nn.GELU(),
        torch.nn.Dropout(0.2),
        torch.nn.Linear(256, y.shape[1]),
    )
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=1e-2)
    perm = np.random.default_rng(seed).permutation(len(x))
    n_val = max(2, len(x) // 10)
    xt, yt = torch.from_numpy(x[perm[n_val:]]), torch.from_numpy(y[perm[n_val:]])
    xv, yv = torch.from_numpy(x[perm[:n_val]]), torch.from_numpy(y[perm[:n_val]])
    best, best_state, bad = float("inf"), None, 0
    for _ in range(epochs):
        net.train()
        for idx in torch.randperm(len(xt)).split(128):
            loss = torch.nn.functional.mse_loss(net(xt[idx]), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        net.eval()
        with torch.no_grad():
            val = float(torch.nn.functional.mse_loss(net(xv), yv))
        if val < best - 1e-6:
            best, best_state, bad = val, {k: v.clone() for k, v in net.state_dict().items()}, 0
        else:
            bad += 1
            if bad >= 20:
                break
    assert best_state is not None
    net.load_state_dict(best_state)
    return net.eval()


def ranks_of(
    users: np.ndarray,
    catalog: np.ndarray,
    targets: np.ndarray,
    history: list[np.ndarray],
    candidates: np.ndarray | None = None,
) -> np.ndarray:
    """``(C,) int64`` 0-based ranks: ``users (C, D)`` scored against ``catalog (N, D)``.

    ``targets (C,)`` are catalogue rows; ``history[c]`` rows are excluded (target kept);
    ``candidates`` (bool ``(N,)``) restricts the ranking to those rows.
    """
    out = np.empty(len(users), dtype=np.int64)
    for start in range(0, len(users), 1024):
        sl = slice(start, start + 1024)
        scores = users[sl] @ catalog.T  # (b, N)
        if candidates is not None:
            scores[:, ~candidates] = -np.inf
        for b, c in enumerate(range(start, min(start + 1024, len(users)))):
            h = history[c]
            scores[b, h[h != targets[c]]] = -np.inf
        tgt = scores[np.arange(len(scores)), targets[sl]]
        out[sl] = (scores > tgt[:, None]).sum(1)
    return out


def main(
    dataset: Annotated[str, typer.Option(help=f"one of {sorted(DATASETS)}")] = "ml-100k",
    json_out: Annotated[Path, typer.Option("--json", help="report path")] = Path(
        "reports/coldstart.json"
    ),
    data_root: Annotated[Path, typer.Option(help="shared data folder")] = DEFAULT_ROOT,
    cold_share: float = 0.1,
    seed: int = 0,
    epochs: int = 60,
    patience: int = 3,
    eval_every: int = 2,
    dim: int = 64,
    max_len: int = 50,
    max_minutes: float = 8.0,
    max_cases: int = 5000,
    threads: int = 2,
    cache_dir: Annotated[Path, typer.Option(help="text-embedding cache")] = Path(
        "/tmp/streamrec-coldstart-cache"
    ),
    progress: bool = False,
) -> None:
    if dataset not in DATASETS:
        raise typer.BadParameter(
            f"bench: expected --dataset in {sorted(DATASETS)}, got {dataset!r}"
        )
    torch.set_num_threads(threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    t0 = time.perf_counter()
    rel, fmt, items_rel = DATASETS[dataset]
    data = load_interactions(data_root / rel, fmt)
    catalog_items = {it.item_id: it for it in load_items(data_root / items_rel, fmt)}
    all_ids = [i for i in data.item_ids() if i in catalog_items]
    missing_text = len(data.item_ids()) - len(all_ids)
    rng = np.random.default_rng(seed)
    cold = set(rng.choice(all_ids, size=round(cold_share * len(all_ids)), replace=False).tolist())
    warm_log = drop_items(data, cold)
    console.print(
        f"{dataset}: {len(data.users)} users, {len(all_ids)} items with text "
        f"({missing_text} without), {len(cold)} cold; warm log {warm_log.num_interactions} "
        f"of {data.num_interactions} interactions; timestamps={data.has_time}"
    )

    # --- 2. the encoder on the warm log -----------------------------------------------------
    split = leave_one_out(warm_log)
    model_cfg = EncoderConfig(
        num_items=len(warm_log.item_ids()), dim=dim, max_len=max_len, use_time=data.has_time
    )
    train_cfg = TrainConfig(
        epochs=epochs,
        patience=patience,
        eval_every=eval_every,
        max_minutes=max_minutes,
        seed=seed,
        device="cpu",
        progress=progress,
    )
    result, vocab, log_ = train_encoder(split, model_cfg, train_cfg)
    warm_test = evaluate_split(result.model, split, log_, "test", max_len=max_len)
    console.print(
        f"encoder: best epoch {result.best_epoch}, {result.seconds}s, warm test "
        f"HR@10={warm_test.metrics['HR@10']:.4f}"
    )

    text = CachedText(cache_dir, dataset)
    text.encode([item_text(catalog_items[i]) for i in all_ids])  # one pass fills the cache
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        save_model(result.model, model_dir, vocab.ids, dataset=f"{dataset}-warm")
        counts = count_interactions([u.items for u in warm_log.users])
        fit_started = time.perf_counter()
        report = fit_text_projection(
            model_dir,
            [catalog_items[i] for i in vocab.ids if i in catalog_items],
            text_encoder=text,
            train_counts=counts,
        )
        fit_seconds = time.perf_counter() - fit_started
        cold_start = ColdStart.load(model_dir, text_encoder=text)
        encoder = load_model(model_dir, device="cpu")
    assert cold_start is not None
    console.print(f"projection: {report}")

    # --- catalogue: warm rows first (model order), then cold rows ----------------------------
    cold_ids = sorted(cold, key=all_ids.index)
    warm_ids = list(encoder.item_ids())
    ids = warm_ids + cold_ids
    row = {it: i for i, it in enumerate(ids)}
    n_warm = len(warm_ids)
    id_vecs = encoder.item_vectors()
    text_all = text.encode([item_text(catalog_items[i]) for i in ids])  # (N, 384)
    warm_text, cold_text = text_all[:n_warm], text_all[n_warm:]

    ridge = cold_start.projection  # the shipped default: raw ridge outputs
    matched = TextProjection(ridge.weight, ridge.bias, ridge.lam, None)
    # Text-kNN: cold vector = mean ID vector of its 10 nearest warm items by text cosine.
    nn_idx = np.argsort(-(cold_text @ warm_text.T), axis=1)[:, :10]
    knn = id_vecs[nn_idx].mean(1)
    mlp_started = time.perf_counter()
    mlp = fit_mlp(warm_text, id_vecs, seed)
    with torch.no_grad():
        mlp_vecs = mlp(torch.from_numpy(cold_text)).numpy()
    mlp_seconds = time.perf_counter() - mlp_started
    target_norm = float(np.median(np.linalg.norm(id_vecs, axis=1)))

    def norm_to(v: np.ndarray) -> np.ndarray:
        return v * (target_norm / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12))

    cold_variants = {
        "ridge (shipped)": cold_start.vectors_for([catalog_items[i] for i in cold_ids]),
        "ridge + norm match": norm_to(matched.project(cold_text)),
        "text-kNN(10)": knn,
        "text-kNN(10) + norm match": norm_to(knn),
        "MLP": mlp_vecs,
        "MLP + norm match": norm_to(mlp_vecs),
    }

    # --- 4. cases ---------------------------------------------------------------------------
    cases: list[tuple[int, int]] = []
    for u, hist in enumerate(data.users):
        seen_warm = False
        for t, it in enumerate(hist.items):
            if it in cold and seen_warm:
                cases.append((u, t))
            seen_warm = seen_warm or it in vocab.index
    n_all_cases = len(cases)
    if len(cases) > max_cases:
        pick = np.sort(rng.choice(len(cases), size=max_cases, replace=False))
        cases = [cases[i] for i in pick]
    histories, targets, hist_rows = [], [], []
    for u, t in cases:
        h = data.users[u]
        ts = h.ts_ms or (0,) * len(h.items)
        histories.append([Step(h.items[k], h.types[k], ts[k]) for k in range(t)])
        targets.append(row[h.items[t]])
        hist_rows.append(np.array([row[i] for i in h.items[:t] if i in row], dtype=np.int64))
    tgt = np.asarray(targets, dtype=np.int64)
    users = encoder.encode(histories)  # (C, D)
    console.print(f"cases: {len(cases)} sampled of {n_all_cases} cold-target positions")

    cold_mask = np.zeros(len(ids), dtype=bool)
    cold_mask[n_warm:] = True
    results: dict[str, dict[str, float]] = {}

    def record(name: str, full: np.ndarray, cold_only: np.ndarray | None) -> None:
        m = metrics_from_ranks(full, ks=(10,))
        entry = {"HR@10": m["HR@10"], "NDCG@10": m["NDCG@10"]}
        if cold_only is not None:
            c = metrics_from_ranks(cold_only, ks=(10,))
            entry |= {"cold-only HR@10": c["HR@10"], "cold-only NDCG@10": c["NDCG@10"]}
        entry["median rank"] = float(np.median(full))
        results[name] = {k: round(v, 4) for k, v in entry.items()}

    # Popularity: warm counts; cold items score 0 (ties resolved against the target).
    pop = np.array([counts.get(i, 0) for i in ids], dtype=np.float32)
    record(
        "popularity",
        ranks_of(np.ones((len(cases), 1), np.float32), pop[:, None], tgt, hist_rows),
        None,
    )
    rnd = np.random.default_rng(seed + 1).standard_normal((len(cases), 32)).astype(np.float32)
    rnd_items = np.random.default_rng(seed + 2).standard_normal((len(ids), 32)).astype(np.float32)
    record(
        "random",
        ranks_of(rnd, rnd_items, tgt, hist_rows),
        ranks_of(rnd, rnd_items, tgt, hist_rows, cold_mask),
    )
    # Text-only profile: mean text vector of the newest max_len prefix items.
    prof = np.stack(
        [
            text_all[r[-max_len:]].mean(0) if len(r) else np.zeros(text_all.shape[1], np.float32)
            for r in hist_rows
        ]
    )
    record(
        "text-only user profile",
        ranks_of(prof, text_all, tgt, hist_rows),
        ranks_of(prof, text_all, tgt, hist_rows, cold_mask),
    )
    for name, vecs in cold_variants.items():
        cat = np.concatenate([id_vecs, vecs.astype(np.float32)])
        record(
            f"encoder + {name}",
            ranks_of(users, cat, tgt, hist_rows),
            ranks_of(users, cat, tgt, hist_rows, cold_mask),
        )
    # Context: where cold targets would land with a zero vector (no cold-start module).
    cat0 = np.concatenate([id_vecs, np.zeros((len(cold_ids), id_vecs.shape[1]), np.float32)])
    record("encoder, cold items = zero vector", ranks_of(users, cat0, tgt, hist_rows), None)

    table = Table(title=f"{dataset}: cold-target cases, full-catalogue ranking ({len(ids)} items)")
    cols = ["HR@10", "NDCG@10", "cold-only HR@10", "cold-only NDCG@10", "median rank"]
    table.add_column("method")
    for c in cols:
        table.add_column(c, justify="right")
    for name, m in results.items():
        table.add_row(name, *(f"{m[c]:.4f}" if c in m else "-" for c in cols))
    console.print(table)

    payload: dict[str, object] = {
        "dataset": dataset,
        "data": str(data_root / rel),
        "protocol": (
            f"{cold_share:.0%} of items cold (all their interactions removed before training); "
            "cases = full-log positions with a cold target and >=1 warm prefix item; full "
            "catalogue ranking (warm ID + cold text vectors), prefix items excluded"
        ),
        "seed": seed,
        "items": len(ids),
        "cold_items": len(cold_ids),
        "warm_interactions": warm_log.num_interactions,
        "cases": len(cases),
        "cold_target_positions": n_all_cases,
        "encoder": {
            "model": model_cfg.to_dict(),
            "train": train_cfg.to_dict(),
            "best_epoch": result.best_epoch,
            "epochs_run": result.epochs_run,
            "train_seconds": result.seconds,
            "warm_test": warm_test.metrics,
        },
        "projection_fit": report.to_dict(),
        "projection_fit_seconds": round(fit_seconds, 1),
        "text_encode_seconds_uncached": round(text.seconds, 1),
        "mlp_fit_seconds": round(mlp_seconds, 1),
        "results": results,
        "wall_seconds": round(time.perf_counter() - t0, 1),
        "threads": threads,
    }
    write_json(payload, json_out)
    console.print(f"wrote {json_out} in {payload['wall_seconds']}s")


if __name__ == "__main__":
    typer.run(main)
