"""Shared unit-test fixtures."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from streamrec.metrics import Metrics
from streamrec.settings import Settings
from streams.app import StreamWorker

#: ``make(guarantee="at_least_once", registry=None) -> StreamWorker``
WorkerFactory = Callable[..., StreamWorker]


@pytest.fixture
def passthrough_worker(tmp_path: Path) -> WorkerFactory:
    """A passthrough ``StreamWorker`` (no model) on memory tables, never started: for tests
    that drive its Faust hooks directly."""

    def make(
        guarantee: str = "at_least_once", registry: CollectorRegistry | None = None
    ) -> StreamWorker:
        settings = Settings(
            store="memory://", data_dir=tmp_path / guarantee, processing_guarantee=guarantee
        )
        metrics = Metrics.create(registry or CollectorRegistry())
        return StreamWorker(settings, None, metrics, passthrough=True)

    return make
