"""Reliability tooling: read back what a worker wrote, account for every event, fuzz input, burst.

Used by ``tests/integration/test_reliability.py`` and runnable by hand against a live worker::

    python -m streamrec.chaos burst --n 1000000 --metrics-url http://127.0.0.1:9464/metrics

Accounting after a crash cannot use the killed worker's counters (they die with it), so it is
done from the topics the workers wrote: every event id must appear as ``trigger_event_id`` or in
``coalesced_event_ids`` of some slate, or in a DLQ record, or be held in its user's session (the
``sessions`` changelog) — the last case is an event whose session write reached the broker
before the crash but whose slate did not, so its redelivery is counted as a duplicate.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import random
import string
import sys
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition

from serving.session import SessionState, event_fingerprint
from serving.types import Step
from streamrec.kafka_config import confluent_config
from streamrec.replay import (  # noqa: F401 - metric_sum is re-exported for the tests
    handled,
    make_producer,
    metric_sum,
    now_ms,
    produce_records,
    scrape_metrics,
)
from streamrec.settings import Settings
from streamrec.topics import changelog_topic

SESSIONS_TABLE = "sessions"  # streams.app.SESSIONS_TABLE (not imported: no faust here)


# --- Reading topics back --------------------------------------------------------------------
def read_topic(
    settings: Settings,
    topic: str,
    isolation: str = "read_uncommitted",
    timeout_s: float = 120.0,
) -> list[tuple[bytes | None, bytes | None]]:
    """Every (key, value) of ``topic`` from the beginning up to its end, partition by partition.

    ``isolation="read_committed"`` hides records of aborted (and still open) transactions.
    """
    consumer = Consumer(
        {
            **confluent_config(settings),
            "group.id": f"streamrec-chaos-{time.time_ns()}",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
            "isolation.level": isolation,
        }
    )
    try:
        meta = consumer.list_topics(topic, timeout=30).topics[topic]
        parts = sorted(meta.partitions)
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
        out: list[tuple[bytes | None, bytes | None]] = []
        at_eof: set[int] = set()
        deadline = time.monotonic() + timeout_s
        while len(at_eof) < len(parts):
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"read_topic {topic}: reached the end of {len(at_eof)} of {len(parts)} "
                    f"partitions in {timeout_s:.0f} s"
                )
            for msg in consumer.consume(num_messages=5000, timeout=0.5):
                err = msg.error()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        at_eof.add(msg.partition() or 0)
                        continue
                    raise RuntimeError(f"read_topic {topic}: {err}")
                at_eof.discard(msg.partition() or 0)
                out.append((msg.key(), msg.value()))
        return out
    finally:
        consumer.close()


@dataclass
class OutputLog:
    """Everything a run wrote to the recommendations and DLQ topics."""

    recommendations: list[dict[str, Any]]
    dead_letters: list[dict[str, Any]]

    def answers(self) -> Counter[str]:
        """How many slates answered each event id (as trigger or as a coalesced event)."""
        c: Counter[str] = Counter()
        for rec in self.recommendations:
            c[rec["trigger_event_id"]] += 1
            c.update(rec.get("coalesced_event_ids") or ())
        return c

    def dlq_reasons(self) -> Counter[str]:
        return Counter(d["error"] for d in self.dead_letters)

    def dlq_originals(self) -> list[tuple[bytes | None, str]]:
        """(original value bytes, reason) of each DLQ record."""
        return [
            (
                None if d["original_b64"] is None else base64.b64decode(d["original_b64"]),
                d["error"],
            )
            for d in self.dead_letters
        ]

    def dlq_event_ids(self) -> set[str]:
        ids: set[str] = set()
        for raw, _ in self.dlq_originals():
            try:
                ids.add(str(json.loads(raw or b"")["event_id"]))
            except (ValueError, KeyError, TypeError):
                continue
        return ids


def read_outputs(settings: Settings, isolation: str = "read_uncommitted") -> OutputLog:
    recs = read_topic(settings, settings.topic_recommendations, isolation)
    dlq = read_topic(settings, settings.topic_dlq, isolation)
    return OutputLog(
        [json.loads(v) for _, v in recs if v is not None],
        [json.loads(v) for _, v in dlq if v is not None],
    )


def read_sessions(
    settings: Settings, isolation: str = "read_uncommitted"
) -> dict[str, dict[str, Any] | None]:
    """The latest value per user of the worker's ``sessions`` changelog (JSON key and value)."""
    out: dict[str, dict[str, Any] | None] = {}
    topic = changelog_topic(settings.app_id, SESSIONS_TABLE)
    for key, value in read_topic(settings, topic, isolation):
        if key is None:
            continue
        out[str(json.loads(key))] = None if value is None else json.loads(value)
    return out


