"""Sequential user encoder: a causal Transformer over item, event-type and time-gap embeddings.

SASRec/HSTU family. A user vector is the final hidden state at the newest step; the retrieval
score of an item is ``user_vec · item_vec`` with the item table shared between input and output
(tied embeddings), so the same vectors go into FAISS.

Inputs are left-padded ``(B, T)`` int64 batches (0 = padding). Positions (``positions``):

- ``"oldest"`` (default): 0 = the oldest step of the window. The state after step t depends on
  steps 0..t only, so the training forward computes exactly what serving computes for every
  prefix, and a user's keys/values can be cached and extended by one step per event
  (:meth:`SequenceEncoder.extend`, parity with the full forward tested).
- ``"newest"``: 0 = the newest step (the first artifacts). Every new event shifts every
  position, so there is nothing to cache.

Either way a batch padded to its own longest sequence gives exactly the user vectors of one
padded to ``max_len``.
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
POSITIONS = ("oldest", "newest")


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
    positions: str = "oldest"  # one of POSITIONS, see the module docstring
    # Item side information: an item's vector is its ID embedding plus the mean embedding of
    # up to max_attrs attributes (brand, categories) out of num_attrs; 0 = IDs only.
    num_attrs: int = 0
    max_attrs: int = 0

    def __post_init__(self) -> None:
        if self.num_items < 1:
            raise ValueError(f"{STAGE}: expected num_items >= 1, got {self.num_items}")
        if self.dim % self.heads:
            raise ValueError(
                f"{STAGE}: expected dim divisible by heads, got dim={self.dim} heads={self.heads}"
            )
        if self.max_len < 1:
            raise ValueError(f"{STAGE}: expected max_len >= 1, got {self.max_len}")
        if (self.num_attrs > 0) != (self.max_attrs > 0) or min(self.num_attrs, self.max_attrs) < 0:
            raise ValueError(
                f"{STAGE}: expected num_attrs and max_attrs both 0 or both positive, got "
                f"{self.num_attrs} and {self.max_attrs}"
            )
        if self.positions not in POSITIONS:
            raise ValueError(f"{STAGE}: expected positions in {POSITIONS}, got {self.positions!r}")

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


#: Cached keys and values of one layer: ``(k, v)``, each ``(B, H, P, D / H)`` float32.
LayerKV = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True, slots=True)
class Past:
    """What earlier steps left behind for :meth:`SequenceEncoder.extend`.

    kv: one ``LayerKV`` per block, left-padded along P; valid: ``(B, P) bool`` real steps.
    """

    kv: tuple[LayerKV, ...]
    valid: torch.Tensor

    @property
    def lengths(self) -> torch.Tensor:  # (B,) int64
        return self.valid.sum(dim=1)


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

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor,
        past: LayerKV | None = None,
        last_only: bool = False,
    ) -> tuple[torch.Tensor, LayerKV]:
        """``x (B, T, D)`` new steps, ``mask (B, 1, Tq, P + T) bool`` (True = may attend),
        ``past`` the earlier steps' keys/values ``(B, H, P, D / H)``.

        Returns the new states ``(B, T, D)`` (``(B, 1, D)`` with ``last_only``: only the newest
        query is computed) and the new steps' own keys/values ``(B, H, T, D / H)``.
        """
        b, t, d = x.shape
        h = self.ln1(x)
        q, k, v = self.qkv(h).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        own = (k, v)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        if last_only:
            q, x = q[:, :, -1:], x[:, -1:]
        att = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.attn_dropout if self.training else 0.0
        )
        x = x + self.drop(self.proj(att.transpose(1, 2).reshape(b, -1, d)))
        return x + self.drop(self.ff2(F.gelu(self.ff1(self.ln2(x))))), own


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
        self.attr_emb = (
            nn.Embedding(cfg.num_attrs + 1, cfg.dim, padding_idx=0) if cfg.num_attrs else None
        )
        # (N + 1, max_attrs) int64 attribute indices per item, 0 = none; saved with the weights.
        self.register_buffer(
            "item_attrs", torch.zeros(cfg.num_items + 1, cfg.max_attrs, dtype=torch.int64)
        )
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

    def _positions(self, items: torch.Tensor, offset: torch.Tensor | None) -> torch.Tensor:
        """``(B, T) int64`` position ids of left-padded ``items``; ``offset (B,)`` = steps the
        window already holds before these (cached encoding)."""
        t = items.shape[1]
        if self.cfg.positions == "newest":
            if offset is not None:
                raise ValueError(
                    f"{STAGE}: expected positions='oldest' for cached encoding, got 'newest'"
                )
            return torch.arange(t - 1, -1, -1, device=items.device).expand_as(items)
        pos = (items > 0).cumsum(dim=1) - 1
        if offset is not None:
            # Without a past, _embed's length check already bounds positions; only cached
            # encoding needs the (device-syncing) max, and it is not on the training path.
            pos = pos + offset[:, None]
            top = int(pos.max()) if pos.numel() else 0
            if top >= self.cfg.max_len:
                raise ValueError(
                    f"{STAGE}: expected windows of at most max_len={self.cfg.max_len} steps, "
                    f"got {top + 1}"
                )
        return pos.clamp_(min=0)

    def _embed(self, batch: Batch, offset: torch.Tensor | None = None) -> torch.Tensor:
        items = batch.items
        if offset is None and items.shape[1] > self.cfg.max_len:
            raise ValueError(
                f"{STAGE}: expected sequences of at most max_len={self.cfg.max_len}, "
                f"got {items.shape[1]}"
            )
        # Training embeds from the whole table (the loss builds it anyway); inference only
        # the batch's rows: the same values without the catalogue-wide attribute sum.
        vecs = F.embedding(items, self.item_table()) if self.training else self.item_rows(items)
        x = vecs + self.pos_emb(self._positions(items, offset))
        if self.type_emb is not None:
            x = x + self.type_emb(batch.types)
        if self.gap_emb is not None:
            x = x + self.gap_emb(batch.gaps)
        return self.emb_drop(self.emb_ln(x))

    @staticmethod
    def _mask(items: torch.Tensor, past_valid: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, 1, T, P + T) bool``: causal over the new steps, every real earlier step
        visible, padded keys hidden; a padded query sees itself only, which keeps its softmax
        finite without leaking into real positions."""
        t = items.shape[1]
        causal = torch.ones(t, t, dtype=torch.bool, device=items.device).tril()
        valid = (items > 0)[:, None, None, :]
        eye = torch.eye(t, dtype=torch.bool, device=items.device)
        new = causal & (valid | eye)
        if past_valid is None:
            return new
        old = past_valid[:, None, None, :] & valid.transpose(-1, -2)
        return torch.cat([old, new.expand(len(items), 1, t, t)], dim=-1)

    def hidden(self, batch: Batch) -> torch.Tensor:
        """``(B, T, D)`` float32: the state after each step (the training-time forward)."""
        x = self._embed(batch)
        mask = self._mask(batch.items)
        for block in self.blocks:
            x, _ = block(x, mask)
        return self.out_ln(x)

    def user_vectors(self, batch: Batch) -> torch.Tensor:
        """``(B, D)`` float32: the state after the newest step.

        The last block computes only the newest query and its FFN, which is where
        serving spends its time; parity with ``hidden(batch)[:, -1]`` is tested.
        """
        vectors, _ = self.extend(batch, None)
        return vectors

    def extend(self, batch: Batch, past: Past | None) -> tuple[torch.Tensor, tuple[LayerKV, ...]]:
        """Encode new steps ``batch (B, T)`` after the cached ``past`` steps (or none).

        Returns the user vectors after the newest step ``(B, D)`` and the new steps' keys and
        values per block (``(B, H, T, D / H)``, to append to the cache). With ``past`` from an
        earlier call on the same window this equals :meth:`user_vectors` of the whole window
        (``positions='oldest'`` only; ``tests/unit/test_encoder.py`` checks it).
        Rows whose new steps are all padding return undefined vectors.
        """
        offset = past.lengths if past is not None else None
        x = self._embed(batch, offset)
        mask = self._mask(batch.items, past.valid if past is not None else None)
        last = mask[:, :, -1:]
        own: list[LayerKV] = []
        for i, block in enumerate(self.blocks):
            kv = past.kv[i] if past is not None else None
            final = i == len(self.blocks) - 1
            x, new_kv = block(x, last if final else mask, kv, last_only=final)
            own.append(new_kv)
        return self.out_ln(x[:, 0]), tuple(own)

    def set_attributes(self, table: np.ndarray) -> None:
        """Install the ``(N + 1, max_attrs) int64`` attribute table (``data.attribute_table``)."""
        want = (self.cfg.num_items + 1, self.cfg.max_attrs)
        if table.shape != want or (
            table.size and not 0 <= table.min() <= table.max() <= self.cfg.num_attrs
        ):
            raise ValueError(
                f"{STAGE}: expected an attribute table {want} with indices in "
                f"[0, {self.cfg.num_attrs}], got {table.shape}"
            )
        attrs: torch.Tensor = self.item_attrs  # type: ignore[assignment]
        attrs.copy_(torch.from_numpy(table))

    def item_rows(self, items: torch.Tensor) -> torch.Tensor:
        """``item_table()[items]`` for int64 ``items`` of any shape, computing only those
        rows (ID embedding + mean attribute embedding)."""
        vecs = self.item_emb(items)
        if self.attr_emb is None:
            return vecs
        attrs = self.item_attrs[items]  # type: ignore[index]
        count = (attrs > 0).sum(dim=-1, keepdim=True).clamp(min=1)
        return vecs + self.attr_emb(attrs).sum(dim=-2) / count

    def item_table(self) -> torch.Tensor:
        """``(N + 1, D)`` float32 item vectors (ID embedding + mean attribute embedding);
        row 0 is padding."""
        table = self.item_emb.weight
        if self.attr_emb is None:
            return table
        attrs: torch.Tensor = self.item_attrs  # type: ignore[assignment]
        count = (attrs > 0).sum(dim=1, keepdim=True).clamp(min=1)
        return table + self.attr_emb(attrs).sum(dim=1) / count


def serving_window(events: int, max_len: int) -> int:
    """How many of a user's newest steps the stream worker encodes after ``events`` events.

    All of them up to ``max_len``; beyond, the window restarts from the newest
    ``max_len - max_len // 2 + 1`` steps and grows one step per event back to ``max_len``. A
    window that only grows is one the encoder cache extends by a single step per event (a
    full re-encode once every ``max_len // 2`` events), and it depends on the event count
    alone, so a worker that lost its cache computes the same vectors. The context is thus
    between about half and all of ``max_len`` steps for long histories.
    """
    if events <= max_len:
        return max(events, 0)
    half = max(max_len // 2, 1)
    return max_len - half + 1 + (events - max_len - 1) % half
