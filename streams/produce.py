"""Batched sends for at-least-once: one Kafka record batch per partition per call.

Faust's ``Topic.send_soon`` costs a ``FutureMessage``, a producer-buffer round through the
event loop and an ``AIOKafkaProducer.send`` per record; on a 2-core box that was a third of
the worker's event-loop time (py-spy, stream benchmark). A micro-batch's records for one
partition are instead appended to one aiokafka ``BatchBuilder`` (C extension) and handed over
with one ``send_batch``: the same producer, the same partitioner (murmur2 of the key, as
Java clients), the same compression, and one future per partition batch.

Delivery is unchanged: the batches sit in the producer's accumulator like ``send`` records,
Faust's at-least-once commit flushes the producer before it commits offsets, and a failed
batch is logged (as Faust logs a failed ``send_soon``). Unlike ``send_soon``, handing a batch
over can wait: for the topic's metadata, or for the partition's previous batch to leave. If
the broker is away long enough for that to time out, the send is retried (with a warning)
until it goes through: the agent waits, so nothing past it is acked or committed.
Exactly-once does not use this: its records go to the transactional producer of the consumed
partition (``StreamWorker._send_in_transaction``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from aiokafka.errors import KafkaConnectionError, KafkaTimeoutError

T = TypeVar("T")
#: Seconds between attempts to hand records over while the broker is unreachable.
RETRY_S = (0.5, 1.0, 2.0, 5.0)
log = logging.getLogger("streamrec.worker")

#: ``(key, value, partition)``; ``partition=None`` hashes the key like ``producer.send``.
Record = tuple[bytes | None, bytes | None, int | None]


@dataclass(frozen=True, slots=True)
class SentBatch:
    """One partition's batch: ``future`` resolves to the broker's RecordMetadata of its first
    record (``offset`` = base offset), so its records hold offsets ``offset .. + count - 1``."""

    topic: str
    partition: int
    count: int
    future: asyncio.Future[Any]

    def last_offset(self) -> int | None:
        """The offset of the batch's last record once it is acknowledged, else None."""
        if not self.future.done() or self.future.cancelled() or self.future.exception():
            return None
        meta = self.future.result()
        return None if meta is None else int(meta.offset) + self.count - 1


class BatchProducer:
    """Sends lists of records through an ``AIOKafkaProducer`` as per-partition batches.

    ``producer`` is given as a getter: Faust creates its aiokafka producer on start.
    """

    def __init__(self, producer: Callable[[], Any]) -> None:
        self._producer = producer

    async def send(self, topic: str, records: Sequence[Record]) -> list[SentBatch]:
        """Queue ``records`` in order per partition; returns one :class:`SentBatch` per
        batch handed to the producer (a partition's records fill several batches only past
        the producer's batch size)."""
        if not records:
            return []
        producer = self._producer()
        await _retrying(f"metadata for {topic}", lambda: producer.client._wait_on_metadata(topic))
        by_partition: dict[int, list[tuple[bytes | None, bytes | None]]] = {}
        for key, value, partition in records:
            if partition is None:
                partition = producer._partition(topic, None, key, value, key, value)
            by_partition.setdefault(partition, []).append((key, value))
        sent: list[SentBatch] = []
        for partition, rows in by_partition.items():
            batch, count = producer.create_batch(), 0
            for key, value in rows:
                if batch.append(key=key, value=value, timestamp=None) is None:
                    sent.append(await self._submit(producer, batch, topic, partition, count))
                    batch, count = producer.create_batch(), 0
                    if batch.append(key=key, value=value, timestamp=None) is None:
                        raise ValueError(
                            f"produce: a {len(value or b'')}-byte record for {topic} does not "
                            "fit an empty batch (producer_max_batch_size)"
                        )
                count += 1
            sent.append(await self._submit(producer, batch, topic, partition, count))
        return sent

    @staticmethod
    async def _submit(
        producer: Any, batch: Any, topic: str, partition: int, count: int
    ) -> SentBatch:
        future = await _retrying(
            f"send to {topic}[{partition}]",
            lambda: producer.send_batch(batch, topic, partition=partition),
        )
        out = SentBatch(topic, partition, count, future)
        future.add_done_callback(lambda f: _log_failure(out, f))
        return out


async def _retrying(what: str, call: Callable[[], Awaitable[T]]) -> T:
    """``await call()``, again after a pause while it times out or cannot connect (a batch
    that timed out waiting for room was never queued, so trying it again sends it once)."""
    attempt = 0
    while True:
        try:
            return await call()
        except (KafkaTimeoutError, KafkaConnectionError) as exc:
            pause = RETRY_S[min(attempt, len(RETRY_S) - 1)]
            log.warning("%s: %r; retrying in %.1f s", what, exc, pause)
            attempt += 1
            await asyncio.sleep(pause)


def _log_failure(batch: SentBatch, future: asyncio.Future[Any]) -> None:
    if future.cancelled():
        log.error(
            "send of %d records to %s[%d] was cancelled", batch.count, batch.topic, batch.partition
        )
    elif future.exception() is not None:
        log.error(
            "send of %d records to %s[%d] failed: %r",
            batch.count,
            batch.topic,
            batch.partition,
            future.exception(),
        )
