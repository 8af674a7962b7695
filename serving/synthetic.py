"""Synthetic shop data the project generates itself: a catalog with text and sequential events.

Users have a favourite category and browse it in a loose order (item j is often followed by
item j+1..j+3 of the same category), with occasional jumps to other categories, so a sequence
model has real structure to learn and a text encoder has real words to read.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CATEGORIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("running shoes", ("trail runner", "road racer", "cushioned trainer", "marathon flat")),
    ("coffee", ("espresso beans", "single origin roast", "cold brew blend", "decaf ground")),
    ("science fiction books", ("space opera novel", "cyberpunk thriller", "time travel saga")),
    ("kitchen knives", ("chef knife", "paring knife", "bread knife", "santoku blade")),
    ("yoga", ("yoga mat", "yoga block", "meditation cushion", "stretching strap")),
    ("headphones", ("noise cancelling headphones", "wireless earbuds", "studio monitors")),
    ("board games", ("strategy board game", "party card game", "cooperative puzzle game")),
    ("gardening", ("pruning shears", "tomato seeds", "watering can", "raised garden bed")),
    ("baby care", ("baby diapers", "baby wipes", "teething toy", "infant car seat")),
    ("camping", ("camping tent", "sleeping bag", "camp stove", "headlamp lantern")),
    ("skin care", ("face moisturizer", "sunscreen lotion", "vitamin c serum", "lip balm")),
    ("tea", ("green tea leaves", "earl grey tea bags", "herbal chamomile tea", "matcha powder")),
)
ADJECTIVES = ("classic", "premium", "lightweight", "compact", "deluxe", "organic", "pro", "eco")
TYPE_MIX: tuple[tuple[str, float], ...] = (
    ("view", 0.78),
    ("click", 0.10),
    ("add_to_cart", 0.06),
    ("remove_from_cart", 0.01),
    ("purchase", 0.04),
    ("rating", 0.01),
)


@dataclass(frozen=True)
class SyntheticShop:
    items: list[dict[str, Any]]  # streamrec.items records
    events: list[dict[str, Any]]  # streamrec.events records, in event-time order per user
    category_of: dict[str, str]


def make_catalog(n_items: int, seed: int = 0) -> list[dict[str, Any]]:
    """``n_items`` items spread over the categories, each with a title, price and category."""
    rng = random.Random(seed)
    items = []
    for i in range(n_items):
        category, nouns = CATEGORIES[i % len(CATEGORIES)]
        title = f"{rng.choice(ADJECTIVES)} {rng.choice(nouns)} {i // len(CATEGORIES) + 1}"
        items.append(
            {
                "item_id": f"item-{i}",
                "title": title.title(),
                "description": f"A {title} from our {category} range.",
                "categories": [category],
                "price": round(rng.uniform(3, 300), 2),
                "available": True,
                "attributes": {},
            }
        )
    return items


def _pick_type(rng: random.Random) -> str:
    x = rng.random()
    for name, p in TYPE_MIX:
        x -= p
        if x <= 0:
            return name
    return "view"


def iter_user_events(
    user: int,
    by_category: list[list[str]],
    n_events: int,
    rng: random.Random,
    start_ms: int,
    gap_ms: int = 30_000,
) -> Iterator[dict[str, Any]]:
    """Events of one user: loose in-category order with occasional category switches."""
    cat = rng.randrange(len(by_category))
    pos = rng.randrange(len(by_category[cat]))
    ts = start_ms
    for n in range(n_events):
        if rng.random() < 0.08:
            cat = rng.randrange(len(by_category))
            pos = rng.randrange(len(by_category[cat]))
        elif rng.random() < 0.8:
            pos = (pos + rng.randint(1, 3)) % len(by_category[cat])
        else:
            pos = rng.randrange(len(by_category[cat]))
        ts += rng.randint(gap_ms // 4, gap_ms * 2)
        yield {
            "event_id": f"u{user}-e{n}",
            "user_id": f"user-{user}",
            "item_id": by_category[cat][pos],
            "type": _pick_type(rng),
            "ts": ts,
        }


def make_shop(
    n_items: int = 600,
    n_users: int = 1000,
    events_per_user: int = 30,
    seed: int = 0,
    start_ms: int = 1_700_000_000_000,
) -> SyntheticShop:
    items = make_catalog(n_items, seed)
    by_category: list[list[str]] = [[] for _ in CATEGORIES]
    category_of = {}
    for i, item in enumerate(items):
        by_category[i % len(CATEGORIES)].append(item["item_id"])
        category_of[item["item_id"]] = item["categories"][0]
    rng = random.Random(seed + 1)
    events: list[dict[str, Any]] = []
    for u in range(n_users):
        events.extend(iter_user_events(u, by_category, events_per_user, rng, start_ms))
    return SyntheticShop(items=items, events=events, category_of=category_of)


def write_jsonl(records: list[dict[str, Any]], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as fh:
        for r in records:
            fh.write(json.dumps(r, separators=(",", ":")) + "\n")
    return path
