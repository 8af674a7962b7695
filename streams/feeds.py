"""Broadcast feeds every worker reads in full: the item catalog and model hot-swap notices.

The catalog is global state (every worker retrieves over every item), so each worker reads
all partitions of the compacted items topic itself, without a consumer group, from the
beginning: that rebuilds the catalog and the index on start, then tails updates. The control
topic works the same way; its last notice names the model every worker should serve.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition

from schemas.codec import DecodeError, Limits, decode_item
from serving.service import Recommender
from streamrec.kafka_config import confluent_config, consume_available
from streamrec.metrics import Metrics
from streamrec.settings import Settings

log = logging.getLogger("streamrec.feeds")


class _BroadcastFeed:
    """Reads every partition of one topic from the beginning, in a daemon thread."""

    topic: str
    name: str

    def __init__(self, settings: Settings, recommender: Recommender, metrics: Metrics) -> None:
        self.settings = settings
        self.recommender = recommender
        self.metrics = metrics
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.caught_up = threading.Event()

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._run, name=f"streamrec-{self.name}", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _consumer(self) -> Consumer:
        conf: dict[str, Any] = {
            **confluent_config(self.settings),
            "group.id": f"{self.settings.app_id}-{self.name}-unused",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
        }
        return Consumer(conf)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._consume()
            except Exception:  # a broken feed must not take the worker down; retry
                log.exception("feed %s failed; retrying in 2 s", self.name)
                self._stop.wait(2.0)

    def _consume(self) -> None:
        consumer = self._consumer()
        try:
            meta = consumer.list_topics(self.topic, timeout=10)
            topic_meta = meta.topics.get(self.topic)
            if topic_meta is None or topic_meta.error is not None or not topic_meta.partitions:
                log.warning("feed %s: topic %r not found yet; waiting", self.name, self.topic)
                self._stop.wait(2.0)
                return
            parts = sorted(topic_meta.partitions)
            consumer.assign([TopicPartition(self.topic, p, OFFSET_BEGINNING) for p in parts])
            at_eof: set[int] = set()
            while not self._stop.is_set():
                msgs = consume_available(consumer, 500, 0.2)
                for msg in msgs:
                    err = msg.error()
                    partition, offset = msg.partition() or 0, msg.offset() or 0
                    if err is not None:
                        if err.code() == KafkaError._PARTITION_EOF:
                            at_eof.add(partition)
                            if len(at_eof) == len(parts) and not self.caught_up.is_set():
                                self.caught_up.set()
                                log.info("feed %s caught up", self.name)
                            continue
                        log.warning("feed %s: %s", self.name, err)
                        continue
                    self.handle(msg.key(), msg.value(), partition, offset)
        finally:
            consumer.close()

    def handle(self, key: bytes | None, value: bytes | None, partition: int, offset: int) -> None:
        raise NotImplementedError


class CatalogFeed(_BroadcastFeed):
    """Applies ``streamrec.items`` upserts and tombstones to the recommender's catalog."""

    name = "catalog"

    def __init__(self, settings: Settings, recommender: Recommender, metrics: Metrics) -> None:
        super().__init__(settings, recommender, metrics)
        self.topic = settings.topic_items
        self.limits = Limits.from_settings(settings)

    def handle(self, key: bytes | None, value: bytes | None, partition: int, offset: int) -> None:
        try:
            item = decode_item(value, key, self.limits)
        except DecodeError as exc:
            self.metrics.items_rejected.labels(reason=exc.code).inc()
            log.warning("items %d@%d rejected (%s): %s", partition, offset, exc.code, exc.detail)
            return
        if item is None:
            if key is None:
                self.metrics.items_rejected.labels(reason="missing_key").inc()
                return
            self.recommender.delete_item(key.decode("utf-8", "replace"))
            self.metrics.items_consumed.labels(op="delete").inc()
        else:
            self.recommender.upsert_item(item)
            self.metrics.items_consumed.labels(op="upsert").inc()
        self.metrics.index_items.set(self.recommender.index_size)
        self.metrics.index_updated.set(time.time())


class ControlFeed(_BroadcastFeed):
    """Hot-swaps the model when a notice ``{"model_dir": PATH}`` arrives on the control topic."""

    name = "control"

    def __init__(self, settings: Settings, recommender: Recommender, metrics: Metrics) -> None:
        super().__init__(settings, recommender, metrics)
        self.topic = settings.topic_control

    def handle(self, key: bytes | None, value: bytes | None, partition: int, offset: int) -> None:
        if value is None:
            return
        try:
            notice = json.loads(value)
            model_dir = str(notice["model_dir"])
        except (ValueError, KeyError, TypeError) as exc:
            log.warning(
                'control %d@%d ignored: expected {"model_dir": PATH}: %s', partition, offset, exc
            )
            return
        try:
            changed = self.recommender.swap_model(model_dir)
        except Exception:
            log.exception(
                "model hot swap to %s failed; still serving %s",
                model_dir,
                self.recommender.model_version,
            )
            return
        if changed:
            self.metrics.model_swaps.inc()
            log.info("now serving model %s", self.recommender.model_version)
