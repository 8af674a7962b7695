"""The Faust app: topics, the session table, the events agent and the worker's timers.

The agent only decodes, updates the table, calls the recommender and sends; the logic lives
in ``streams.handler`` (batch accounting) and ``serving.service`` (models, index, catalog).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import faust
from faust.streams import _current_event
from faust.types import TP, EventT
from mode.types.signals import BaseSignalT

from schemas.codec import Limits
from serving.service import Recommender
from serving.session import SessionState
from streamrec.kafka_config import faust_broker_kwargs
from streamrec.metrics import Metrics
from streamrec.settings import Settings
from streams.batching import take_batches
from streams.handler import EventBatchHandler, InMessage, OutMessage, SlateResult
from streams.produce import BatchProducer, SentBatch

log = logging.getLogger("streamrec.worker")

#: Names of the Faust tables; ``streamrec topics create`` pre-creates their changelogs.
SESSIONS_TABLE = "sessions"


def _use_event(event: Any) -> None:
    """Make ``event`` the current event, so a table write goes to its partition's changelog.

    Faust routes table changelog writes through the *current* event, which ``take_events``
    does not set per event; we set it explicitly for each write of a batch.
    """
    _current_event.set(weakref.ref(event))


def _when_consumer_created(app: faust.App, hook: Callable[[Any], None]) -> None:
    """Call ``hook(app.consumer)`` once the started app has created its consumer, before the
    consumer starts.

    Not earlier: the consumer reads ``app.in_transaction`` when it is created, and that
    (cached) property is true only once a Faust worker runs the app. A consumer created at
    build time stays at-least-once for good: no transactional producers are ever started
    and the first exactly-once send fails ("No transaction producer found").
    """
    first_start = app.on_first_start

    async def on_first_start() -> None:  # the app's dependencies (its consumer) exist by now
        hook(app.consumer)
        await first_start()

    app.on_first_start = on_first_start  # type: ignore[method-assign]


class StreamWorker:
    """Builds and owns the Faust app for one worker process."""

    def __init__(
        self,
        settings: Settings,
        recommender: Recommender | None,
        metrics: Metrics,
        passthrough: bool = False,
    ) -> None:
        """``passthrough=True`` (benchmark reference): forward each raw event to the
        recommendations topic with no decoding, state or model, through the same Faust
        machinery and batching."""
        if recommender is None and not passthrough:
            raise ValueError("StreamWorker: a recommender is required unless passthrough=True")
        self.settings = settings
        self.recommender = recommender
        self.metrics = metrics
        self.passthrough = passthrough
        self.exactly_once = settings.processing_guarantee == "exactly_once"
        #: Exactly-once: held while a batch is processed and by every offset commit, so a
        #: transaction never commits half a batch (see ``_guard_commits``).
        self._batch_lock = asyncio.Lock()
        #: At-least-once: the latest of the chained tasks that send a batch's session
        #: changelog records once its slates are on the broker (see ``_changelog_after``).
        self._changelog_tail: asyncio.Future[None] | None = None
        #: (topic, partition) label pairs of the lag gauge this worker exports.
        self._lag_exported: set[tuple[str, str]] = set()
        self.feeds: list[Any] = []
        # One thread for model work: batches are processed in order, and the event loop
        # stays free to heartbeat and fetch while torch/faiss run.
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="streamrec-model")
        self.handler = EventBatchHandler(
            limits=Limits.from_settings(settings),
            metrics=metrics,
            max_len=settings.session_max_len,
            dedupe_window_ms=int(settings.dedupe_window_s * 1000),
            knows_item=recommender.knows_item if recommender is not None else lambda _: True,
        )
        self.app = self._build_app()
        # At-least-once sends: per-partition record batches through Faust's aiokafka producer.
        # (Faust's aiokafka driver creates that producer on start; no public getter.)
        producer: Any = self.app.producer
        self.batches = BatchProducer(producer._ensure_producer)

    def _build_app(self) -> faust.App:
        s = self.settings
        app = faust.App(
            s.app_id,
            **faust_broker_kwargs(s),
            store=s.store,
            datadir=str(s.data_dir),
            processing_guarantee=s.processing_guarantee,
            topic_partitions=s.topic_partitions,
            topic_replication_factor=s.topic_replication,
            web_enabled=False,
            consumer_auto_offset_reset="earliest",
            producer_max_request_size=max(1_048_576, 4 * s.max_message_bytes),
            # Let slates and changelog writes of one batch travel in few produce requests.
            producer_linger=0.005,
            producer_max_batch_size=256 * 1024,
            producer_compression_type="lz4",
            stream_wait_empty=False,
            broker_commit_interval=1.0,
            # A crashed worker's partitions move after this long (Faust's default is 60 s).
            broker_session_timeout=s.kafka_session_timeout_s,
            broker_heartbeat_interval=min(3.0, s.kafka_session_timeout_s / 3),
            # Table keys (user ids) and values (session dicts) go through JSON, so both come
            # back as the same str/dict after changelog recovery; topics set raw explicitly.
            key_serializer="json",
            value_serializer="json",
        )
        events = app.topic(s.topic_events, key_serializer="raw", value_serializer="raw")
        self.recs_topic = app.topic(
            s.topic_recommendations, key_serializer="raw", value_serializer="raw"
        )
        self.dlq_topic = app.topic(s.topic_dlq, key_serializer="raw", value_serializer="raw")
        self.sessions = app.Table(
            SESSIONS_TABLE,
            default=None,
            partitions=s.topic_partitions,
        )

        async def process(stream: faust.StreamT) -> None:
            handle = self.forward_batch if self.passthrough else self.handle_batch
            # Events, not values: the batch keeps each message's topic/partition/offset for
            # the DLQ and the event to route table writes by (streams.batching).
            batches = take_batches(stream, s.batch_size, s.batch_within_s)
            self._guard_commits(app.consumer)
            if not self.exactly_once:
                async for batch in batches:
                    await handle(batch)
                return
            async for batch in batches:
                # take_batches acks the batch's events right after this body returns, before
                # its next suspension point (Stream.ack never awaits), so a commit waiting on
                # the lock sees the batch's outputs, changelog writes and offsets together.
                async with self._batch_lock:
                    await handle(batch)

        app.agent(events, name="streamrec.events")(process)
        _when_consumer_created(app, self._batch_fetches)
        app.on_rebalance_complete.connect(self._hold_flow_until_seek)

        async def refresh_gauges() -> None:
            self.metrics.session_users.set(len(self.sessions))
            if self.recommender is not None:
                self.metrics.index_items.set(self.recommender.index_size)
            self._update_lag(app)

        app.timer(2.0)(refresh_gauges)
        return app

    def _batch_fetches(self, consumer: Any) -> None:
        """Let the broker hold each fetch of the consumer up to ``fetch_max_wait_ms`` until it
        has ``fetch_min_bytes`` (aiokafka's defaults, as Faust leaves them: answer as soon as
        there is one byte).

        Below the worker's capacity every fetch otherwise brings the few events that arrived
        since the last one, and each costs a round through aiokafka's thread, Faust's
        delivery and a micro-batch: measured in a paced stream benchmark at 500 events/s,
        the consumer thread alone took 23% of a core, and p50/p99 were 108-239 / 210-1,963
        ms; with fetches held 10 ms for 64 KiB, 12% and 75-82 / 136-181 ms (two runs each).
        A backlog fills the bytes at once, so throughput is unchanged.
        """
        thread = consumer._thread  # Faust's AIOKafkaConsumerThread; no public handle
        create = thread._create_worker_consumer
        s = self.settings

        def create_batched(transport: Any) -> Any:
            aiokafka_consumer = create(transport)
            # aiokafka reads both when it starts the consumer's fetcher.
            aiokafka_consumer._fetch_min_bytes = s.fetch_min_bytes
            aiokafka_consumer._fetch_max_wait_ms = s.fetch_max_wait_ms
            return aiokafka_consumer

        thread._create_worker_consumer = create_batched

    async def _hold_flow_until_seek(
        self, sender: Any, /, *_: Any, signal: BaseSignalT[Any], **__: Any
    ) -> None:
        """Deliver no event between a rebalance's recovery and the seek to committed offsets.

        faust-streaming 0.15 sends ``on_rebalance_complete``, then resumes the events
        partitions while the fetcher is still running (it was resumed to read the
        changelogs), and only then awaits the seek to the committed offsets. Records fetched
        in that window reach the agent, are acked and may be committed; the seek then puts
        the committed offset back, and the partition is left with a hole in its acks that no
        commit ever crosses: it stalls with lag > 0 (and under exactly-once its transaction
        never commits). Stopping the fetch flow here makes the fetcher wait; Faust resumes it
        itself once the seek is done.
        """
        self.app.consumer.stop_flow()

    def _update_lag(self, app: faust.App) -> None:
        consumer = app.consumer
        gauge = self.metrics.consumer_lag
        exported: set[tuple[str, str]] = set()
        for tp in consumer.assignment():
            if tp.topic != self.settings.topic_events:
                continue
            highwater = consumer.highwater(tp)
            # Faust has no public getter for the committed offset of a partition.
            committed = consumer._committed_offset.get(tp)  # type: ignore[attr-defined]
            if highwater is None:
                continue
            labels = (tp.topic, str(tp.partition))
            gauge.labels(*labels).set(max(0, highwater - (committed or 0)))
            exported.add(labels)
        # A partition that moved to another worker is that worker's to report: a stale value
        # here would show lag (and page, StreamrecPartitionStuck) where nothing is behind.
        for labels in self._lag_exported - exported:
            gauge.remove(*labels)
        self._lag_exported = exported

    def _get_state(self, user_id: str, ref: Any) -> SessionState:
        # The RocksDB store reads from the partition of the *current* event: set it first.
        _use_event(ref)
        return SessionState.from_json(self.sessions.get(user_id))

    async def forward_batch(self, batch: list[EventT]) -> None:
        self.metrics.batch_size.observe(len(batch))
        await self._send_all(
            self.recs_topic,
            [OutMessage(ev.message.key, ev.message.value or b"", ev) for ev in batch],
        )
        self.metrics.recommendations_produced.inc(len(batch))

    async def handle_batch(self, batch: list[EventT]) -> None:
        assert self.recommender is not None
        self.metrics.batch_size.observe(len(batch))
        msgs = [
            InMessage(
                key=ev.message.key,
                value=ev.message.value,
                topic=ev.message.topic,
                partition=ev.message.partition,
                offset=ev.message.offset,
                ref=ev,
            )
            for ev in batch
        ]
        prepared = self.handler.prepare(msgs, self._get_state)
        await self._send_all(self.dlq_topic, prepared.dead_letters)
        if not prepared.users:
            return
        histories = prepared.histories
        loop = asyncio.get_running_loop()
        slates: Sequence[SlateResult] | None = None
        error: BaseException | None = None
        try:
            slates = await loop.run_in_executor(
                self.executor, self.recommender.recommend, histories
            )
        except Exception as exc:  # a model failure must not kill the worker
            log.exception("stage 'recommend' failed for a batch of %d users", len(histories))
            error = exc
        finished = self.handler.finish(
            prepared,
            slates,
            model_version=self.recommender.model_version,
            index_version=self.recommender.index_version,
            error=error,
        )
        # Outputs first, session changelog after (at-least-once: after the broker has the
        # slates): if the worker dies in between, the redelivered events find no record of
        # themselves and are answered again (a repeated trigger_event_id), rather than taken
        # for duplicates that never got a slate.
        await self._send_all(self.dlq_topic, finished.dead_letters)
        if self.exactly_once:
            await self._send_all(self.recs_topic, finished.recommendations)
            await self._write_sessions_in_transaction(finished.session_writes)
            return
        sent = await self.batches.send(
            self.recs_topic.get_topic_name(),
            [(m.key, m.value, None) for m in finished.recommendations],
        )
        self._write_sessions_after(sent, finished.session_writes)

    # --- exactly-once ------------------------------------------------------------------------
    # faust-streaming 0.15 keeps one transactional producer per consumed partition and commits
    # each partition's offsets in its transaction on a timer. Left to itself it (1) commits at
    # any await of a batch, so a transaction can hold part of a batch's outputs without its
    # offsets; (2) routes a send to the transaction of the *output* partition, which is not
    # the consumed one unless the producer of the events hashed keys like aiokafka does;
    # (3) leaves table changelog writes in a buffer (send_soon) that reaches the producer
    # after the offsets are committed. The three methods below close each gap:
    # docs/reliability.md, "Exactly-once".

    def _guard_commits(self, consumer: Any) -> None:
        """Make every offset commit wait for what the acked events still owe Kafka.

        Exactly-once: the batch in progress (the batch lock). At-least-once: the session
        changelog records still waiting for their batch's slates (``_changelog_after``).
        """
        if getattr(consumer, "_streamrec_guarded", False):
            return
        commit = consumer.commit
        lock = self._batch_lock

        async def guarded_commit(topics: Any = None, start_new_transaction: bool = True) -> bool:
            if not self.exactly_once:
                # No await between the check and ``commit`` computing the offsets: every
                # acked event's changelog records are in the producer buffer by then, and
                # Faust flushes that buffer before it commits (at-least-once branch).
                while self._changelog_tail is not None and not self._changelog_tail.done():
                    await asyncio.wait([self._changelog_tail])
                return bool(await commit(topics, start_new_transaction=start_new_transaction))
            async with lock:
                return bool(await commit(topics, start_new_transaction=start_new_transaction))

        # Every commit path (the commit timer, commit_every, rebalances, shutdown) calls
        # ``self.commit``, so an instance attribute covers them all.
        consumer.commit = guarded_commit
        consumer._streamrec_guarded = True

    # --- at-least-once -------------------------------------------------------------------------
    # A batch's slates and its session changelog records go to different topics: sent side by
    # side, a crash between their produce requests can leave the changelog holding events whose
    # slates never reached Kafka, and their redelivery is then taken for duplicates (measured:
    # up to one micro-batch held with no slate). The local store is written at once (the next
    # batch reads it); the changelog records follow once the broker has the slates.

    def _write_sessions_after(
        self, slates: Sequence[SentBatch], writes: Sequence[tuple[str, dict[str, Any], Any]]
    ) -> None:
        self._store_locally(writes)
        if not writes:
            return
        self._changelog_tail = asyncio.ensure_future(
            self._changelog_after(self._changelog_tail, slates, writes)
        )

    def _store_locally(self, writes: Sequence[tuple[str, dict[str, Any], Any]]) -> None:
        table = self.sessions
        for user_id, state, ref in writes:
            _use_event(ref)  # the RocksDB store writes to the current event's partition
            table.data[user_id] = state

    async def _changelog_after(
        self,
        previous: asyncio.Future[None] | None,
        slates: Sequence[SentBatch],
        writes: Sequence[tuple[str, dict[str, Any], Any]],
    ) -> None:
        """Send ``writes`` to the changelog once ``slates`` are acknowledged by the broker.

        Chained after the previous batch's task, so a user's changelog records keep their
        order. A slate that failed to send does not hold its session back: the state is
        written either way, as before (the failure is logged by ``streams.produce``). Each
        changelog batch, once acknowledged, records its last offset in the RocksDB store of
        its partition, as Faust's own changelog callback does: a clean restart then reads
        only the changelog's tail.
        """
        if previous is not None:
            await asyncio.wait([previous])
        await asyncio.gather(*(b.future for b in slates), return_exceptions=True)
        changelog = self.sessions.changelog_topic
        records = [
            (
                changelog.prepare_key(user_id, None)[0],
                changelog.prepare_value(state, None)[0],
                ref.message.partition,
            )
            for user_id, state, ref in writes
        ]
        for batch in await self.batches.send(changelog.get_topic_name(), records):
            batch.future.add_done_callback(functools.partial(self._persist_offset, batch))

    def _persist_offset(self, batch: SentBatch, _: asyncio.Future[Any]) -> None:
        offset = batch.last_offset()
        if offset is not None:
            store: Any = self.sessions.data
            store.set_persisted_offset(TP(batch.topic, batch.partition), offset)

    async def _send_in_transaction(
        self,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        ref: Any,
        partition: int | None = None,
    ) -> None:
        """Hand one record to the transactional producer of ``ref``'s consumed partition.

        aiokafka flushes a producer's pending records before it commits the transaction, so
        a record handed over here is in the same transaction as the offset of ``ref``.
        """
        tp = ref.message.tp
        group = self.app.assignor.group_for_topic(tp.topic)
        await self.app.producer.send(
            topic,
            key,
            value,
            partition,
            None,
            None,
            transactional_id=f"{self.app.conf.id}-{group}-{tp.partition}",
        )

    async def _write_sessions_in_transaction(
        self, writes: Sequence[tuple[str, dict[str, Any], Any]]
    ) -> None:
        """Update the session table and send its changelog records into the transaction.

        What ``table[key] = value`` does, minus its send_soon buffer: the local store is
        written, and the changelog record goes to the partition (and transaction) of the
        event that changed it.
        """
        self._store_locally(writes)
        changelog = self.sessions.changelog_topic
        name = changelog.get_topic_name()
        for user_id, state, ref in writes:
            key, _ = changelog.prepare_key(user_id, None)
            value, _ = changelog.prepare_value(state, None)
            await self._send_in_transaction(name, key, value, ref, ref.message.partition)

    async def _send_all(self, topic: faust.TopicT, messages: list[OutMessage]) -> None:
        if self.exactly_once:
            name = topic.get_topic_name()
            for m in messages:
                if m.ref is None:  # not tied to a consumed event (passthrough only)
                    await topic.send(key=m.key, value=m.value)
                else:
                    await self._send_in_transaction(name, m.key, m.value, m.ref)
            return
        # One batch per partition (streams.produce); Faust flushes the producer before it
        # commits offsets, so at-least-once still holds.
        await self.batches.send(topic.get_topic_name(), [(m.key, m.value, None) for m in messages])
