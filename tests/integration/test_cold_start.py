"""A new item is recommendable as soon as it is published; a retired one never comes back."""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from schemas.models import Item
from serving.synthetic import SyntheticShop
from serving.text import fit_text_projection
from streamrec.procs import WorkerProcess, free_port
from streamrec.replay import (
    OutputCollector,
    event_records,
    make_producer,
    produce_records,
    scrape_metrics,
)
from streamrec.settings import Settings
from streamrec.topics import design_topics, ensure_topics


@pytest.fixture(scope="module")
def text_model_dir(
    tmp_path_factory: pytest.TempPathFactory, model_dir: Path, shop: SyntheticShop
) -> Path:
    """The shared tiny model plus a text projection fitted on its items."""
    out = tmp_path_factory.mktemp("text-model") / "model"
    shutil.copytree(model_dir, out)
    fit_text_projection(out, [Item.model_validate(i) for i in shop.items])
    return out


def test_new_item_reaches_a_slate_within_a_second_and_leaves_on_tombstone(
    make_settings: Callable[..., Settings],
    text_model_dir: Path,
    unique: str,
    shop: SyntheticShop,
) -> None:
    s = make_settings(
        model_dir=text_model_dir,
        metrics_port=free_port(),
        topic_control=f"t.control.{unique}",
        batch_within_s=0.01,
    )
    ensure_topics(s, design_topics(s))
    producer = make_producer(s)
    produce_records(
        producer,
        s.topic_items,
        [(i["item_id"].encode(), json.dumps(i).encode()) for i in shop.items],
    )
    new = {
        "item_id": "new-trail-runner",
        "title": "Lightweight Trail Runner X",
        "description": "A new trail running shoe from our running shoes range.",
        "categories": ["running shoes"],
        "price": 120.0,
        "available": True,
    }
    runner_items = [i["item_id"] for i in shop.items if i["categories"] == ["running shoes"]]
    stop = threading.Event()

    def browse() -> None:
        # A user browsing running shoes, ten events a second.
        n = 0
        while not stop.is_set():
            item = runner_items[n % len(runner_items)]
            event = {"event_id": f"b-{n}", "user_id": "browser", "item_id": item, "type": "view"}
            produce_records(producer, s.topic_events, event_records([event]))
            n += 1
            time.sleep(0.1)

    seen: list[tuple[float, dict[str, Any]]] = []

    def on_rec(rec: dict[str, Any]) -> None:
        seen.append((time.time(), rec))

    with (
        WorkerProcess(s, s.data_dir.parent / "worker.log") as worker,
        OutputCollector(s, on_recommendation=on_rec),
    ):
        feeder = threading.Thread(target=browse, daemon=True)
        feeder.start()
        try:
            deadline = time.time() + 60
            while not seen and time.time() < deadline:
                time.sleep(0.1)
            assert seen, worker.tail()
            published_at = time.time()
            produce_records(
                producer, s.topic_items, [(b"new-trail-runner", json.dumps(new).encode())]
            )
            deadline = published_at + 10
            first: float | None = None
            while first is None and time.time() < deadline:
                for at, rec in list(seen):
                    if any(x["item_id"] == "new-trail-runner" for x in rec["items"]):
                        first = at
                        break
                time.sleep(0.05)
            assert first is not None, "the new item never reached a slate"
            assert first - published_at <= 1.0, f"took {first - published_at:.2f} s"

            produce_records(producer, s.topic_items, [(b"new-trail-runner", None)])
            deadline = time.time() + 10
            while time.time() < deadline:
                m = scrape_metrics(worker.metrics_url)
                if m.get('streamrec_items_consumed_total{op="delete"}', 0) >= 1:
                    break
                time.sleep(0.05)
            retired_at = time.time()
            time.sleep(2.0)  # more slates for the browsing user
        finally:
            stop.set()
            feeder.join(5)
    after = [rec for _, rec in seen if rec["generated_at"] / 1000 > retired_at]
    assert after, "no slates after the tombstone"
    for rec in after:
        assert all(x["item_id"] != "new-trail-runner" for x in rec["items"])
