"""Complementary items ("bundles"): session co-occurrence, cart/purchase weighted.

Two items are complements when the same user touches both within one session (events no more
than ``session_gap_ms`` apart) and within ``window`` steps of each other. A pair's weight is
``w(type_a) · w(type_b)`` (:data:`TYPE_WEIGHTS`: carts and purchases count more than views),
summed over all users, symmetric. The score of ``j`` for ``i`` is cosine-normalised,
``c_ij / sqrt(c_i · c_j)`` with ``c_i`` the item's total pair weight, so a bestseller is not
everyone's complement. The top ``top_m`` per item are kept.

Artifact: ``bundles.json`` in the model directory (item → ``[[other, score], ...]``); plain
JSON because it is a small ragged table. Transport-free: no faust, no kafka.

Serving: :func:`fill_slate` replaces the last ``m`` slots of a slate with complements of the
items just carted or bought (:func:`cart_anchors`), skipping duplicates and blocked items.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Container, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from serving.data import Interactions
from serving.types import Step

STAGE = "bundles"
BUNDLES_FILE = "bundles.json"
FORMAT_VERSION = 1
TYPE_WEIGHTS: dict[str, float] = {
    "view": 1.0,
    "click": 1.0,
    "rating": 1.0,
    "add_to_cart": 3.0,
    "purchase": 5.0,
    "remove_from_cart": 0.0,  # a removal says the pair did not belong together
}
ANCHOR_TYPES = frozenset({"add_to_cart", "purchase"})


class BundleError(ValueError):
    """Bundle settings, inputs or files that cannot be used."""


@dataclass(frozen=True)
class BundleConfig:
    window: int = 3  # steps apart that still count as "together" (3 beat 5 on the shop)
    session_gap_ms: int = 30 * 60 * 1000  # a longer silence starts a new session
    top_m: int = 20  # complements kept per item
    weights: Mapping[str, float] = field(default_factory=lambda: dict(TYPE_WEIGHTS))

    def __post_init__(self) -> None:
        if self.window < 1 or self.top_m < 1 or self.session_gap_ms < 0:
            raise BundleError(
                f"{STAGE}: expected window >= 1, top_m >= 1, session_gap_ms >= 0, got "
                f"window={self.window} top_m={self.top_m} session_gap_ms={self.session_gap_ms}"
            )


def cooccurrence(data: Interactions, cfg: BundleConfig) -> dict[str, dict[str, float]]:
    """Symmetric weighted pair counts ``{a: {b: weight}}`` (no self pairs)."""
    pairs: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for u in data.users:
        ts = u.ts_ms
        n = len(u.items)
        for t in range(n):
            wa = cfg.weights.get(u.types[t], 1.0)
            if wa == 0.0:
                continue
            for s in range(t + 1, min(n, t + cfg.window + 1)):
                # Without times the whole sequence is one session.
                if ts is not None and ts[s] - ts[s - 1] > cfg.session_gap_ms:
                    break
                a, b = u.items[t], u.items[s]
                w = wa * cfg.weights.get(u.types[s], 1.0)
                if a == b or w == 0.0:
                    continue
                pairs[a][b] += w
                pairs[b][a] += w
    return {a: dict(bs) for a, bs in pairs.items()}


class Bundles:
    """Top-M complements per item: ``complements(item)`` → ``[(other, score), ...]``."""

    def __init__(
        self, table: Mapping[str, Sequence[tuple[str, float]]], cfg: BundleConfig | None = None
    ) -> None:
        self.table = {k: [(str(o), float(s)) for o, s in v] for k, v in table.items()}
        self.cfg = cfg or BundleConfig()

    def __len__(self) -> int:
        return len(self.table)

    @classmethod
    def fit(cls, data: Interactions, cfg: BundleConfig | None = None) -> Bundles:
        cfg = cfg or BundleConfig()
        pairs = cooccurrence(data, cfg)
        total = {a: sum(bs.values()) for a, bs in pairs.items()}
        table = {}
        for a, bs in pairs.items():
            scored = sorted(
                ((b, w / math.sqrt(total[a] * total[b])) for b, w in bs.items()),
                key=lambda x: (-x[1], x[0]),
            )
            table[a] = scored[: cfg.top_m]
        return cls(table, cfg)

    def complements(self, item: str) -> list[tuple[str, float]]:
        return list(self.table.get(item, ()))

    def save(self, model_dir: Path | str) -> Path:
        path = Path(model_dir) / BUNDLES_FILE
        payload = {
            "format_version": FORMAT_VERSION,
            "created_at": datetime.now(UTC).isoformat(),
            "config": {
                "window": self.cfg.window,
                "session_gap_ms": self.cfg.session_gap_ms,
                "top_m": self.cfg.top_m,
                "weights": dict(self.cfg.weights),
            },
            "items": {k: [[o, round(s, 6)] for o, s in v] for k, v in self.table.items()},
        }
        path.write_text(json.dumps(payload, sort_keys=True) + "\n")
        return path

    @classmethod
    def load(cls, model_dir: Path | str) -> Bundles | None:
        """The bundles of ``model_dir``; None when it has no ``bundles.json``."""
        path = Path(model_dir) / BUNDLES_FILE
        if not path.exists():
            return None
        try:
            raw = json.loads(path.read_text())
            c = raw["config"]
            cfg = BundleConfig(
                window=int(c["window"]),
                session_gap_ms=int(c["session_gap_ms"]),
                top_m=int(c["top_m"]),
                weights={str(k): float(v) for k, v in c["weights"].items()},
            )
            table = {str(k): [(str(o), float(s)) for o, s in v] for k, v in raw["items"].items()}
        except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise BundleError(
                f"{STAGE}: expected {BUNDLES_FILE} with 'config' and 'items' "
                f"(item → [[other, score], ...]) in {model_dir}: {type(exc).__name__}: {exc}"
            ) from exc
        return cls(table, cfg)


def cart_anchors(history: Sequence[Step], max_anchors: int = 3) -> list[str]:
    """Items carted or bought in the newest run of cart/purchase events, newest first.

    Scans back from the newest step while the steps are carts, purchases or removals; an
    item removed from the cart later is not an anchor. Empty when the newest step is none
    of these (the trigger was not a cart or purchase).
    """
    out: list[str] = []
    removed: set[str] = set()
    for step in reversed(history):
        if step.type == "remove_from_cart":
            removed.add(step.item)
            continue
        if step.type not in ANCHOR_TYPES:
            break
        if step.item not in removed and step.item not in out:
            out.append(step.item)
        if len(out) >= max_anchors:
            break
    return out


def fill_slate(
    slate: Sequence[str],
    anchors: Sequence[str],
    bundles: Bundles,
    m: int,
    blocked: Container[str] = frozenset(),
) -> list[str]:
    """``slate`` with its last ``m`` slots given to complements of ``anchors``.

    Complements are merged over anchors by best score (ties: earlier anchor, then id). An item
    already kept in the slate, an anchor itself or a ``blocked`` item is skipped. Slots
    without a complement keep the slate's own items in order, so the length never changes
    and no item appears twice.
    """
    if m < 0:
        raise BundleError(f"{STAGE}: expected m >= 0 slots to fill, got {m}")
    m = min(m, len(slate))
    keep = list(slate[: len(slate) - m])
    if m == 0 or not anchors:
        return list(slate)
    best: dict[str, tuple[float, int]] = {}
    for rank, a in enumerate(anchors):
        for item, score in bundles.complements(a):
            if item not in best or (score, -rank) > (best[item][0], -best[item][1]):
                best[item] = (score, rank)
    ordered = sorted(best, key=lambda i: (-best[i][0], best[i][1], i))
    taken = set(keep) | set(anchors)
    fill: list[str] = []
    for item in ordered:
        if len(fill) == m:
            break
        if item in taken or item in blocked:
            continue
        fill.append(item)
        taken.add(item)
    for item in slate[len(slate) - m :]:
        if len(fill) == m:
            break
        if item not in taken:
            fill.append(item)
            taken.add(item)
    return keep + fill
