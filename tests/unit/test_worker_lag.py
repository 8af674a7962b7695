"""The worker's lag gauge: one series per assigned events partition, none for moved ones."""

from __future__ import annotations

from unittest import mock

from faust.types import TP
from prometheus_client import CollectorRegistry

from tests.unit.conftest import WorkerFactory


def test_lag_is_exported_for_assigned_partitions_and_dropped_when_they_move(
    passthrough_worker: WorkerFactory,
) -> None:
    registry = CollectorRegistry()
    worker = passthrough_worker(registry=registry)
    topic = worker.settings.topic_events
    p0, p1, changelog = TP(topic, 0), TP(topic, 1), TP("sessions-changelog", 0)
    consumer = worker.app.consumer
    highwater = {p0: 120, p1: 50, changelog: 9}

    def lag(partition: int) -> float | None:
        return registry.get_sample_value(
            "streamrec_consumer_lag_messages", {"topic": topic, "partition": str(partition)}
        )

    with (
        mock.patch.object(consumer, "highwater", side_effect=highwater.get),
        mock.patch.object(consumer, "_committed_offset", {p0: 100, p1: 50}),
        mock.patch.object(consumer, "assignment", return_value={p0, p1, changelog}),
    ):
        worker._update_lag(worker.app)
    assert (lag(0), lag(1)) == (20.0, 0.0)
    assert (
        registry.get_sample_value(
            "streamrec_consumer_lag_messages", {"topic": "sessions-changelog", "partition": "0"}
        )
        is None
    )

    # Partition 0 moved to another worker in a rebalance: its last value must not linger.
    with (
        mock.patch.object(consumer, "highwater", side_effect=highwater.get),
        mock.patch.object(consumer, "_committed_offset", {p1: 40}),
        mock.patch.object(consumer, "assignment", return_value={p1}),
    ):
        worker._update_lag(worker.app)
    assert (lag(0), lag(1)) == (None, 10.0)
