"""Attribute affinity: how much a candidate shares the brands and categories of the user's
newest items.

The encoder mixes an item's attributes into its vector, so a user vector leans towards the
brands they buy, but one dot product blurs "this brand" into "brands like it". Affinity keeps
the exact match. Each item's attributes (the model's ``item_attrs``: S3-Rec brand and category
ids, MovieLens genres, ``streamrec.items`` categories) form a vector ``a(i)`` weighted by
inverse document frequency (an attribute every item has says nothing) and scaled to unit
length. A user whose newest items are ``i_0`` (newest), ``i_1``, ... has the profile
``p = sum_{j < depth} decay ** j * a(i_j)``, and candidate ``b`` gets

    affinity(b) = p . a(b)          (in [0, sum_j decay ** j])

The ranking score becomes ``encoder score + covisit weight * boost + weight * affinity(b)``.
``weight`` is chosen on validation together with the co-visitation weight
(:func:`serving.covisit.fit_covisit`) and stored with the model (0 = off). It serves where the
scores a slate is ordered by are the retrieval scores; a Transformer reranker reads the
candidates' categories itself, so the worker leaves affinity off under one.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch

from serving.covisit import recent_items
from serving.evaluate import Booster

STAGE = "affinity"
#: Weights tried on validation (0 = off), crossed with the co-visitation grid.
WEIGHT_GRID: tuple[float, ...] = (0.0, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0)


@dataclass(frozen=True, slots=True)
class AffinityConfig:
    """How many newest items form the profile (``depth``), how fast older ones fade
    (``decay``), and the weight of the score."""

    depth: int = 5
    decay: float = 0.7
    weight: float = 0.0

    def __post_init__(self) -> None:
        if self.depth < 1 or not 0.0 < self.decay <= 1.0 or self.weight < 0.0:
            raise ValueError(
                f"{STAGE}: expected depth >= 1, decay in (0, 1] and weight >= 0, got {self}"
            )

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: Mapping[str, object]) -> AffinityConfig:
        unknown = set(raw) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"{STAGE}: unknown settings {sorted(unknown)}")
        return cls(**raw)  # type: ignore[arg-type]


class Affinity:
    """Attribute affinity over model item indices ``1..N`` (0 = padding/unknown)."""

    def __init__(self, attrs: np.ndarray, config: AffinityConfig) -> None:
        """``attrs``: ``(N + 1, M) int64`` distinct attribute indices per item, 0 = none (the
        encoder's ``item_attrs``, ``serving.data.attribute_table``)."""
        attrs = np.asarray(attrs, dtype=np.int64)
        if attrs.ndim != 2 or len(attrs) < 1 or (attrs.size and attrs.min() < 0):
            raise ValueError(f"{STAGE}: expected an (N + 1, M) table of indices >= 0")
        self.attrs, self.config = attrs, config
        n_attrs = int(attrs.max()) if attrs.size else 0
        has = attrs > 0
        df = np.bincount(attrs[has], minlength=n_attrs + 1).astype(np.float64)
        idf = np.log(max(len(attrs) - 1, 1) / np.maximum(df, 1.0))
        values = np.where(has, idf[attrs], 0.0)
        norm = np.sqrt((values**2).sum(axis=1, keepdims=True))
        self.values = (values / np.where(norm > 0, norm, 1.0)).astype(np.float32)
        self.num_items, self.num_attrs = len(attrs) - 1, n_attrs

    @classmethod
    def of_model(cls, model: torch.nn.Module, config: AffinityConfig) -> Affinity | None:
        """From an encoder's attribute table; None for a model without item attributes."""
        attrs = getattr(model, "item_attrs", None)
        if not isinstance(attrs, torch.Tensor) or not bool((attrs > 0).any()):
            return None
        return cls(attrs.cpu().numpy(), config)

    @property
    def weight(self) -> float:
        return self.config.weight

    def with_weight(self, weight: float) -> Affinity:
        """The same attributes read with another weight."""
        out = copy.copy(self)  # shares the arrays, which are never changed in place
        out.config = replace(self.config, weight=weight)
        return out

    def profiles(self, recent: np.ndarray) -> np.ndarray:
        """``(B, num_attrs + 1) float32`` profiles of users whose newest items are
        ``recent (B, L)``, newest first, 0-padded."""
        recent = np.clip(np.asarray(recent, dtype=np.int64), 0, self.num_items)
        out = np.zeros((len(recent), self.num_attrs + 1), dtype=np.float32)
        rows = np.repeat(np.arange(len(recent)), self.attrs.shape[1])
        for j in range(min(self.config.depth, recent.shape[1] if recent.ndim == 2 else 0)):
            item = recent[:, j]
            fade = np.float32(self.config.decay**j)
            np.add.at(out, (rows, self.attrs[item].ravel()), fade * self.values[item].ravel())
        out[:, 0] = 0.0
        return out

    def boost(self, recent: np.ndarray, items: np.ndarray) -> np.ndarray:
        """``(B, C) float32`` unweighted affinity of ``items (B, C)`` (model indices, 0 = none)."""
        items = np.clip(np.asarray(items, dtype=np.int64), 0, self.num_items)
        prof = self.profiles(recent)
        picked = np.take_along_axis(prof[:, None, :], self.attrs[items], axis=2)  # (B, C, M)
        return (picked * self.values[items]).sum(axis=2).astype(np.float32)

    def dense_boost(self, recent: np.ndarray) -> np.ndarray:
        """``(B, N + 1) float32``: :meth:`boost` of every item (evaluation)."""
        prof = self.profiles(recent)
        out = np.zeros((len(prof), self.num_items + 1), dtype=np.float32)
        for m in range(self.attrs.shape[1]):
            out += prof[:, self.attrs[:, m]] * self.values[:, m]
        return out

    def booster(self, weight: float | None = None) -> Booster:
        """For :func:`serving.evaluate.rank_targets`: left-padded item batch -> weighted
        dense affinity ``(B, N + 1)``."""
        w = np.float32(self.weight if weight is None else weight)

        def boost(items: torch.Tensor) -> torch.Tensor:
            dense = self.dense_boost(recent_items(items, self.config.depth)) * w
            return torch.from_numpy(dense).to(items.device)

        return boost

    def to_config(self) -> dict[str, float | int]:
        return self.config.to_dict()
