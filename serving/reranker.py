"""Listwise Transformer reranker: the candidate set attends to itself and to the user's sequence.

Per candidate, one token built from what the retriever does not see:

- the item's encoder embedding (a frozen copy of the encoder's item table), projected;
- its retrieval score, standardised within the user's candidate list, its gap to the best
  score, and its retrieval rank (log2 buckets);
- item popularity: ``log1p(count)`` in the training log, scaled to [0, 1];
- the user's history with the item: steps since the last interaction (log2 buckets, 0 = never),
  the event type of that interaction, and how often it occurs in the history;
- category ids (mean of up to ``max_categories`` embeddings) and a price bucket, when the
  training data had them (frozen per-item tables; 0 = unknown);
- with ``covisit`` (an encoder with a co-visitation table, ``serving.covisit``): the
  candidate's unweighted co-visitation boost from the user's newest items, and whether it has
  one. The retrieval score it reads is then the boosted one, as the pipeline's covisit stage
  hands it over.

Candidate tokens run ``layers`` blocks of [self-attention across the candidate set,
cross-attention to the user's recent sequence (item + event-type + position embeddings, one
self-attention layer, plus a learned null token so a cold user still has a key), FFN]. The score
is ``head(token) + alpha * z_retrieval``: the retrieval order is the starting point and the
network learns corrections. A next-action head reads the attention-pooled sequence and predicts
the next event type (softmax over ``EVENT_TYPES``) and whether a purchase follows within
``purchase_horizon`` events.

Everything is indexed by the encoder's vocabulary (``items.json`` of the model directory, index
0 = padding / unknown). Artifacts: ``reranker.safetensors`` + ``reranker.json`` next to the
encoder's files; the JSON records the encoder version, and loading refuses a reranker trained on
another encoder.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from serving.affinity import Affinity
from serving.artifacts import LoadedEncoder, load_model, save_model
from serving.calibration import slate_weight_of, temperature_of
from serving.configs import config_from_dict, config_to_dict
from serving.covisit import CoVisitation, recent_items
from serving.data import (
    EncodedLog,
    Interactions,
    ItemVocab,
    LeaveOneOut,
    leave_one_out,
    sequence_features,
)
from serving.encoder import EncoderConfig, SequenceEncoder, collate
from serving.evaluate import metrics_from_ranks
from serving.pipeline import Candidates, SlateRequest, below_scored
from serving.train import TrainConfig, train_encoder
from serving.types import EVENT_TYPE_ID, EVENT_TYPES

STAGE = "rerank"
WEIGHTS, CONFIG = "reranker.safetensors", "reranker.json"
FORMAT_VERSION = 1
log = logging.getLogger(__name__)
N_NUMERIC = 5  # z-score, gap to best, popularity, log1p(history count), in-history flag
_POPULARITY = 2  # the per-item column of the numeric features
_DYNAMIC = [0, 1, 3, 4]  # the per-(user, candidate) columns


class RerankerError(RuntimeError):
    """A reranker artifact is missing, unreadable, or belongs to another encoder."""


@dataclass(frozen=True)
class RerankerConfig:
    """Model hyperparameters; saved in ``reranker.json``."""

    num_items: int  # N of the encoder vocabulary; tables have N + 1 rows, row 0 = padding
    item_dim: int  # encoder embedding width
    dim: int = 32
    heads: int = 2
    layers: int = 1
    ffn_mult: int = 2
    max_len: int = 50  # newest history steps read
    dropout: float = 0.1
    rank_buckets: int = 8  # 1 + floor(log2(1 + rank)), ranks >= 63 share the last; 0 = invalid
    recency_buckets: int = 8  # 1 + floor(log2(1 + steps since)), capped; 0 = not in history
    n_categories: int = 0  # category vocabulary size (ids 1..n); 0 = no category feature
    max_categories: int = 4
    price_buckets: int = 0  # price quantile buckets (ids 1..n); 0 = no price feature
    next_action: bool = False  # train the next-event-type / purchase head
    purchase_horizon: int = 5
    encoder_version: str = ""
    covisit: bool = False  # reads the co-visitation boost of each candidate

    def __post_init__(self) -> None:
        if self.num_items < 1 or self.item_dim < 1:
            raise ValueError(
                f"{STAGE}: expected num_items >= 1 and item_dim >= 1, got "
                f"{self.num_items}, {self.item_dim}"
            )
        if self.dim % self.heads:
            raise ValueError(
                f"{STAGE}: expected dim divisible by heads, got dim={self.dim} heads={self.heads}"
            )
        if self.max_len < 1 or self.layers < 1:
            raise ValueError(
                f"{STAGE}: expected max_len >= 1 and layers >= 1, got {self.max_len}, {self.layers}"
            )

    def to_dict(self) -> dict[str, object]:
        return config_to_dict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, object]) -> RerankerConfig:
        return config_from_dict(cls, raw, STAGE)


@dataclass(frozen=True, slots=True)
class ItemSide:
    """Frozen per-item facts, indexed by encoder vocabulary (row 0 = padding).

    popularity: (N + 1,) float32 in [0, 1]; categories: (N + 1, M) int64, 0 = none;
    price_bucket: (N + 1,) int64, 0 = unknown.
    """

    popularity: np.ndarray
    categories: np.ndarray
    price_bucket: np.ndarray


def item_side(
    vocab: ItemVocab,
    counts: np.ndarray,
    *,
    categories: Mapping[str, Sequence[str]] | None = None,
    prices: Mapping[str, float] | None = None,
    max_categories: int = 4,
    price_buckets: int = 8,
) -> tuple[ItemSide, dict[str, int], list[float]]:
    """Build :class:`ItemSide` from training counts and optional item metadata.

    counts: (N + 1,) interaction count per vocabulary index. Returns the side tables, the
    category vocabulary (name -> id >= 1) and the price bucket edges (empty without prices).
    """
    n = len(vocab)
    counts = np.asarray(counts, dtype=np.float64)
    if counts.shape != (n + 1,):
        raise ValueError(
            f"{STAGE}: expected counts ({n + 1},) for the vocabulary, got {counts.shape}"
        )
    pop = np.log1p(counts)
    pop = (pop / max(pop.max(), 1e-9)).astype(np.float32)
    cats = np.zeros((n + 1, max_categories), dtype=np.int64)
    cat_vocab: dict[str, int] = {}
    for item, names in (categories or {}).items():
        idx = vocab.index.get(item)
        if idx is None:
            continue
        for j, name in enumerate(list(dict.fromkeys(names))[:max_categories]):
            cats[idx, j] = cat_vocab.setdefault(str(name), len(cat_vocab) + 1)
    price_bucket = np.zeros(n + 1, dtype=np.int64)
    edges: list[float] = []
    known = {vocab.index[i]: float(p) for i, p in (prices or {}).items() if i in vocab.index}
    if known:
        values = np.array(list(known.values()))
        edges = np.unique(np.quantile(values, np.linspace(0, 1, price_buckets + 1)[1:-1])).tolist()
        rows = np.array(list(known.keys()))
        price_bucket[rows] = 1 + np.searchsorted(edges, values, side="right")
    return ItemSide(pop, cats, price_bucket), cat_vocab, edges


@dataclass(frozen=True, slots=True)
class RerankInputs:
    """One batch for the network; all tensors on the model's device.

    seq_items, seq_types: (B, L) int64, left-padded, 0 = padding.
    cand_items: (B, C) int64 vocabulary indices, 0 = invalid candidate.
    retrieval: (B, C) float32 retrieval scores (ignored where cand_items == 0).
    covisit: (B, C) float32 unweighted co-visitation boosts, or None (read as zeros).
    """

    seq_items: torch.Tensor
    seq_types: torch.Tensor
    cand_items: torch.Tensor
    retrieval: torch.Tensor
    covisit: torch.Tensor | None = None

    def to(self, device: torch.device) -> RerankInputs:
        return RerankInputs(
            self.seq_items.to(device),
            self.seq_types.to(device),
            self.cand_items.to(device),
            self.retrieval.to(device),
            self.covisit.to(device) if self.covisit is not None else None,
        )


def check_inputs(x: RerankInputs) -> None:
    """Shape/dtype contract of :class:`RerankInputs`; errors name what arrived."""
    b = x.cand_items.shape[0] if x.cand_items.ndim == 2 else -1
    if x.cand_items.ndim != 2 or x.retrieval.shape != x.cand_items.shape:
        raise ValueError(
            f"{STAGE}: expected cand_items and retrieval (B, C), got "
            f"{tuple(x.cand_items.shape)} and {tuple(x.retrieval.shape)}"
        )
    if x.covisit is not None and x.covisit.shape != x.cand_items.shape:
        raise ValueError(
            f"{STAGE}: expected covisit boosts {tuple(x.cand_items.shape)}, got "
            f"{tuple(x.covisit.shape)}"
        )
    if x.seq_items.ndim != 2 or x.seq_items.shape[0] != b or x.seq_types.shape != x.seq_items.shape:
        raise ValueError(
            f"{STAGE}: expected seq_items and seq_types ({b}, L), got "
            f"{tuple(x.seq_items.shape)} and {tuple(x.seq_types.shape)}"
        )


def _log2_bucket(x: torch.Tensor, n: int) -> torch.Tensor:
    """1 + floor(log2(1 + x)) capped at ``n - 1`` (0 is kept for 'absent')."""
    return (1 + torch.floor(torch.log2(1.0 + x.float()))).clamp(max=n - 1).long()


class _Attn(nn.Module):
    """Pre-LN multi-head attention with a residual, queries from ``x``, keys/values from ``kv``."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.ln_q = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, kv: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x (B, Q, D), kv (B, K, D) already normalised, mask (B, 1, Q|1, K) bool (True = see)."""
        b, q_len, d = x.shape
        h = d // self.heads
        q = self.q(self.ln_q(x)).view(b, q_len, self.heads, h).transpose(1, 2)
        k, v = self.kv(kv).view(b, kv.shape[1], 2, self.heads, h).permute(2, 0, 3, 1, 4)
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return x + self.drop(self.out(att.transpose(1, 2).reshape(b, q_len, d)))


