"""The events consumer's fetches wait for bytes (``STREAMREC_FETCH_*``), as configured."""

from __future__ import annotations

import asyncio
from pathlib import Path

from prometheus_client import CollectorRegistry

from streamrec.metrics import Metrics
from streamrec.settings import Settings
from streams.app import StreamWorker


def _aiokafka_consumer_fetch(settings: Settings) -> tuple[int, int]:
    worker = StreamWorker(settings, None, Metrics.create(CollectorRegistry()), passthrough=True)

    async def build() -> tuple[int, int]:
        await worker.app.on_first_start()  # what starting the app runs before its consumer
        # What Faust's consumer thread calls on start (not started: no broker needed).
        consumer = worker.app.consumer._thread._create_worker_consumer(worker.app.transport)  # type: ignore[attr-defined]
        return consumer._fetch_min_bytes, consumer._fetch_max_wait_ms

    return asyncio.run(build())


def test_the_events_consumer_is_built_with_the_fetch_settings(tmp_path: Path) -> None:
    default = Settings(store="memory://", data_dir=tmp_path / "a")
    assert _aiokafka_consumer_fetch(default) == (65536, 10)
    custom = Settings(
        store="memory://", data_dir=tmp_path / "b", fetch_min_bytes=1, fetch_max_wait_ms=250
    )
    assert _aiokafka_consumer_fetch(custom) == (1, 250)


def test_building_the_worker_leaves_the_guarantee_to_the_running_app(tmp_path: Path) -> None:
    """The app's consumer is created only once a Faust worker runs the app: created earlier,
    it reads ``in_transaction`` as false and an exactly-once worker never starts its
    transactional producers (a regression seen in the crash test)."""
    settings = Settings(store="memory://", data_dir=tmp_path, processing_guarantee="exactly_once")
    worker = StreamWorker(settings, None, Metrics.create(CollectorRegistry()), passthrough=True)
    worker.app.in_worker = True  # what faust.Worker.on_start does
    assert worker.app.in_transaction
    assert worker.app.consumer.in_transaction
