"""Item metadata from the ``streamrec.items`` topic, and its row-aligned view for the pipeline.

``Catalog`` is keyed by item id. Items the catalog has never heard of count as available (the
encoder's vocabulary is the source of items; the catalog only adds facts about them); items
deleted by a tombstone count as retired, hence unavailable, until upserted again.

``CatalogRows`` turns the catalog into arrays aligned with an ``ItemIndex``'s rows, so the filter
and order stages test ``(B, C)`` candidates with one fancy-indexing call instead of B*C dict
lookups. It refreshes incrementally from the catalog's change log.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from serving.index import ItemIndex

STAGE = "catalog"


@dataclass(frozen=True, slots=True)
class ItemMeta:
    """What the catalog knows about one item."""

    available: bool = True
    price: float | None = None
    categories: tuple[str, ...] = ()
    title: str = ""


class Catalog:
    """item_id -> ItemMeta, with category ids and a bounded change log.

    One writer; readers tolerate concurrent upserts (each mutation is a few GIL-atomic steps).
    ``version`` counts mutations.
    """

    def __init__(self, *, max_categories: int = 4, max_log: int = 100_000) -> None:
        """max_categories: categories per item kept for diversity (first ones win).
        max_log: change-log length before readers fall back to a full refresh."""
        if max_categories < 1 or max_log < 1:
            raise ValueError(
                f"{STAGE}: expected max_categories >= 1 and max_log >= 1, got "
                f"{max_categories}, {max_log}"
            )
        self.max_categories = max_categories
        self.max_log = max_log
        self._meta: dict[str, ItemMeta] = {}
        self._retired: set[str] = set()
        self._category_ids: dict[str, int] = {}
        self._log: list[str] = []
        self._log_base = 0  # version before _log[0]
        self.version = 0

    def __len__(self) -> int:
        return len(self._meta)

    def __contains__(self, item_id: object) -> bool:
        return item_id in self._meta

    def get(self, item_id: str) -> ItemMeta | None:
        return self._meta.get(item_id)

    def upsert(self, item_id: str, meta: ItemMeta) -> None:
        if not isinstance(item_id, str) or not item_id:
            raise ValueError(
                f"{STAGE}.upsert: expected a non-empty string item id, got {item_id!r}"
            )
        if meta.price is not None and not (meta.price >= 0.0):
            raise ValueError(
                f"{STAGE}.upsert: expected price >= 0 or None for {item_id!r}, got {meta.price}"
            )
        for name in list(dict.fromkeys(meta.categories))[: self.max_categories]:
            self._category_ids.setdefault(name, len(self._category_ids))
        self._meta[item_id] = meta
        self._retired.discard(item_id)
        self._changed(item_id)

    def delete(self, item_id: str) -> bool:
        """Retire an item (tombstone). Returns whether it was known."""
        known = self._meta.pop(item_id, None) is not None
        self._retired.add(item_id)
        self._changed(item_id)
        return known

    def _changed(self, item_id: str) -> None:
        self._log.append(item_id)
        self.version += 1
        if len(self._log) > self.max_log:
            drop = len(self._log) - self.max_log // 2
            del self._log[:drop]
            self._log_base += drop

    def changes_since(self, version: int) -> list[str] | None:
        """Item ids changed after ``version`` (with repeats), or None if the log was truncated."""
        if version < self._log_base:
            return None
        return self._log[version - self._log_base :]

    def is_available(self, ids: Sequence[str] | np.ndarray) -> np.ndarray:
        """(n,) bool: not retired and not marked unavailable (unknown items are available)."""
        out = np.ones(len(ids), dtype=bool)
        for j, item in enumerate(ids):
            meta = self._meta.get(item)
            if (meta is not None and not meta.available) or item in self._retired:
                out[j] = False
        return out

    def category_id(self, name: str) -> int:
        """Stable small int for a category name, -1 if never seen."""
        return self._category_ids.get(name, -1)

    def category_ids(self, ids: Sequence[str] | np.ndarray) -> np.ndarray:
        """(n, max_categories) int32 category ids per item, -1 padding."""
        out = np.full((len(ids), self.max_categories), -1, dtype=np.int32)
        for j, item in enumerate(ids):
            meta = self._meta.get(item)
            if meta is not None and meta.categories:
                names = list(dict.fromkeys(meta.categories))[: self.max_categories]
                cats = [self._category_ids[c] for c in names]
                out[j, : len(cats)] = cats
        return out


class CatalogRows:
    """Catalog facts aligned with an ItemIndex's rows.

    blocked: (R,) bool, True for unavailable or retired items.
    categories: (R, max_categories) int32 category ids, -1 padding.
    R = ``index.n_rows`` at the last ``refresh``; rows beyond it are treated as unknown.
    """

    def __init__(self, catalog: Catalog, index: ItemIndex) -> None:
        self.catalog = catalog
        self.index = index
        m = catalog.max_categories
        self.blocked = np.zeros(0, dtype=bool)
        self.categories = np.full((0, m), -1, dtype=np.int32)
        self._version = -1

    def refresh(self) -> CatalogRows:
        """Bring the arrays up to date: new index rows, then catalog changes since last time."""
        n = self.index.n_rows
        row_ids = self.index.row_ids()[:n]
        changed = None if self._version < 0 else self.catalog.changes_since(self._version)
        version = self.catalog.version
        if changed is None:
            self.blocked = ~self.catalog.is_available(row_ids)
            self.categories = self.catalog.category_ids(row_ids)
        else:
            old = len(self.blocked)
            if n > old:
                new_ids = row_ids[old:]
                self.blocked = np.concatenate([self.blocked, ~self.catalog.is_available(new_ids)])
                self.categories = np.concatenate(
                    [self.categories, self.catalog.category_ids(new_ids)]
                )
            self._apply(changed)
        self._version = version
        return self

    def _apply(self, changed: Iterable[str]) -> None:
        ids = list(dict.fromkeys(changed))
        if not ids:
            return
        rows = self.index.rows_of(ids, live_only=False)
        keep = (rows >= 0) & (rows < len(self.blocked))
        ids = [i for i, k in zip(ids, keep.tolist(), strict=True) if k]
        rows = rows[keep]
        self.blocked[rows] = ~self.catalog.is_available(ids)
        self.categories[rows] = self.catalog.category_ids(ids)

    def blocked_of(self, rows: np.ndarray) -> np.ndarray:
        """rows: (...) int64 with -1 padding. Returns (...) bool; padding and unknown rows False."""
        ok = (rows >= 0) & (rows < len(self.blocked))
        return np.where(
            ok, self.blocked[np.where(ok, rows, 0)] if len(self.blocked) else False, False
        )

    def categories_of(self, rows: np.ndarray) -> np.ndarray:
        """rows: (...) int64 with -1 padding. Returns (..., max_categories) int32, -1 padding."""
        ok = (rows >= 0) & (rows < len(self.categories))
        if not len(self.categories):
            return np.full((*rows.shape, self.catalog.max_categories), -1, dtype=np.int32)
        cats = self.categories[np.where(ok, rows, 0)]
        cats[~ok] = -1
        return cats
