"""One frozen settings object per process, read from ``STREAMREC_*`` environment variables."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Runtime configuration. Every field maps to ``STREAMREC_<FIELD>`` (upper case)."""

    model_config = SettingsConfigDict(env_prefix="STREAMREC_", frozen=True, extra="ignore")

    # --- Kafka connection -------------------------------------------------------------
    kafka_bootstrap: str = Field("127.0.0.1:9092", description="host:port[,host:port...]")
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    kafka_ssl_cafile: Path | None = None
    kafka_ssl_certfile: Path | None = None
    kafka_ssl_keyfile: Path | None = None

    # --- Topics -----------------------------------------------------------------------
    topic_events: str = "streamrec.events"
    topic_items: str = "streamrec.items"
    topic_recommendations: str = "streamrec.recommendations"
    topic_dlq: str = "streamrec.events.dlq"
    topic_control: str = Field("streamrec.control", description="model hot-swap notices")
    topic_partitions: int = Field(4, ge=1, description="partitions for topics we create")
    topic_replication: int = Field(1, ge=1)

    # --- Local broker (``streamrec kafka start``) ------------------------------------
    local_kafka_dir: Path = Path(".streamrec/kafka")
    local_kafka_port: int = 9092
    local_kafka_controller_port: int = 9093
    local_kafka_heap: str = "1g"
    jars_dir: Path = Path(".cache/kafka-jars")

    # --- Worker -----------------------------------------------------------------------
    app_id: str = "streamrec"
    data_dir: Path = Path(".streamrec/worker")
    store: str = Field("rocksdb://", description="faust table store: rocksdb:// or memory://")
    processing_guarantee: Literal["at_least_once", "exactly_once"] = "at_least_once"
    kafka_session_timeout_s: float = Field(
        10.0, ge=6.0, le=300.0, description="consumer group session timeout (failover time)"
    )
    fetch_max_wait_ms: int = Field(
        10,
        ge=0,
        le=1000,
        description="events consumer: the broker holds a fetch up to this long to fill "
        "fetch_min_bytes (fewer, larger fetches; adds at most this much latency)",
    )
    fetch_min_bytes: int = Field(
        65536, ge=1, description="events consumer: bytes a fetch waits for (see above)"
    )
    model_dir: Path | None = None
    batch_size: int = Field(256, ge=1, description="max events per micro-batch")
    batch_within_s: float = Field(0.02, gt=0, description="max wait to fill a micro-batch")
    slate_size: int = Field(10, ge=1, le=200)
    candidates: int = Field(200, ge=1, le=2000)
    rerank_candidates: int | None = Field(
        None,
        ge=1,
        le=2000,
        description="candidates per user the reranker scores (the best by retrieval); unset: "
        "as many as it was trained on",
    )
    diversity: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description="weight on diversity in the slate ordering (0 = off); unset: the weight "
        "chosen on validation and stored with the model, else 0.15 (a model with no weight "
        "chosen for expected is then ordered by dcg)",
    )
    ordering: Literal["expected", "dcg", "mmr"] = Field(
        "expected",
        description="slate ordering: expected (expected NDCG + diversity over calibrated "
        "probabilities), dcg (expected-gain MMR) or mmr (min-max MMR)",
    )
    filter_seen: bool = False
    covisit_weight: float | None = Field(
        None,
        ge=0.0,
        le=100.0,
        description="weight of the model's item-to-item co-visitation boost; unset: the "
        "weight chosen on validation and stored with the model; 0: off",
    )
    covisit_candidates: int = Field(
        10,
        ge=0,
        le=200,
        description="each user's strongest co-visitation followers added to the retrieved "
        "candidates when retrieval missed them (scored user . item like the rest); 0: none",
    )
    affinity_weight: float | None = Field(
        None,
        ge=0.0,
        le=100.0,
        description="weight of the attribute affinity (brands and categories shared with the "
        "user's newest items) in the retrieval scores; unset: the weight chosen on validation "
        "and stored with the model; 0: off. Never applied under a reranker",
    )
    covisit_snapshot_s: float = Field(
        60.0,
        ge=0.0,
        description="seconds between saves of the worker's co-visitation counts (trained + "
        "counted online) into data_dir/covisit/<model version>/, read back when a worker "
        "starts with the same model; 0: never saved",
    )
    fresh_slots: int = Field(
        1, ge=0, le=10, description="slate places reserved for new (text-embedded) items"
    )
    session_max_len: int = Field(50, ge=1, le=1000)
    dedupe_window_s: float = Field(3600.0, gt=0)
    max_message_bytes: int = Field(64 * 1024, ge=256)
    max_event_age_days: float = Field(365.0 * 30, gt=0)
    max_event_future_s: float = Field(300.0, ge=0)
    torch_threads: int = Field(0, ge=0, description="0 = torch default")
    encoder_cache_users: int = Field(
        10_000, ge=0, description="users whose encoder keys/values stay cached (0 = off)"
    )

    # --- Observability ----------------------------------------------------------------
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 9464
    log_level: Literal["debug", "info", "warning", "error"] = "info"


def load_settings(**overrides: object) -> Settings:
    """Build the process settings from the environment, with explicit overrides on top."""
    return Settings(**overrides)  # type: ignore[arg-type]
