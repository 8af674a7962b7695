"""Reliability scenarios against the real broker (issue "Reliability"; docs/reliability.md).

Each test prints one ``RELIABILITY {json}`` line with the counts it observed (``pytest -s``).
Accounting that must survive a SIGKILL is done from the output topics and the ``sessions``
changelog (``streamrec.chaos``), since a killed worker's counters die with it.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from serving.artifacts import save_model
from serving.data import leave_one_out, load_interactions
from serving.encoder import EncoderConfig
from serving.session import FORMAT_VERSION, SessionState
from serving.synthetic import SyntheticShop, make_shop, write_jsonl
from serving.train import TrainConfig, train_encoder
from streamrec import chaos
from streamrec.kafka_local import LocalKafka
from streamrec.procs import WorkerProcess, free_port
from streamrec.publish import publish_model_notice
from streamrec.replay import (
    OutputCollector,
    event_records,
    make_producer,
    produce_records,
    scrape_metrics,
)
from streamrec.settings import Settings
from streamrec.topics import design_topics, ensure_topics

SETTLE_S = 2.5  # offsets commit every 1 s, gauges refresh every 2 s


def _report(scenario: str, **counts: Any) -> None:
    print(f"RELIABILITY {json.dumps({'scenario': scenario, **counts}, sort_keys=True)}")


def _prepare(settings: Settings, shop: SyntheticShop) -> Settings:
    ensure_topics(settings, design_topics(settings))
    produce_records(
        make_producer(settings),
        settings.topic_items,
        [(i["item_id"].encode(), json.dumps(i).encode()) for i in shop.items],
    )
    return settings


@pytest.fixture
def new_settings(
    make_settings: Callable[..., Settings], model_dir: Path, shop: SyntheticShop
) -> Callable[..., Settings]:
    def make(**overrides: object) -> Settings:
        values: dict[str, object] = {
            "model_dir": model_dir,
            "metrics_port": free_port(),
            # Fewer candidates to rerank: these tests are about delivery, not slate quality,
            # and the volume scenarios finish sooner on a busy CI box.
            "candidates": 50,
        }
        values.update(overrides)
        return _prepare(make_settings(**values), shop)

    return make


@pytest.fixture(scope="module")
def big_shop(shop: SyntheticShop) -> SyntheticShop:
    """800 users x 25 events = 20,000 events over the fixture shop's catalog (same seed)."""
    big = make_shop(n_items=len(shop.items), n_users=800, events_per_user=25, seed=5)
    assert big.items == shop.items
    return big


