"""Every dashboard panel and alert expression against a real Prometheus scraping real exporters.

The exporters serve ``Metrics.create()`` from streamrec.metrics with every label value the
dashboard and the alerts read, moving like a healthy worker; a real-worker variant only has to
pass other targets to ``run_monitoring_check``.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, start_http_server
from typer.testing import CliRunner

from schemas.models import ErrorCode
from streamrec.cli import app
from streamrec.metrics import SLATE_HIT_KS, Metrics
from streamrec.monitoring import (
    MonitoringError,
    PrometheusServer,
    extract_queries,
    free_port,
    query,
    run_monitoring_check,
)

pytestmark = pytest.mark.prometheus

EVENT_TYPES = ("view", "click", "add_to_cart", "purchase")
STAGES = ("encode", "retrieve", "covisit", "filter", "rerank", "order")
REASONS = ("invalid_json", "missing_field", "oversize")


class FakeWorker:
    """A healthy worker's metrics on 127.0.0.1:<free port>, updated every 0.2 s."""

    def __init__(self, seed: int) -> None:
        self.registry = CollectorRegistry()
        self.metrics = Metrics.create(self.registry)
        self.rng = random.Random(seed)
        self.port = free_port()
        self._stop = threading.Event()
        m = self.metrics
        # Counters with labels export nothing until a label value is used: touch them all,
        # as a worker should at start-up, so "no rejections yet" reads 0, not "no data".
        for kind in EVENT_TYPES:
            m.events_consumed.labels(type=kind)
        for reason in REASONS:
            m.events_rejected.labels(reason=reason)
        for k in SLATE_HIT_KS:
            m.slate_hits.labels(k=str(k))
        for op in ("upsert", "delete"):
            m.items_consumed.labels(op=op)
        m.items_rejected.labels(reason="missing_field")
        m.model_info.labels(model_version="m-20240101", index_version="i-42").set(1)
        m.index_items.set(5000)
        m.index_updated.set(time.time())
        for partition in (seed * 2, seed * 2 + 1):
            m.consumer_lag.labels(topic="streamrec.events", partition=str(partition)).set(3)

    def tick(self) -> None:
        m, rng = self.metrics, self.rng
        batch = rng.randint(8, 64)
        for _ in range(batch):
            m.events_consumed.labels(type=rng.choice(EVENT_TYPES)).inc()
            m.end_to_end_latency.observe(rng.uniform(0.004, 0.040))
            m.slates_evaluated.inc()
            for k in SLATE_HIT_KS:
                if rng.random() < 0.05 * k:
                    m.slate_hits.labels(k=str(k)).inc()
        m.recommendations_produced.inc(batch - 1)
        m.recommendations_coalesced.inc()
        m.events_rejected.labels(reason=rng.choice(REASONS)).inc()
        m.events_duplicate.inc()
        m.batch_size.observe(batch)
        for stage in STAGES:
            m.stage_duration.labels(stage=stage).observe(rng.uniform(0.0005, 0.005))
        m.items_consumed.labels(op="upsert").inc()
        m.session_users.set(1000 + rng.randint(0, 50))
        m.index_updated.set(time.time())

    def _loop(self) -> None:
        while not self._stop.wait(0.2):
            self.tick()

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def __enter__(self) -> FakeWorker:
        self.tick()
        self._server, _ = start_http_server(self.port, addr="127.0.0.1", registry=self.registry)
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def workers() -> Iterator[list[FakeWorker]]:
    with FakeWorker(0) as a, FakeWorker(1) as b:
        yield [a, b]


def test_every_panel_and_alert_query_returns_series(workers: list[FakeWorker]) -> None:
    report = run_monitoring_check([w.target for w in workers], wait_s=20)

    assert report.config.ok, report.config.output
    assert report.rules.ok, report.rules.output
    assert report.targets_up == {w.target: True for w in workers}
    assert len(report.results) == len(extract_queries())
    failures = [(r.query.title, r.error) for r in report.failures]
    assert failures == []
    assert report.ok
    panels = [r for r in report.results if r.query.kind == "panel"]
    alerts = [r for r in report.results if r.query.kind == "alert"]
    assert len(panels) >= 30
    assert len(alerts) == 9
    # A healthy worker keeps every alert condition false.
    assert {r.query.title: r.firing for r in alerts} == {r.query.title: 0 for r in alerts}
    by_title = {r.query.title: r for r in panels}
    # Per-instance and per-label panels see every worker and every label value.
    assert by_title["Consumed /s per worker [A]"].series == 2
    assert by_title["Per-stage latency p99 [A]"].series == len(STAGES)
    assert by_title["Online hit rate at k [A]"].series == len(SLATE_HIT_KS)
    # Every reason is exported from the start (at 0), so the panel shows all of them.
    assert by_title["Dead-letter rate by reason [A]"].series == len(ErrorCode)
    assert by_title["Consumer lag per partition [A]"].series == 4


def test_cli_fails_and_names_the_target_that_is_down(tmp_path: Path) -> None:
    nobody = f"127.0.0.1:{free_port()}"
    out = tmp_path / "report.json"

    result = CliRunner().invoke(
        app, ["check-monitoring", "--target", nobody, "--wait", "3", "--json", str(out)]
    )

    assert result.exit_code == 1, result.output
    assert f"target {nobody}: DOWN" in result.output
    report = json.loads(out.read_text())
    assert report["ok"] is False
    assert report["targets_up"] == {nobody: False}
    assert report["promtool_check_config"]["ok"] is True
    # Nothing is scraped, so every panel query comes back empty and is named as failed.
    panels = [q for q in report["queries"] if q["kind"] == "panel"]
    assert panels
    assert all(not q["ok"] and "returned no series" in q["error"] for q in panels)


def test_cli_passes_against_live_workers(workers: list[FakeWorker], tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    args = ["check-monitoring", "--wait", "20", "--json", str(out)]
    for w in workers:
        args += ["--target", w.target]

    result = CliRunner().invoke(app, args)

    assert result.exit_code == 0, result.output
    assert "OK:" in result.output
    assert json.loads(out.read_text())["ok"] is True


def test_prometheus_server_reports_bad_queries_and_stops(workers: list[FakeWorker]) -> None:
    with PrometheusServer([workers[0].target]) as prom:
        url = prom.url
        with pytest.raises(MonitoringError, match="bad_data"):
            query(url, "sum(rate(streamrec_events_consumed_total[1m])")
    with pytest.raises(MonitoringError, match="query failed"):
        query(url, "up", timeout_s=2)


def test_prometheus_server_explains_a_failed_start(monkeypatch: pytest.MonkeyPatch) -> None:
    server = PrometheusServer(["127.0.0.1:1"])
    # An unparsable config makes the real binary exit at once, with its reason in the log.
    monkeypatch.setattr(server, "config", lambda: {"global": {"scrape_interval": "soon"}})

    with pytest.raises(MonitoringError, match=r"exited with code \d+ before it was ready"):
        server.__enter__()


def test_prometheus_server_gives_up_when_never_ready() -> None:
    server = PrometheusServer(["127.0.0.1:1"], start_timeout_s=0)

    with pytest.raises(MonitoringError, match=r"not ready on http://127\.0\.0\.1:"):
        server.__enter__()
    assert server._proc is None
