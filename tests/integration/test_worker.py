"""The stream worker against the real broker: accounting, slates that follow the user,
metrics over HTTP, and session state recovered from the changelog after a restart."""

from __future__ import annotations

import json
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from serving.synthetic import SyntheticShop
from streamrec.procs import WorkerProcess, free_port
from streamrec.replay import (
    OutputCollector,
    event_records,
    handled,
    make_producer,
    metric_sum,
    produce_records,
    scrape_metrics,
)
from streamrec.settings import Settings
from streamrec.topics import design_topics, ensure_topics

DESIGN_METRICS = (
    "streamrec_events_consumed_total",
    "streamrec_events_rejected_total",
    "streamrec_events_duplicate_total",
    "streamrec_recommendations_produced_total",
    "streamrec_stage_duration_seconds_bucket",
    "streamrec_end_to_end_latency_seconds_bucket",
    "streamrec_batch_size_bucket",
    "streamrec_index_items",
    "streamrec_session_users",
    "streamrec_model_info",
    "streamrec_slate_hits_total",
    "streamrec_slates_evaluated_total",
)


@pytest.fixture
def settings(make_settings: Callable[..., Settings], model_dir: Path, unique: str) -> Settings:
    s = make_settings(
        model_dir=model_dir,
        metrics_port=free_port(),
        topic_control=f"t.control.{unique}",
        batch_within_s=0.01,
    )
    ensure_topics(s, design_topics(s))
    return s


def _publish_items(settings: Settings, shop: SyntheticShop) -> None:
    produce_records(
        make_producer(settings),
        settings.topic_items,
        [(i["item_id"].encode(), json.dumps(i).encode()) for i in shop.items],
    )


def _wait_handled(worker: WorkerProcess, n: int, timeout_s: float = 60) -> dict[str, float]:
    deadline = time.monotonic() + timeout_s
    metrics: dict[str, float] = {}
    while time.monotonic() < deadline:
        metrics = scrape_metrics(worker.metrics_url)
        if handled(metrics) >= n:
            return metrics
        time.sleep(0.2)
    raise AssertionError(f"worker handled {handled(metrics)} of {n} messages:\n{worker.tail()}")


