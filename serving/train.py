"""Training loop for the sequential encoder: all-prefix next-item prediction, full softmax CE.

Every position of a training sequence predicts the next item. The loss is cross-entropy over
the whole catalog (scores against the tied item table), computed only at real (non-padding)
positions, which is most of the cost on CPU. ``negatives > 0`` switches to a sampled softmax
with that many shared uniform negatives for catalogs too large for a full softmax.
Early stopping watches validation NDCG@10 (full ranking) and restores the best weights.
"""

from __future__ import annotations

import copy
import logging
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from serving.data import EncodedLog, Features, ItemVocab, LeaveOneOut, attribute_table
from serving.encoder import Batch, EncoderConfig, SequenceEncoder, collate
from serving.evaluate import EvalReport, SequenceScorer, evaluate_split

STAGE = "train"
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings (model shape lives in :class:`EncoderConfig`)."""

    epochs: int = 200
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.0
    patience: int = 10  # evaluations without a better validation NDCG@10 before stopping
    eval_every: int = 1  # epochs between validation runs
    negatives: int = 0  # 0 = full softmax; >0 = sampled softmax with this many negatives
    seed: int = 42
    device: str = "auto"
    progress: bool = True
    max_minutes: float | None = None  # wall-clock budget, checked as each epoch starts

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass
class TrainResult:
    model: SequenceEncoder
    best_epoch: int
    best_valid: EvalReport | None
    epochs_run: int
    seconds: float
    history: list[dict[str, float]] = field(default_factory=list)
    attributes: list[str] = field(default_factory=list)  # attribute names, index i + 1


def resolve_device(name: str | None) -> torch.device:
    """'auto' (or None) → CUDA when present, else CPU; otherwise the named device."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"{STAGE}: expected an available device, got {name!r} but CUDA is absent")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def training_sequences(split: LeaveOneOut, log_: EncodedLog, max_len: int) -> list[Features]:
    """Per user the training prefix as ``max_len + 1`` features (input = [:-1], target = [1:])."""
    seqs = [log_.prefix(u, cut, max_len + 1) for u, cut in enumerate(split.train_cut)]
    return [s for s in seqs if len(s) >= 2]


def iterate_batches(
    seqs: Sequence[Features], batch_size: int, rng: np.random.Generator
) -> Iterator[tuple[Batch, torch.Tensor]]:
    """Shuffled batches of ``(inputs, targets (B, T) int64)``, bucketed by length.

    Sequences are shuffled, cut into chunks of 50 batches, and sorted by length inside a
    chunk, so most batches pad to a similar length while the order stays random.
    """
    order = rng.permutation(len(seqs))
    chunk = batch_size * 50
    batches: list[np.ndarray] = []
    for start in range(0, len(order), chunk):
        part = order[start : start + chunk]
        part = part[np.argsort([len(seqs[i]) for i in part], kind="stable")]
        batches.extend(part[i : i + batch_size] for i in range(0, len(part), batch_size))
    for bi in rng.permutation(len(batches)):
        full = collate([seqs[i] for i in batches[bi]])
        inputs = Batch(full.items[:, :-1], full.types[:, :-1], full.gaps[:, :-1])
        # Left padding: the first real item sits under a padded input; it has no history.
        yield inputs, full.items[:, 1:].masked_fill(inputs.items == 0, 0)


def softmax_loss(
    model: SequenceEncoder, batch: Batch, targets: torch.Tensor, negatives: int
) -> torch.Tensor:
    """Mean next-item cross-entropy over the real positions of ``targets (B, T) int64``."""
    h = model.hidden(batch)
    real = targets > 0
    h, y = h[real], targets[real]  # (M, D), (M,)
    table = model.item_table()
    if negatives <= 0:
        logits = h @ table.T  # (M, N + 1)
        logits[:, 0] = -torch.inf
        return F.cross_entropy(logits, y)
    neg = torch.randint(1, table.shape[0], (negatives,), device=h.device)
    pos_logit = (h * table[y]).sum(-1, keepdim=True)  # (M, 1)
    neg_logit = h @ table[neg].T  # (M, K)
    neg_logit = neg_logit.masked_fill(neg[None, :] == y[:, None], -torch.inf)
    logits = torch.cat([pos_logit, neg_logit], dim=1)
    return F.cross_entropy(logits, torch.zeros_like(y))


LossFn = Callable[[torch.nn.Module, Batch, torch.Tensor], torch.Tensor]


