"""Item-to-item co-visitation: which items follow which, counted from event sequences.

The encoder compresses a user into one vector, and a dot product with it cannot say "people
who just bought *this* brush buy *that* refill next" for every pair of 12,000 items. A count
table can. ``C[a, b]`` sums, over every sequence, ``decay ** (w - 1)`` for each time ``b``
came ``w <= window`` steps after ``a``. A user whose newest items are ``a_0`` (newest),
``a_1``, ... gets for candidate ``b``

    boost(b) = sum_{j < lookback} lookback_decay ** j * log1p(C[a_j, b])

and the ranking score is ``encoder score + weight * boost(b)``. ``weight`` is chosen on the
validation split (:func:`choose_weight`; 0 switches the table off) and stored with the model.

The table is built from the training sequences (``streamrec train``, ``streamrec covisit``) and
keeps counting in the worker: every event adds its transitions (:meth:`CoVisitation.observe`),
so pairs that appear after training are recommended within a second. Storage is one sorted
``int64`` key array (``a * (N + 1) + b``) with its counts and a row pointer, so a batch gathers
each user's rows and looks its candidates up among those few hundred pairs; new counts wait
in a small dict and are merged in batches. Rows are cut to
the ``top_k`` largest counts at build time, and the table to ``max_pairs`` pairs online.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.numpy import load_file, save_file

from serving.data import EncodedLog, LeaveOneOut
from serving.evaluate import (
    Booster,
    SequenceScorer,
    case_inputs,
    metrics_from_ranks,
    rank_targets_grid,
)

if TYPE_CHECKING:
    from serving.affinity import Affinity

STAGE = "covisit"
FILE = "covisit.safetensors"
#: Weights tried on validation by :func:`choose_weight` (0 = off).
WEIGHT_GRID: tuple[float, ...] = (0.0, 0.5, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0)


class CoVisitError(RuntimeError):
    """A co-visitation table that cannot be read."""


@dataclass(frozen=True, slots=True)
class CoVisitConfig:
    """How pairs are counted (``window``, ``decay``), read (``lookback``, ``lookback_decay``),
    kept (``top_k`` per item at build time, ``max_pairs`` online) and weighed (``weight``)."""

    window: int = 3
    decay: float = 0.5
    lookback: int = 3
    lookback_decay: float = 0.5
    top_k: int = 200
    max_pairs: int = 2_000_000
    weight: float = 0.0

    def __post_init__(self) -> None:
        if self.window < 1 or self.lookback < 1 or self.top_k < 1 or self.max_pairs < 1:
            raise ValueError(
                f"{STAGE}: expected window, lookback, top_k and max_pairs >= 1, got {self}"
            )
        if not (0.0 < self.decay <= 1.0 and 0.0 < self.lookback_decay <= 1.0):
            raise ValueError(f"{STAGE}: expected decays in (0, 1], got {self}")
        if self.weight < 0.0:
            raise ValueError(f"{STAGE}: expected weight >= 0, got {self.weight}")

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: Mapping[str, object]) -> CoVisitConfig:
        names = set(cls.__dataclass_fields__)
        unknown = set(raw) - names
        if unknown:
            raise ValueError(f"{STAGE}: unknown settings {sorted(unknown)}")
        return cls(**raw)  # type: ignore[arg-type]


def _pairs(
    sequences: Iterable[np.ndarray], window: int, decay: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(a, b, weight)`` of every ordered pair at distance ``1..window``; 0 = unknown item."""
    a_parts, b_parts, w_parts = [], [], []
    for seq in sequences:
        s = np.asarray(seq, dtype=np.int64)
        for w in range(1, min(window, len(s) - 1) + 1):
            a_parts.append(s[:-w])
            b_parts.append(s[w:])
            w_parts.append(np.full(len(s) - w, decay ** (w - 1)))
    if not a_parts:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, np.zeros(0, dtype=np.float64)
    a, b, wt = np.concatenate(a_parts), np.concatenate(b_parts), np.concatenate(w_parts)
    known = (a > 0) & (b > 0)
    return a[known], b[known], wt[known]


