"""Worker ordering against Faust: no event before the seek; no changelog before the slates.

faust-streaming resumes the events partitions with the fetcher running and awaits the seek
only afterwards; records delivered in between leave a hole in the acks that no commit
crosses (a partition stalled with lag > 0). The worker stops the fetch flow on
``on_rebalance_complete``; this drives Faust's own ``Recovery.on_recovery_completed`` and
records whether the flow was open at each step.

At-least-once, a batch's session changelog records wait until the broker has its slates
(else a crash between the two leaves events held in a session with no slate), keep their
order across batches, and every offset commit waits for them.
"""

from __future__ import annotations

import asyncio
from typing import Any
from unittest import mock

from faust.types import TP

from streams.app import StreamWorker
from streams.produce import SentBatch
from tests.unit.conftest import WorkerFactory


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


def test_events_partitions_resume_and_seek_with_the_flow_stopped(
    passthrough_worker: WorkerFactory,
) -> None:
    for guarantee in ("at_least_once", "exactly_once"):
        steps, flow_after = _recovery_steps(passthrough_worker(guarantee))
        assert steps == [
            ("resume_partitions", False),
            ("perform_seek", False),
            ("resume_flow", False),
        ], guarantee
        # ... and Faust opens the flow again once the seek is done.
        assert flow_after is True


class _Ref:
    """What the worker keeps of a consumed event: its message (for the partition)."""

    def __init__(self, partition: int) -> None:
        self.message = mock.Mock(partition=partition)


def test_at_least_once_sends_the_changelog_only_after_the_slates_and_in_order(
    passthrough_worker: WorkerFactory,
) -> None:
    worker = passthrough_worker()
    sent: list[tuple[int, bytes, bytes]] = []
    inner_commits: list[bool] = []
    persisted: list[tuple[TP, int]] = []
    changelog = worker.sessions.changelog_topic.get_topic_name()

    async def inner_commit(topics: Any = None, start_new_transaction: bool = True) -> bool:
        # What the commit would find in the producer when it computes the offsets.
        inner_commits.append(len(sent) == 2)
        return True

    async def run() -> None:
        loop = asyncio.get_running_loop()
        acks: list[asyncio.Future[Any]] = []

        async def send(topic: str, records: list[Any]) -> list[SentBatch]:
            assert topic == changelog
            out = []
            for key, value, partition in records:
                sent.append((partition, key, value))
                acks.append(loop.create_future())
                out.append(SentBatch(topic, partition, 1, acks[-1]))
            return out

        consumer = worker.app.consumer
        consumer.commit = inner_commit
        worker._guard_commits(consumer)
        ref = _Ref(partition=3)
        first, second = loop.create_future(), loop.create_future()
        store = worker.sessions.data
        with (
            mock.patch.object(worker.batches, "send", send),
            mock.patch.object(
                store, "set_persisted_offset", lambda tp, o: persisted.append((tp, o)), create=True
            ),
        ):
            worker._write_sessions_after([SentBatch("recs", 0, 1, first)], [("u1", {"n": 1}, ref)])
            worker._write_sessions_after([SentBatch("recs", 1, 1, second)], [("u1", {"n": 2}, ref)])
            # The local store has the newest state at once: the next batch reads it.
            assert worker.sessions.data["u1"] == {"n": 2}
            commit = asyncio.ensure_future(consumer.commit())
            second.set_result(None)  # the later batch's slates are on the broker first ...
            for _ in range(5):
                await asyncio.sleep(0)
            assert sent == []  # ... but nothing goes to the changelog before the first's
            assert inner_commits == []  # and no offset is committed meanwhile
            first.set_exception(RuntimeError("broker said no"))  # a failed slate: state kept
            assert await commit is True
            # Each acknowledged changelog batch records its last offset for a clean restart.
            acks[0].set_result(mock.Mock(offset=41))
            acks[1].set_exception(RuntimeError("lost"))  # a failed one records nothing
            await asyncio.sleep(0)
        assert sent == [(3, b'"u1"', b'{"n":1}'), (3, b'"u1"', b'{"n":2}')]
        assert inner_commits == [True]
        assert persisted == [(TP(changelog, 3), 41)]

    asyncio.run(run())
