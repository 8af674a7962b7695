"""Peer reference: SASRec as published (Kang & McAuley, ICDM 2018), minimal and faithful.

Architecture of the reference implementation (kang205/SASRec, ported in pmixer/SASRec.pytorch):
item embedding scaled by sqrt(d) + learned positions, embedding dropout, padded steps zeroed;
per block ``Q = LN(x); x = Q + MHA(Q, x, x)`` with causal attention and padded keys masked,
``x = LN(x); x = x + FFN(x)`` (two position-wise linears, ReLU, dropout), padded steps zeroed
again; a final LayerNorm. Training: binary cross-entropy on the next item against ONE sampled
negative per position, Adam(lr 1e-3, betas 0.9/0.98). The paper's Beauty settings are
d=50, 2 blocks, 1 head, dropout 0.5, max_len 50, batch 128.

Positions count back from the newest step, as in :mod:`serving.encoder`; with the reference's
left padding to ``max_len`` that is the same table, indexed in reverse.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from serving.encoder import Batch


@dataclass(frozen=True)
class SASRecConfig:
    num_items: int
    dim: int = 50
    layers: int = 2
    heads: int = 1
    max_len: int = 50
    dropout: float = 0.5

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


class _Block(nn.Module):
    def __init__(self, cfg: SASRecConfig) -> None:
        super().__init__()
        self.attn_ln = nn.LayerNorm(cfg.dim, eps=1e-8)
        self.attn = nn.MultiheadAttention(cfg.dim, cfg.heads, dropout=cfg.dropout, batch_first=True)
        self.ffn_ln = nn.LayerNorm(cfg.dim, eps=1e-8)
        self.ff1 = nn.Linear(cfg.dim, cfg.dim)
        self.ff2 = nn.Linear(cfg.dim, cfg.dim)
        self.drop1 = nn.Dropout(cfg.dropout)
        self.drop2 = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        """``x (B, T, D)``; ``attn_mask (B*H, T, T) bool`` True = blocked; ``pad (B, T, 1)``."""
        q = self.attn_ln(x)
        out, _ = self.attn(q, x, x, attn_mask=attn_mask, need_weights=False)
        x = self.ffn_ln(q + out)
        x = x + self.drop2(self.ff2(self.drop1(F.relu(self.ff1(x)))))
        return x * pad


class SASRec(nn.Module):
    """SASRec; exposes ``user_vectors`` / ``item_table`` for the shared full-ranking evaluator."""

    def __init__(self, cfg: SASRecConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.item_emb = nn.Embedding(cfg.num_items + 1, cfg.dim, padding_idx=0)
        self.pos_emb = nn.Embedding(cfg.max_len, cfg.dim)
        self.emb_drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(_Block(cfg) for _ in range(cfg.layers))
        self.last_ln = nn.LayerNorm(cfg.dim, eps=1e-8)
        for name, p in self.named_parameters():
            # The reference initialises every weight matrix with Xavier (Glorot) uniform.
            if p.dim() > 1 and "ln" not in name:
                nn.init.xavier_uniform_(p)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()

    def hidden(self, batch: Batch) -> torch.Tensor:
        """``(B, T, D)``: state after every step."""
        items = batch.items
        _b, t = items.shape
        pos = torch.arange(t - 1, -1, -1, device=items.device)
        x = self.item_emb(items) * math.sqrt(self.cfg.dim) + self.pos_emb(pos)
        pad = (items > 0).unsqueeze(-1).to(x.dtype)
        x = self.emb_drop(x) * pad
        causal = torch.ones(t, t, dtype=torch.bool, device=items.device).tril()
        eye = torch.eye(t, dtype=torch.bool, device=items.device)
        allowed = causal & ((items > 0)[:, None, :] | eye)  # (B, T, T)
        blocked = (~allowed).repeat_interleave(self.cfg.heads, dim=0)
        for block in self.blocks:
            x = block(x, blocked, pad)
        return self.last_ln(x)

    def user_vectors(self, batch: Batch) -> torch.Tensor:
        """``(B, D)``: state after the newest step."""
        return self.hidden(batch)[:, -1]

    def item_table(self) -> torch.Tensor:
        """``(N + 1, D)``; row 0 = padding."""
        return self.item_emb.weight


def bce_one_negative(model: nn.Module, batch: Batch, targets: torch.Tensor) -> torch.Tensor:
    """SASRec's loss: BCE(pos) + BCE(one uniform negative not in the user's window).

    ``targets (B, T) int64`` (0 = no target). The reference draws negatives outside the user's
    whole training sequence; the window (max_len + 1 steps) is what the batch holds, and is the
    same set for all but users longer than the window.
    """
    assert isinstance(model, SASRec)
    h = model.hidden(batch)
    real = targets > 0
    n = model.cfg.num_items
    neg = torch.randint(1, n + 1, targets.shape, device=targets.device)
    seen = torch.cat([batch.items, targets], dim=1)  # (B, 2T)
    for _ in range(10):  # resample collisions; after a few rounds they are vanishingly rare
        clash = (neg[:, :, None] == seen[:, None, :]).any(-1)
        if not clash.any():
            break
        neg = torch.where(clash, torch.randint_like(neg, 1, n + 1), neg)
    table = model.item_table()
    pos_logit = (h * table[targets]).sum(-1)[real]
    neg_logit = (h * table[neg]).sum(-1)[real]
    return F.binary_cross_entropy_with_logits(
        pos_logit, torch.ones_like(pos_logit)
    ) + F.binary_cross_entropy_with_logits(neg_logit, torch.zeros_like(neg_logit))