class CoVisitation:
    """Co-visitation counts over model item indices ``1..num_items`` (0 = padding/unknown)."""

    def __init__(
        self,
        num_items: int,
        config: CoVisitConfig,
        keys: np.ndarray | None = None,
        counts: np.ndarray | None = None,
        *,
        merge_every: int = 4096,
        merge_after_s: float = 1.0,
    ) -> None:
        """``keys``: sorted distinct ``a * (num_items + 1) + b``; ``counts`` beside them."""
        self.num_items, self.config = num_items, config
        self.keys = np.zeros(0, np.int64) if keys is None else np.asarray(keys, np.int64)
        self.counts = np.zeros(0, np.float32) if counts is None else np.asarray(counts, np.float32)
        if self.keys.shape != self.counts.shape or self.keys.ndim != 1:
            raise ValueError(
                f"{STAGE}: expected keys and counts of one shape, got {self.keys.shape} and "
                f"{self.counts.shape}"
            )
        span = (num_items + 1) ** 2
        if len(self.keys) and (
            np.any(np.diff(self.keys) <= 0) or self.keys[0] < 0 or self.keys[-1] >= span
        ):
            raise ValueError(f"{STAGE}: expected sorted distinct keys below {span}")
        self.merge_every, self.merge_after_s = merge_every, merge_after_s
        self._starts = self._row_starts(self.keys)
        self._pending: dict[int, float] = {}
        self._pending_since = 0.0
        self.observed = 0  # transitions added online

    # --- building -------------------------------------------------------------------------
    @classmethod
    def build(
        cls, sequences: Iterable[np.ndarray], num_items: int, config: CoVisitConfig
    ) -> CoVisitation:
        """Count every sequence's pairs, then keep each item's ``top_k`` largest counts."""
        a, b, wt = _pairs(sequences, config.window, config.decay)
        keys, inverse = np.unique(a * (num_items + 1) + b, return_inverse=True)
        counts = np.bincount(inverse, weights=wt, minlength=len(keys))
        rows = keys // (num_items + 1)
        # Within each row, largest count first; keep the first top_k of each row.
        order = np.lexsort((-counts, rows))
        rows_sorted = rows[order]
        starts = np.searchsorted(rows_sorted, rows_sorted, side="left")
        keep = order[(np.arange(len(order)) - starts) < config.top_k]
        keep.sort()
        return cls(num_items, config, keys[keep], counts[keep].astype(np.float32))

    def _row_starts(self, keys: np.ndarray) -> np.ndarray:
        """``(N + 2,)``: row ``a``'s pairs are ``keys[starts[a]:starts[a + 1]]``."""
        span = self.num_items + 1
        return np.searchsorted(keys, np.arange(span + 1, dtype=np.int64) * span)

    def __len__(self) -> int:
        return len(self.keys)

    def with_weight(self, weight: float) -> CoVisitation:
        """The same counts read with another weight."""
        out = CoVisitation(self.num_items, replace(self.config, weight=weight))
        out.keys, out.counts, out._starts = self.keys, self.counts, self._starts
        return out

    # --- online ---------------------------------------------------------------------------
    def observe(self, before: Sequence[int], item: int) -> None:
        """Count ``item`` after the items before it (oldest first; the last ``window`` count)."""
        if item <= 0 or item > self.num_items:
            return
        span = self.num_items + 1
        recent = list(before)[-self.config.window :]
        for w, a in enumerate(reversed(recent), start=1):
            if 0 < a <= self.num_items:
                key = a * span + item
                self._pending[key] = self._pending.get(key, 0.0) + self.config.decay ** (w - 1)
                self.observed += 1
        if self._pending and not self._pending_since:
            self._pending_since = time.monotonic()

    def flush(self, force: bool = False) -> bool:
        """Merge pending counts once there are ``merge_every`` of them or the oldest waited
        ``merge_after_s`` (or now, with ``force``). True when it merged."""
        if not self._pending:
            return False
        waited = time.monotonic() - self._pending_since
        if not force and len(self._pending) < self.merge_every and waited < self.merge_after_s:
            return False
        new_keys = np.fromiter(self._pending.keys(), np.int64, len(self._pending))
        new_counts = np.fromiter(self._pending.values(), np.float64, len(self._pending))
        self._pending.clear()
        self._pending_since = 0.0
        order = np.argsort(new_keys)
        new_keys, new_counts = new_keys[order], new_counts[order]
        pos = np.searchsorted(self.keys, new_keys)
        hit = pos < len(self.keys)
        hit[hit] = self.keys[pos[hit]] == new_keys[hit]
        counts = self.counts.copy()
        np.add.at(counts, pos[hit], new_counts[hit].astype(np.float32))
        keys = np.insert(self.keys, pos[~hit], new_keys[~hit])
        counts = np.insert(counts, pos[~hit], new_counts[~hit].astype(np.float32))
        if len(keys) > self.config.max_pairs:
            # Drop the weakest pairs down to 90% of the budget.
            keep = np.argsort(-counts, kind="stable")[: int(self.config.max_pairs * 0.9)]
            keep.sort()
            keys, counts = keys[keep], counts[keep]
        starts = self._row_starts(keys)
        # Swapped whole, between batches (the same thread reads them).
        self.keys, self.counts, self._starts = keys, counts, starts
        return True

    # --- reading --------------------------------------------------------------------------
    def lookup(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Counts ``C[a, b]`` (0 where unknown), elementwise over equal-shape int arrays."""
        keys, counts = self.keys, self.counts
        a, b = np.asarray(a, np.int64), np.asarray(b, np.int64)
        out = np.zeros(a.shape, np.float32)
        if not len(keys):
            return out
        ok = (a > 0) & (b > 0) & (a <= self.num_items) & (b <= self.num_items)
        q = a[ok] * (self.num_items + 1) + b[ok]
        pos = np.minimum(np.searchsorted(keys, q), len(keys) - 1)
        out[ok] = np.where(keys[pos] == q, counts[pos], 0.0)
        return out

    def _entries(self, recent: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every pair of every user's newest items: ``(user, follower, gain)``, where gain is
        ``lookback_decay ** j * log1p(count)`` for the user's ``j``-th newest item."""
        cfg = self.config
        depth = min(cfg.lookback, recent.shape[1])
        a = np.clip(recent[:, :depth], 0, self.num_items)
        lo = self._starts[a].ravel()
        lens = self._starts[a + 1].ravel() - lo
        total = int(lens.sum())
        owner = np.repeat(np.arange(a.size), lens)
        at = np.repeat(lo - np.cumsum(lens) + lens, lens) + np.arange(total)
        decay = np.float32(cfg.lookback_decay) ** np.arange(depth, dtype=np.float32)
        gain = decay[owner % depth] * np.log1p(self.counts[at])
        return owner // depth, self.keys[at] % (self.num_items + 1), gain

    def user_gains(self, recent: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Every (user, follower) boost of users whose newest items are ``recent (B, L)``,
        newest first, 0-padded: sorted distinct keys ``user * (num_items + 1) + item`` and
        their ``float32`` unweighted boosts. Gathers each user's rows (a few hundred pairs);
        :meth:`boost` and :meth:`followers` read it (pass it to both to gather once)."""
        recent = np.asarray(recent, np.int64)
        if recent.ndim != 2 or not recent.shape[1] or not len(self.keys):
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        user, item, gain = self._entries(recent)
        keys, inverse = np.unique(user * (self.num_items + 1) + item, return_inverse=True)
        gains = np.bincount(inverse, weights=gain, minlength=len(keys)).astype(np.float32)
        return keys, gains

    def boost(
        self,
        recent: np.ndarray,
        candidates: np.ndarray,
        gains: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> np.ndarray:
        """``(B, C) float32`` boosts (unweighted) of ``candidates (B, C)`` for users whose
        newest items are ``recent (B, L)`` (or their :meth:`user_gains`)."""
        candidates = np.asarray(candidates, np.int64)
        out = np.zeros(candidates.shape, np.float32)
        keys, values = gains if gains is not None else self.user_gains(recent)
        if not len(keys):
            return out
        span = self.num_items + 1
        wanted = (np.arange(len(candidates), dtype=np.int64)[:, None] * span + candidates).ravel()
        pos = np.minimum(np.searchsorted(keys, wanted), len(keys) - 1)
        ok = candidates.ravel()
        hit = (keys[pos] == wanted) & (ok > 0) & (ok <= self.num_items)
        out.ravel()[hit] = values[pos[hit]]
        return out

    def followers(
        self, gains: tuple[np.ndarray, np.ndarray], exclude: np.ndarray, k: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` items with the largest boosts in ``gains`` (:meth:`user_gains` of the
        users' newest items), leaving out each user's ``exclude (B, C)`` items (0 = none):
        ``(B, k)`` item indices, best first, 0-padded, and their ``(B, k) float32``
        unweighted boosts. The worker adds them to the retrieved candidates, so a strong
        follower the encoder ranked below the top K is still considered."""
        exclude = np.asarray(exclude, np.int64)
        items = np.zeros((len(exclude), max(k, 0)), np.int64)
        boosts = np.zeros(items.shape, np.float32)
        keys, values = gains
        if k <= 0 or not len(keys):
            return items, boosts
        span = self.num_items + 1
        owner = np.arange(len(exclude), dtype=np.int64)[:, None]
        drop = (owner * span + exclude)[exclude > 0]
        pos = np.minimum(np.searchsorted(keys, drop), len(keys) - 1)
        keep = np.ones(len(keys), dtype=bool)
        keep[pos[keys[pos] == drop]] = False
        keys, values = keys[keep], values[keep]
        users = keys // span
        # Keys are sorted by user: a stable sort on the negated boost within each user.
        order = np.lexsort((-values, users))
        keys, values, users = keys[order], values[order], users[order]
        rank = np.arange(len(keys)) - np.searchsorted(users, users, side="left")
        top = rank < k
        items[users[top], rank[top]] = keys[top] % span
        boosts[users[top], rank[top]] = values[top]
        return items, boosts

    def dense_boost(self, recent: np.ndarray) -> np.ndarray:
        """``(B, num_items + 1) float32``: :meth:`boost` of every item (evaluation)."""
        recent = np.asarray(recent, np.int64)
        out = np.zeros((len(recent), self.num_items + 1), np.float32)
        if recent.ndim == 2 and recent.shape[1] and len(self.keys):
            user, item, gain = self._entries(recent)
            np.add.at(out, (user, item), gain)
        return out

    # --- files ----------------------------------------------------------------------------
    def save(self, directory: Path | str) -> Path:
        """Write ``covisit.safetensors`` (counts, pending merged) into ``directory``."""
        self.flush(force=True)
        return self.snapshot()(Path(directory) / FILE)

    def snapshot(self) -> Callable[[Path], Path]:
        """The merged counts as they are now (pending ones wait for the next merge), as a
        function that writes them to a file. The arrays are never changed in place (a merge
        swaps in new ones), so the writing may happen on another thread while this table goes
        on counting. The file is written beside its path and renamed over it, so a reader
        never sees half a file."""
        keys, counts = self.keys, self.counts
        metadata = {"num_items": str(self.num_items), "config": json.dumps(self.to_config())}

        def write(path: Path) -> Path:
            tmp = path.with_name(path.name + ".tmp")
            save_file({"keys": keys, "counts": counts}, str(tmp), metadata=metadata)
            tmp.replace(path)
            return path

        return write

    def to_config(self) -> dict[str, float | int]:
        return self.config.to_dict()

    @classmethod
    def load(cls, directory: Path | str, config: Mapping[str, object]) -> CoVisitation | None:
        """The table in ``directory`` read with ``config`` (the model's ``"covisit"``
        settings); None when the directory has no table."""
        path = Path(directory) / FILE
        if not path.is_file():
            return None
        try:
            tensors = load_file(str(path))
            with safe_open(str(path), framework="np") as fh:
                meta = fh.metadata() or {}
            num_items = int(meta["num_items"])
            cfg = CoVisitConfig.from_dict(config)
        except (SafetensorError, OSError, KeyError, ValueError, TypeError) as exc:
            raise CoVisitError(f"{STAGE}: expected a readable table in {path}: {exc}") from exc
        if set(tensors) != {"keys", "counts"}:
            raise CoVisitError(f"{STAGE}: expected keys and counts in {path}, got {set(tensors)}")
        try:
            return cls(num_items, cfg, tensors["keys"], tensors["counts"])
        except ValueError as exc:
            raise CoVisitError(f"{STAGE}: expected a valid table in {path}: {exc}") from exc


def recent_items(items: torch.Tensor | np.ndarray, lookback: int) -> np.ndarray:
    """``(B, lookback)`` newest-first item indices of left-padded ``(B, T)`` sequences."""
    arr = items.cpu().numpy() if isinstance(items, torch.Tensor) else np.asarray(items)
    out = arr[:, ::-1][:, :lookback]
    if out.shape[1] < lookback:
        out = np.pad(out, ((0, 0), (0, lookback - out.shape[1])))
    return np.ascontiguousarray(out, dtype=np.int64)


def batch_booster(table: CoVisitation) -> Callable[[torch.Tensor], torch.Tensor]:
    """For :func:`serving.evaluate.rank_targets`: left-padded item batch -> weighted dense
    boost ``(B, N + 1)``."""
    weight = np.float32(table.config.weight)

    def boost(items: torch.Tensor) -> torch.Tensor:
        dense = table.dense_boost(recent_items(items, table.config.lookback)) * weight
        return torch.from_numpy(dense).to(items.device)

    return boost


def summed_booster(*boosters: Booster | None) -> Booster | None:
    """One booster adding the given ones (None entries skipped); None when none is left."""
    parts = [b for b in boosters if b is not None]
    if len(parts) <= 1:
        return parts[0] if parts else None

    def boost(items: torch.Tensor) -> torch.Tensor:
        total = parts[0](items)
        for part in parts[1:]:
            total = total + part(items)
        return total

    return boost


def sequences_before(split: LeaveOneOut, log: EncodedLog, which: str) -> list[np.ndarray]:
    """Every user's steps before the ``which`` split's held-out step ('valid': the training
    steps; 'test': those and the validation step): the table a worker would hold after
    reading every earlier event. Users without a case give all their steps."""
    cuts = list(split.train_cut)
    if which == "test":
        for case in split.cases("test"):
            cuts[case.user] = case.cut
    elif which != "valid":
        raise ValueError(f"{STAGE}: expected split 'valid' or 'test', got {which!r}")
    return [log.items[u][:cut] for u, cut in enumerate(cuts)]


@dataclass(frozen=True, slots=True)
class CoVisitFit:
    """A table built from the training steps and the weight chosen on validation, and the
    attribute affinity's weight chosen with it (``serving.affinity``; None without one)."""

    table: CoVisitation
    ndcg_by_weight: dict[float, float]  # validation NDCG@10 per table weight (chosen affinity)
    users: int
    affinity: Affinity | None = None
    ndcg_by_affinity: dict[float, float] = field(default_factory=dict)  # at the chosen table
    exclude_history: bool = False  # validation ranked without the user's history

    @property
    def gain(self) -> float:
        base = self.ndcg_by_weight.get(0.0, 0.0)
        best = self.ndcg_by_weight[self.table.config.weight]
        return best / base - 1.0 if base > 0 else 0.0

    @property
    def affinity_gain(self) -> float:
        """Validation NDCG@10 gain of the chosen affinity weight over none (at the chosen
        table weight); 0 without affinity."""
        if self.affinity is None:
            return 0.0
        base = self.ndcg_by_affinity.get(0.0, 0.0)
        return self.ndcg_by_affinity[self.affinity.weight] / base - 1.0 if base > 0 else 0.0

    def to_dict(self) -> dict[str, object]:
        out: dict[str, object] = {
            "weight": self.table.config.weight,
            "validation_ndcg10_by_weight": {f"{w:g}": v for w, v in self.ndcg_by_weight.items()},
            "validation_users": self.users,
            "validation_history": "excluded" if self.exclude_history else "kept",
            "pairs": len(self.table),
        }
        if self.affinity is not None:
            out["affinity_weight"] = self.affinity.weight
            out["validation_ndcg10_by_affinity_weight"] = {
                f"{w:g}": v for w, v in self.ndcg_by_affinity.items()
            }
        return out


def fit_covisit(
    model: SequenceScorer,
    split: LeaveOneOut,
    log: EncodedLog,
    num_items: int,
    *,
    max_len: int,
    config: CoVisitConfig | None = None,
    grid: Sequence[float] = WEIGHT_GRID,
    affinity: Affinity | None = None,
    affinity_grid: Sequence[float] = (),
    exclude_history: bool = False,
) -> CoVisitFit:
    """Build the table from the training steps and choose its weight on the validation
    cases: the best NDCG@10 (history kept as early stopping scores it, or excluded for a
    worker that filters seen items), the smaller weight on a tie; 0 means the table does not
    help this model and is switched off. With ``affinity`` every pair of a table weight and an
    ``affinity_grid`` weight is scored (one pass over the cases) and the best pair chosen."""
    cases = split.cases("valid")
    if not cases:
        raise ValueError(f"{STAGE}: expected validation cases (users with >= 3 steps), got none")
    base = CoVisitation.build(
        sequences_before(split, log, "valid"), num_items, config or CoVisitConfig()
    )
    boosts = [batch_booster(base.with_weight(1.0))]
    table_weights = sorted({0.0, *grid})
    aff_weights = sorted({0.0, *affinity_grid}) if affinity is not None else [0.0]
    if affinity is not None:
        boosts.append(affinity.booster(1.0))
    combos = [(t, a) for t in table_weights for a in aff_weights]
    _, inputs, targets = case_inputs(split, log, "valid", max_len)
    ranks = rank_targets_grid(
        model,
        inputs,
        targets,
        boosts=boosts,
        weights=[combo[: len(boosts)] for combo in combos],
        exclude_history=exclude_history,
    )
    scores = {
        combo: metrics_from_ranks(r)["NDCG@10"] for combo, r in zip(combos, ranks, strict=True)
    }
    bt, ba = max(scores, key=lambda c: (scores[c], -c[0], -c[1]))
    return CoVisitFit(
        base.with_weight(bt),
        {t: scores[(t, ba)] for t in table_weights},
        len(cases),
        affinity.with_weight(ba) if affinity is not None else None,
        {a: scores[(bt, a)] for a in aff_weights} if affinity is not None else {},
        exclude_history,
    )


def store_covisit(
    model_dir: Path | str, table: CoVisitation, fit: CoVisitFit | None = None
) -> None:
    """Write the table beside the model and its settings into ``config.json`` as
    ``"covisit"`` (weights and version id unchanged)."""
    directory = Path(model_dir)
    table.save(directory)
    path = directory / "config.json"
    config = json.loads(path.read_text())
    config["covisit"] = table.to_config()
    if fit is not None:
        config["covisit_fit"] = fit.to_dict()
        if fit.affinity is not None:
            config["affinity"] = fit.affinity.to_config()
        else:
            config.pop("affinity", None)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)