def _by_ts(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    # Users start together, so sorting by event time interleaves them.
    return sorted(events, key=lambda e: (e["ts"], e["event_id"]))


def _encoded(events: list[dict[str, Any]]) -> list[tuple[bytes, bytes]]:
    return list(event_records(events, stamp_now=False))


def _produce_in_background(
    settings: Settings, records: list[tuple[bytes, bytes]], rate: float | None = None
) -> threading.Thread:
    def run() -> None:
        produce_records(make_producer(settings), settings.topic_events, records, rate=rate)

    thread = threading.Thread(target=run, name="replay", daemon=True)
    thread.start()
    return thread


def _sessions_match(
    settings: Settings, delivered: list[dict[str, Any]], isolation: str = "read_uncommitted"
) -> tuple[int, list[str]]:
    """Compare every user's changelog session with the offline reference; returns
    (users compared, users that differ)."""
    reference = chaos.reference_sessions(
        delivered, settings.session_max_len, int(settings.dedupe_window_s * 1000)
    )
    stored = chaos.read_sessions(settings, isolation)
    differ = [
        user
        for user, state in reference.items()
        if chaos.comparable(stored.get(user)) != chaos.comparable(state.to_json())
    ]
    return len(reference), differ


# --- 4. Bad input at volume ---------------------------------------------------------------------
@pytest.mark.slow
def test_fuzzed_bad_input_goes_to_the_dlq_with_the_right_reason(
    new_settings: Callable[..., Settings], shop: SyntheticShop
) -> None:
    s = new_settings(max_message_bytes=8192)
    good = _by_ts(shop.events[:3000])
    bad = chaos.fuzz_messages(
        10_000,
        seed=11,
        users=sorted({e["user_id"] for e in good}),
        items=[i["item_id"] for i in shop.items],
        max_bytes=s.max_message_bytes,
    )
    # Bad messages scattered through the good ones; the good keep their order.
    rng = random.Random(7)
    stream: list[tuple[bytes | None, bytes | None]] = _encoded(good)  # type: ignore[assignment]
    for f in bad:
        stream.insert(rng.randrange(len(stream) + 1), (f.key, f.value))
    intended = Counter(f.reason for f in bad)
    by_value = Counter(f.value for f in bad)
    reason_of = {f.value: f.reason for f in bad if f.value is not None and by_value[f.value] == 1}

    with WorkerProcess(s, s.data_dir.parent / "worker.log") as worker:
        produce_records(make_producer(s), s.topic_events, stream)
        metrics = chaos.wait_handled(worker.metrics_url, len(stream), 300)
        chaos.wait_committed(s, 60)
        assert worker.alive(), worker.tail()
    out = chaos.read_outputs(s)
    acct = chaos.account(good, out)
    wrong = [
        (reason_of[raw], got)
        for raw, got in out.dlq_originals()
        if raw in reason_of and reason_of[raw] != got
    ]
    _report(
        "fuzz",
        good=len(good),
        bad=len(bad),
        intended=dict(intended),
        dlq=dict(out.dlq_reasons()),
        matched_by_bytes=sum(raw in reason_of for raw, _ in out.dlq_originals()),
        **acct.as_dict(),
    )
    assert out.dlq_reasons() == intended
    assert wrong == []
    assert sum(raw in reason_of for raw, _ in out.dlq_originals()) == len(reason_of)
    for reason, n in intended.items():
        assert metrics[f'streamrec_events_rejected_total{{reason="{reason}"}}'] == n
    assert chaos.metric_sum(metrics, "streamrec_events_consumed_total") == len(good)
    assert acct.answered == len(good)
    assert acct.answered_twice == []


# --- 1. Worker crash ----------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("guarantee", ["at_least_once", "exactly_once"])
def test_sigkill_mid_replay_loses_nothing(
    new_settings: Callable[..., Settings], big_shop: SyntheticShop, guarantee: str
) -> None:
    s = new_settings(store="rocksdb://", processing_guarantee=guarantee)
    isolation = "read_committed" if guarantee == "exactly_once" else "read_uncommitted"
    events = _by_ts(big_shop.events)
    assert len(events) >= 20_000
    w1 = WorkerProcess(s, s.data_dir.parent / "w1.log").start()
    try:
        producer = _produce_in_background(s, _encoded(events))
        # Kill it half-way, while the replay is still coming in.
        before_kill = chaos.wait_handled(w1.metrics_url, len(events) // 2, 300, "worker 1")
        w1.kill()
    finally:
        w1.kill()
    producer.join(120)
    w2 = WorkerProcess(s, s.data_dir.parent / "w2.log").start()
    try:
        chaos.wait_committed(s, 300)
        time.sleep(SETTLE_S)
        after = scrape_metrics(w2.metrics_url)
        assert w2.alive(), w2.tail()
    finally:
        w2.stop()
    out = chaos.read_outputs(s, isolation)
    sessions = chaos.read_sessions(s, isolation)
    acct = chaos.account(events, out, sessions)
    users, differ = _sessions_match(s, events, isolation)
    w1_handled, w2_handled = chaos.handled(before_kill), chaos.handled(after)
    w2_dupes = chaos.metric_sum(after, "streamrec_events_duplicate_total")
    _report(
        f"crash/{guarantee}",
        w1_handled_at_last_scrape=w1_handled,
        w2_handled=w2_handled,
        w2_duplicates=w2_dupes,
        recommendations=len(out.recommendations),
        users_compared=users,
        users_differing=len(differ),
        **acct.as_dict(),
    )
    assert w1_handled + w2_handled >= len(events)
    assert acct.in_dlq == 0
    if guarantee == "exactly_once":
        # Outputs, changelog writes and offsets commit together: under read_committed no
        # event is answered twice.
        assert acct.answered_twice == []
    # Exactly-once: the changelog commits with the slates. At-least-once: a batch's changelog
    # records are sent only once the broker has its slates. Either way no event is held in a
    # session (taken for a duplicate on redelivery) without its slate.
    assert acct.held_as_duplicate == []
    assert acct.missing == []
    assert differ == [], differ[:5]


# --- 3. Broker restart --------------------------------------------------------------------------
@pytest.fixture
def restartable_broker(local_kafka: LocalKafka) -> Iterator[LocalKafka]:
    """The session broker, guaranteed to be up again when the test ends."""
    try:
        yield local_kafka
    finally:
        local_kafka.start(timeout_s=180)


@pytest.mark.slow
def test_worker_rides_out_a_broker_restart(
    new_settings: Callable[..., Settings], shop: SyntheticShop, restartable_broker: LocalKafka
) -> None:
    s = new_settings()
    events = _by_ts(shop.events[:6000])
    first, second = events[:3000], events[3000:]
    with WorkerProcess(s, s.data_dir.parent / "worker.log") as worker:
        produce_records(make_producer(s), s.topic_events, _encoded(first))
        chaos.wait_handled(worker.metrics_url, len(first), 180)
        restartable_broker.stop()
        time.sleep(5.0)
        assert worker.alive(), worker.tail()
        restartable_broker.start(timeout_s=180)
        produce_records(make_producer(s), s.topic_events, _encoded(second))
        metrics = chaos.wait_handled(worker.metrics_url, len(events), 300)
        chaos.wait_committed(s, 180)
        time.sleep(SETTLE_S)
        metrics = scrape_metrics(worker.metrics_url)
        assert worker.alive(), worker.tail()
    out = chaos.read_outputs(s)
    acct = chaos.account(events, out)
    consumed = chaos.metric_sum(metrics, "streamrec_events_consumed_total")
    dupes = chaos.metric_sum(metrics, "streamrec_events_duplicate_total")
    _report(
        "broker_restart",
        consumed=consumed,
        duplicates=dupes,
        produced=metrics["streamrec_recommendations_produced_total"],
        coalesced=metrics["streamrec_recommendations_coalesced_total"],
        recommendations=len(out.recommendations),
        **acct.as_dict(),
    )
    assert acct.missing == []
    assert consumed == len(events)
    assert len(out.recommendations) == metrics["streamrec_recommendations_produced_total"]
    assert (
        metrics["streamrec_recommendations_produced_total"]
        == consumed - metrics["streamrec_recommendations_coalesced_total"]
    )


# --- 5. Model hot swap under load ---------------------------------------------------------------
@pytest.fixture(scope="module")
def second_model_dir(tmp_path_factory: pytest.TempPathFactory, shop: SyntheticShop) -> Path:
    """Same data and shape as the ``model_dir`` fixture, another seed: another version."""
    root = tmp_path_factory.mktemp("model2")
    data = load_interactions(write_jsonl(shop.events, root / "events.jsonl"), "events")
    cfg = EncoderConfig(num_items=len(data.item_ids()), dim=32, dropout=0.1, attn_dropout=0.1)
    result, _, _ = train_encoder(
        leave_one_out(data), cfg, TrainConfig(epochs=5, progress=False, seed=2)
    )
    save_model(result.model, root / "model", data.item_ids(), dataset="synthetic")
    return root / "model"


@pytest.mark.slow
def test_model_hot_swap_under_load(
    new_settings: Callable[..., Settings],
    big_shop: SyntheticShop,
    second_model_dir: Path,
) -> None:
    s = new_settings()
    events = _by_ts(big_shop.events)[:3000]
    rate = 150.0  # well under the worker's speed: latency is the model's, not a queue's
    seen: list[tuple[int, float, str]] = []  # (generated_at, latency ms at arrival, version)

    def on_rec(rec: dict[str, Any]) -> None:
        seen.append(
            (rec["generated_at"], time.time() * 1000 - rec["event_ts"], rec["model_version"])
        )

    with (
        WorkerProcess(s, s.data_dir.parent / "worker.log") as worker,
        OutputCollector(s, on_recommendation=on_rec) as _,
    ):
        old_version = next(
            k.split('model_version="')[1].split('"')[0]
            for k in scrape_metrics(worker.metrics_url)
            if k.startswith("streamrec_model_info{")
        )
        # Stamped at send time: latency is event-to-slate, as a consumer sees it.
        producer = _produce_in_background(s, list(event_records(events)), rate=rate)
        time.sleep(len(events) / rate / 2)
        new_version = publish_model_notice(s, second_model_dir)
        producer.join(120)
        chaos.wait_handled(worker.metrics_url, len(events), 180)
        chaos.wait_committed(s, 60)
        time.sleep(SETTLE_S)
        assert worker.alive(), worker.tail()
    out = chaos.read_outputs(s)
    acct = chaos.account(events, out)
    versions = Counter(r["model_version"] for r in out.recommendations)
    swap_at = min(g for g, _, v in seen if v == new_version)
    stale = [g for g, _, v in seen if v != new_version and g > swap_at + 5]

    def p99(lo: float, hi: float) -> float:
        lat = [ms for g, ms, _ in seen if lo <= g < hi]
        return float(np.percentile(lat, 99)) if lat else float("nan")

    before, around = p99(swap_at - 10_000, swap_at - 2000), p99(swap_at - 2000, swap_at + 3000)
    _report(
        "hot_swap",
        versions=dict(versions),
        p99_ms_before=round(before, 1),
        p99_ms_around_swap=round(around, 1),
        **acct.as_dict(),
    )
    assert old_version != new_version
    assert acct.missing == []
    assert acct.answered == len(events)
    assert versions[old_version] > 0
    assert versions[new_version] > 0
    assert set(versions) == {old_version, new_version}
    assert stale == []
    # The swap loads and indexes a model off the event loop; it must not stall the stream.
    assert around < 30_000


def _wait_assigned(worker: WorkerProcess, timeout_s: float) -> None:
    """Wait until ``worker`` owns an events partition: its lag gauge gets a series per
    assigned partition (refreshed every 2 s)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if any(
            k.startswith("streamrec_consumer_lag_messages{")
            for k in scrape_metrics(worker.metrics_url)
        ):
            return
        time.sleep(0.5)
    raise AssertionError(f"no events partition assigned in {timeout_s} s:\n{worker.tail()}")


# --- 2. Two workers, rebalance -------------------------------------------------------------------
@pytest.mark.slow
def test_partitions_and_state_move_to_a_second_worker(
    new_settings: Callable[..., Settings], shop: SyntheticShop, tmp_path: Path
) -> None:
    s1 = new_settings(store="rocksdb://")
    s2 = s1.model_copy(update={"metrics_port": free_port(), "data_dir": tmp_path / "worker2"})
    events = _by_ts(shop.events[:4500])
    a, b, c = events[:1800], events[1800:3600], events[3600:]
    again = a[::6]  # 300 redeliveries of old events, after their first owner left
    producer = make_producer(s1)
    w1 = WorkerProcess(s1, tmp_path / "w1.log").start()
    w2 = WorkerProcess(s2, tmp_path / "w2.log")
    try:
        produce_records(producer, s1.topic_events, _encoded(a))
        chaos.wait_handled(w1.metrics_url, len(a), 180, "worker 1")
        w2.start()
        _wait_assigned(w2, 180)  # the rebalance is done: part 2 is shared by both
        produce_records(producer, s1.topic_events, _encoded(b))
        chaos.wait_committed(s1, 240)
        time.sleep(SETTLE_S)
        w2_mid = scrape_metrics(w2.metrics_url)
        m1 = scrape_metrics(w1.metrics_url)
        w1.stop()
        produce_records(producer, s1.topic_events, _encoded(c) + _encoded(again))
        chaos.wait_committed(s1, 240)
        time.sleep(SETTLE_S)
        m2 = scrape_metrics(w2.metrics_url)
        assert w2.alive(), w2.tail()
    finally:
        w1.stop()
        w2.stop()
    out = chaos.read_outputs(s1)
    acct = chaos.account(events, out)
    answers = out.answers()
    consumed = sum(chaos.metric_sum(m, "streamrec_events_consumed_total") for m in (m1, m2))
    dupes = sum(chaos.metric_sum(m, "streamrec_events_duplicate_total") for m in (m1, m2))
    users, differ = _sessions_match(s1, events + again)
    _report(
        "rebalance",
        w1_handled=chaos.handled(m1),
        w2_handled_while_sharing=chaos.handled(w2_mid),
        w2_handled=chaos.handled(m2),
        consumed=consumed,
        duplicates=dupes,
        redelivered=len(again),
        users_compared=users,
        users_differing=len(differ),
        **acct.as_dict(),
    )
    assert chaos.handled(w2_mid) > 0, "the second worker got no partition"
    assert acct.missing == []
    assert [e["event_id"] for e in again if answers[e["event_id"]] != 1] == []
    assert chaos.metric_sum(m2, "streamrec_events_duplicate_total") >= len(again)
    # An event accepted twice (redelivered across the rebalance) is answered twice.
    assert consumed == len(events) + len(acct.answered_twice)
    assert differ == [], differ[:5]


# --- 6. Backpressure and memory ------------------------------------------------------------------
@pytest.mark.slow
def test_burst_drains_with_bounded_memory_and_state(
    new_settings: Callable[..., Settings], shop: SyntheticShop
) -> None:
    max_len = 20
    s = new_settings(session_max_len=max_len)
    n, users = 15_000, 250  # 60 events per user: more than the session keeps
    items = [i["item_id"] for i in shop.items]
    with WorkerProcess(s, s.data_dir.parent / "worker.log") as worker:
        assert worker.proc is not None
        report = chaos.burst(
            s, chaos.burst_events(n, users, items), n, worker.metrics_url, worker.proc.pid, 400
        )
        chaos.wait_committed(s, 120)
        time.sleep(SETTLE_S)
        assert worker.alive(), worker.tail()
    sessions = chaos.read_sessions(s)
    sizes = [len(json.dumps(v)) for v in sessions.values()]
    _report(
        "burst",
        **report.as_dict(),
        users=len(sessions),
        max_session_json_bytes=max(sizes),
        rss_mib_samples=[
            round(r / 1024) for _, _, r in report.samples[:: max(1, len(report.samples) // 10)]
        ],
    )
    assert report.peak_lag > 0
    assert report.peak_rss_kib > 0
    assert len(sessions) == users
    for value in sessions.values():
        assert value is not None
        assert value["v"] == FORMAT_VERSION
        state = SessionState.from_json(value)
        assert state.events == n // users
        assert len(state.history) == max_len
        assert len(state.fingerprints) == n // users  # below the 128 kept for dedupe
    # Bounded by design: max_len steps + 128 fingerprints + a slate, whatever the volume.
    assert max(sizes) < 12_000
