"""Sequential user encoder: a causal Transformer over item, event-type and time-gap embeddings.

SASRec/HSTU family. A user vector is the final hidden state at the newest step; the retrieval
score of an item is ``user_vec · item_vec`` with the item table shared between input and output
(tied embeddings), so the same vectors go into FAISS.

Inputs are left-padded ``(B, T)`` int64 batches (0 = padding). Positions count back from the
newest step (0 = newest), which makes a batch padded to its own longest sequence give exactly
the same user vectors as one padded to ``max_len``; SASRec's left-padded absolute positions
are the same thing for full-length sequences.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from serving.configs import config_from_dict, config_to_dict
from serving.data import GAP_BUCKETS, Features
from serving.types import EVENT_TYPES

STAGE = "encoder"


@dataclass(frozen=True)
class EncoderConfig:
    """Model hyperparameters; saved with every artifact."""

    num_items: int  # N; the item table has N + 1 rows, row 0 = padding
    dim: int = 64
    layers: int = 2
    heads: int = 2
    ffn_mult: int = 2  # FFN hidden = ffn_mult * dim
    max_len: int = 50
    dropout: float = 0.5  # embeddings and residual branches
    attn_dropout: float = 0.2
    use_types: bool = True
    use_time: bool = True

    def __post_init__(self) -> None:
        if self.num_items < 1:
            raise ValueError(f"{STAGE}: expected num_items >= 1, got {self.num_items}")
        if self.dim % self.heads:
            raise ValueError(
                f"{STAGE}: expected dim divisible by heads, got dim={self.dim} heads={self.heads}"
            )
        if self.max_len < 1:
            raise ValueError(f"{STAGE}: expected max_len >= 1, got {self.max_len}")

    def to_dict(self) -> dict[str, object]:
        return config_to_dict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, object]) -> EncoderConfig:
        return config_from_dict(cls, raw, STAGE)


@dataclass(frozen=True, slots=True)
class Batch:
    """Left-padded model inputs, all ``(B, T) int64``; 0 = padding."""

    items: torch.Tensor
    types: torch.Tensor
    gaps: torch.Tensor

    def to(self, device: torch.device) -> Batch:
        return Batch(
            self.items.to(device, non_blocking=True),
            self.types.to(device, non_blocking=True),
            self.gaps.to(device, non_blocking=True),
        )


def collate(seqs: Sequence[Features], length: int | None = None) -> Batch:
    """Left-pad feature sequences to ``length`` (default: the longest) into a :class:`Batch`."""
    t = max(1, max((len(s) for s in seqs), default=1)) if length is None else length
    out = np.zeros((3, len(seqs), t), dtype=np.int64)
    for b, s in enumerate(seqs):
        n = len(s)
        if n:
            out[0, b, t - n :] = s.items
            out[1, b, t - n :] = s.types
            out[2, b, t - n :] = s.gaps
    tens = torch.from_numpy(out)
    return Batch(tens[0], tens[1], tens[2])


class _Block(nn.Module):
    """Pre-LayerNorm Transformer block with causal self-attention."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.heads = cfg.heads
        self.attn_dropout = cfg.attn_dropout
        self.ln1 = nn.LayerNorm(cfg.dim)
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim)
        self.proj = nn.Linear(cfg.dim, cfg.dim)
        self.ln2 = nn.LayerNorm(cfg.dim)
        self.ff1 = nn.Linear(cfg.dim, cfg.ffn_mult * cfg.dim)
        self.ff2 = nn.Linear(cfg.ffn_mult * cfg.dim, cfg.dim)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """``x (B, T, D)``, ``mask (B, 1, Tq, T) bool`` (True = may attend).

        With ``last_only`` only the newest position is computed: returns ``(B, 1, D)``.
        """
        b, t, d = x.shape
        h = self.ln1(x)
        q, k, v = self.qkv(h).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        if last_only:
            q, x = q[:, :, -1:], x[:, -1:]
        att = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.attn_dropout if self.training else 0.0
        )
        x = x + self.drop(self.proj(att.transpose(1, 2).reshape(b, -1, d)))
        return x + self.drop(self.ff2(F.gelu(self.ff1(self.ln2(x)))))


class SequenceEncoder(nn.Module):
    """Causal Transformer user encoder with a tied item table."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.item_emb = nn.Embedding(cfg.num_items + 1, cfg.dim, padding_idx=0)
        self.pos_emb = nn.Embedding(cfg.max_len, cfg.dim)
        self.type_emb = (
            nn.Embedding(len(EVENT_TYPES) + 1, cfg.dim, padding_idx=0) if cfg.use_types else None
        )
        self.gap_emb = nn.Embedding(GAP_BUCKETS, cfg.dim, padding_idx=0) if cfg.use_time else None
        self.emb_ln = nn.LayerNorm(cfg.dim)
        self.emb_drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(_Block(cfg) for _ in range(cfg.layers))
        self.out_ln = nn.LayerNorm(cfg.dim)
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        # Small init (BERT/RecBole style) keeps the first logits near uniform, so the full
        # softmax starts at log(N) and learns fast; unit-scale init starts overconfident.
        if isinstance(m, nn.Linear | nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear):
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding) and m.padding_idx is not None:
            with torch.no_grad():
                m.weight[m.padding_idx].zero_()

    def _embed(self, batch: Batch) -> torch.Tensor:
        items = batch.items
        t = items.shape[1]
        if t > self.cfg.max_len:
            raise ValueError(
                f"{STAGE}: expected sequences of at most max_len={self.cfg.max_len}, got {t}"
            )
        pos = torch.arange(t - 1, -1, -1, device=items.device)
        x = self.item_emb(items) + self.pos_emb(pos)
        if self.type_emb is not None:
            x = x + self.type_emb(batch.types)
        if self.gap_emb is not None:
            x = x + self.gap_emb(batch.gaps)
        return self.emb_drop(self.emb_ln(x))

    @staticmethod
    def _mask(items: torch.Tensor) -> torch.Tensor:
        """``(B, 1, T, T) bool``: causal, padded keys hidden; a padded query sees itself only,
        which keeps its softmax finite without leaking into real positions."""
        t = items.shape[1]
        causal = torch.ones(t, t, dtype=torch.bool, device=items.device).tril()
        valid = (items > 0)[:, None, None, :]
        eye = torch.eye(t, dtype=torch.bool, device=items.device)
        return causal & (valid | eye)

    def hidden(self, batch: Batch) -> torch.Tensor:
        """``(B, T, D)`` float32: the state after each step (the training-time forward)."""
        x = self._embed(batch)
        mask = self._mask(batch.items)
        for block in self.blocks:
            x = block(x, mask)
        return self.out_ln(x)

    def user_vectors(self, batch: Batch) -> torch.Tensor:
        """``(B, D)`` float32: the state after the newest step.

        The last block computes only the newest query and its FFN, which is where
        serving spends its time; parity with ``hidden(batch)[:, -1]`` is tested.
        """
        x = self._embed(batch)
        mask = self._mask(batch.items)
        for block in self.blocks[:-1]:
            x = block(x, mask)
        x = self.blocks[-1](x, mask[:, :, -1:], last_only=True)
        return self.out_ln(x[:, 0])

    def item_table(self) -> torch.Tensor:
        """``(N + 1, D)`` float32 item vectors; row 0 is padding."""
        return self.item_emb.weight
