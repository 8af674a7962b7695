"""Replay events into Kafka and collect what comes out: used by the demo and the benchmarks."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from confluent_kafka import Consumer, KafkaError, Producer

from streamrec.kafka_config import confluent_config, consume_available
from streamrec.settings import Settings


def now_ms() -> int:
    return int(time.time() * 1000)


def make_producer(settings: Settings, **extra: Any) -> Producer:
    conf: dict[str, Any] = {
        **confluent_config(settings),
        "linger.ms": 5,
        "batch.num.messages": 10000,
        "queue.buffering.max.messages": 1_000_000,
        "compression.type": "lz4",
        # The same partitioner as the Java client and aiokafka, so keys land where the
        # worker's table changelogs expect them.
        "partitioner": "murmur2_random",
        **extra,
    }
    return Producer(conf)


def produce_records(
    producer: Producer,
    topic: str,
    records: Iterable[tuple[bytes | None, bytes | None]],
    rate: float | None = None,
    on_sent: Callable[[int], None] | None = None,
) -> int:
    """Produce (key, value) pairs; ``rate`` caps messages per second (None = full speed)."""
    n = 0
    start = time.perf_counter()
    for key, value in records:
        while True:
            try:
                producer.produce(topic, key=key, value=value)
                break
            except BufferError:
                producer.poll(0.05)
        n += 1
        if n % 1000 == 0:
            producer.poll(0)
        if rate:
            ahead = n / rate - (time.perf_counter() - start)
            if ahead > 0:
                time.sleep(ahead)
        if on_sent is not None:
            on_sent(n)
    producer.flush(60)
    return n


def event_records(
    events: Iterable[dict[str, Any]], stamp_now: bool = True
) -> Iterable[tuple[bytes, bytes]]:
    """Events as (key, value) bytes; ``stamp_now`` sets ``ts`` to the send time, so the
    end-to-end latency measured from event time is the real one."""
    for e in events:
        if stamp_now:
            e = {**e, "ts": now_ms()}
        yield e["user_id"].encode(), json.dumps(e, separators=(",", ":")).encode()


@dataclass
class Collected:
    recommendations: int = 0
    dead_letters: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    first_at: float | None = None
    last_at: float | None = None
    dlq_reasons: dict[str, int] = field(default_factory=dict)
    last_slates: dict[str, dict[str, Any]] = field(default_factory=dict)
    coalesced: int = 0
    model_versions: dict[str, int] = field(default_factory=dict)

    def percentile(self, q: float, *, since: float = 0.0) -> float | None:
        """The q-th percentile latency (ms) of the slates received, or of those after the
        first ``since`` share of them in arrival order (``since=0.5``: the second half);
        rounded to 0.1 ms (arrival is timed to the millisecond at best)."""
        lat = self.latencies_ms[int(len(self.latencies_ms) * since) :]
        if not lat:
            return None
        return round(float(np.percentile(np.asarray(lat), q)), 1)


class OutputCollector:
    """Consumes the recommendations and DLQ topics in a thread and records what arrives."""

    def __init__(
        self,
        settings: Settings,
        keep_slates: bool = False,
        on_recommendation: Callable[[dict[str, Any]], None] | None = None,
        from_beginning: bool = True,
    ) -> None:
        """``from_beginning``: read the output topics from their start (right for topics
        created for this run); otherwise only what arrives after assignment."""
        self.settings = settings
        self.from_beginning = from_beginning
        self.keep_slates = keep_slates
        self.on_recommendation = on_recommendation
        self.collected = Collected()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="collector", daemon=True)

    def __enter__(self) -> OutputCollector:
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("output collector: no partition assignment within 30 s")
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def snapshot(self) -> Collected:
        with self._lock:
            c = self.collected
            return Collected(
                c.recommendations,
                c.dead_letters,
                list(c.latencies_ms),
                c.first_at,
                c.last_at,
                dict(c.dlq_reasons),
                {},
                c.coalesced,
                dict(c.model_versions),
            )

    def _run(self) -> None:
        s = self.settings
        consumer = Consumer(
            {
                **confluent_config(s),
                "group.id": f"streamrec-collector-{time.time_ns()}",
                "auto.offset.reset": "earliest" if self.from_beginning else "latest",
                "enable.auto.commit": False,
            }
        )

        def on_assign(c: Consumer, parts: list[Any]) -> None:
            self._ready.set()

        consumer.subscribe([s.topic_recommendations, s.topic_dlq], on_assign=on_assign)
        try:
            while not self._stop.is_set():
                for msg in consume_available(consumer, 1000, 0.1):
                    err = msg.error()
                    if err is not None:
                        if err.code() != KafkaError._PARTITION_EOF:
                            raise RuntimeError(f"collector: {err}")
                        continue
                    self._record(msg.topic() or "", msg.value() or b"{}")
        finally:
            consumer.close()

    def _record(self, topic: str, value: bytes) -> None:
        t = time.time()
        record = json.loads(value)
        with self._lock:
            c = self.collected
            c.first_at = c.first_at or t
            c.last_at = t
            if topic == self.settings.topic_dlq:
                c.dead_letters += 1
                reason = record.get("error", "?")
                c.dlq_reasons[reason] = c.dlq_reasons.get(reason, 0) + 1
                return
            c.recommendations += 1
            # Passthrough (benchmark reference) forwards raw events, which carry ``ts``.
            c.latencies_ms.append(t * 1000 - record.get("event_ts", record.get("ts", 0)))
            c.coalesced += len(record.get("coalesced_event_ids") or ())
            mv = record.get("model_version", "?")
            c.model_versions[mv] = c.model_versions.get(mv, 0) + 1
            if self.keep_slates:
                c.last_slates[record["user_id"]] = record
        if self.on_recommendation is not None:
            self.on_recommendation(record)


def scrape_metrics(url: str, timeout: float = 5.0) -> dict[str, float]:
    """Parse a Prometheus text exposition into {'name{labels}': value} (samples only)."""
    from urllib.request import urlopen

    from prometheus_client.parser import text_string_to_metric_families

    with urlopen(url, timeout=timeout) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            out[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return out


def metric_sum(metrics: dict[str, float], name: str) -> float:
    """Sum of every sample of metric ``name`` (all label values) in a ``scrape_metrics``
    result."""
    return sum(v for k, v in metrics.items() if k.split("{")[0] == name)


def handled(metrics: dict[str, float]) -> float:
    """Messages a worker has finished with: accepted + rejected + duplicates."""
    return (
        metric_sum(metrics, "streamrec_events_consumed_total")
        + metric_sum(metrics, "streamrec_events_rejected_total")
        + metric_sum(metrics, "streamrec_events_duplicate_total")
    )


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")


class TimelineRecorder:
    """Samples a worker's counters and the collector's latencies once a second into a
    timeline (JSON lines; format in docs/monitoring.md) for ``streamrec report``."""

    def __init__(self, metrics_url: str, collector: OutputCollector, path: Path) -> None:
        self.metrics_url = metrics_url
        self.collector = collector
        self.path = path
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="timeline", daemon=True)

    def __enter__(self) -> TimelineRecorder:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        started = time.monotonic()
        seen = 0
        with self.path.open("w") as fh:
            while not self._stop.wait(1.0):
                try:
                    m = scrape_metrics(self.metrics_url)
                except OSError:
                    continue
                snap = self.collector.snapshot()
                window = snap.latencies_ms[seen:]
                seen = len(snap.latencies_ms)
                evaluated = m.get("streamrec_slates_evaluated_total", 0.0)
                hits = m.get('streamrec_slate_hits_total{k="10"}', 0.0)
                point = {
                    "t": round(time.monotonic() - started, 3),
                    "consumed": int(metric_sum(m, "streamrec_events_consumed_total")),
                    "produced": int(m.get("streamrec_recommendations_produced_total", 0.0)),
                    "rejected": int(metric_sum(m, "streamrec_events_rejected_total")),
                    "duplicates": int(m.get("streamrec_events_duplicate_total", 0.0)),
                    "p50_ms": float(np.percentile(window, 50)) if window else None,
                    "p99_ms": float(np.percentile(window, 99)) if window else None,
                    "hit_rate_10": hits / evaluated if evaluated else None,
                }
                fh.write(json.dumps(point) + "\n")
                fh.flush()
