"""After a rebalance, no event reaches the agent before the seek to the committed offsets.

faust-streaming resumes the events partitions with the fetcher running and awaits the seek
only afterwards; records delivered in between leave a hole in the acks that no commit
crosses (a partition stalled with lag > 0). The worker stops the fetch flow on
``on_rebalance_complete``; this drives Faust's own ``Recovery.on_recovery_completed`` and
records whether the flow was open at each step.
"""

from __future__ import annotations

import asyncio
from typing import Any
from unittest import mock

from faust.types import TP
from prometheus_client import CollectorRegistry

from streamrec.metrics import Metrics
from streamrec.settings import Settings
from streams.app import StreamWorker


def _recovery_steps(worker: StreamWorker) -> tuple[list[tuple[str, bool]], bool]:
    app = worker.app
    consumer = app.consumer
    steps: list[tuple[str, bool]] = []
    resume_flow = consumer.resume_flow

    def record(name: str) -> Any:
        def step(*_: Any) -> None:
            steps.append((name, consumer.flow_active))

        return step

    async def perform_seek() -> None:
        record("perform_seek")()

    def resume_flow_recorded() -> None:
        record("resume_flow")()
        resume_flow()

    async def run() -> None:
        consumer.resume_flow()  # as Faust leaves it after reading the changelogs
        events_tp = TP(worker.settings.topic_events, 0)
        with (
            mock.patch.object(consumer, "assignment", return_value={events_tp}),
            mock.patch.object(consumer, "resume_partitions", record("resume_partitions")),
            mock.patch.object(consumer, "perform_seek", perform_seek),
            mock.patch.object(consumer, "resume_flow", resume_flow_recorded),
            mock.patch.object(app, "_fetcher") as fetcher,
        ):
            fetcher.maybe_start = mock.AsyncMock()
            await app.tables.recovery.on_recovery_completed(app.consumer_generation_id)

    asyncio.run(run())
    return steps, consumer.flow_active


def _worker(tmp_path: Any, guarantee: str) -> StreamWorker:
    settings = Settings(store="memory://", data_dir=tmp_path, processing_guarantee=guarantee)
    return StreamWorker(settings, None, Metrics.create(CollectorRegistry()), passthrough=True)


def test_events_partitions_resume_and_seek_with_the_flow_stopped(tmp_path: Any) -> None:
    for guarantee in ("at_least_once", "exactly_once"):
        steps, flow_after = _recovery_steps(_worker(tmp_path / guarantee, guarantee))
        assert steps == [
            ("resume_partitions", False),
            ("perform_seek", False),
            ("resume_flow", False),
        ], guarantee
        # ... and Faust opens the flow again once the seek is done.
        assert flow_after is True