class _FFN(nn.Module):
    def __init__(self, dim: int, mult: int, dropout: float) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(dim)
        self.ff1 = nn.Linear(dim, mult * dim)
        self.ff2 = nn.Linear(mult * dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop(self.ff2(F.gelu(self.ff1(self.ln(x)))))


class _Layer(nn.Module):
    def __init__(self, cfg: RerankerConfig) -> None:
        super().__init__()
        self.self_attn = _Attn(cfg.dim, cfg.heads, cfg.dropout)
        self.ln_self = nn.LayerNorm(cfg.dim)
        self.cross_attn = _Attn(cfg.dim, cfg.heads, cfg.dropout)
        self.ffn = _FFN(cfg.dim, cfg.ffn_mult, cfg.dropout)

    def forward(
        self, x: torch.Tensor, cand_mask: torch.Tensor, seq: torch.Tensor, seq_mask: torch.Tensor
    ) -> torch.Tensor:
        x = self.self_attn(x, self.ln_self(x), cand_mask)
        x = self.cross_attn(x, seq, seq_mask)
        return self.ffn(x)


class RerankerNet(nn.Module):
    """The network. ``forward`` returns ``(scores (B, C) float32, user (B, dim) float32)``."""

    item_table: torch.Tensor  # (N + 1, item_dim) float32, frozen
    popularity: torch.Tensor  # (N + 1,) float32
    item_categories: torch.Tensor  # (N + 1, M) int64
    item_price: torch.Tensor  # (N + 1,) int64

    def __init__(self, cfg: RerankerConfig, item_table: torch.Tensor, side: ItemSide) -> None:
        super().__init__()
        n1 = cfg.num_items + 1
        if tuple(item_table.shape) != (n1, cfg.item_dim):
            raise ValueError(
                f"{STAGE}: expected item table ({n1}, {cfg.item_dim}), got "
                f"{tuple(item_table.shape)}"
            )
        if side.popularity.shape != (n1,) or side.price_bucket.shape != (n1,):
            raise ValueError(
                f"{STAGE}: expected popularity and price_bucket ({n1},), got "
                f"{side.popularity.shape} and {side.price_bucket.shape}"
            )
        if side.categories.shape != (n1, cfg.max_categories):
            raise ValueError(
                f"{STAGE}: expected categories ({n1}, {cfg.max_categories}), got "
                f"{side.categories.shape}"
            )
        self.cfg = cfg
        d = cfg.dim
        # Frozen copies: the reranker must see the exact vectors the retriever scored with.
        self.register_buffer("item_table", item_table.detach().float().clone())
        self.register_buffer("popularity", torch.as_tensor(side.popularity, dtype=torch.float32))
        self.register_buffer("item_categories", torch.as_tensor(side.categories, dtype=torch.long))
        self.register_buffer("item_price", torch.as_tensor(side.price_bucket, dtype=torch.long))
        self.item_proj = nn.Linear(cfg.item_dim, d)
        self.type_emb = nn.Embedding(len(EVENT_TYPES) + 1, d, padding_idx=0)
        self.pos_emb = nn.Embedding(cfg.max_len + 1, d)
        self.null_token = nn.Parameter(torch.zeros(1, 1, d))
        self.seq_ln = nn.LayerNorm(d)
        self.seq_attn = _Attn(d, cfg.heads, cfg.dropout)
        self.seq_ffn = _FFN(d, cfg.ffn_mult, cfg.dropout)
        self.seq_out_ln = nn.LayerNorm(d)
        self.rank_emb = nn.Embedding(cfg.rank_buckets, d, padding_idx=0)
        self.recency_emb = nn.Embedding(cfg.recency_buckets, d, padding_idx=0)
        self.hist_type_emb = nn.Embedding(len(EVENT_TYPES) + 1, d, padding_idx=0)
        self.numeric = nn.Linear(N_NUMERIC, d)
        self.cat_emb = (
            nn.Embedding(cfg.n_categories + 1, d, padding_idx=0) if cfg.n_categories else None
        )
        self.price_emb = (
            nn.Embedding(cfg.price_buckets + 1, d, padding_idx=0) if cfg.price_buckets else None
        )
        # Boost and has-boost flag; only in a reranker trained with the table.
        self.covisit_proj = nn.Linear(2, d) if cfg.covisit else None
        self.cand_ln = nn.LayerNorm(d)
        self.drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(_Layer(cfg) for _ in range(cfg.layers))
        self.out_ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, 1)
        self.alpha = nn.Parameter(torch.ones(()))
        self.pool_query = nn.Parameter(torch.zeros(d))
        self.type_head = nn.Linear(d, len(EVENT_TYPES))
        self.purchase_head = nn.Linear(d, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self._proj_table: torch.Tensor | None = None
        self._proj_key: tuple[int, int, int] | None = None
        self._tok_table: torch.Tensor | None = None
        self._tok_key: tuple[int, ...] | None = None

    def item_vectors(self, items: torch.Tensor) -> torch.Tensor:
        """``(..., dim)`` projected item embeddings for vocabulary indices ``items (...)``.

        Serving (inference mode) projects the whole table once and gathers, which costs
        N rows instead of B * C per batch; the cache is keyed on the projection's version
        counters so a later optimiser step invalidates it. Training gathers first so memory
        and time scale with the batch, not the catalogue.
        """
        if not torch.is_inference_mode_enabled():
            return self.item_proj(self.item_table[items])
        key = (
            self.item_proj.weight._version,
            self.item_proj.bias._version,
            self.item_table._version,
        )
        if self._proj_key != key or self._proj_table is None:
            self._proj_table = self.item_proj(self.item_table)
            self._proj_key = key
        return self._proj_table[items]

    def _static_tokens(self, items: torch.Tensor) -> torch.Tensor:
        """``(..., dim)``: the part of a candidate token that depends on the item alone
        (projected vector, popularity, categories, price)."""
        tok = self.item_proj(self.item_table[items])
        tok = tok + self.popularity[items][..., None] * self.numeric.weight[:, _POPULARITY]
        if self.cat_emb is not None:
            cats = self.item_categories[items]  # (..., M)
            n_cats = (cats > 0).sum(dim=-1, keepdim=True).clamp(min=1)
            tok = tok + self.cat_emb(cats).sum(dim=-2) / n_cats
        if self.price_emb is not None:
            tok = tok + self.price_emb(self.item_price[items])
        return tok

    def item_tokens(self, items: torch.Tensor) -> torch.Tensor:
        """``(..., dim)`` static candidate tokens; cached per weight version when serving,
        like :meth:`item_vectors` (one gather per candidate instead of four)."""
        if not torch.is_inference_mode_enabled():
            return self._static_tokens(items)
        parts = [self.item_table, self.popularity, self.item_proj.weight, self.item_proj.bias]
        parts += [self.numeric.weight]
        parts += [m.weight for m in (self.cat_emb, self.price_emb) if m is not None]
        key = tuple(t._version for t in parts)
        if self._tok_key != key or self._tok_table is None:
            all_items = torch.arange(self.item_table.shape[0], device=self.item_table.device)
            self._tok_table = self._static_tokens(all_items)
            self._tok_key = key
        return self._tok_table[items]

    def sequence(self, seq_items: torch.Tensor, seq_types: torch.Tensor) -> torch.Tensor:
        """``(B, L + 1, dim)`` sequence keys: a null token then the (normalised) history."""
        b, t = seq_items.shape
        if t > self.cfg.max_len:
            raise ValueError(
                f"{STAGE}: expected at most max_len={self.cfg.max_len} history steps, got {t}"
            )
        pos = torch.arange(t - 1, -1, -1, device=seq_items.device) + 1
        s = self.item_vectors(seq_items) + self.type_emb(seq_types)
        s = s + self.pos_emb(pos)
        s = torch.cat([self.null_token.expand(b, 1, -1), s], dim=1)
        mask = self._seq_mask(seq_items)
        s = self.seq_ffn(self.seq_attn(s, self.seq_ln(s), mask))
        return self.seq_out_ln(s)

    @staticmethod
    def _seq_mask(seq_items: torch.Tensor) -> torch.Tensor:
        """``(B, 1, 1, L + 1) bool``: the null token and the real history steps."""
        null = torch.ones_like(seq_items[:, :1], dtype=torch.bool)
        return torch.cat([null, seq_items > 0], dim=1)[:, None, None, :]

    def user(self, seq: torch.Tensor, seq_items: torch.Tensor) -> torch.Tensor:
        """``(B, dim)``: attention pooling of the sequence keys with a learned query."""
        logits = seq @ self.pool_query / math.sqrt(self.cfg.dim)  # (B, L + 1)
        logits = logits.masked_fill(~self._seq_mask(seq_items)[:, 0, 0], -torch.inf)
        return (logits.softmax(dim=1)[:, :, None] * seq).sum(dim=1)

    def candidates(self, x: RerankInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """Candidate tokens ``(B, C, dim)`` and standardised retrieval scores ``(B, C)``."""
        cand, valid = x.cand_items, x.cand_items > 0
        n_valid = valid.sum(dim=1, keepdim=True).clamp(min=1)
        retr = torch.where(
            valid, x.retrieval.float(), torch.zeros_like(x.retrieval, dtype=torch.float32)
        )
        mean = retr.sum(dim=1, keepdim=True) / n_valid
        var = (torch.where(valid, retr - mean, torch.zeros_like(retr)) ** 2).sum(1, True) / n_valid
        z = torch.where(valid, (retr - mean) / (var.sqrt() + 1e-6), torch.zeros_like(retr))
        best = torch.where(valid, retr, torch.full_like(retr, -torch.inf)).amax(1, keepdim=True)
        gap = torch.where(valid, retr - best.clamp(min=-1e30), torch.zeros_like(retr))
        # Rank among valid candidates by retrieval score (candidates may arrive unsorted).
        order = torch.where(valid, retr, torch.full_like(retr, -torch.inf)).argsort(1, True)
        rank = torch.empty_like(order)
        rank.scatter_(1, order, torch.arange(cand.shape[1], device=cand.device).expand_as(order))
        rank_b = torch.where(valid, _log2_bucket(rank, self.cfg.rank_buckets), 0)
        # History match: (B, C, L); the newest matching step decides recency and event type.
        seq = x.seq_items
        t = seq.shape[1]
        # Padding (0) in the history becomes -1 so it never matches a padded candidate (0).
        match = cand[:, :, None] == seq.masked_fill(seq == 0, -1)[:, None, :]
        steps = torch.arange(1, t + 1, device=cand.device, dtype=torch.int32)
        last = torch.where(match, steps, 0).amax(dim=2).long()  # 1-based; 0 = not in history
        seen = last > 0
        idx = (last - 1).clamp(min=0)
        hist_type = torch.where(seen, x.seq_types.gather(1, idx), 0)
        recency = torch.where(seen, _log2_bucket(t - last, self.cfg.recency_buckets), 0)
        count = match.sum(dim=2).float()
        dynamic = torch.stack([z, gap.clamp(min=-20.0), torch.log1p(count), seen.float()], dim=2)
        tok = self.item_tokens(cand) + F.linear(
            dynamic, self.numeric.weight[:, _DYNAMIC], self.numeric.bias
        )
        tok = tok + self.rank_emb(rank_b) + self.recency_emb(recency)
        tok = tok + self.hist_type_emb(hist_type)
        if self.covisit_proj is not None and x.covisit is not None:
            boost = torch.where(valid, x.covisit.float(), torch.zeros_like(retr))
            tok = tok + self.covisit_proj(torch.stack([boost, (boost > 0).float()], dim=2))
        elif self.covisit_proj is not None:
            tok = tok + self.covisit_proj.bias
        return self.drop(self.cand_ln(tok)), z

    def forward(self, x: RerankInputs) -> tuple[torch.Tensor, torch.Tensor]:
        check_inputs(x)
        seq = self.sequence(x.seq_items, x.seq_types)
        seq_mask = self._seq_mask(x.seq_items)
        tok, z = self.candidates(x)
        valid = x.cand_items > 0
        # Key mask (B, 1, 1, C), broadcast over queries instead of a (B, 1, C, C) tensor; a row
        # with no valid candidate lets every key through so its softmax stays finite.
        cand_mask = (valid | ~valid.any(dim=1, keepdim=True))[:, None, None, :]
        for layer in self.layers:
            tok = layer(tok, cand_mask, seq, seq_mask)
        scores = self.head(self.out_ln(tok)).squeeze(-1) + self.alpha * z
        return scores, self.user(seq, x.seq_items)

    def next_action_logits(self, user: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, n_types)`` event-type logits and ``(B,)`` purchase logit from ``user``."""
        return self.type_head(user), self.purchase_head(user).squeeze(-1)


def listwise_loss(
    scores: torch.Tensor, cand_items: torch.Tensor, target: torch.Tensor
) -> torch.Tensor:
    """Softmax cross-entropy over the valid candidates; ``target (B,) int64`` positions."""
    logits = scores.masked_fill(cand_items <= 0, -torch.inf)
    return F.cross_entropy(logits, target)


class TransformerReranker:
    """Serving wrapper: ``serving.pipeline.Reranker`` over the trained :class:`RerankerNet`.

    ``item_ids`` is the encoder vocabulary the network is indexed by (``items.json``).
    """

    def __init__(
        self,
        net: RerankerNet,
        item_ids: Sequence[str],
        *,
        version: str = "",
        meta: dict[str, object] | None = None,
        device: str | torch.device = "cpu",
        temperature: float = 1.0,
        slate: dict[str, Any] | None = None,
    ) -> None:
        """``temperature``: calibrated temperature of the scores; ``slate``: the diversity
        weight chosen on validation for them (both ``serving.calibration``)."""
        if len(item_ids) != net.cfg.num_items:
            raise ValueError(
                f"{STAGE}: expected {net.cfg.num_items} item ids for the reranker, "
                f"got {len(item_ids)}"
            )
        self.device = torch.device(device)
        self.net = net.eval().to(self.device)
        self.vocab = ItemVocab(item_ids)
        self.version = version
        self.meta = dict(meta or {})
        self.temperature = temperature
        self.slate = dict(slate or {})
        self._row_ids: np.ndarray | None = None
        self._row_map = np.zeros(0, dtype=np.int64)

    @property
    def cfg(self) -> RerankerConfig:
        return self.net.cfg

    @property
    def trained_candidates(self) -> int | None:
        """Retrieval candidates per case it was trained on (``RerankTrainConfig.candidates``),
        None when the artifact does not say."""
        train = self.meta.get("train")
        value = train.get("candidates") if isinstance(train, dict) else None
        return int(value) if isinstance(value, int) and value > 0 else None

    def slate_weight(self, ordering: str) -> float | None:
        """Diversity weight chosen on validation for ``ordering`` over these scores; None when
        none was."""
        return slate_weight_of({"slate": self.slate}, ordering)

    def _vocab_rows(self, row_ids: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """(B, C) index rows -> vocabulary indices (0 = padding or unknown item).

        Index rows never change their id once assigned, so the map for one ``row_ids`` array
        is extended, not rebuilt, when the index grows.
        """
        if row_ids is not self._row_ids:
            self._row_ids, self._row_map = row_ids, np.zeros(0, dtype=np.int64)
        need = min(int(rows.max(initial=-1)) + 1, len(row_ids))
        have = len(self._row_map)
        if need > have:
            index = self.vocab.index
            extra = np.fromiter(
                (index.get(i, 0) if isinstance(i, str) else 0 for i in row_ids[have:need]),
                dtype=np.int64,
                count=need - have,
            )
            self._row_map = np.concatenate([self._row_map, extra])
        ok = (rows >= 0) & (rows < len(self._row_map))
        return (
            np.where(ok, self._row_map[np.where(ok, rows, 0)], 0)
            if len(self._row_map)
            else (np.zeros(rows.shape, dtype=np.int64))
        )

    def sequences(self, requests: Sequence[SlateRequest]) -> tuple[np.ndarray, np.ndarray]:
        """``(B, L) int64`` items and types, left-padded, the newest known steps."""
        b, t = len(requests), self.cfg.max_len
        items = np.zeros((b, t), dtype=np.int64)
        types = np.zeros((b, t), dtype=np.int64)
        index = self.vocab.index
        for r, req in enumerate(requests):
            hist = req.history
            n = len(hist)
            it = np.fromiter((index.get(s.item, 0) for s in hist), np.int64, n)
            ty = np.fromiter((EVENT_TYPE_ID.get(s.type, 0) for s in hist), np.int64, n)
            f = sequence_features(it, ty, None, t)
            k = len(f)
            if k:
                items[r, t - k :], types[r, t - k :] = f.items, f.types
        return items, types

    def inputs(self, requests: Sequence[SlateRequest], candidates: Candidates) -> RerankInputs:
        """Model inputs for a pipeline batch; checks the batch shapes first."""
        rows = np.asarray(candidates.rows)
        retr = np.asarray(candidates.retrieval_scores)
        if rows.ndim != 2 or retr.shape != rows.shape or len(rows) != len(requests):
            raise ValueError(
                f"{STAGE}: expected candidate rows and retrieval scores ({len(requests)}, C), "
                f"got {rows.shape} and {retr.shape}"
            )
        cand = self._vocab_rows(np.asarray(candidates.row_ids), rows)
        cand = np.where(np.isfinite(retr), cand, 0)
        seq_items, seq_types = self.sequences(requests)
        boost = candidates.covisit
        if boost is not None and np.shape(boost) != rows.shape:
            raise ValueError(
                f"{STAGE}: expected co-visitation boosts {rows.shape}, got {np.shape(boost)}"
            )
        return RerankInputs(
            torch.from_numpy(seq_items),
            torch.from_numpy(seq_types),
            torch.from_numpy(cand),
            torch.from_numpy(np.where(cand > 0, retr, 0.0).astype(np.float32)),
            torch.from_numpy(np.where(cand > 0, boost, 0.0).astype(np.float32))
            if boost is not None and self.cfg.covisit
            else None,
        ).to(self.device)

    @torch.inference_mode()
    def score(self, requests: Sequence[SlateRequest], candidates: Candidates) -> np.ndarray:
        """``(B, C) float32`` rerank scores; invalid candidates (rows == -1) get -inf.

        Candidates the reranker's vocabulary lacks (items added to the index after training)
        keep their retrieval score shifted below every known candidate's rerank score, so
        they stay rankable without the network guessing about them.
        """
        x = self.inputs(requests, candidates)
        scores = self.net(x)[0].float().cpu().numpy()
        rows = np.asarray(candidates.rows)
        retr = np.asarray(candidates.retrieval_scores, dtype=np.float32)
        known = x.cand_items.cpu().numpy() > 0
        unknown = (rows >= 0) & ~known & np.isfinite(retr)
        if unknown.any():
            scores = np.where(unknown, below_scored(np.where(known, scores, np.inf), retr), scores)
        return np.where(rows >= 0, scores, -np.inf).astype(np.float32)

    @torch.inference_mode()
    def next_action(self, requests: Sequence[SlateRequest]) -> np.ndarray:
        """``(B, len(EVENT_TYPES)) float32`` probabilities of the user's next event type."""
        return self.next_action_and_purchase(requests)[0]

    @torch.inference_mode()
    def next_action_and_purchase(
        self, requests: Sequence[SlateRequest]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Next event-type probabilities ``(B, n_types)`` and purchase propensity ``(B,)``.

        Meaningful only when ``cfg.next_action`` (the training log had several event types);
        otherwise the head is untrained and the caller should ignore it.
        """
        items, types = self.sequences(requests)
        si = torch.from_numpy(items).to(self.device)
        seq = self.net.sequence(si, torch.from_numpy(types).to(self.device))
        type_logits, buy = self.net.next_action_logits(self.net.user(seq, si))
        return (
            type_logits.softmax(dim=1).float().cpu().numpy(),
            torch.sigmoid(buy).float().cpu().numpy(),
        )


def save_reranker(
    model: TransformerReranker, directory: Path | str, *, metrics: dict[str, object] | None = None
) -> str:
    """Write ``reranker.safetensors`` + ``reranker.json`` into the encoder's model directory.

    Returns the reranker version (weights digest + UTC stamp).
    """
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.net.state_dict().items()}
    save_file(tensors, str(out / WEIGHTS))
    digest = hashlib.sha256((out / WEIGHTS).read_bytes()).hexdigest()[:12]
    version = f"rr-{digest}-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}"
    config = {
        "format_version": FORMAT_VERSION,
        "version": version,
        "created_at": datetime.now(UTC).isoformat(),
        "model": model.cfg.to_dict(),
        "meta": model.meta,
        "metrics": dict(metrics or {}),
        "weights_sha256_12": digest,
    }
    (out / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    model.version = version
    return version


def _read_json(path: Path) -> dict[str, object]:
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RerankerError(f"{STAGE}: expected readable JSON in {path}: {exc}") from exc
    if not isinstance(raw, dict):
        raise RerankerError(f"{STAGE}: expected a JSON object in {path}, got {type(raw).__name__}")
    return raw


def load_reranker(
    directory: Path | str, device: str | torch.device = "cpu"
) -> TransformerReranker | None:
    """Load the reranker saved next to an encoder; ``None`` when the directory has none.

    Raises :class:`RerankerError` for a broken artifact or one trained on another encoder
    (``reranker.json``'s encoder_version differs from ``config.json``'s version).
    """
    path = Path(directory)
    if not (path / CONFIG).is_file() and not (path / WEIGHTS).is_file():
        return None
    config = _read_json(path / CONFIG)
    model_raw = config.get("model")
    if not isinstance(model_raw, dict):
        raise RerankerError(f"{STAGE}: expected a 'model' object in {path / CONFIG}")
    try:
        cfg = RerankerConfig.from_dict(model_raw)
    except (TypeError, ValueError) as exc:
        raise RerankerError(f"{STAGE}: expected valid settings in {path / CONFIG}: {exc}") from exc
    items = (
        json.loads((path / "items.json").read_text()) if (path / "items.json").is_file() else None
    )
    if not isinstance(items, list) or len(items) != cfg.num_items:
        got = len(items) if isinstance(items, list) else "no items.json"
        raise RerankerError(
            f"{STAGE}: expected items.json with {cfg.num_items} ids in {path}, got {got}"
        )
    if (path / "config.json").is_file() and cfg.encoder_version:
        enc_version = _read_json(path / "config.json").get("version")
        if enc_version != cfg.encoder_version:
            raise RerankerError(
                f"{STAGE}: expected a reranker trained on encoder {enc_version}, got one "
                f"trained on {cfg.encoder_version}; retrain it with `streamrec train-reranker`"
            )
    try:
        state = load_file(str(path / WEIGHTS))
    except (SafetensorError, OSError, ValueError) as exc:
        raise RerankerError(
            f"{STAGE}: expected readable safetensors in {path / WEIGHTS}: {exc}"
        ) from exc
    n1 = cfg.num_items + 1
    side = ItemSide(
        np.zeros(n1, np.float32),
        np.zeros((n1, cfg.max_categories), np.int64),
        np.zeros(n1, np.int64),
    )
    net = RerankerNet(cfg, torch.zeros(n1, cfg.item_dim), side)
    try:
        net.load_state_dict(state)
    except RuntimeError as exc:
        raise RerankerError(
            f"{STAGE}: expected weights matching {CONFIG} in {path / WEIGHTS}: {exc}"
        ) from exc
    meta = config.get("meta")
    return TransformerReranker(
        net,
        [str(i) for i in items],
        version=str(config.get("version", "")),
        meta=meta if isinstance(meta, dict) else {},
        device=device,
        temperature=temperature_of(config),
        slate=slate if isinstance(slate := config.get("slate"), dict) else None,
    )


# ---------------------------------------------------------------------------------------------
# Training on logged retrieval candidates

MISS = 1_000_000  # rank given to a target outside the candidate set


@dataclass(frozen=True)
class RerankTrainConfig:
    """Optimisation and candidate-logging settings (model shape lives in RerankerConfig)."""

    candidates: int = 100  # C retrieved per training/validation case
    prefixes: int = 10  # newest training positions per user used as training cases (0: none)
    epochs: int = 30
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 1e-4
    patience: int = 3  # epochs without a better validation NDCG@10
    action_weight: float = 0.2  # weight of the next-action losses
    # Drop candidates already in the input history from every training and validation case,
    # for a pipeline that filters them (``filter_seen``) before it reranks.
    filter_seen: bool = False
    seed: int = 42
    progress: bool = False

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class LoggedCandidates:
    """Retrieval candidates logged for ``n`` cases.

    seq_items, seq_types: (n, L) int64 left-padded reranker inputs.
    cand: (n, C) int64 vocabulary indices, best retrieval score first; retrieval: (n, C) float32.
    target_pos: (n,) int64 position of the true next item in ``cand``, -1 when retrieval missed.
    next_type: (n,) int64 index into EVENT_TYPES of the next event (-1 unknown).
    purchase: (n,) float32 1.0 when a purchase follows within the horizon.
    covisit: (n, C) float32 unweighted co-visitation boost of each candidate (0 without a table).
    """

    seq_items: np.ndarray
    seq_types: np.ndarray
    cand: np.ndarray
    retrieval: np.ndarray
    target_pos: np.ndarray
    next_type: np.ndarray
    purchase: np.ndarray
    covisit: np.ndarray

    def __len__(self) -> int:
        return len(self.cand)

    def take(self, idx: np.ndarray) -> LoggedCandidates:
        return LoggedCandidates(*(getattr(self, f.name)[idx] for f in fields(LoggedCandidates)))

    def inputs(self, idx: np.ndarray, device: torch.device) -> RerankInputs:
        return RerankInputs(
            torch.from_numpy(self.seq_items[idx]),
            torch.from_numpy(self.seq_types[idx]),
            torch.from_numpy(self.cand[idx]),
            torch.from_numpy(self.retrieval[idx]),
            torch.from_numpy(self.covisit[idx]),
        ).to(device)


class EncoderLike(Protocol):
    """What candidate logging needs from a loaded encoder (``LoadedEncoder`` has it)."""

    model: SequenceEncoder
    vocab: ItemVocab
    device: torch.device

    @property
    def max_len(self) -> int: ...

    @property
    def version(self) -> str: ...


@torch.inference_mode()
def log_candidates(
    encoder: EncoderLike,
    log_: EncodedLog,
    cases: Sequence[tuple[int, int]],
    *,
    candidates: int,
    seq_len: int,
    horizon: int = 5,
    stop: Sequence[int] | None = None,
    batch_size: int = 1024,
    covisit: CoVisitation | None = None,
    counted_to: Sequence[int] | None = None,
    table_index: np.ndarray | None = None,
    affinity: Affinity | None = None,
) -> LoggedCandidates:
    """Run the encoder over ``(user, cut)`` prefixes and keep its top-``candidates`` items.

    The case predicts ``items[user][cut]`` from steps ``[0, cut)``. ``stop[user]`` bounds the
    purchase-horizon look-ahead (the training cut, so labels never peek at held-out steps).

    ``covisit`` (a table with a weight > 0): candidates are the top of ``encoder score +
    weight * boost`` over the whole catalogue, ``retrieval`` holds that sum and ``covisit`` the
    unweighted boost, as the pipeline's covisit stage hands them to the reranker.
    ``counted_to[user]``: the table counted that user's steps ``[0, counted_to[user])``, so the
    pairs whose second item is at or after the cut (the future the case predicts, its own
    target first) are taken out of its boosts (:func:`own_future_pairs`). ``table_index``
    maps ``encoder``'s item indices to the table's when they differ (a cross-fitted encoder
    reading the serving model's table; 0 = an item the table does not know). ``affinity``
    (weight > 0) adds ``weight * affinity`` to the scores as the pipeline does without a
    reranker (``serving.affinity``).
    """
    if affinity is not None and table_index is not None:
        raise ValueError(f"{STAGE}: expected no affinity with a table_index (cross-fitting)")
    near = affinity.booster() if affinity is not None and affinity.weight > 0 else None
    if not cases:
        raise ValueError(f"{STAGE}: expected at least one (user, cut) case to log, got none")
    model = encoder.model.eval()
    table = model.item_table().detach()
    n_items = table.shape[0] - 1
    if candidates < 1 or candidates > n_items:
        raise ValueError(
            f"{STAGE}: expected 1 <= candidates <= {n_items} catalogue items, got {candidates}"
        )
    n = len(cases)
    out_cand = np.zeros((n, candidates), dtype=np.int64)
    out_retr = np.zeros((n, candidates), dtype=np.float32)
    seq_items = np.zeros((n, seq_len), dtype=np.int64)
    seq_types = np.zeros((n, seq_len), dtype=np.int64)
    target = np.zeros(n, dtype=np.int64)
    next_type = np.full(n, -1, dtype=np.int64)
    purchase = np.zeros(n, dtype=np.float32)
    buy = EVENT_TYPE_ID["purchase"]
    enc_inputs = []
    for j, (u, cut) in enumerate(cases):
        enc_inputs.append(log_.prefix(u, cut, encoder.max_len))
        f = log_.prefix(u, cut, seq_len)
        k = len(f)
        if k:
            seq_items[j, seq_len - k :], seq_types[j, seq_len - k :] = f.items, f.types
        target[j] = log_.items[u][cut]
        t = int(log_.types[u][cut])
        next_type[j] = t - 1 if t > 0 else -1
        end = min(cut + horizon, stop[u] if stop is not None else len(log_.items[u]))
        purchase[j] = float((log_.types[u][cut : max(end, cut + 1)] == buy).any())
    out_boost = np.zeros((n, candidates), dtype=np.float32)
    if covisit is not None and covisit.config.weight <= 0:
        covisit = None
    order = np.argsort([len(f) for f in enc_inputs], kind="stable")
    for start in range(0, n, batch_size):
        idx = order[start : start + batch_size]
        batch = collate([enc_inputs[i] for i in idx]).to(table.device)
        scores = model.user_vectors(batch) @ table.T
        boost = None
        if covisit is not None:
            recent = recent_items(batch.items, covisit.config.lookback)
            if table_index is not None:
                recent = table_index[recent]
            dense = covisit.dense_boost(recent)
            if counted_to is not None:
                for row, i in enumerate(idx.tolist()):
                    u, cut = cases[i]
                    items = log_.items[u] if table_index is None else table_index[log_.items[u]]
                    _take_out(covisit, dense[row], recent[row], items, cut, counted_to[u])
            if table_index is not None:
                dense = dense[:, table_index]
                dense[:, 0] = 0.0
            boost = torch.from_numpy(np.ascontiguousarray(dense)).to(scores.device)
            scores = scores + covisit.config.weight * boost
        if near is not None:
            scores = scores + near(batch.items)
        scores[:, 0] = -torch.inf
        top = scores.topk(candidates, dim=1)
        out_cand[idx] = top.indices.cpu().numpy()
        out_retr[idx] = top.values.float().cpu().numpy()
        if boost is not None:
            out_boost[idx] = boost.gather(1, top.indices).cpu().numpy()
    hit = out_cand == target[:, None]
    pos = np.where(hit.any(axis=1) & (target > 0), hit.argmax(axis=1), -1)
    return LoggedCandidates(
        seq_items,
        seq_types,
        out_cand,
        out_retr,
        pos.astype(np.int64),
        next_type,
        purchase,
        out_boost,
    )


def own_future_pairs(
    items: np.ndarray, cut: int, counted_to: int, window: int, decay: float
) -> dict[tuple[int, int], float]:
    """``{(a, b): count}`` a co-visitation table built from ``items[:counted_to]`` holds
    for pairs whose second item is at a position ``>= cut``: what the user had not done yet
    when predicting ``items[cut]``."""
    out: dict[tuple[int, int], float] = {}
    for k in range(cut, min(counted_to, len(items))):
        for d in range(1, window + 1):
            if k - d < 0:
                break
            key = (int(items[k - d]), int(items[k]))
            out[key] = out.get(key, 0.0) + decay ** (d - 1)
    return out


def _take_out(
    table: CoVisitation,
    dense: np.ndarray,
    recent: np.ndarray,
    items: np.ndarray,
    cut: int,
    counted_to: int,
) -> None:
    """Remove :func:`own_future_pairs` from one case's dense boost row (``recent``: the
    newest items it was boosted from, newest first), in place. Each touched follower's boost
    is recomputed from the reduced counts rather than corrected by a difference, so one whose
    pairs were all this user's own future is exactly 0 (a float residue would tell the
    reranker which candidate is the target)."""
    cfg = table.config
    if cut >= counted_to:
        return
    future = own_future_pairs(items, cut, counted_to, cfg.window, cfg.decay)
    newest = [int(a) for a in recent.tolist()]
    touched = sorted({b for (a, b) in future if a in newest and a > 0 and b > 0})
    if not touched:
        return
    followers = np.array(touched, dtype=np.int64)
    total = np.zeros(len(followers), dtype=np.float32)
    for j, a in enumerate(newest):
        if a <= 0:
            continue
        counts = table.lookup(np.full(len(followers), a), followers)
        own = np.array([future.get((a, b), 0.0) for b in touched], dtype=np.float32)
        total += np.float32(cfg.lookback_decay**j) * np.log1p(np.maximum(counts - own, 0.0))
    dense[followers] = total


def heldout_candidates(
    aux: EncoderLike,
    split: LeaveOneOut,
    vocab: ItemVocab,
    *,
    steps: int,
    candidates: int,
    seq_len: int,
    horizon: int = 5,
    covisit: CoVisitation | None = None,
) -> LoggedCandidates:
    """Training cases whose retrieval looks like serving: logged by a cross-fitted encoder.

    ``aux`` must be an encoder trained with the same settings on every user's training part
    minus its last ``steps`` steps (``leave_one_out`` of the training parts leaves 2 out), so the
    cases at positions ``[train_cut - steps, train_cut)`` are targets it never fitted. The
    serving encoder fitted every training prefix, so its own candidates for them are more
    accurate than its candidates for held-out steps; a reranker trained only on those learns
    to trust retrieval more than it should. Candidate and history indices are mapped to
    ``vocab`` (the serving encoder's); items ``aux`` never saw cannot be its candidates.
    ``covisit``: the serving model's table (built from the training parts, indexed by
    ``vocab``); each case reads it without its own later steps (:func:`log_candidates`), as
    a reranker trained with the table needs.
    """
    if steps < 1:
        raise ValueError(f"{STAGE}: expected held-out steps >= 1, got {steps}")
    cases = [
        (u, cut)
        for u, train_cut in enumerate(split.train_cut)
        for cut in range(max(1, train_cut - steps), train_cut)
    ]
    to_main = np.concatenate([[0], vocab.lookup(aux.vocab.ids)]).astype(np.int64)
    got = log_candidates(
        aux,
        EncodedLog(split.data, aux.vocab),
        cases,
        candidates=candidates,
        seq_len=seq_len,
        horizon=horizon,
        stop=split.train_cut,
        covisit=covisit,
        counted_to=split.train_cut,
        table_index=to_main,
    )
    main_log = EncodedLog(split.data, vocab)
    seq_items = np.zeros_like(got.seq_items)
    seq_types = np.zeros_like(got.seq_types)
    for j, (u, cut) in enumerate(cases):
        f = main_log.prefix(u, cut, seq_len)
        if len(f):
            seq_items[j, seq_len - len(f) :], seq_types[j, seq_len - len(f) :] = f.items, f.types
    return replace(got, cand=to_main[got.cand], seq_items=seq_items, seq_types=seq_types)


def model_attributes(encoder: LoadedEncoder) -> dict[str, list[str]] | None:
    """Item id -> attribute names, read back from a model trained with item attributes (its
    ``item_attrs`` table and ``attributes.json``); None for a model without them."""
    if not encoder.attribute_index:
        return None
    names = {i: n for n, i in encoder.attribute_index.items()}
    attrs: torch.Tensor = encoder.model.item_attrs  # type: ignore[assignment]
    table = attrs.cpu().numpy()  # (N + 1, max_attrs), 0 = none
    return {
        item: [names[int(a)] for a in table[row] if a > 0]
        for row, item in enumerate(encoder.vocab.ids, start=1)
    }


def cross_fitted_encoder(
    encoder: LoadedEncoder, split: LeaveOneOut, out: Path | str, *, progress: bool = False
) -> LoadedEncoder:
    """The encoder :func:`heldout_candidates` needs, trained into ``out`` with ``encoder``'s
    model and training settings (and its item attributes) on every user's training part,
    whose last two steps its own leave-one-out split holds out. A model already in ``out``
    made for this encoder is reused; one made for another encoder is an error."""
    path = Path(out)
    made_for = f"cross-fit of {encoder.version}"
    if (path / "model.safetensors").is_file():
        aux = load_model(path, device="cpu")
        if aux.config.get("dataset") != made_for:
            raise ValueError(
                f"{STAGE}: expected the cross-fitted encoder in {path} to be made for "
                f"{encoder.version}, got {aux.config.get('dataset')!r}; remove it to retrain"
            )
        return aux
    users = tuple(
        replace(
            u,
            items=u.items[:cut],
            types=u.types[:cut],
            ts_ms=u.ts_ms[:cut] if u.ts_ms is not None else None,
        )
        for u, cut in zip(split.data.users, split.train_cut, strict=True)
        if cut > 0
    )
    part = Interactions(name=f"{split.data.name}-train-part", users=users)
    raw, train_raw = encoder.config.get("model"), encoder.config.get("train")
    if not isinstance(raw, dict) or not isinstance(train_raw, dict):
        raise ValueError(
            f"{STAGE}: expected 'model' and 'train' settings in the encoder's config.json to "
            "train the cross-fitted encoder with, got none"
        )
    cfg = EncoderConfig.from_dict(
        {**raw, "num_items": len(part.item_ids()), "num_attrs": 0, "max_attrs": 0}
    )
    tcfg = TrainConfig(**{**train_raw, "progress": progress})
    log.info("training the cross-fitted encoder into %s", path)
    res, vocab, _ = train_encoder(
        leave_one_out(part), cfg, tcfg, model_attributes(encoder), int(raw.get("max_attrs") or 8)
    )
    save_model(
        res.model,
        path,
        vocab.ids,
        dataset=made_for,
        train=tcfg.to_dict(),
        attributes=res.attributes,
    )
    return load_model(path, device="cpu")


def without_seen(logged: LoggedCandidates) -> LoggedCandidates:
    """``logged`` with every candidate found in the case's history window marked invalid (0);
    a target among them is no longer retrieved (``target_pos = -1``)."""
    seq = np.where(logged.seq_items > 0, logged.seq_items, -1)
    seen = (logged.cand[:, :, None] == seq[:, None, :]).any(axis=2)
    pos = logged.target_pos
    hit_seen = (pos >= 0) & seen[np.arange(len(pos)), np.maximum(pos, 0)]
    return replace(
        logged, cand=np.where(seen, 0, logged.cand), target_pos=np.where(hit_seen, -1, pos)
    )


def training_cases(split: LeaveOneOut, prefixes: int) -> list[tuple[int, int]]:
    """The newest ``prefixes`` positions of each user's training part as (user, cut) cases."""
    if prefixes < 1:
        raise ValueError(f"{STAGE}: expected prefixes >= 1, got {prefixes}")
    return [
        (u, cut)
        for u, train_cut in enumerate(split.train_cut)
        for cut in range(max(1, train_cut - prefixes), train_cut)
    ]


@torch.inference_mode()
def score_logged(
    net: RerankerNet, logged: LoggedCandidates, *, batch_size: int = 512
) -> np.ndarray:
    """``(n, C) float32`` reranker scores of logged candidates; -inf where ``cand == 0``."""
    was = net.training
    net.eval()
    device = next(net.parameters()).device
    out = np.empty(logged.cand.shape, dtype=np.float32)
    for start in range(0, len(logged), batch_size):
        idx = np.arange(start, min(start + batch_size, len(logged)))
        out[idx] = net(logged.inputs(idx, device))[0].float().cpu().numpy()
    net.train(was)
    return np.where(logged.cand > 0, out, -np.inf).astype(np.float32)


def rerank_ranks(
    net: RerankerNet, logged: LoggedCandidates, *, batch_size: int = 512
) -> np.ndarray:
    """``(n,) int64`` 0-based rank of the target under the reranker; MISS when not retrieved."""
    scores = score_logged(net, logged, batch_size=batch_size)
    pos = logged.target_pos
    tgt = scores[np.arange(len(pos)), np.maximum(pos, 0)]
    ranks = (scores > tgt[:, None]).sum(axis=1)
    return np.where(pos >= 0, ranks, MISS).astype(np.int64)


def retrieval_ranks(logged: LoggedCandidates) -> np.ndarray:
    """``(n,)`` rank under retrieval alone (candidates are logged best first)."""
    return np.where(logged.target_pos >= 0, logged.target_pos, MISS).astype(np.int64)


@dataclass
class RerankTrainResult:
    reranker: TransformerReranker
    best_epoch: int
    valid: dict[str, dict[str, float]]  # {"retrieval": metrics, "rerank": metrics}
    train_cases: int  # logged cases with the target among the candidates (trained on)
    train_recall: float  # share of logged training cases whose target was retrieved
    seconds: float
    history: list[dict[str, float]] = field(default_factory=list)


def train_reranker(
    encoder: EncoderLike,
    split: LeaveOneOut,
    cfg: RerankTrainConfig | None = None,
    *,
    model: Mapping[str, object] | None = None,
    categories: Mapping[str, Sequence[str]] | None = None,
    prices: Mapping[str, float] | None = None,
    heldout: LoggedCandidates | None = None,
    device: str | torch.device = "cpu",
) -> RerankTrainResult:
    """Train a reranker on candidates the encoder retrieves for ``split``'s training prefixes.

    Cases whose true next item is not among the C candidates are skipped for the listwise loss
    (there is no positive to score; adding the target artificially would teach the model a
    candidate distribution it never sees when serving) but still train the next-action head.
    Early stopping watches validation NDCG@10 over the validation cases' candidates, where a
    target outside them counts as a miss. ``model`` overrides RerankerConfig fields.
    ``heldout`` (:func:`heldout_candidates`) adds cross-fitted cases; with ``cfg.prefixes == 0``
    they are the only training cases. With the table they must have been logged with it
    (``heldout_candidates(covisit=encoder.covisit)``).

    An encoder with a co-visitation table (``encoder.covisit``, weight > 0, built from the
    training steps) makes a reranker that reads it (``RerankerConfig.covisit``): every case's
    candidates come from the boosted scores, and a training case's own later steps are taken
    out of its boosts so its target's own transition is not a feature.
    """
    cfg = cfg or RerankTrainConfig()
    started = time.perf_counter()
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    dev = torch.device(device)
    vocab = encoder.vocab
    log_ = EncodedLog(split.data, vocab)
    counts = np.zeros(len(vocab) + 1, dtype=np.float64)
    for u, cut in enumerate(split.train_cut):
        np.add.at(counts, log_.items[u][:cut], 1.0)
    counts[0] = 0.0
    side, cat_vocab, edges = item_side(vocab, counts, categories=categories, prices=prices)
    types_seen = {t for u in split.data.users for t in u.types}
    table: CoVisitation | None = getattr(encoder, "covisit", None)
    if table is not None and table.config.weight <= 0:
        table = None
    overrides = dict(model or {})
    if not overrides.setdefault("covisit", table is not None):
        table = None
    elif table is None:
        raise ValueError(
            f"{STAGE}: expected an encoder with a co-visitation table for covisit=True"
        )
    rcfg = RerankerConfig(
        **{
            "num_items": len(vocab),
            "item_dim": encoder.model.cfg.dim,
            "n_categories": len(cat_vocab),
            "price_buckets": len(edges) + 1 if edges else 0,
            "next_action": len(types_seen) > 1,
            "encoder_version": encoder.version,
            **overrides,
        }  # type: ignore[arg-type]
    )
    parts = [heldout] if heldout is not None else []
    if heldout is not None and heldout.cand.shape[1] != cfg.candidates:
        raise ValueError(
            f"{STAGE}: expected held-out cases with {cfg.candidates} candidates, got "
            f"{heldout.cand.shape[1]}"
        )
    if cfg.prefixes or not parts:
        parts.insert(
            0,
            log_candidates(
                encoder,
                log_,
                training_cases(split, cfg.prefixes),
                candidates=cfg.candidates,
                seq_len=rcfg.max_len,
                horizon=rcfg.purchase_horizon,
                stop=split.train_cut,
                covisit=table,
                counted_to=split.train_cut,
            ),
        )
    if parts[-1].seq_items.shape[1] != rcfg.max_len:
        raise ValueError(
            f"{STAGE}: expected held-out cases with max_len={rcfg.max_len} history steps, got "
            f"{parts[-1].seq_items.shape[1]}"
        )
    train = LoggedCandidates(
        *(np.concatenate([getattr(x, f.name) for x in parts]) for f in fields(LoggedCandidates))
    )
    if not split.valid:
        raise ValueError(
            f"{STAGE}: expected validation cases (users with >= 3 steps) in {split.data.name}, "
            "got none"
        )
    valid = log_candidates(
        encoder,
        log_,
        [(c.user, c.cut) for c in split.valid],
        candidates=cfg.candidates,
        seq_len=rcfg.max_len,
        horizon=rcfg.purchase_horizon,
        covisit=table,
    )
    if cfg.filter_seen:
        train, valid = without_seen(train), without_seen(valid)
    listwise = np.flatnonzero(train.target_pos >= 0)
    if not len(listwise):
        raise ValueError(
            f"{STAGE}: expected some training cases with the target among the top "
            f"{cfg.candidates} candidates, got none of {len(train)}"
        )
    use = np.arange(len(train)) if rcfg.next_action else listwise
    net = RerankerNet(rcfg, encoder.model.item_table().detach().cpu(), side).to(dev)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    base = metrics_from_ranks(retrieval_ranks(valid))
    best, best_epoch, bad = -1.0, 0, 0
    best_state = copy.deepcopy(net.state_dict())
    best_metrics: dict[str, float] = {}
    history: list[dict[str, float]] = []
    for epoch in range(1, cfg.epochs + 1):
        net.train()
        total, steps = 0.0, 0
        perm = rng.permutation(use)
        for start in range(0, len(perm), cfg.batch_size):
            idx = perm[start : start + cfg.batch_size]
            scores, user = net(train.inputs(idx, dev))
            pos = train.target_pos[idx]
            hit = torch.from_numpy(pos >= 0).to(dev)
            loss = torch.zeros((), device=dev)
            if bool(hit.any()):
                loss = listwise_loss(
                    scores[hit],
                    torch.from_numpy(train.cand[idx]).to(dev)[hit],
                    torch.from_numpy(pos).to(dev)[hit],
                )
            if rcfg.next_action:
                type_logits, buy = net.next_action_logits(user)
                nt = torch.from_numpy(train.next_type[idx]).to(dev)
                loss = loss + cfg.action_weight * (
                    F.cross_entropy(type_logits, nt, ignore_index=-1)
                    + F.binary_cross_entropy_with_logits(
                        buy, torch.from_numpy(train.purchase[idx]).to(dev)
                    )
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach())
            steps += 1
        metrics = metrics_from_ranks(rerank_ranks(net, valid))
        row = {
            "epoch": float(epoch),
            "loss": total / max(steps, 1),
            "valid_ndcg10": metrics["NDCG@10"],
        }
        history.append(row)
        log.info("reranker epoch %d %s (retrieval NDCG@10 %.4f)", epoch, row, base["NDCG@10"])
        if cfg.progress:
            print(f"reranker epoch {epoch}: {row} retrieval NDCG@10={base['NDCG@10']:.4f}")
        if metrics["NDCG@10"] > best:
            best, best_epoch, bad = metrics["NDCG@10"], epoch, 0
            best_state = copy.deepcopy(net.state_dict())
            best_metrics = metrics
        else:
            bad += 1
            if bad >= cfg.patience:
                break
    net.load_state_dict(best_state)
    meta: dict[str, object] = {
        "categories": cat_vocab,
        "price_edges": edges,
        "train": cfg.to_dict(),
        "dataset": split.data.name,
        "covisit_weight": table.config.weight if table is not None else 0.0,
    }
    return RerankTrainResult(
        reranker=TransformerReranker(net.cpu(), vocab.ids, meta=meta, device="cpu"),
        best_epoch=best_epoch,
        valid={"retrieval": base, "rerank": best_metrics},
        train_cases=len(listwise),
        train_recall=float(len(listwise) / len(train)),
        seconds=round(time.perf_counter() - started, 1),
        history=history,
    )
