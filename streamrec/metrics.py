"""Every Prometheus metric streamrec exports, in one place, on an injected registry.

Names follow Prometheus conventions: prefix ``streamrec_``, base units, ``_total`` counters,
no user or item ids as labels.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

#: Buckets for per-stage and end-to-end latencies (seconds): 0.5 ms .. 10 s.
LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
SLATE_HIT_KS = (1, 5, 10)
#: Pipeline stage names (the ``stage`` label); serving.pipeline.Pipeline.STAGES must match.
STAGES = ("encode", "retrieve", "covisit", "filter", "rerank", "order")
ITEM_OPS = ("upsert", "delete")


@dataclass(frozen=True)
class Metrics:
    events_consumed: Counter
    events_rejected: Counter
    events_duplicate: Counter
    recommendations_produced: Counter
    recommendations_coalesced: Counter
    stage_duration: Histogram
    end_to_end_latency: Histogram
    batch_size: Histogram
    index_items: Gauge
    session_users: Gauge
    model_info: Gauge
    slate_hits: Counter
    slates_evaluated: Counter
    items_consumed: Counter
    items_rejected: Counter
    consumer_lag: Gauge
    model_swaps: Counter
    index_updated: Gauge
    encoder_cache_lookups: Counter
    encoder_cache_users: Gauge
    covisit_pairs: Gauge

    @classmethod
    def create(cls, registry: CollectorRegistry) -> Metrics:
        metrics = cls._create(registry)
        metrics._initialise_labels()
        return metrics

    def _initialise_labels(self) -> None:
        """Export every known label value from the start, at 0: a labelled series that does
        not exist yet shows as "no data" in Grafana and breaks rate() over restarts."""
        from schemas.models import ErrorCode, EventType

        for event_type in EventType:
            self.events_consumed.labels(type=event_type.value)
        for code in ErrorCode:
            self.events_rejected.labels(reason=code.value)
            self.items_rejected.labels(reason=code.value)
        for stage in STAGES:
            self.stage_duration.labels(stage=stage)
        for k in SLATE_HIT_KS:
            self.slate_hits.labels(k=str(k))
        for op in ITEM_OPS:
            self.items_consumed.labels(op=op)
        for result in ("hit", "miss"):
            self.encoder_cache_lookups.labels(result=result)
        self.index_updated.set_to_current_time()

    @classmethod
    def _create(cls, registry: CollectorRegistry) -> Metrics:
        r = registry
        return cls(
            events_consumed=Counter(
                "streamrec_events_consumed",
                "Valid events accepted from the events topic, by event type.",
                ["type"],
                registry=r,
            ),
            events_rejected=Counter(
                "streamrec_events_rejected",
                "Messages sent to the dead-letter topic, by machine-readable reason.",
                ["reason"],
                registry=r,
            ),
            events_duplicate=Counter(
                "streamrec_events_duplicate",
                "Events skipped because their event_id was already processed.",
                registry=r,
            ),
            recommendations_produced=Counter(
                "streamrec_recommendations_produced",
                "Slates published to the recommendations topic.",
                registry=r,
            ),
            recommendations_coalesced=Counter(
                "streamrec_recommendations_coalesced",
                "Accepted events whose slate was merged into a later event of the same user "
                "in the same micro-batch.",
                registry=r,
            ),
            stage_duration=Histogram(
                "streamrec_stage_duration_seconds",
                "Wall time of one pipeline stage for one micro-batch.",
                ["stage"],
                buckets=LATENCY_BUCKETS,
                registry=r,
            ),
            end_to_end_latency=Histogram(
                "streamrec_end_to_end_latency_seconds",
                "From the event's timestamp to the slate being handed to the producer.",
                buckets=LATENCY_BUCKETS,
                registry=r,
            ),
            batch_size=Histogram(
                "streamrec_batch_size",
                "Events per micro-batch.",
                buckets=BATCH_BUCKETS,
                registry=r,
            ),
            index_items=Gauge(
                "streamrec_index_items", "Items currently retrievable in the index.", registry=r
            ),
            session_users=Gauge(
                "streamrec_session_users",
                "Users with session state on this worker's partitions.",
                registry=r,
            ),
            model_info=Gauge(
                "streamrec_model_info",
                "1 for the model and index versions currently serving.",
                ["model_version", "index_version"],
                registry=r,
            ),
            slate_hits=Counter(
                "streamrec_slate_hits",
                "Events whose item was in the top k of the slate last sent to that user.",
                ["k"],
                registry=r,
            ),
            slates_evaluated=Counter(
                "streamrec_slates_evaluated",
                "Events checked against the slate last sent to that user.",
                registry=r,
            ),
            items_consumed=Counter(
                "streamrec_items_consumed",
                "Catalog messages applied, by operation (upsert, delete).",
                ["op"],
                registry=r,
            ),
            items_rejected=Counter(
                "streamrec_items_rejected",
                "Catalog messages rejected, by reason.",
                ["reason"],
                registry=r,
            ),
            consumer_lag=Gauge(
                "streamrec_consumer_lag_messages",
                "Messages between the committed-to position and the end of each assigned "
                "events partition.",
                ["topic", "partition"],
                registry=r,
            ),
            model_swaps=Counter(
                "streamrec_model_swaps",
                "Model versions loaded while serving (hot swaps).",
                registry=r,
            ),
            index_updated=Gauge(
                "streamrec_index_last_update_timestamp_seconds",
                "Unix time of the last change applied to the retrieval index.",
                registry=r,
            ),
            encoder_cache_lookups=Counter(
                "streamrec_encoder_cache_lookups",
                "Users looked up in the encoder's key/value cache: hit = only new steps encoded.",
                ["result"],
                registry=r,
            ),
            encoder_cache_users=Gauge(
                "streamrec_encoder_cache_users",
                "Users whose encoder keys/values are cached in this worker.",
                registry=r,
            ),
            covisit_pairs=Gauge(
                "streamrec_covisit_pairs",
                "Item pairs in this worker's co-visitation table (grows as it counts served "
                "events; 0 when the model has none or it is off).",
                registry=r,
            ),
        )