# --- The offline reference --------------------------------------------------------------------
def reference_sessions(
    events: Iterable[dict[str, Any]], max_len: int, dedupe_window_ms: int
) -> dict[str, SessionState]:
    """Session state per user after ``events`` (in delivery order), as the worker should hold
    it: the same ``SessionState`` code, applied one event at a time, duplicates skipped."""
    states: dict[str, SessionState] = {}
    for e in events:
        state = states.get(e["user_id"], SessionState())
        if state.is_duplicate(e["event_id"], e["ts"], dedupe_window_ms):
            continue
        step = Step(e["item_id"], e["type"], int(e["ts"]))
        states[e["user_id"]] = state.apply(e["event_id"], step, max_len)
    return states


def comparable(session: dict[str, Any] | None) -> dict[str, Any]:
    """A session (stored JSON of any version, or ``to_json()``) in one comparable form, without
    the model-dependent part (the last slate)."""
    data = SessionState.from_json(session).to_json()
    data.pop("s", None)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}


# --- Accounting -------------------------------------------------------------------------------
@dataclass
class Accounting:
    """Where each sent event id ended up. ``missing`` must be empty."""

    sent: int
    answered: int
    answered_twice: list[str]
    in_dlq: int
    held_as_duplicate: list[str]
    missing: list[str]

    def as_dict(self) -> dict[str, int]:
        return {
            "sent": self.sent,
            "answered": self.answered,
            "answered_twice": len(self.answered_twice),
            "in_dlq": self.in_dlq,
            "held_as_duplicate": len(self.held_as_duplicate),
            "missing": len(self.missing),
        }


def account(
    sent: Sequence[dict[str, Any]],
    outputs: OutputLog,
    sessions: dict[str, dict[str, Any] | None] | None = None,
) -> Accounting:
    """Account for each event of ``sent`` (unique ids) from the output topics and sessions."""
    answers = outputs.answers()
    dlq_ids = outputs.dlq_event_ids()
    held: dict[str, set[str]] = {}
    for user, value in (sessions or {}).items():
        held[user] = set(SessionState.from_json(value).fingerprints)
    answered = twice = 0
    twice_ids: list[str] = []
    in_dlq = 0
    held_dup: list[str] = []
    missing: list[str] = []
    for e in sent:
        eid = e["event_id"]
        n = answers.get(eid, 0)
        if n:
            answered += 1
            if n > 1:
                twice += 1
                twice_ids.append(eid)
        elif eid in dlq_ids:
            in_dlq += 1
        elif event_fingerprint(eid) in held.get(e["user_id"], set()):
            held_dup.append(eid)
        else:
            missing.append(eid)
    return Accounting(len(sent), answered, twice_ids, in_dlq, held_dup, missing)


def committed_lag(settings: Settings, group: str | None = None) -> int:
    """Messages of the events topic past the committed offsets of the worker group."""
    consumer = Consumer(
        {
            **confluent_config(settings),
            "group.id": group or settings.app_id,
            "enable.auto.commit": False,
        }
    )
    try:
        topic = settings.topic_events
        parts = sorted(consumer.list_topics(topic, timeout=30).topics[topic].partitions)
        committed = consumer.committed([TopicPartition(topic, p) for p in parts], timeout=30)
        lag = 0
        for tp in committed:
            _, high = consumer.get_watermark_offsets(tp, timeout=30)
            lag += high - max(0, tp.offset)
        return lag
    finally:
        consumer.close()