def fit(
    model: torch.nn.Module,
    loss_fn: LossFn,
    split: LeaveOneOut,
    log_: EncodedLog,
    cfg: TrainConfig,
    *,
    max_len: int,
    optimizer: torch.optim.Optimizer | None = None,
    desc: str = "train",
) -> tuple[int, EvalReport | None, int, list[dict[str, float]]]:
    """Generic loop shared with the benchmark peer: epochs, early stopping, best-weight restore.

    Returns ``(best_epoch, best_valid_report, epochs_run, history)``; the model ends with the
    best weights loaded.
    """
    if cfg.epochs < 1:
        raise ValueError(f"{STAGE}: expected epochs >= 1, got {cfg.epochs}")
    device = next(model.parameters()).device
    seqs = training_sequences(split, log_, max_len)
    if not seqs:
        raise ValueError(
            f"{STAGE}: expected users with at least 2 training steps, got none in {split.data.name}"
        )
    rng = np.random.default_rng(cfg.seed)
    opt = optimizer or torch.optim.AdamW(
        model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay
    )
    scorer: SequenceScorer = model  # type: ignore[assignment]
    best_score, best_epoch, best_report = -1.0, 0, None
    best_state = copy.deepcopy(model.state_dict())
    history: list[dict[str, float]] = []
    bad_evals, epoch = 0, 0
    started = time.perf_counter()
    bar = tqdm(range(1, cfg.epochs + 1), desc=desc, disable=not cfg.progress, leave=True)
    for epoch in bar:
        out_of_time = (
            cfg.max_minutes is not None and time.perf_counter() - started > 60 * cfg.max_minutes
        )
        model.train()
        total, count = 0.0, 0
        for batch, targets in iterate_batches(seqs, cfg.batch_size, rng):
            loss = loss_fn(model, batch.to(device), targets.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach())
            count += 1
        row = {"epoch": float(epoch), "loss": total / max(count, 1)}
        last = epoch == cfg.epochs or out_of_time
        if split.valid and (epoch % cfg.eval_every == 0 or last):
            rep = evaluate_split(scorer, split, log_, "valid", max_len=max_len)
            score = rep.metrics["NDCG@10"]
            row["valid_ndcg10"] = score
            if score > best_score:
                best_score, best_epoch, best_report = score, epoch, rep
                best_state = copy.deepcopy(model.state_dict())
                bad_evals = 0
            else:
                bad_evals += 1
        history.append(row)
        bar.set_postfix(
            loss=f"{row['loss']:.4f}",
            ndcg10=f"{row.get('valid_ndcg10', float('nan')):.4f}",
            best=f"{max(best_score, 0.0):.4f}@{best_epoch}",
        )
        log.info("%s epoch %d %s", desc, epoch, row)
        if bad_evals >= cfg.patience:
            break
        if out_of_time:
            log.warning(
                "%s: time budget of %s min spent after epoch %d", desc, cfg.max_minutes, epoch
            )
            break
    if not split.valid:
        best_epoch, best_state = epoch, copy.deepcopy(model.state_dict())
    model.load_state_dict(best_state)
    return best_epoch, best_report, epoch, history


def train_encoder(
    split: LeaveOneOut,
    model_cfg: EncoderConfig,
    cfg: TrainConfig,
    attributes: dict[str, list[str]] | None = None,
    max_attrs: int = 8,
) -> tuple[TrainResult, ItemVocab, EncodedLog]:
    """Train a :class:`SequenceEncoder` on ``split``; the vocabulary covers every item seen.

    ``attributes`` (item id -> names, ``data.load_item_attributes``) adds up to ``max_attrs``
    attribute embeddings to every item vector; ``model_cfg.num_attrs/max_attrs`` are set here.
    """
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    vocab = ItemVocab(split.data.item_ids())
    if model_cfg.num_items != len(vocab):
        raise ValueError(
            f"{STAGE}: expected model num_items == catalog size {len(vocab)}, "
            f"got {model_cfg.num_items}"
        )
    log_ = EncodedLog(split.data, vocab)
    table: np.ndarray | None = None
    names: list[str] = []
    if attributes:
        table, names = attribute_table(vocab, attributes, max_attrs)
        if not names:
            raise ValueError(
                f"{STAGE}: expected attributes for some of the {len(vocab)} items, got none "
                "that match the log's item ids"
            )
        model_cfg = replace(model_cfg, num_attrs=len(names), max_attrs=max_attrs)
    model = SequenceEncoder(model_cfg).to(device)
    if table is not None:
        model.set_attributes(table)
    started = time.perf_counter()

    def loss_fn(m: torch.nn.Module, batch: Batch, targets: torch.Tensor) -> torch.Tensor:
        return softmax_loss(m, batch, targets, cfg.negatives)  # type: ignore[arg-type]

    best_epoch, best_report, epochs_run, history = fit(
        model, loss_fn, split, log_, cfg, max_len=model_cfg.max_len, desc="encoder"
    )
    result = TrainResult(
        model=model,
        best_epoch=best_epoch,
        best_valid=best_report,
        epochs_run=epochs_run,
        seconds=round(time.perf_counter() - started, 1),
        history=history,
        attributes=names,
    )
    return result, vocab, log_
