"""Batched at-least-once sends: per-partition batches, in order, split at the batch size."""

from __future__ import annotations

import asyncio
import logging
from typing import Any
from unittest import mock

import pytest
from aiokafka.errors import KafkaConnectionError, KafkaTimeoutError
from aiokafka.producer.message_accumulator import BatchBuilder

from streams.produce import BatchProducer, SentBatch


class FakeProducer:
    """The parts of ``AIOKafkaProducer`` that ``BatchProducer`` uses, with aiokafka's own
    ``BatchBuilder``; partitions by the key's last byte."""

    def __init__(self, batch_size: int = 16_384) -> None:
        self.batch_size = batch_size
        self.client = mock.Mock(_wait_on_metadata=mock.AsyncMock())
        self.submitted: list[tuple[str, int, list[tuple[bytes | None, bytes | None]]]] = []
        self.futures: list[asyncio.Future[Any]] = []

    def _partition(self, topic: str, partition: Any, key: bytes, *_: Any) -> int:
        return key[-1] % 3

    def create_batch(self) -> BatchBuilder:
        return BatchBuilder(self.batch_size, 0)

    async def send_batch(self, batch: BatchBuilder, topic: str, *, partition: int) -> Any:
        records = [(r.key, r.value) for r in _records(batch)]
        self.submitted.append((topic, partition, records))
        self.futures.append(asyncio.get_running_loop().create_future())
        return self.futures[-1]


def _records(batch: BatchBuilder) -> list[Any]:
    from aiokafka.record.default_records import DefaultRecordBatch

    return list(DefaultRecordBatch(bytes(batch._build())))


def test_records_go_out_as_one_batch_per_partition_in_order() -> None:
    producer = FakeProducer()

    async def run() -> list[SentBatch]:
        batches = BatchProducer(lambda: producer)
        keys = [b"u0", b"u1", b"u3", b"u4", b"u6"]  # partitions 0, 1, 0, 1, 0 (by last byte)
        recs = [(k, b"v" + k, None) for k in keys] + [(b"x", b"pinned", 2)]
        return await batches.send("recs", recs)

    sent = asyncio.run(run())
    assert [(t, p, r) for t, p, r in producer.submitted] == [
        ("recs", 0, [(b"u0", b"vu0"), (b"u3", b"vu3"), (b"u6", b"vu6")]),
        ("recs", 1, [(b"u1", b"vu1"), (b"u4", b"vu4")]),
        ("recs", 2, [(b"x", b"pinned")]),
    ]
    assert [(b.partition, b.count) for b in sent] == [(0, 3), (1, 2), (2, 1)]
    producer.client._wait_on_metadata.assert_awaited_with("recs")


def test_a_full_batch_is_sent_and_a_new_one_started() -> None:
    producer = FakeProducer(batch_size=256)

    async def run() -> list[SentBatch]:
        return await BatchProducer(lambda: producer).send(
            "recs", [(b"k", bytes([i]) * 100, 0) for i in range(5)]
        )

    sent = asyncio.run(run())
    counts = [len(r) for _, _, r in producer.submitted]
    assert sum(counts) == 5
    assert len(counts) > 1
    assert [b.count for b in sent] == counts
    values = [v for _, _, recs in producer.submitted for _, v in recs]
    assert values == [bytes([i]) * 100 for i in range(5)]  # order kept across batches


def test_offsets_and_failures(caplog: pytest.LogCaptureFixture) -> None:
    producer = FakeProducer()

    async def run() -> list[int | None]:
        batches = BatchProducer(lambda: producer)
        assert await batches.send("recs", []) == []
        sent = await batches.send(
            "recs", [(b"a0", b"1", None), (b"b0", b"2", None), (b"c1", b"3", None)]
        )
        assert [b.last_offset() for b in sent] == [None, None]  # not acknowledged yet
        producer.futures[0].set_result(mock.Mock(offset=100))
        producer.futures[1].set_exception(RuntimeError("broker said no"))
        await asyncio.sleep(0)
        return [b.last_offset() for b in sent]

    with caplog.at_level(logging.ERROR, logger="streamrec.worker"):
        offsets = asyncio.run(run())
    assert offsets == [101, None]  # base offset 100 + 2 records - 1
    assert "send of 1 records to recs[1] failed: RuntimeError('broker said no')" in caplog.text


def test_a_timed_out_hand_over_is_retried_once_the_broker_is_back(
    caplog: pytest.LogCaptureFixture,
) -> None:
    producer = FakeProducer()
    real_send = producer.send_batch
    fails = [KafkaTimeoutError(), KafkaConnectionError("broker away")]

    async def flaky(batch: BatchBuilder, topic: str, *, partition: int) -> Any:
        if fails:
            raise fails.pop(0)
        return await real_send(batch, topic, partition=partition)

    async def run() -> list[SentBatch]:
        with mock.patch("streams.produce.RETRY_S", (0.0,)):
            return await BatchProducer(lambda: producer).send("recs", [(b"a0", b"1", None)])

    producer.send_batch = flaky  # type: ignore[method-assign]
    with caplog.at_level(logging.WARNING, logger="streamrec.worker"):
        sent = asyncio.run(run())
    assert [(b.partition, b.count) for b in sent] == [(0, 1)]
    assert producer.submitted == [("recs", 0, [(b"a0", b"1")])]  # handed over exactly once
    assert caplog.text.count("send to recs[0]") == 2