def _wait_collected(collector: OutputCollector, recs: int, dlq: int, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = collector.snapshot()
        if got.recommendations >= recs and got.dead_letters >= dlq:
            return
        time.sleep(0.1)


def _malformed(shop: SyntheticShop) -> Iterator[tuple[bytes | None, bytes | None, str]]:
    """(key, value, expected DLQ reason) for many kinds of bad input."""
    item = shop.items[0]["item_id"]
    now = int(time.time() * 1000)

    def ev(**kw: Any) -> bytes:
        base = {"event_id": "bad", "user_id": "u-bad", "item_id": item, "type": "view", "ts": now}
        base.update(kw)
        return json.dumps({k: v for k, v in base.items() if v is not None}).encode()

    for i in range(20):
        yield b"u-bad", b"{this is not json" + str(i).encode(), "invalid_json"
        yield b"u-bad", b"\xff\xfe\xfa" + bytes([i]), "invalid_utf8"
        yield b"u-bad", ev(event_id=f"t{i}", type="teleport"), "unknown_event_type"
        yield b"u-bad", ev(event_id=f"m{i}", item_id=None), "missing_field"
        yield b"u-bad", ev(event_id=f"w{i}", ts="yesterday"), "invalid_value"
        yield b"u-bad", ev(event_id=f"f{i}", ts=now + 10 * 86_400_000), "timestamp_out_of_range"
        yield None, ev(event_id=f"k{i}"), "missing_key"
        yield b"someone-else", ev(event_id=f"x{i}"), "key_mismatch"
        yield b"u-bad", ev(event_id=f"u{i}", item_id=f"no-such-item-{i}"), "unknown_item"
        yield b"u-bad", b"[1, 2, 3]", "not_an_object"


def test_every_message_is_accounted_for(settings: Settings, shop: SyntheticShop) -> None:
    _publish_items(settings, shop)
    good = list(event_records(sorted(shop.events[:2500], key=lambda e: e["ts"])))
    bad = list(_malformed(shop))
    dup_src = good[::25]  # 100 redeliveries: the very same bytes again
    producer = make_producer(settings)
    with (
        WorkerProcess(settings, settings.data_dir / "worker.log") as worker,
        OutputCollector(settings) as collector,
    ):
        worker.wait_assigned(timeout_s=60)  # what the demo waits for before replaying
        lag = metric_sum(scrape_metrics(worker.metrics_url), "streamrec_consumer_lag_messages")
        assert lag == 0  # assigned, fetched from, nothing sent yet
        produce_records(producer, settings.topic_events, good)
        produce_records(producer, settings.topic_events, [(k, v) for k, v, _ in bad])
        produce_records(producer, settings.topic_events, dup_src)
        sent = len(good) + len(bad) + len(dup_src)
        metrics = _wait_handled(worker, sent)
        accepted = metric_sum(metrics, "streamrec_events_consumed_total")
        produced = metrics["streamrec_recommendations_produced_total"]
        coalesced = metrics["streamrec_recommendations_coalesced_total"]
        _wait_collected(collector, int(produced), len(bad))
        got = collector.snapshot()
        assert worker.alive(), worker.tail()

    assert accepted == len(good)
    assert metric_sum(metrics, "streamrec_events_rejected_total") == len(bad)
    assert metrics["streamrec_events_duplicate_total"] == len(dup_src)
    assert produced == accepted - coalesced
    assert got.recommendations == produced
    assert got.dead_letters == len(bad)
    assert got.dlq_reasons == dict(Counter(reason for _, _, reason in bad))
    for reason, n in Counter(reason for _, _, reason in bad).items():
        assert metrics[f'streamrec_events_rejected_total{{reason="{reason}"}}'] == n


def test_metrics_carry_the_design_names(settings: Settings, shop: SyntheticShop) -> None:
    _publish_items(settings, shop)
    with WorkerProcess(settings, settings.data_dir / "worker.log") as worker:
        produce_records(
            make_producer(settings), settings.topic_events, event_records(shop.events[:200])
        )
        _wait_handled(worker, 200)
        time.sleep(2.5)  # gauges refresh every 2 s
        text = scrape_metrics(worker.metrics_url)
    names = {k.split("{")[0] for k in text}
    for name in DESIGN_METRICS:
        assert name in names, f"{name} missing from /metrics"
    assert text["streamrec_index_items"] == len(shop.items)
    assert text["streamrec_session_users"] > 0
    assert any(k.startswith("streamrec_model_info{") and v == 1 for k, v in text.items())
    stages = {k.split('stage="')[1].split('"')[0] for k in text if 'stage="' in k}
    assert stages == {"encode", "retrieve", "filter", "rerank", "covisit", "order"}
    assert "streamrec_covisit_pairs" in text


def _category_share(slate: dict[str, Any], shop: SyntheticShop, category: str) -> float:
    items = [s["item_id"] for s in slate["items"]]
    return sum(shop.category_of[i] == category for i in items) / max(1, len(items))


def test_slate_follows_the_user_to_a_new_kind_of_item(
    settings: Settings, shop: SyntheticShop
) -> None:
    _publish_items(settings, shop)
    by_cat: dict[str, list[str]] = {}
    for item in shop.items:
        by_cat.setdefault(item["categories"][0], []).append(item["item_id"])
    cat_a, cat_b = sorted(by_cat)[:2]
    user = "probe-user"

    def views(cat: str, start: int) -> list[dict[str, Any]]:
        return [
            {"event_id": f"{user}-{cat}-{i}", "user_id": user, "item_id": it, "type": "view"}
            for i, it in enumerate(by_cat[cat][start : start + 8])
        ]

    producer = make_producer(settings)
    with (
        WorkerProcess(settings, settings.data_dir / "worker.log") as worker,
        OutputCollector(settings, keep_slates=True) as collector,
    ):
        for event in views(cat_a, 0):  # one at a time: each event sees the previous state
            produce_records(producer, settings.topic_events, event_records([event]))
            time.sleep(0.05)
        _wait_handled(worker, 8)
        _wait_collected(collector, 1, 0)
        time.sleep(1.0)
        first = collector.collected.last_slates[user]
        for event in views(cat_b, 0):
            produce_records(producer, settings.topic_events, event_records([event]))
            time.sleep(0.05)
        _wait_handled(worker, 16)
        time.sleep(1.0)
        second = collector.collected.last_slates[user]
    assert first["trigger_event_id"] != second["trigger_event_id"]
    assert _category_share(first, shop, cat_a) >= 0.5, first
    assert _category_share(second, shop, cat_b) >= 0.5, second
    assert _category_share(second, shop, cat_a) < _category_share(first, shop, cat_a)


def test_restart_recovers_sessions_from_the_changelog(
    make_settings: Callable[..., Settings], model_dir: Path, unique: str, shop: SyntheticShop
) -> None:
    s = make_settings(
        model_dir=model_dir,
        metrics_port=free_port(),
        topic_control=f"t.control.{unique}",
        store="rocksdb://",
    )
    ensure_topics(s, design_topics(s))
    _publish_items(s, shop)
    users = [f"user-{u}" for u in range(5)]
    mine = [e for e in shop.events if e["user_id"] in users]
    first = [e for e in mine if int(e["event_id"].split("-e")[-1]) < 10]
    later = [e for e in mine if int(e["event_id"].split("-e")[-1]) == 10]
    producer = make_producer(s)
    sent_first = list(event_records(first))
    with WorkerProcess(s, s.data_dir.parent / "w1.log") as worker:
        produce_records(producer, s.topic_events, sent_first)
        _wait_handled(worker, len(first))
        time.sleep(2.0)  # let the changelog writes and offset commits go out
    # Lose the local RocksDB state: everything must come back from the changelog topic.
    shutil.rmtree(s.data_dir)
    replayed = [r for r, e in zip(sent_first, first, strict=True) if e["event_id"].endswith("e9")]
    with WorkerProcess(s, s.data_dir.parent / "w2.log") as worker:
        produce_records(producer, s.topic_events, replayed)
        produce_records(producer, s.topic_events, event_records(later))
        metrics = _wait_handled(worker, len(replayed) + len(later))
    # At-least-once: events of the first run whose offsets were not committed yet come back
    # too; recovered state must recognise every old event as a duplicate and accept only
    # the new ones.
    assert metrics["streamrec_events_duplicate_total"] >= len(replayed)
    assert metric_sum(metrics, "streamrec_events_consumed_total") == len(later)
    # Each new event was checked against the slate sent before the restart.
    assert metrics["streamrec_slates_evaluated_total"] == len(later)
