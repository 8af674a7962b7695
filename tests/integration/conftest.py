"""A real Kafka broker for the integration tests, started once per session.

The broker runs from a temporary directory on free ports; its jars come from the repo's normal
cache (``.cache/kafka-jars``, fetched with Maven on first use). If it cannot start, every test
that needs it errors: integration tests never skip.
"""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from serving.artifacts import save_model
from serving.data import leave_one_out, load_interactions
from serving.encoder import EncoderConfig
from serving.synthetic import SyntheticShop, make_shop, write_jsonl
from serving.train import TrainConfig, train_encoder
from streamrec.kafka_local import REPO_ROOT, LocalKafka, free_ports
from streamrec.settings import Settings, load_settings

HERE = Path(__file__).resolve().parent
JARS_DIR = REPO_ROOT / ".cache" / "kafka-jars"
_counter = itertools.count()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # This hook sees every collected item, not only ours: mark just those under this folder.
    for item in items:
        if HERE in Path(item.path).resolve().parents:
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def local_kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalKafka]:
    """The session's broker (LocalKafka handle); most tests want ``kafka_bootstrap``."""
    port, controller_port = free_ports(2)
    broker = LocalKafka(
        tmp_path_factory.mktemp("kafka"),
        port=port,
        controller_port=controller_port,
        jars_dir=JARS_DIR,
        heap="512m",
    )
    broker.start(timeout_s=120)
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture(scope="session")
def kafka_bootstrap(local_kafka: LocalKafka) -> str:
    """``127.0.0.1:PORT`` of a running real broker (auto topic creation is off)."""
    return local_kafka.bootstrap


@pytest.fixture
def unique(request: pytest.FixtureRequest) -> str:
    """A suffix no other test (in this or a concurrent session) uses for topics and groups."""
    # Kafka topic names allow only [a-zA-Z0-9._-]; parametrised test names carry more.
    name = re.sub(r"[^A-Za-z0-9._-]", "-", request.node.name)[:40]
    return f"{os.getpid()}-{next(_counter)}-{name}"


@pytest.fixture
def make_settings(kafka_bootstrap: str, unique: str, tmp_path: Path) -> Callable[..., Settings]:
    """Factory: ``Settings`` on the test broker with this test's own topics and app id."""

    def make(**overrides: object) -> Settings:
        values: dict[str, object] = {
            "kafka_bootstrap": kafka_bootstrap,
            "kafka_security_protocol": "PLAINTEXT",
            "topic_events": f"t.events.{unique}",
            "topic_items": f"t.items.{unique}",
            "topic_recommendations": f"t.recommendations.{unique}",
            "topic_dlq": f"t.events.dlq.{unique}",
            "topic_control": f"t.control.{unique}",
            "topic_partitions": 2,
            "app_id": f"t-app-{unique}",
            "data_dir": tmp_path / "worker",
            "store": "memory://",
        }
        values.update(overrides)
        return load_settings(**values)

    return make


@pytest.fixture(scope="session")
def shop() -> SyntheticShop:
    return make_shop(n_items=240, n_users=300, events_per_user=25, seed=5)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory, shop: SyntheticShop) -> Path:
    """A small encoder trained on the synthetic shop (a few seconds on CPU)."""
    root = tmp_path_factory.mktemp("model")
    data = load_interactions(write_jsonl(shop.events, root / "events.jsonl"), "events")
    split = leave_one_out(data)
    cfg = EncoderConfig(num_items=len(data.item_ids()), dim=32, dropout=0.1, attn_dropout=0.1)
    result, _, _ = train_encoder(split, cfg, TrainConfig(epochs=20, progress=False, seed=1))
    save_model(result.model, root / "model", data.item_ids(), dataset="synthetic")
    return root / "model"
