"""Publishing helpers behind ``streamrec publish``."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from streamrec.replay import make_producer, produce_records
from streamrec.settings import Settings


def read_model_version(model_dir: Path) -> str:
    config = model_dir / "config.json"
    if not config.is_file():
        raise FileNotFoundError(
            f"{model_dir} is not a model directory: expected {config} written by `streamrec train`"
        )
    try:
        return str(json.loads(config.read_text())["version"])
    except (ValueError, KeyError) as exc:
        raise ValueError(f"{config}: expected JSON with a 'version' field ({exc})") from exc


def publish_model_notice(settings: Settings, model_dir: Path) -> str:
    """Publish ``{"model_dir", "version"}`` on the control topic; workers swap on receipt."""
    version = read_model_version(model_dir)
    notice = {"model_dir": str(model_dir.resolve()), "version": version}
    producer = make_producer(settings)
    produce_records(producer, settings.topic_control, [(b"model", json.dumps(notice).encode())])
    return version


def _jsonl(path: Path, key_field: str) -> Iterator[tuple[bytes | None, bytes]]:
    with path.open("rb") as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            try:
                key = str(json.loads(line)[key_field]).encode()
            except (ValueError, KeyError, TypeError):
                key = None  # the worker rejects it to the DLQ with the precise reason
            yield key, line


def publish_jsonl(settings: Settings, path: Path, kind: str, rate: float | None = None) -> int:
    topic, key_field = {
        "items": (settings.topic_items, "item_id"),
        "events": (settings.topic_events, "user_id"),
    }[kind]
    return produce_records(make_producer(settings), topic, _jsonl(path, key_field), rate=rate)
