"""Leave-one-out evaluation with FULL ranking over every item (no sampled negatives).

The target's rank is the number of items scored strictly higher than it (0 = first place).
HR@K = 1 if rank < K; NDCG@K = 1 / log2(rank + 2) if rank < K (one relevant item, so IDCG = 1).
A target the model does not know (possible when evaluating on another log) counts as a miss.

``exclude_history`` (default False, as in the SASRec / S3-Rec papers' full ranking) sets
the scores of items already in the input sequence to -inf before ranking — except the target
itself, so a repeat purchase can still be a hit.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from serving.data import EncodedLog, EvalCase, Features, LeaveOneOut
from serving.encoder import Batch, collate

STAGE = "evaluate"
KS: tuple[int, ...] = (5, 10, 20)
#: Extra scores from a batch's left-padded item ids: ``(B, T) -> (B, N + 1)``.
Booster = Callable[[torch.Tensor], torch.Tensor]


class SequenceScorer(Protocol):
    """What the evaluator needs: user vectors and the item table they are scored against."""

    def user_vectors(self, batch: Batch) -> torch.Tensor:  # (B, D)
        ...

    def item_table(self) -> torch.Tensor:  # (N + 1, D), row 0 = padding
        ...

    def eval(self) -> object: ...

    def train(self, mode: bool = True) -> object: ...


@dataclass
class EvalReport:
    """Metrics of one evaluation run, JSON-ready."""

    split: str
    users: int
    metrics: dict[str, float]
    exclude_history: bool
    unknown_targets: int = 0
    seconds: float = 0.0
    extra: dict[str, object] = field(default_factory=dict)

    def to_json(self) -> dict[str, object]:
        return asdict(self)


def metrics_from_ranks(ranks: np.ndarray, ks: Sequence[int] = KS) -> dict[str, float]:
    """HR@K and NDCG@K from ``(U,) int64`` 0-based ranks (a huge rank = miss)."""
    if len(ranks) == 0:
        raise ValueError(f"{STAGE}: expected at least one evaluation case, got none")
    out: dict[str, float] = {}
    gains = 1.0 / np.log2(ranks.astype(np.float64) + 2.0)
    for k in ks:
        hit = ranks < k
        out[f"HR@{k}"] = float(hit.mean())
        out[f"NDCG@{k}"] = float(np.where(hit, gains, 0.0).mean())
    return out


@torch.inference_mode()
def rank_targets(
    model: SequenceScorer,
    inputs: Sequence[Features],
    targets: np.ndarray,
    *,
    exclude_history: bool = False,
    batch_size: int = 512,
    boost: Booster | None = None,
) -> np.ndarray:
    """``(U,) int64`` 0-based full-ranking rank of each target; unknown targets (0) rank last.

    ``inputs[u]`` is user u's feature sequence, ``targets (U,) int64`` the model index of the
    held-out item. ``boost`` adds ``(B, N + 1)`` scores computed from the batch's left-padded
    items (co-visitation, ``serving.covisit``). Runs on the device the item table lives on.
    """
    boosts = [boost] if boost is not None else []
    weights = [(1.0,)] if boost is not None else [()]
    return rank_targets_grid(
        model,
        inputs,
        targets,
        boosts=boosts,
        weights=weights,
        exclude_history=exclude_history,
        batch_size=batch_size,
    )[0]


def rank_targets_grid(
    model: SequenceScorer,
    inputs: Sequence[Features],
    targets: np.ndarray,
    *,
    boosts: Sequence[Booster],
    weights: Sequence[Sequence[float]],
    exclude_history: bool = False,
    batch_size: int = 512,
) -> np.ndarray:
    """:func:`rank_targets` for many weightings of the same boosts in one pass: ``(G, U)``
    ranks, row ``g`` scored ``user . item + sum_i weights[g][i] * boosts[i]``. The encoder
    and each boost run once per batch (fitting the co-visitation and affinity weights)."""
    if len(inputs) != len(targets):
        raise ValueError(
            f"{STAGE}: expected one target per input, got {len(inputs)} inputs "
            f"and {len(targets)} targets"
        )
    if any(len(w) != len(boosts) for w in weights):
        raise ValueError(f"{STAGE}: expected {len(boosts)} weights per row, got {list(weights)}")
    was_training = getattr(model, "training", False)
    model.eval()
    table = model.item_table().detach()
    n_rows = table.shape[0]
    ranks = np.empty((len(weights), len(inputs)), dtype=np.int64)
    # Sorting by length keeps padding (and attention cost) per batch small.
    order = np.argsort([len(s) for s in inputs], kind="stable")
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        batch = collate([inputs[i] for i in idx]).to(table.device)
        base = model.user_vectors(batch) @ table.T  # (B, N + 1)
        extra = [b(batch.items) for b in boosts]
        tgt = torch.from_numpy(targets[idx]).to(table.device)
        hist = None
        if exclude_history:
            hist = batch.items.clone()
            hist[hist == tgt[:, None]] = 0
        for g, row in enumerate(weights):
            scores = base.clone() if len(weights) > 1 else base
            for w, e in zip(row, extra, strict=True):
                if w:
                    scores += w * e
            scores[:, 0] = -torch.inf
            if hist is not None:
                scores.scatter_(1, hist, -torch.inf)
                scores[:, 0] = -torch.inf
            tgt_score = scores.gather(1, tgt[:, None])
            rank = (scores > tgt_score).sum(dim=1)
            rank = torch.where(tgt > 0, rank, torch.full_like(rank, n_rows))
            ranks[g, idx] = rank.cpu().numpy()
    model.train(was_training)
    return ranks


def case_inputs(
    split: LeaveOneOut, log: EncodedLog, which: str, max_len: int
) -> tuple[Sequence[EvalCase], list[Features], np.ndarray]:
    """The ``which`` split's cases, each one's input (its newest ``max_len`` steps before the
    held-out one) and ``(U,) int64`` targets (model indices, 0 = unknown)."""
    cases = split.cases(which)
    inputs = [log.prefix(c.user, c.cut, max_len) for c in cases]
    targets = np.fromiter((log.target(c) for c in cases), dtype=np.int64, count=len(cases))
    return cases, inputs, targets


def evaluate_split(
    model: SequenceScorer,
    split: LeaveOneOut,
    log: EncodedLog,
    which: str = "test",
    *,
    max_len: int,
    exclude_history: bool = False,
    batch_size: int = 512,
    boost: Booster | None = None,
) -> EvalReport:
    """Full-ranking HR/NDCG@{5,10,20} on the ``which`` ('valid' or 'test') leave-one-out cases."""
    started = time.perf_counter()
    cases, inputs, targets = case_inputs(split, log, which, max_len)
    ranks = rank_targets(
        model,
        inputs,
        targets,
        exclude_history=exclude_history,
        batch_size=batch_size,
        boost=boost,
    )
    return EvalReport(
        split=which,
        users=len(cases),
        metrics=metrics_from_ranks(ranks),
        exclude_history=exclude_history,
        unknown_targets=int((targets == 0).sum()),
        seconds=round(time.perf_counter() - started, 3),
    )


def print_reports(reports: dict[str, EvalReport], console: Console | None = None) -> None:
    """A rich table: one row per named report, one column per metric."""
    console = console or Console()
    first = next(iter(reports.values()))
    table = Table(
        title=f"full ranking, split={first.split}, exclude_history={first.exclude_history}"
    )
    table.add_column("model")
    table.add_column("users", justify="right")
    for key in first.metrics:
        table.add_column(key, justify="right")
    for name, rep in reports.items():
        table.add_row(name, str(rep.users), *(f"{v:.4f}" for v in rep.metrics.values()))
    console.print(table)


def write_json(payload: dict[str, object], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
