"""Every dashboard panel and alert expression, evaluated by a real Prometheus scraping a real
worker that is replaying events through the real broker."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from serving.synthetic import SyntheticShop
from streamrec.monitoring import run_monitoring_check
from streamrec.procs import WorkerProcess, free_port
from streamrec.replay import event_records, make_producer, produce_records
from streamrec.settings import Settings
from streamrec.topics import design_topics, ensure_topics

pytestmark = pytest.mark.prometheus


def test_dashboards_and_alerts_against_a_live_worker(
    make_settings: Callable[..., Settings], model_dir: Path, unique: str, shop: SyntheticShop
) -> None:
    s = make_settings(
        model_dir=model_dir, metrics_port=free_port(), topic_control=f"t.control.{unique}"
    )
    ensure_topics(s, design_topics(s))
    producer = make_producer(s)
    produce_records(
        producer,
        s.topic_items,
        [(i["item_id"].encode(), json.dumps(i).encode()) for i in shop.items],
    )
    events = sorted(shop.events, key=lambda e: e["ts"])
    stop = threading.Event()

    def replay() -> None:
        # A steady trickle with a malformed message now and then, for as long as the check runs.
        i = 0
        while not stop.is_set() and i < len(events):
            chunk = events[i : i + 100]
            produce_records(producer, s.topic_events, event_records(chunk))
            produce_records(producer, s.topic_events, [(b"u", b"{broken")])
            i += len(chunk)
            time.sleep(0.5)

    with WorkerProcess(s, s.data_dir.parent / "worker.log") as worker:
        feeder = threading.Thread(target=replay, daemon=True)
        feeder.start()
        try:
            report = run_monitoring_check([f"127.0.0.1:{s.metrics_port}"], wait_s=90)
        finally:
            stop.set()
            feeder.join(10)
        assert worker.alive(), worker.tail()
    failures = [(r.query.source, r.query.title, r.query.expr, r.error) for r in report.failures]
    assert report.ok, failures
    assert len(report.results) >= 40  # every panel query and alert probe was evaluated
