"""The topics streamrec needs, and their idempotent creation with the Kafka admin API.

Faust creates its changelog topics itself, but not the source topics it consumes; and it
assumes each changelog has the partition count of the stream that feeds its table. Creating all
of them here, up front and with the same counts, keeps co-partitioning right by construction.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass, field

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

from streamrec.kafka_config import bootstrap_servers, confluent_config
from streamrec.settings import Settings

DAY_MS = 24 * 3600 * 1000
# Faust table names whose changelogs we pre-create: the Faust app must use exactly these.
EVENT_TABLES = ("sessions",)
# The catalog is read by every worker straight from the compacted items topic (no table).
ITEM_TABLES: tuple[str, ...] = ()
COMPACT = {"cleanup.policy": "compact"}


class TopicError(RuntimeError):
    """A topic could not be created, or exists with a layout streamrec cannot use."""

    def __init__(self, message: str, results: dict[str, str]) -> None:
        super().__init__(message)
        self.results = results


@dataclass(frozen=True)
class TopicSpec:
    """One topic: name, partition count, replication factor, topic-level configs."""

    name: str
    partitions: int
    replication: int
    config: dict[str, str] = field(default_factory=dict)
    purpose: str = ""


def changelog_topic(app_id: str, table: str) -> str:
    """The changelog topic Faust uses for ``table`` of app ``app_id`` (app version 1)."""
    return f"{app_id}-{table}-changelog"


def leader_topic(app_id: str) -> str:
    """The single-partition topic Faust's partition assignor elects its leader on."""
    return f"{app_id}-__assignor-__leader"


def design_topics(settings: Settings, partitions: int | None = None) -> list[TopicSpec]:
    """Every topic of the design, with partitions from ``partitions`` or the settings."""
    if partitions is not None and partitions < 1:
        raise ValueError(f"topics: partitions must be >= 1, got {partitions}")
    p = partitions if partitions is not None else settings.topic_partitions
    r = settings.topic_replication
    app = settings.app_id
    specs = [
        TopicSpec(
            settings.topic_events,
            p,
            r,
            {"cleanup.policy": "delete", "retention.ms": str(7 * DAY_MS)},
            "user events in (key=user_id)",
        ),
        # Same partition count as events: the item table's changelog is sized like it.
        TopicSpec(settings.topic_items, p, r, dict(COMPACT), "catalog (key=item_id)"),
        TopicSpec(
            settings.topic_recommendations,
            p,
            r,
            {"cleanup.policy": "delete"},
            "slates out (key=user_id)",
        ),
        TopicSpec(
            settings.topic_dlq,
            p,
            r,
            {"cleanup.policy": "delete", "retention.ms": str(30 * DAY_MS)},
            "rejected events with reasons",
        ),
        TopicSpec(settings.topic_control, 1, r, dict(COMPACT), "model hot-swap notices"),
    ]
    specs += [
        TopicSpec(changelog_topic(app, t), p, r, dict(COMPACT), f"faust table {t}")
        for t in (*EVENT_TABLES, *ITEM_TABLES)
    ]
    specs.append(TopicSpec(leader_topic(app), 1, r, {}, "faust assignor leader"))
    return specs


def _admin(settings: Settings) -> AdminClient:
    servers = bootstrap_servers(settings)
    # librdkafka retries a refused connection every ~50 ms and logs each try to stderr; a
    # plain TCP probe first turns "no broker there" into one clear error instead.
    if not any(_reachable(server) for server in servers):
        raise TopicError(
            f"topics: nothing accepts connections at {', '.join(servers)}; expected a Kafka "
            "broker there. Start the local one with `streamrec kafka start`, or set "
            "STREAMREC_KAFKA_BOOTSTRAP.",
            {},
        )
    return AdminClient(confluent_config(settings))


def _wait_visible(admin: AdminClient, names: list[str], timeout_s: float) -> dict[str, int]:
    """Wait until ``names`` appear in the broker's metadata; returns their partition counts.

    A created topic reaches the metadata cache a moment after CreateTopics returns; a producer
    or a second ``ensure_topics`` in that moment would see it missing.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        topics = admin.list_topics(timeout=max(1.0, deadline - time.monotonic())).topics
        found = {
            n: len(topics[n].partitions) for n in names if n in topics and topics[n].partitions
        }
        if len(found) == len(names) or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


def _reachable(server: str, timeout_s: float = 2.0) -> bool:
    host, _, port = server.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            return True
    except OSError:
        return False


def list_topics(settings: Settings, timeout_s: float = 10.0) -> dict[str, int]:
    """Non-internal topics on the cluster and their partition counts, sorted by name."""
    try:
        metadata = _admin(settings).list_topics(timeout=timeout_s)
    except KafkaException as exc:
        raise TopicError(
            f"topics: could not list topics on {settings.kafka_bootstrap} within "
            f"{timeout_s:.0f} s ({exc.args[0]}); is the broker running "
            "(`streamrec kafka status`)?",
            {},
        ) from exc
    return {
        name: len(meta.partitions)
        for name, meta in sorted(metadata.topics.items())
        if not name.startswith("__")
    }


def ensure_topics(
    settings: Settings, specs: list[TopicSpec], timeout_s: float = 30.0
) -> dict[str, str]:
    """Create the missing topics. Returns ``{name: "created" | "exists"}``.

    Raises ``TopicError`` (with the per-topic results attached) when a topic could not be
    created, or exists with another partition count; the other topics are still created.
    """
    existing = list_topics(settings, timeout_s)
    results: dict[str, str] = {}
    problems: list[str] = []
    missing = [spec for spec in specs if spec.name not in existing]
    if missing:
        # The client must outlive the futures: a collected client cancels them.
        admin = _admin(settings)
        futures = admin.create_topics(
            [NewTopic(s.name, s.partitions, s.replication, config=dict(s.config)) for s in missing],
            operation_timeout=timeout_s,
            request_timeout=timeout_s,
        )
        for spec in missing:
            try:
                futures[spec.name].result()
                results[spec.name] = "created"
            except KafkaException as exc:
                error: KafkaError = exc.args[0]
                # Created by someone else since our listing, or (KRaft) created so recently that
                # the broker's metadata did not list it yet: checked like any existing topic.
                if error.code() != KafkaError.TOPIC_ALREADY_EXISTS:
                    results[spec.name] = "failed"
                    problems.append(f"{spec.name} could not be created: {error.str()}")
        existing = (
            _wait_visible(
                admin,
                [s.name for s in missing if results.get(s.name) != "failed"],
                timeout_s,
            )
            | existing
        )
    for spec in specs:
        state = results.get(spec.name)
        if state == "failed":
            continue
        count = existing.get(spec.name)
        if count is None:
            results[spec.name] = "failed"
            problems.append(
                f"{spec.name} did not appear in the broker's metadata within {timeout_s:.0f} s"
            )
        elif count != spec.partitions:
            results[spec.name] = "mismatch"
            problems.append(f"{spec.name} has {count} partitions, expected {spec.partitions}")
        elif state is None:
            results[spec.name] = "exists"
    if problems:
        advice = ""
        if "mismatch" in results.values():
            advice = (
                " A topic's partition count decides which worker owns which user, so streamrec "
                "will not use a topic laid out otherwise: delete and recreate it (its data is "
                "lost), or pass the partition count it has (--partitions / "
                "STREAMREC_TOPIC_PARTITIONS)."
            )
        raise TopicError("topics: " + "; ".join(problems) + "." + advice, results)
    return results