def wait_committed(settings: Settings, timeout_s: float, group: str | None = None) -> None:
    """Wait until the worker group has committed every message of the events topic."""
    deadline = time.monotonic() + timeout_s
    lag = -1
    while time.monotonic() < deadline:
        try:
            lag = committed_lag(settings, group)
        except Exception:  # broker briefly unreachable (restart tests): try again
            lag = -1
        if lag == 0:
            return
        time.sleep(1.0)
    raise TimeoutError(f"events topic still {lag} messages past the commits after {timeout_s} s")


# --- Metrics ----------------------------------------------------------------------------------
def wait_handled(url: str, n: float, timeout_s: float, what: str = "worker") -> dict[str, float]:
    """Poll ``url`` until the worker has handled ``n`` messages; returns the last scrape."""
    deadline = time.monotonic() + timeout_s
    metrics: dict[str, float] = {}
    while time.monotonic() < deadline:
        try:
            metrics = scrape_metrics(url)
        except OSError:
            metrics = {}
        if handled(metrics) >= n:
            return metrics
        time.sleep(0.5)
    raise TimeoutError(
        f"{what} handled {handled(metrics):.0f} of {n:.0f} messages in {timeout_s} s"
    )


def rss_kib(pid: int) -> int:
    """Resident set size of ``pid`` in KiB (``VmRSS`` of /proc/PID/status; 0 if gone)."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return 0
    return 0


# --- Fuzzing ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Fuzzed:
    """A malformed message and the DLQ reason it is meant to get."""

    key: bytes | None
    value: bytes | None
    reason: str


_DAY_MS = 86_400_000


def fuzz_messages(
    n: int,
    *,
    seed: int,
    users: Sequence[str],
    items: Sequence[str],
    max_bytes: int,
    now: int | None = None,
) -> list[Fuzzed]:
    """``n`` malformed events, each with exactly one defect whose DLQ reason is known.

    Values are unique where they exist (a nonce in each), so a DLQ record maps back to the
    message that caused it. ``now`` is the clock the worker will see, give or take minutes.
    """
    rng = random.Random(seed)
    now = now_ms() if now is None else now
    counter = iter(range(10**9))

    def base() -> dict[str, Any]:
        i = next(counter)
        return {
            "event_id": f"fz-{seed}-{i}",
            "user_id": rng.choice(users),
            "item_id": rng.choice(items),
            "type": rng.choice(["view", "click", "purchase"]),
            "ts": now - rng.randint(0, 3_600_000),
        }

    def dump(obj: Any) -> bytes:
        return json.dumps(obj, separators=(",", ":")).encode()

    def keyed(e: dict[str, Any], value: bytes | None, reason: str) -> Fuzzed:
        return Fuzzed(str(e["user_id"]).encode(), value, reason)

    def invalid_json() -> Fuzzed:
        e = base()
        raw = dump(e)
        kind = rng.randrange(4)
        if kind == 0:  # truncated: no proper prefix of an object is valid JSON
            value = raw[: rng.randint(1, len(raw) - 1)]
        elif kind == 1:  # single quotes, trailing commas, comments: not JSON
            value = raw.replace(b'"', b"'")
        elif kind == 2:
            value = raw[:-1] + b",}"
        else:
            value = b"{" + "".join(rng.choices(string.ascii_letters, k=20)).encode() + raw
        return keyed(e, value, "invalid_json")

    def invalid_utf8() -> Fuzzed:
        e = base()
        raw = dump(e)
        cut = raw.index(b'"', raw.index(b"event_id") + 10) + 1  # inside the event_id string
        # 0xff/0xfe never occur in UTF-8; a lone continuation byte 0x80 cannot start a char.
        junk = bytes([rng.choice([0xFF, 0xFE, 0x80])]) + bytes(rng.choices([0xFF, 0xC3, 0x80], k=2))
        return keyed(e, raw[:cut] + junk + raw[cut:], "invalid_utf8")

    def not_an_object() -> Fuzzed:
        e = base()
        value = rng.choice(
            [dump([e]), dump(e["event_id"]), dump(rng.randint(0, 10**9)), b"null", b"true"]
        )
        return keyed(e, value + b" " * rng.randint(0, 3), "not_an_object")

    def missing_field() -> Fuzzed:
        e = base()
        e.pop(rng.choice(["event_id", "item_id", "type", "ts"]))
        return keyed(e, dump(e), "missing_field")

    def wrong_type() -> Fuzzed:
        e = base()
        name, bad = rng.choice(
            [
                ("event_id", rng.randint(1, 10**6)),
                ("item_id", [e["item_id"]]),
                ("item_id", True),
                ("ts", True),
                ("ts", [e["ts"]]),
                ("value", "three"),
                ("context", "not-a-map"),
            ]
        )
        e[name] = bad
        return keyed(e, dump(e), "wrong_type")

    def invalid_value() -> Fuzzed:
        e = base()
        kind = rng.randrange(5)
        if kind == 0:
            e["ts"] = rng.choice(["yesterday", "2024-02-31T00:00:00Z", "2024-01-01T00:00:00"])
        elif kind == 1:
            e["item_id"] = ""
        elif kind == 2:
            e["item_id"] = "x" * rng.randint(257, 600)
        elif kind == 3:
            e["context"] = {"page": rng.randint(0, 99)}
        else:
            e["context"] = {"k": "v" * 1001}
        return keyed(e, dump(e), "invalid_value")

    def unknown_event_type() -> Fuzzed:
        e = base()
        e["type"] = rng.choice(["teleport", "VIEW", "", "like", "purchase "])
        return keyed(e, dump(e), "unknown_event_type")

    def timestamp_out_of_range() -> Fuzzed:
        e = base()
        e["ts"] = rng.choice(
            [
                now + rng.randint(1, 3650) * _DAY_MS,  # future
                rng.randint(0, 10**11),  # 1970-1973: older than the 30-year window
                "1971-06-01T00:00:00Z",
            ]
        )
        return keyed(e, dump(e), "timestamp_out_of_range")

    def missing_key() -> Fuzzed:
        e = base()
        return Fuzzed(None, dump(e), "missing_key")

    def key_mismatch() -> Fuzzed:
        e = base()
        return Fuzzed(f"not-{e['user_id']}".encode(), dump(e), "key_mismatch")

    def unknown_item() -> Fuzzed:
        e = base()
        e["item_id"] = f"ghost-item-{rng.randint(0, 10**9)}"
        return keyed(e, dump(e), "unknown_item")

    def oversize() -> Fuzzed:
        e = base()
        e["pad"] = "p" * rng.randint(max_bytes + 1, 4 * max_bytes)
        return keyed(e, dump(e), "oversize")

    def empty_value() -> Fuzzed:
        e = base()
        value: bytes | None = rng.choice([b"", None])
        return keyed(e, value, "empty_value")

    makers = [
        (invalid_json, 12),
        (invalid_utf8, 8),
        (not_an_object, 6),
        (missing_field, 10),
        (wrong_type, 10),
        (invalid_value, 10),
        (unknown_event_type, 8),
        (timestamp_out_of_range, 10),
        (missing_key, 6),
        (key_mismatch, 6),
        (unknown_item, 8),
        (oversize, 2),
        (empty_value, 4),
    ]
    funcs = [f for f, _ in makers]
    weights = [w for _, w in makers]
    return [rng.choices(funcs, weights)[0]() for _ in range(n)]


# --- Burst ------------------------------------------------------------------------------------
@dataclass
class BurstReport:
    """A burst of ``sent`` events: how lag and the worker's memory moved while it drained."""

    sent: int
    seconds_to_produce: float
    seconds_to_drain: float
    peak_lag: float
    peak_rss_kib: int
    start_rss_kib: int
    samples: list[tuple[float, float, int]] = field(default_factory=list)  # (t_s, lag, rss)

    def as_dict(self) -> dict[str, Any]:
        return {
            "sent": self.sent,
            "seconds_to_produce": round(self.seconds_to_produce, 1),
            "seconds_to_drain": round(self.seconds_to_drain, 1),
            "events_per_s": round(self.sent / max(1e-9, self.seconds_to_drain), 1),
            "peak_lag": self.peak_lag,
            "start_rss_mib": round(self.start_rss_kib / 1024, 1),
            "peak_rss_mib": round(self.peak_rss_kib / 1024, 1),
        }


