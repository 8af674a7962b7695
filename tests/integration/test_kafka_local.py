"""The local broker, topic creation and the CLI against a real Kafka broker."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest
from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient, ConfigResource, ResourceType
from typer.testing import CliRunner

from streamrec.cli import app
from streamrec.kafka_config import confluent_config, consume_available
from streamrec.kafka_local import REPO_ROOT, LocalKafka, LocalKafkaError, free_port, free_ports
from streamrec.settings import Settings
from streamrec.topics import TopicError, TopicSpec, design_topics, ensure_topics, list_topics


def test_produce_and_consume_1000_keyed_messages(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings()
    topic = settings.topic_events
    assert ensure_topics(settings, [TopicSpec(topic, 3, 1)]) == {topic: "created"}
    sent = {(f"user-{i % 97}", f"event-{i}") for i in range(1000)}
    producer = Producer({**confluent_config(settings), "linger.ms": 5, "acks": "all"})
    for key, value in sent:
        producer.produce(topic, key=key.encode(), value=value.encode())
    assert producer.flush(30) == 0

    consumer = Consumer(
        {
            **confluent_config(settings),
            "group.id": f"g-{settings.app_id}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    consumer.subscribe([topic])
    received: set[tuple[str, str]] = set()
    partitions_of_key: dict[str, set[int]] = {}
    try:
        for _ in range(200):
            for msg in consumer.consume(num_messages=500, timeout=0.5):
                assert msg.error() is None, msg.error()
                raw_key, raw_value, partition = msg.key(), msg.value(), msg.partition()
                assert raw_key is not None
                assert raw_value is not None
                assert partition is not None
                key = raw_key.decode()
                received.add((key, raw_value.decode()))
                partitions_of_key.setdefault(key, set()).add(partition)
            if len(received) >= len(sent):
                break
    finally:
        consumer.close()
    assert received == sent
    # Keyed messages stay on one partition each: the ordering per user the worker relies on.
    assert all(len(parts) == 1 for parts in partitions_of_key.values())
    assert len({p for parts in partitions_of_key.values() for p in parts}) == 3


def test_consume_available_returns_a_trickle_at_once_and_drains_the_rest(
    make_settings: Callable[..., Settings],
) -> None:
    """``Consumer.consume(n, timeout)`` holds a lone message for the whole timeout; the
    helper the feeds and the output collector use must hand it over when it arrives."""
    settings = make_settings()
    topic = settings.topic_events
    ensure_topics(settings, [TopicSpec(topic, 1, 1)])
    consumer = Consumer(
        {
            **confluent_config(settings),
            "group.id": f"g-{settings.app_id}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    producer = Producer({**confluent_config(settings), "linger.ms": 0})
    try:
        consumer.subscribe([topic])
        producer.produce(topic, value=b"lone")
        assert producer.flush(30) == 0
        # Past the assignment and first fetch (up to a few seconds on a cold broker) ...
        got: list[bytes] = []
        deadline = time.monotonic() + 60
        while not got and time.monotonic() < deadline:
            got = [m.value() for m in consume_available(consumer, 1000, 1.0) if not m.error()]
        assert got == [b"lone"]
        # ... a message produced now arrives well before a 20 s timeout would end.
        producer.produce(topic, value=b"second")
        assert producer.flush(30) == 0
        started = time.monotonic()
        second = [m for m in consume_available(consumer, 1000, 20.0) if not m.error()]
        waited = time.monotonic() - started
        assert [m.value() for m in second] == [b"second"]
        assert waited < 10.0, f"held the message {waited:.1f} s"
        # Several already fetched: all of them in one call, nothing left behind.
        for i in range(50):
            producer.produce(topic, value=f"m{i}".encode())
        assert producer.flush(30) == 0
        batch: list[bytes] = []
        deadline = time.monotonic() + 30
        while len(batch) < 50 and time.monotonic() < deadline:
            batch += [m.value() for m in consume_available(consumer, 1000, 1.0) if not m.error()]
        assert batch == [f"m{i}".encode() for i in range(50)]
    finally:
        consumer.close()


def test_ensure_topics_is_idempotent_and_configures_compaction(
    make_settings: Callable[..., Settings],
) -> None:
    settings = make_settings()
    specs = design_topics(settings)
    first = ensure_topics(settings, specs)
    assert first == {s.name: "created" for s in specs}
    second = ensure_topics(settings, specs)
    assert second == {s.name: "exists" for s in specs}

    on_broker = list_topics(settings)
    assert on_broker[settings.topic_events] == 2
    assert on_broker[f"{settings.app_id}-__assignor-__leader"] == 1

    admin = AdminClient(confluent_config(settings))
    resources = [
        ConfigResource(ResourceType.TOPIC, settings.topic_items),
        ConfigResource(ResourceType.TOPIC, settings.topic_dlq),
    ]
    items_res, dlq_res = resources
    futures = admin.describe_configs(resources)
    items_cfg = futures[items_res].result(timeout=30)
    dlq_cfg = futures[dlq_res].result(timeout=30)
    assert items_cfg["cleanup.policy"].value == "compact"
    assert dlq_cfg["cleanup.policy"].value == "delete"
    assert dlq_cfg["retention.ms"].value == str(30 * 24 * 3600 * 1000)


def test_ensure_topics_reports_partition_mismatch(
    make_settings: Callable[..., Settings],
) -> None:
    settings = make_settings()
    ensure_topics(settings, [TopicSpec(settings.topic_events, 2, 1)])
    with pytest.raises(TopicError, match=r"has 2 partitions, expected 3") as info:
        ensure_topics(
            settings,
            [TopicSpec(settings.topic_events, 3, 1), TopicSpec(settings.topic_dlq, 3, 1)],
        )
    # The mismatch does not stop the other topics from being created.
    assert info.value.results == {settings.topic_events: "mismatch", settings.topic_dlq: "created"}


def test_ensure_topics_reports_creation_failure(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings()
    # Three replicas on a one-broker cluster cannot be placed.
    with pytest.raises(TopicError, match="could not be created") as info:
        ensure_topics(settings, [TopicSpec(settings.topic_events, 1, 3)])
    assert info.value.results == {settings.topic_events: "failed"}


def test_auto_create_is_off(make_settings: Callable[..., Settings], unique: str) -> None:
    settings = make_settings()
    consumer = Consumer({**confluent_config(settings), "group.id": f"g-{unique}"})
    try:
        # Asking for metadata of an unknown topic would create it if auto-create were on.
        consumer.list_topics(f"never-created-{unique}", timeout=10)
    finally:
        consumer.close()
    assert f"never-created-{unique}" not in list_topics(settings)


def test_cli_start_status_stop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    port, cport = free_ports(2)
    base = tmp_path / "cli-kafka"
    monkeypatch.setenv("STREAMREC_LOCAL_KAFKA_DIR", str(base))
    monkeypatch.setenv("STREAMREC_JARS_DIR", str(REPO_ROOT / ".cache" / "kafka-jars"))
    runner = CliRunner()
    start = ["kafka", "start", "--port", str(port), "--controller-port", str(cport)]
    try:
        result = runner.invoke(app, ["kafka", "status"])
        assert result.exit_code == 1, result.output
        assert "not running" in result.output

        result = runner.invoke(app, start)
        assert result.exit_code == 0, result.output
        assert f"127.0.0.1:{port}" in result.output
        pid = LocalKafka(base).pid()
        assert pid is not None

        # A second start, even without the ports, finds the same broker instead of another.
        result = runner.invoke(app, ["kafka", "start", "--timeout", "10"])
        assert result.exit_code == 0, result.output
        assert LocalKafka(base).pid() == pid

        # Status without --port still reports the port the broker was started on.
        result = runner.invoke(app, ["kafka", "status"])
        assert result.exit_code == 0, result.output
        assert f"running pid {pid} on 127.0.0.1:{port}, answering" in result.output

        result = runner.invoke(app, ["kafka", "logs", "-n", "5"])
        assert result.exit_code == 0, result.output
        assert len(result.output.strip().splitlines()) == 5

        monkeypatch.setenv("STREAMREC_KAFKA_BOOTSTRAP", f"127.0.0.1:{port}")
        monkeypatch.setenv("STREAMREC_APP_ID", "cli")
        result = runner.invoke(app, ["topics", "create", "--partitions", "2"])
        assert result.exit_code == 0, result.output
        assert "created" in result.output
        result = runner.invoke(app, ["topics", "list"])
        assert result.exit_code == 0, result.output
        assert "cli-sessions-changelog" in result.output
        # Same topics, other partition count: a red one-line error, exit code 1.
        result = runner.invoke(app, ["topics", "create", "--partitions", "3"])
        assert result.exit_code == 1
        assert "has 2 partitions, expected 3" in result.output
    finally:
        result = runner.invoke(app, ["kafka", "stop"])
    assert result.exit_code == 0, result.output
    assert "stopped" in result.output
    result = runner.invoke(app, ["kafka", "status"])
    assert result.exit_code == 1
    result = runner.invoke(app, ["kafka", "stop"])
    assert "was not running" in result.output


def test_start_fails_when_port_is_taken_by_another_broker(
    local_kafka: LocalKafka, tmp_path: Path
) -> None:
    other = LocalKafka(
        tmp_path / "other",
        port=local_kafka.port,
        controller_port=free_port(),
        jars_dir=local_kafka.jars_dir,
    )
    with pytest.raises(LocalKafkaError, match=rf"broker port 127.0.0.1:{local_kafka.port}"):
        other.start()
    assert other.pid() is None
