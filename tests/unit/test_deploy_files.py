"""The deploy/ files parse, agree with each other and with the code, and the alerts fire when
they should (``promtool test rules``). Also the pure parts of streamrec.monitoring and
streamrec.report. No network; promtool is run as a local binary."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry
from typer.testing import CliRunner

from streamrec import monitoring
from streamrec.cli import app
from streamrec.metrics import Metrics
from streamrec.monitoring import (
    MonitoringError,
    PrometheusServer,
    Query,
    check_queries,
    condition_probes,
    extract_queries,
    promtool_check_config,
    promtool_check_rules,
    promtool_test_rules,
    scrape_address,
    substitute_variables,
)
from streamrec.report import TimelineError, rates, read_timeline
from streamrec.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "streamrec.json"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
COMPOSE = DEPLOY / "compose.yaml"
DATASOURCE_UID = "streamrec-prometheus"
SETTINGS_ENV = {f"STREAMREC_{name.upper()}" for name in Settings.model_fields}


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def panels() -> list[dict[str, Any]]:
    return [p for p in dashboard()["panels"] if p["type"] != "row"]


def alert_rules() -> list[dict[str, Any]]:
    return [r for g in load_yaml(ALERTS)["groups"] for r in g["rules"]]


def exported_metric_names() -> set[str]:
    registry = CollectorRegistry()
    Metrics.create(registry)
    names = set()
    for family in registry.collect():
        suffix = {"counter": "_total", "histogram": "_bucket"}.get(family.type, "")
        names.add(family.name + suffix)
    return names


# --- Every file parses ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yml", ".yaml", ".json")),
    ids=lambda p: str(p.relative_to(DEPLOY)),
)
def test_deploy_file_parses(path: Path) -> None:
    text = path.read_text()
    docs = [json.loads(text)] if path.suffix == ".json" else list(yaml.safe_load_all(text))
    assert docs
    assert all(isinstance(d, dict) for d in docs)


# --- docker compose ------------------------------------------------------------------------


def compose() -> dict[str, Any]:
    data: dict[str, Any] = load_yaml(COMPOSE)
    return data


def test_compose_runs_three_kraft_brokers_of_the_official_image() -> None:
    services = compose()["services"]
    brokers = {name: s for name, s in services.items() if name.startswith("kafka-")}
    assert sorted(brokers) == ["kafka-1", "kafka-2", "kafka-3"]
    pom = (DEPLOY / "kafka" / "pom.xml").read_text()
    kafka_version = re.search(r"<kafka.version>([^<]+)</kafka.version>", pom)
    assert kafka_version is not None
    node_ids = []
    for name, svc in brokers.items():
        env = svc["environment"]
        # Same broker version as the local runner, so behaviour matches between the two.
        assert svc["image"] == f"apache/kafka:{kafka_version.group(1)}"
        assert env["KAFKA_PROCESS_ROLES"] == "broker,controller"
        assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"] == (
            "1@kafka-1:9093,2@kafka-2:9093,3@kafka-3:9093"
        )
        assert f"PLAINTEXT://{name}:9092" in env["KAFKA_ADVERTISED_LISTENERS"]
        assert env["KAFKA_LOG_DIRS"] in {v.split(":")[1] for v in svc["volumes"]}
        node_ids.append(env["KAFKA_NODE_ID"])
        assert svc["healthcheck"]["test"]
    assert sorted(node_ids) == [1, 2, 3]
    assert len({s["environment"]["CLUSTER_ID"] for s in brokers.values()}) == 1


def test_compose_workers_start_after_topics_and_are_all_scraped() -> None:
    services = compose()["services"]
    workers = sorted(n for n in services if n.startswith("worker-"))
    assert len(workers) >= 2
    topics = services["topics"]
    assert topics["command"] == ["topics", "create"]
    for name, svc in services.items():
        for dep in svc.get("depends_on", []):
            assert dep in services, f"{name} depends on unknown service {dep}"
    for name in workers:
        svc = services[name]
        env = svc["environment"]
        assert svc["command"] == ["worker"]
        assert svc["depends_on"]["topics"]["condition"] == "service_completed_successfully"
        assert env["STREAMREC_METRICS_HOST"] == "0.0.0.0"
        assert "ports" not in svc, "worker metrics must stay inside the compose network"
        assert set(env["STREAMREC_KAFKA_BOOTSTRAP"].split(",")) == {
            "kafka-1:9092",
            "kafka-2:9092",
            "kafka-3:9092",
        }
        assert set(env) <= SETTINGS_ENV, "unknown STREAMREC_ variable (typo?)"
    assert set(topics["environment"]) <= SETTINGS_ENV
    scrape = load_yaml(DEPLOY / "prometheus" / "prometheus.yml")["scrape_configs"]
    job = next(j for j in scrape if j["job_name"] == "streamrec")
    port = services[workers[0]]["environment"]["STREAMREC_METRICS_PORT"]
    assert job["static_configs"][0]["targets"] == [f"{w}:{port}" for w in workers]


def test_compose_mounts_and_builds_refer_to_existing_files() -> None:
    data = compose()
    named = set(data["volumes"])
    for name, svc in data["services"].items():
        if "build" in svc:
            context = (COMPOSE.parent / svc["build"]["context"]).resolve()
            assert context == ROOT
            assert (context / svc["build"]["dockerfile"]).is_file()
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (COMPOSE.parent / source).exists(), f"{name}: {source} missing"
            else:
                assert source in named, f"{name}: volume {source} not declared"
    prometheus = data["services"]["prometheus"]
    assert "./prometheus:/etc/prometheus:ro" in prometheus["volumes"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]
    grafana = data["services"]["grafana"]
    mounts = dict(v.split(":")[:2] for v in grafana["volumes"])
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    provider = load_yaml(DEPLOY / "grafana/provisioning/dashboards/streamrec.yml")["providers"][0]
    assert mounts["./grafana/dashboards"] == provider["options"]["path"]


def test_dockerfile_copies_existing_sources_and_runs_the_cli() -> None:
    lines = (DEPLOY / "Dockerfile").read_text().splitlines()
    copies = [shlex.split(line)[1:-1] for line in lines if line.startswith("COPY ")]
    assert copies
    for sources in copies:
        for source in sources:
            assert (ROOT / source).exists(), f"Dockerfile copies {source}, which is missing"
    assert 'ENTRYPOINT ["streamrec"]' in lines
    assert 'CMD ["worker"]' in lines
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'streamrec = "streamrec.cli:main"' in pyproject


def test_k8s_manifests_agree_with_each_other() -> None:
    docs = {}
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            assert {"apiVersion", "kind", "metadata"} <= set(doc), path
            docs[doc["kind"]] = doc
    assert set(docs) == {"ConfigMap", "Service", "StatefulSet"}
    sts, svc, cm = docs["StatefulSet"], docs["Service"], docs["ConfigMap"]
    pod_labels = sts["spec"]["template"]["metadata"]["labels"]
    assert sts["spec"]["selector"]["matchLabels"] == pod_labels
    assert svc["spec"]["selector"] == pod_labels
    assert sts["spec"]["serviceName"] == svc["metadata"]["name"]
    container = sts["spec"]["template"]["spec"]["containers"][0]
    port_names = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert svc["spec"]["ports"][0]["targetPort"] in port_names
    assert container["envFrom"][0]["configMapRef"]["name"] == cm["metadata"]["name"]
    assert set(cm["data"]) <= SETTINGS_ENV
    assert int(cm["data"]["STREAMREC_METRICS_PORT"]) == port_names["metrics"]
    assert cm["data"]["STREAMREC_METRICS_HOST"] == "0.0.0.0"
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts["state"] == cm["data"]["STREAMREC_DATA_DIR"]


# --- Grafana -------------------------------------------------------------------------------


def test_datasource_uid_is_the_one_every_panel_names() -> None:
    ds = load_yaml(DEPLOY / "grafana/provisioning/datasources/prometheus.yml")["datasources"]
    assert [d["uid"] for d in ds] == [DATASOURCE_UID]
    assert ds[0]["url"] == "http://prometheus:9090"
    for panel in panels():
        assert panel["datasource"] == {"type": "prometheus", "uid": DATASOURCE_UID}, panel["title"]
        assert panel["targets"], f"{panel['title']} has no query"
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == DATASOURCE_UID
            assert target["expr"].strip()


def test_every_panel_respects_the_job_and_instance_variables() -> None:
    variables = {v["name"]: v for v in dashboard()["templating"]["list"]}
    assert variables["job"]["query"]["query"] == (
        "label_values(streamrec_events_consumed_total, job)"
    )
    assert variables["instance"]["query"]["query"].startswith(
        "label_values(streamrec_events_consumed_total"
    )
    assert variables["instance"]["datasource"]["uid"] == DATASOURCE_UID
    for panel in panels():
        for target in panel["targets"]:
            assert 'instance=~"$instance"' in target["expr"], panel["title"]
            assert 'job=~"$job"' in target["expr"], panel["title"]


def test_dashboard_layout_is_valid() -> None:
    all_panels = dashboard()["panels"]
    ids = [p["id"] for p in all_panels]
    assert len(ids) == len(set(ids))
    for p in all_panels:
        pos = p["gridPos"]
        assert pos["x"] >= 0, p["title"]
        assert pos["x"] + pos["w"] <= 24, p["title"]


def test_dashboard_shows_every_exported_metric() -> None:
    exprs = " ".join(t["expr"] for p in panels() for t in p["targets"])
    missing = {name for name in exported_metric_names() if name not in exprs}
    assert missing == set()


def test_dashboard_has_the_panels_operators_asked_for() -> None:
    titles = {p["title"] for p in panels()}
    assert {
        "Throughput: consumed, produced, rejected, duplicate",
        "End-to-end latency p50 / p95 / p99",
        "End-to-end latency heatmap",
        "Per-stage latency p99",
        "Batch size",
        "Consumer lag per partition",
        "Dead-letter rate by reason",
        "Index items",
        "Session users",
        "Model / index version",
        "Online hit rate at k",
        "Consumed /s per worker",
    } <= titles
    heatmap = next(p for p in panels() if p["type"] == "heatmap")
    assert heatmap["targets"][0]["format"] == "heatmap"


# --- Prometheus rules ----------------------------------------------------------------------


def test_every_alert_has_for_severity_and_text_for_the_operator() -> None:
    rules = alert_rules()
    assert {r["alert"] for r in rules} >= {
        "StreamrecWorkerDown",
        "StreamrecConsumerLagGrowing",
        "StreamrecEndToEndLatencyP99OverSLO",
        "StreamrecDeadLetterSpike",
        "StreamrecOnlineHitRateDrop",
        "StreamrecIndexStale",
        "StreamrecNoRecommendations",
    }
    for rule in rules:
        assert re.fullmatch(r"\d+[smh]", rule["for"]), rule["alert"]
        assert rule["labels"]["severity"] in {"critical", "warning"}
        assert {"summary", "description", "runbook"} <= set(rule["annotations"])
        assert 'job="streamrec"' in rule["expr"]


def test_promtool_accepts_config_and_rules() -> None:
    config = promtool_check_config()
    rules = promtool_check_rules()
    assert config.ok, config.output
    assert "SUCCESS" in config.output
    assert rules.ok, rules.output
    assert f"{len(alert_rules())} rules found" in rules.output


def test_promtool_rejects_a_broken_rule(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yml"
    bad.write_text("groups:\n- name: x\n  rules:\n  - alert: A\n    expr: rate(x[5m]\n")

    result = promtool_check_rules([bad])

    assert not result.ok
    assert "FAILED" in result.output


# Alert unit tests for `promtool test rules`: (alert, eval time, input series, expected labels
# of the firing alerts). Series follow promtool's expanding notation at a 1 minute interval.
J = 'job="streamrec"'
FIRING_CASES: list[tuple[str, str, dict[str, str], list[dict[str, str]]]] = [
    (
        "StreamrecWorkerDown",
        "5m",
        {f'up{{{J},instance="w1"}}': "1 1 0 0 0 0", f'up{{{J},instance="w2"}}': "1x5"},
        [{"instance": "w1", "severity": "critical"}],
    ),
    (
        "StreamrecConsumerLagGrowing",
        "25m",
        {
            f'streamrec_consumer_lag_messages{{{J},instance="w1",topic="e",partition="0"}}': (
                "0+200x30"
            ),
            # Large but steady lag is a backlog being held, not growing: no alert.
            f'streamrec_consumer_lag_messages{{{J},instance="w1",topic="e",partition="1"}}': (
                "5000x30"
            ),
        },
        [{"topic": "e", "partition": "0", "severity": "warning"}],
    ),
    (
        "StreamrecEndToEndLatencyP99OverSLO",
        "15m",
        {
            f'streamrec_end_to_end_latency_seconds_bucket{{{J},le="0.05"}}': "0+10x20",
            f'streamrec_end_to_end_latency_seconds_bucket{{{J},le="0.1"}}': "0+10x20",
            f'streamrec_end_to_end_latency_seconds_bucket{{{J},le="0.25"}}': "0+100x20",
            f'streamrec_end_to_end_latency_seconds_bucket{{{J},le="+Inf"}}': "0+100x20",
        },
        [{"severity": "critical"}],
    ),
    (
        "StreamrecDeadLetterSpike",
        "15m",
        {
            f'streamrec_events_consumed_total{{{J},instance="w1",type="view"}}': "0+600x20",
            f'streamrec_events_rejected_total{{{J},instance="w1",reason="schema"}}': "0+60x20",
        },
        [{"severity": "warning"}],
    ),
    (
        "StreamrecOnlineHitRateDrop",
        "1500m",
        {
            f"streamrec_slates_evaluated_total{{{J}}}": "0+1000x1500",
            f'streamrec_slate_hits_total{{{J},k="10"}}': "0+300x1400 420100+100x99",
        },
        [{"severity": "warning"}],
    ),
    (
        "StreamrecIndexStale",
        "90m",
        {f'streamrec_index_last_update_timestamp_seconds{{{J},instance="w1"}}': "0x100"},
        [{"instance": "w1", "severity": "warning"}],
    ),
    (
        "StreamrecNoRecommendations",
        "15m",
        {
            f'streamrec_events_consumed_total{{{J},instance="w1",type="view"}}': "0+600x20",
            f'streamrec_recommendations_produced_total{{{J},instance="w1"}}': "0x20",
            f'streamrec_events_consumed_total{{{J},instance="w2",type="view"}}': "0+600x20",
            f'streamrec_recommendations_produced_total{{{J},instance="w2"}}': "0+590x20",
        },
        [{"instance": "w1", "severity": "critical"}],
    ),
    (
        "StreamrecPartitionStuck",
        "35m",
        {
            # w1 consumed, then nothing for 25 minutes with 4,746 messages uncommitted.
            f'streamrec_consumer_lag_messages{{{J},instance="w1",topic="e",partition="0"}}': (
                "0+10x9 4746x30"
            ),
            f'streamrec_events_consumed_total{{{J},instance="w1",type="view"}}': "0+600x9 5400x30",
            # w2 is as far behind but still consuming: a backlog, not a stuck partition.
            f'streamrec_consumer_lag_messages{{{J},instance="w2",topic="e",partition="1"}}': (
                "4746x40"
            ),
            f'streamrec_events_duplicate_total{{{J},instance="w2"}}': "0+60x40",
            # w3 is idle and caught up: nothing to alert on.
            f'streamrec_consumer_lag_messages{{{J},instance="w3",topic="e",partition="2"}}': (
                "0x40"
            ),
            f'streamrec_events_consumed_total{{{J},instance="w3",type="view"}}': "100x40",
        },
        [{"instance": "w1", "topic": "e", "partition": "0", "severity": "critical"}],
    ),
    (
        "StreamrecModelVersionsDiverge",
        "45m",
        {
            f'streamrec_model_info{{{J},instance="w1",model_version="a",index_version="i"}}': (
                "1x60"
            ),
            f'streamrec_model_info{{{J},instance="w2",model_version="b",index_version="i"}}': (
                "1x60"
            ),
            # The version w2 swapped away from stays exported at 0 and must not count.
            f'streamrec_model_info{{{J},instance="w2",model_version="a",index_version="i"}}': (
                "0x60"
            ),
        },
        [{"severity": "warning"}],
    ),
]

HEALTHY_SERIES = {
    f'up{{{J},instance="w1"}}': "1x40",
    f'streamrec_consumer_lag_messages{{{J},instance="w1",topic="e",partition="0"}}': "20x40",
    f'streamrec_end_to_end_latency_seconds_bucket{{{J},le="0.05"}}': "0+100x40",
    f'streamrec_end_to_end_latency_seconds_bucket{{{J},le="+Inf"}}': "0+100x40",
    f'streamrec_events_consumed_total{{{J},instance="w1",type="view"}}': "0+600x40",
    f'streamrec_events_rejected_total{{{J},instance="w1",reason="schema"}}': "0+6x40",
    f'streamrec_recommendations_produced_total{{{J},instance="w1"}}': "0+590x40",
    f"streamrec_slates_evaluated_total{{{J}}}": "0+1000x40",
    f'streamrec_slate_hits_total{{{J},k="10"}}': "0+300x40",
    f'streamrec_index_last_update_timestamp_seconds{{{J},instance="w1"}}': "0+60x40",
    f'streamrec_model_info{{{J},instance="w1",model_version="a",index_version="i"}}': "1x40",
    f'streamrec_model_info{{{J},instance="w2",model_version="a",index_version="i"}}': "1x40",
}


def test_alerts_fire_on_sick_series_and_stay_quiet_on_healthy_ones(tmp_path: Path) -> None:
    # promtool compares annotations too; the templated text is checked by `check rules`, so
    # the unit tests run on a copy without annotations and pin expressions, `for` and labels.
    rules = load_yaml(ALERTS)
    for group in rules["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations")
    stripped = tmp_path / "alerts.yml"
    stripped.write_text(yaml.safe_dump(rules))
    tests = [
        {
            "interval": "1m",
            "input_series": [{"series": s, "values": v} for s, v in series.items()],
            "alert_rule_test": [
                {
                    "eval_time": at,
                    "alertname": name,
                    "exp_alerts": [
                        {"exp_labels": {"alertname": name, "job": "streamrec", **labels}}
                        for labels in expected
                    ],
                }
            ],
        }
        for name, at, series, expected in FIRING_CASES
    ]
    tests.append(
        {
            "interval": "1m",
            "input_series": [{"series": s, "values": v} for s, v in HEALTHY_SERIES.items()],
            "alert_rule_test": [
                {"eval_time": "40m", "alertname": r["alert"], "exp_alerts": []}
                for r in alert_rules()
            ],
        }
    )
    assert {case[0] for case in FIRING_CASES} == {r["alert"] for r in alert_rules()}
    spec = tmp_path / "alerts_test.yml"
    spec.write_text(
        yaml.safe_dump({"rule_files": [str(stripped)], "evaluation_interval": "1m", "tests": tests})
    )

    result = promtool_test_rules([spec])

    assert result.ok, result.output
    assert "SUCCESS" in result.output


# --- streamrec.monitoring without a server -------------------------------------------------


def test_extract_queries_finds_every_panel_target_and_alert() -> None:
    queries = extract_queries()
    targets = sum(len(p["targets"]) for p in panels())
    assert len([q for q in queries if q.kind == "panel"]) == targets == 44
    assert len([q for q in queries if q.kind == "alert"]) == len(alert_rules()) == 9
    assert len(queries) == 53
    for q in queries:
        assert "$" not in q.expr, q.title
        assert "[[" not in q.expr, q.title
        assert q.probes
    hit_rate = next(q for q in queries if q.title == "Hit rate @10 [A]")
    assert 'instance=~".*"' in hit_rate.expr
    assert "[1m]" in hit_rate.expr


def test_substitute_variables_handles_every_grafana_syntax() -> None:
    variables = {"instance": ".*", "__rate_interval": "1m", "__interval": "30s"}
    expr = 'rate(x{a=~"$instance",b=~"${instance}",c=~"${instance:regex}",d=~"[[instance]]"}'
    assert substitute_variables(expr + "[$__rate_interval])", variables, "p") == (
        'rate(x{a=~".*",b=~".*",c=~".*",d=~".*"}[1m])'
    )
    assert substitute_variables("avg_over_time(x[${__interval}])", variables, "p") == (
        "avg_over_time(x[30s])"
    )


def test_substitute_variables_names_an_unknown_variable() -> None:
    with pytest.raises(MonitoringError, match=r"panel X: expression uses \$shard"):
        substitute_variables('x{shard="$shard"}', {"instance": ".*"}, "panel X")


def test_extract_queries_rejects_an_unknown_variable(tmp_path: Path) -> None:
    board = tmp_path / "d.json"
    board.write_text(
        json.dumps({"panels": [{"title": "T", "targets": [{"refId": "A", "expr": "x{a=~'$z'}"}]}]})
    )
    with pytest.raises(MonitoringError, match=r"d.json: T \[A\]: expression uses \$z"):
        extract_queries([board], [])


@pytest.mark.parametrize(
    ("expr", "probes"),
    [
        ('up{job="s"} == 0', ('up{job="s"}',)),
        ("a / b > 0.05 and on(job) c == 0", ("a / b", "c")),
        ("x < 0.7 * (y) unless z", ("x", "0.7 * (y)", "z")),
        (
            'sum by (le) (rate(h{l!="a",m=~"b|c"}[5m])) >= bool 1e-3',
            ('sum by (le) (rate(h{l!="a",m=~"b|c"}[5m]))',),
        ),
        ('count(m{v="a>b"} == 1) > 1', ('count(m{v="a>b"} == 1)',)),
        ("x > ignoring(k) group_left y or andy", ("x", "y", "andy")),
        ("time() - t > 3600", ("time() - t",)),
    ],
)
def test_condition_probes_split_only_top_level_operators(
    expr: str, probes: tuple[str, ...]
) -> None:
    assert condition_probes(expr) == probes


def test_check_queries_reports_empty_probes_constant_conditions_and_api_errors(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    answers: dict[str, dict[str, Any]] = {
        "a > 1": {"resultType": "vector", "result": []},
        "a": {"resultType": "vector", "result": [{}, {}]},
        "b": {"resultType": "vector", "result": []},
        "a > 1 and b": {"resultType": "vector", "result": []},
        "1 > 2": {"resultType": "vector", "result": []},
        "scalar(a)": {"resultType": "scalar", "result": [0, "1"]},
    }

    def fake_query(url: str, expr: str, timeout_s: float = 10.0) -> dict[str, Any]:
        if expr not in answers:
            raise MonitoringError("bad_data: parse error")
        return answers[expr]

    monkeypatch.setattr(monitoring, "query", fake_query)
    queries = [
        Query("r", "fires-not", "a > 1", "alert", ("a",)),
        Query("r", "half-empty", "a > 1 and b", "alert", ("a", "b")),
        Query("r", "constant", "1 > 2", "alert", ()),
        Query("d", "scalar", "scalar(a)", "panel", ("scalar(a)",)),
        Query("d", "broken", "rate(", "panel", ("rate(",)),
    ]

    results = {r.query.title: r for r in check_queries("http://x", queries)}

    assert (results["fires-not"].ok, results["fires-not"].series) == (True, 2)
    assert results["fires-not"].firing == 0
    assert not results["half-empty"].ok
    assert results["half-empty"].error == "returned no series: b"
    assert not results["constant"].ok
    assert "compares constants only" in (results["constant"].error or "")
    assert (results["scalar"].ok, results["scalar"].series, results["scalar"].firing) == (
        True,
        1,
        None,
    )
    assert not results["broken"].ok
    assert results["broken"].error == "bad_data: parse error"


def test_scrape_address_maps_wildcards_and_rejects_garbage() -> None:
    assert scrape_address("0.0.0.0:9464") == "127.0.0.1:9464"
    assert scrape_address("worker-1:9464") == "worker-1:9464"
    with pytest.raises(MonitoringError, match="expected host:port, got 'worker-1'"):
        scrape_address("worker-1")


def test_prometheus_server_needs_a_target() -> None:
    with pytest.raises(MonitoringError, match="at least one scrape target"):
        PrometheusServer([])


def test_missing_binary_points_at_the_install_script(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(monitoring.shutil, "which", lambda name: None)
    with pytest.raises(MonitoringError, match=r"deploy/install-system-deps\.sh"):
        monitoring.find_binary("prometheus-not-installed")


def test_unreadable_dashboard_and_rule_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(MonitoringError, match="expected a readable JSON file"):
        extract_queries([tmp_path / "missing.json"], [])
    listed = tmp_path / "list.json"
    listed.write_text("[]")
    with pytest.raises(MonitoringError, match="expected a JSON object, got list"):
        extract_queries([listed], [])
    with pytest.raises(MonitoringError, match="expected a readable YAML file"):
        extract_queries([], [tmp_path / "missing.yml"])
    flat = tmp_path / "flat.yml"
    flat.write_text("rules: []\n")
    with pytest.raises(MonitoringError, match="expected a mapping with a 'groups' list"):
        extract_queries([], [flat])


def test_record_rules_are_checked_as_panels(tmp_path: Path) -> None:
    rules = tmp_path / "rec.yml"
    rules.write_text(
        "groups:\n- name: g\n  rules:\n  - record: job:x:rate5m\n    expr: rate(x[5m])\n"
    )
    assert extract_queries([], [rules]) == [
        Query("rules:rec.yml", "job:x:rate5m", "rate(x[5m])", "record", ("rate(x[5m])",))
    ]


# --- streamrec.report ----------------------------------------------------------------------


def point(t: float, n: int, **overrides: Any) -> dict[str, Any]:
    line: dict[str, Any] = {
        "t": t,
        "consumed": 10 * n,
        "produced": 9 * n,
        "rejected": n,
        "duplicates": 0,
        "p50_ms": 5.0,
        "p99_ms": 40.0 if n else None,
        "hit_rate_10": 0.25,
    }
    line.update(overrides)
    return line


def write_timeline(path: Path, lines: list[Any]) -> Path:
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return path


def test_report_writes_three_pngs(tmp_path: Path) -> None:
    timeline = write_timeline(tmp_path / "run.jsonl", [point(float(i), i) for i in range(5)])

    result = CliRunner().invoke(
        app, ["report", "--timeline", str(timeline), "--out", str(tmp_path / "out")]
    )

    assert result.exit_code == 0, result.output
    for name in ("throughput.png", "latency.png", "hit_rate.png"):
        png = tmp_path / "out" / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert png.stat().st_size > 5000


def test_rates_come_from_cumulative_counters(tmp_path: Path) -> None:
    lines = [point(0, 0), point(2, 4), point(3, 5)]
    points = read_timeline(write_timeline(tmp_path / "r.jsonl", lines))
    assert rates(points, "consumed") == ([1.0, 2.5], [20.0, 10.0])
    assert points[0].p99_ms is None


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        ([[1, 2]], "r.jsonl:1: expected a JSON object, got list"),
        ([{"t": 0}], "r.jsonl:1: expected keys consumed, produced"),
        ([point(-1, 0)], "expected t >= 0 seconds, got -1"),
        ([point(0, 0, consumed=True)], "expected consumed a cumulative int >= 0, got True"),
        ([point(0, 0, rejected=1.5)], "expected rejected a cumulative int >= 0, got 1.5"),
        ([point(0, 0, p50_ms="fast")], "expected p50_ms a number >= 0 or null, got 'fast'"),
        ([point(0, 0, hit_rate_10=1.5)], r"expected hit_rate_10 a share in \[0, 1\], got 1.5"),
        ([point(0, 0), point(0, 1)], "r.jsonl:2: expected t to increase, got 0.0 after 0.0"),
        ([point(0, 2), point(1, 1)], "expected consumed to be cumulative .* got 10 after 20"),
        ([], "expected at least one sample"),
    ],
)
def test_timeline_errors_say_what_was_expected(
    tmp_path: Path, lines: list[Any], message: str
) -> None:
    with pytest.raises(TimelineError, match=message):
        read_timeline(write_timeline(tmp_path / "r.jsonl", lines))


def test_timeline_that_is_not_json_or_missing(tmp_path: Path) -> None:
    bad = tmp_path / "r.jsonl"
    bad.write_text('{"t": 0,\n')
    with pytest.raises(TimelineError, match=r"r\.jsonl:1: expected one JSON object per line"):
        read_timeline(bad)
    with pytest.raises(TimelineError, match="expected a readable timeline file"):
        read_timeline(tmp_path / "absent.jsonl")


def test_report_cli_exits_1_with_the_reason(tmp_path: Path) -> None:
    timeline = write_timeline(tmp_path / "r.jsonl", [{**point(0, 0), "t": "x"}])

    result = CliRunner().invoke(app, ["report", "--timeline", str(timeline), "--out", "o"])

    assert result.exit_code == 1
    assert "expected t >= 0 seconds, got 'x'" in result.output