def burst_events(
    n: int, users: int, items: Sequence[str], seed: int = 0, prefix: str = "b"
) -> Iterator[dict[str, Any]]:
    """``n`` events over ``users`` users, round robin, with distinct ids and fresh stamps."""
    rng = random.Random(seed)
    start = now_ms() - 60_000
    for i in range(n):
        yield {
            "event_id": f"{prefix}-{seed}-{i}",
            "user_id": f"burst-user-{i % users}",
            "item_id": rng.choice(items),
            "type": "view",
            "ts": start + i // users,
        }


def burst(
    settings: Settings,
    events: Iterable[dict[str, Any]],
    n: int,
    metrics_url: str,
    pid: int | None,
    timeout_s: float = 600.0,
    sample_every_s: float = 0.5,
    baseline: float = 0.0,
) -> BurstReport:
    """Produce ``events`` (``n`` of them) at full speed while sampling lag and worker RSS.

    Lag is ``produced - handled`` (the worker's counters), i.e. messages waiting in Kafka or
    in flight inside the worker; ``baseline`` is what the worker had handled before the burst.
    """
    import threading

    produced = [0]
    samples: list[tuple[float, float, int]] = []
    t0 = time.monotonic()
    done_producing = threading.Event()

    def on_sent(k: int) -> None:
        produced[0] = k

    def produce() -> None:
        produce_records(
            make_producer(settings),
            settings.topic_events,
            ((e["user_id"].encode(), json.dumps(e).encode()) for e in events),
            on_sent=on_sent,
        )
        done_producing.set()

    thread = threading.Thread(target=produce, name="burst-producer", daemon=True)
    start_rss = rss_kib(pid) if pid else 0
    thread.start()
    t_produced = None
    seen = 0.0
    while True:
        elapsed = time.monotonic() - t0
        if elapsed > timeout_s:
            raise TimeoutError(f"burst: handled {seen:.0f} of {n} in {timeout_s:.0f} s")
        with contextlib.suppress(OSError):
            seen = handled(scrape_metrics(metrics_url)) - baseline
        if t_produced is None and done_producing.is_set():
            t_produced = elapsed
        samples.append((elapsed, max(0.0, produced[0] - seen), rss_kib(pid) if pid else 0))
        if done_producing.is_set() and seen >= n:
            break
        time.sleep(sample_every_s)
    thread.join(10)
    return BurstReport(
        sent=n,
        seconds_to_produce=t_produced or 0.0,
        seconds_to_drain=time.monotonic() - t0,
        peak_lag=max(s[1] for s in samples),
        peak_rss_kib=max(s[2] for s in samples),
        start_rss_kib=start_rss,
        samples=samples,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m streamrec.chaos burst``: burst a running worker (settings from env)."""
    from streamrec.settings import load_settings

    parser = argparse.ArgumentParser(prog="python -m streamrec.chaos")
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("burst", help="produce N events at full speed; report lag and RSS")
    b.add_argument("--n", type=int, default=1_000_000)
    b.add_argument("--users", type=int, default=10_000)
    b.add_argument("--items", type=int, default=600, help="use item-0 .. item-(N-1)")
    b.add_argument("--metrics-url", default=None)
    b.add_argument("--pid", type=int, default=None, help="worker pid, for RSS")
    b.add_argument("--timeout", type=float, default=3600.0)
    args = parser.parse_args(argv)
    settings = load_settings()
    url = args.metrics_url or f"http://{settings.metrics_host}:{settings.metrics_port}/metrics"
    items = [f"item-{i}" for i in range(args.items)]
    start = handled(scrape_metrics(url))
    events = burst_events(args.n, args.users, items, seed=time.time_ns() % 10**6)
    report = burst(settings, events, args.n, url, args.pid, args.timeout, baseline=start)
    json.dump(report.as_dict(), sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
