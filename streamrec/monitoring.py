"""Proof that the dashboards and alerts an operator looks at query metrics that exist.

The check starts a real Prometheus (Debian's ``prometheus`` binary) that scrapes the given
targets every second, then runs every Grafana panel query and every alert expression of
``deploy/`` through its HTTP API. A panel query passes when Prometheus accepts it and returns
at least one series. An alert expression is a *condition* that a healthy system keeps false,
so it would return nothing on a healthy worker and prove nothing; the check therefore also
evaluates its *probes*: the operands of its top-level comparisons (``>``, ``==``, ...) and set
operators (``and``, ``or``, ``unless``), scalar literals left out. Each probe must return
series: that shows every metric, label and label value the condition reads is really exported.
The whole expression must still be accepted, and how many series it returns (= how many alerts
would fire) is reported alongside.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
DEPLOY_DIR = REPO_ROOT / "deploy"
DASHBOARDS = (DEPLOY_DIR / "grafana" / "dashboards" / "streamrec.json",)
RULE_FILES = (DEPLOY_DIR / "prometheus" / "alerts.yml",)
PROMETHEUS_CONFIG = DEPLOY_DIR / "prometheus" / "prometheus.yml"
INSTALL_HINT = "install it with `bash deploy/install-system-deps.sh` (Debian's prometheus package)"

#: Grafana's built-in variables, with the values the check uses. ``$__rate_interval`` must
#: cover at least two scrapes of the check's 1 s interval and stay short enough that a few
#: seconds of scraping already give a rate.
BUILTIN_VARIABLES = {
    "__rate_interval": "1m",
    "__interval": "30s",
    "__interval_ms": "30000",
    "__range": "1h",
    "__range_s": "3600",
    "__range_ms": "3600000",
}
# $name, ${name}, ${name:format} and the deprecated [[name]] / [[name:format]].
_VARIABLE = re.compile(
    r"\$\{(?P<braced>\w+)(?::\w+)?\}|\[\[(?P<bracketed>\w+)(?::\w+)?\]\]|\$(?P<plain>\w+)"
)
_SCALAR = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")
_SET_OPERATORS = ("unless", "and", "or")
_COMPARISONS = ("==", "!=", ">=", "<=", ">", "<")
_MODIFIER = re.compile(
    r"^(bool\b\s*)?((on|ignoring)\s*\([^)]*\)\s*)?((group_left|group_right)\b\s*(\([^)]*\))?\s*)?"
)


class MonitoringError(RuntimeError):
    """The monitoring check could not run (missing binary, bad file, server that never rose)."""


@dataclass(frozen=True)
class Query:
    """One PromQL expression found in a dashboard or a rule file.

    ``probes`` are the expressions that must return series (see the module docstring): the
    expression itself for a panel, the non-scalar operands of the condition for an alert.
    """

    source: str  # "dashboard:<file name>" or "rules:<file name>"
    title: str  # panel title (with the target's refId) or alert name
    expr: str  # variables already substituted
    kind: Literal["panel", "alert", "record"] = "panel"
    probes: tuple[str, ...] = ()


@dataclass(frozen=True)
class QueryResult:
    """What Prometheus answered for one ``Query``."""

    query: Query
    ok: bool
    series: int  # panels: series returned; alerts: fewest series any probe returned
    firing: int | None = None  # alerts only: series the whole condition returned
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "source": self.query.source,
            "title": self.query.title,
            "kind": self.query.kind,
            "expr": self.query.expr,
            "probes": list(self.query.probes),
            "ok": self.ok,
            "series": self.series,
            "firing": self.firing,
            "error": self.error,
        }


@dataclass(frozen=True)
class PromtoolResult:
    """Outcome of one ``promtool`` run."""

    command: tuple[str, ...]
    ok: bool
    output: str


@dataclass
class MonitoringReport:
    """Everything ``run_monitoring_check`` found; ``ok`` only if every part passed."""

    targets: list[str]
    config: PromtoolResult
    rules: PromtoolResult
    results: list[QueryResult] = field(default_factory=list)
    targets_up: dict[str, bool] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return (
            self.config.ok
            and self.rules.ok
            and all(self.targets_up.get(t, False) for t in self.targets)
            and bool(self.results)
            and all(r.ok for r in self.results)
        )

    @property
    def failures(self) -> list[QueryResult]:
        return [r for r in self.results if not r.ok]

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "targets": self.targets,
            "targets_up": self.targets_up,
            "promtool_check_config": asdict(self.config),
            "promtool_check_rules": asdict(self.rules),
            "queries": [r.as_dict() for r in self.results],
        }


# --- Extracting queries --------------------------------------------------------------------


def _iter_panels(panels: Iterable[dict[str, Any]]) -> Iterable[dict[str, Any]]:
    """Every panel, including those nested in collapsed rows (``row.panels``)."""
    for panel in panels:
        yield panel
        yield from _iter_panels(panel.get("panels", []))


def _dashboard_variables(dashboard: dict[str, Any]) -> dict[str, str]:
    """Template variable -> a value that selects everything (its ``allValue``, else ``.*``).

    Every streamrec variable is used in regex matchers (``=~``), where ``.*`` means "all".
    """
    values = dict(BUILTIN_VARIABLES)
    for var in dashboard.get("templating", {}).get("list", []):
        if var.get("type") == "datasource":
            continue
        values[var["name"]] = var.get("allValue") or ".*"
    return values


def substitute_variables(expr: str, variables: dict[str, str], where: str) -> str:
    """Replace Grafana variables in ``expr``; an unknown one is an error naming ``where``."""

    def replace(match: re.Match[str]) -> str:
        name = match.group("braced") or match.group("bracketed") or match.group("plain")
        if name not in variables:
            raise MonitoringError(
                f"{where}: expression uses ${name}, which is neither a dashboard template "
                f"variable nor a Grafana built-in the check knows ({', '.join(sorted(variables))})"
            )
        return variables[name]

    return _VARIABLE.sub(replace, expr)


def _split_top_level(expr: str, operators: Sequence[str]) -> list[str]:
    """Split ``expr`` at ``operators`` that stand outside (), [], {} and string literals."""
    parts: list[str] = []
    depth = 0
    quote: str | None = None
    start = i = 0
    while i < len(expr):
        ch = expr[i]
        if quote:
            if ch == "\\":
                i += 2
                continue
            if ch == quote:
                quote = None
        elif ch in "\"'`":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif depth == 0:
            for op in operators:
                if op.isalpha():
                    hit = (
                        expr[i : i + len(op)].lower() == op
                        and (i == 0 or not (expr[i - 1].isalnum() or expr[i - 1] == "_"))
                        and (
                            i + len(op) == len(expr)
                            or not (expr[i + len(op)].isalnum() or expr[i + len(op)] == "_")
                        )
                    )
                else:
                    hit = expr.startswith(op, i)
                    # "=~" and "!~" only occur inside {} matchers, "<=" is not "<" + "=".
                if hit:
                    parts.append(expr[start:i])
                    i += len(op)
                    start = i
                    break
            else:
                i += 1
            continue
        i += 1
    parts.append(expr[start:])
    return parts


def condition_probes(expr: str) -> tuple[str, ...]:
    """The vector operands of a condition, which a healthy system must still return.

    ``a / b > 0.05 and on(job) c == 0`` gives ``("a / b", "c")``. Operands are split at
    top-level set operators first, then at comparisons: both bind more loosely than arithmetic,
    so an operand is always a complete expression. Binary-operator modifiers (``bool``,
    ``on(...)``, ``ignoring(...)``, ``group_left(...)``) are dropped with their operator.
    """
    probes: list[str] = []
    for part in _split_top_level(expr, _SET_OPERATORS):
        for operand in _split_top_level(part, _COMPARISONS):
            operand = operand.strip()
            operand = _MODIFIER.sub("", operand, count=1).strip()
            if operand and not _SCALAR.match(operand) and operand not in probes:
                probes.append(operand)
    return tuple(probes)


def extract_queries(
    dashboard_paths: Iterable[Path] = DASHBOARDS, rule_paths: Iterable[Path] = RULE_FILES
) -> list[Query]:
    """Every panel target ``expr`` of the dashboards and every ``expr`` of the rule files."""
    queries: list[Query] = []
    for path in dashboard_paths:
        dashboard = _load_json(path)
        variables = _dashboard_variables(dashboard)
        for panel in _iter_panels(dashboard.get("panels", [])):
            for target in panel.get("targets", []):
                if target.get("hide") or not target.get("expr"):
                    continue
                title = f"{panel.get('title', '(untitled)')} [{target.get('refId', '?')}]"
                expr = substitute_variables(target["expr"], variables, f"{path.name}: {title}")
                queries.append(Query(f"dashboard:{path.name}", title, expr, "panel", (expr,)))
    for path in rule_paths:
        for group in _load_rules(path):
            for rule in group.get("rules", []):
                expr = str(rule["expr"]).strip()
                if "alert" in rule:
                    probes = condition_probes(expr)
                    queries.append(
                        Query(f"rules:{path.name}", rule["alert"], expr, "alert", probes)
                    )
                else:
                    queries.append(
                        Query(f"rules:{path.name}", rule["record"], expr, "record", (expr,))
                    )
    return queries


def _load_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise MonitoringError(f"dashboard {path}: expected a readable JSON file ({exc})") from exc
    if not isinstance(data, dict):
        raise MonitoringError(
            f"dashboard {path}: expected a JSON object, got {type(data).__name__}"
        )
    return data


def _load_rules(path: Path) -> list[dict[str, Any]]:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise MonitoringError(f"rules {path}: expected a readable YAML file ({exc})") from exc
    if not isinstance(data, dict) or not isinstance(data.get("groups"), list):
        raise MonitoringError(
            f"rules {path}: expected a mapping with a 'groups' list, got {str(data)[:80]!r}"
        )
    return list(data["groups"])


# --- promtool ------------------------------------------------------------------------------


def find_binary(name: str) -> str:
    """Path of ``prometheus`` / ``promtool``: on PATH, else Debian's /usr/bin."""
    found = shutil.which(name) or (
        f"/usr/bin/{name}" if Path(f"/usr/bin/{name}").exists() else None
    )
    if found is None:
        raise MonitoringError(f"{name}: binary not found on PATH or in /usr/bin; {INSTALL_HINT}")
    return found


def _promtool(*args: str) -> PromtoolResult:
    command = (find_binary("promtool"), *args)
    proc = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    return PromtoolResult(command, proc.returncode == 0, (proc.stdout + proc.stderr).strip())


def promtool_check_config(path: Path = PROMETHEUS_CONFIG) -> PromtoolResult:
    """``promtool check config`` (it also checks the rule files the config names)."""
    return _promtool("check", "config", str(path))


def promtool_check_rules(paths: Iterable[Path] = RULE_FILES) -> PromtoolResult:
    """``promtool check rules``: syntax, PromQL parsing, duplicate names."""
    return _promtool("check", "rules", *(str(p) for p in paths))


def promtool_test_rules(paths: Iterable[Path]) -> PromtoolResult:
    """``promtool test rules``: alert unit tests over synthetic series (``*_test.yml``)."""
    return _promtool("test", "rules", *(str(p) for p in paths))


# --- A real Prometheus ---------------------------------------------------------------------


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def scrape_address(target: str) -> str:
    """``host:port`` Prometheus can reach; a wildcard bind address means this machine."""
    host, sep, port = target.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise MonitoringError(f"target: expected host:port, got {target!r}")
    if host in ("0.0.0.0", "::", "[::]"):
        host = "127.0.0.1"
    return f"{host}:{port}"


class PrometheusServer:
    """A throw-away Prometheus on 127.0.0.1 scraping ``targets`` every ``scrape_interval_s``.

    Use as a context manager: ``with PrometheusServer(["127.0.0.1:9464"]) as prom: prom.url``.
    The config and the TSDB live in a temporary directory removed on exit.
    """

    def __init__(
        self,
        targets: Sequence[str],
        *,
        job: str = "streamrec",
        scrape_interval_s: int = 1,
        start_timeout_s: float = 30.0,
    ) -> None:
        if not targets:
            raise MonitoringError("prometheus: expected at least one scrape target, got none")
        self.targets = [scrape_address(t) for t in targets]
        self.job = job
        self.scrape_interval_s = scrape_interval_s
        self.start_timeout_s = start_timeout_s
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def config(self) -> dict[str, Any]:
        interval = f"{self.scrape_interval_s}s"
        return {
            "global": {"scrape_interval": interval, "evaluation_interval": interval},
            "scrape_configs": [
                {
                    "job_name": self.job,
                    "scrape_timeout": interval,
                    "static_configs": [{"targets": self.targets}],
                }
            ],
        }

    def __enter__(self) -> PrometheusServer:
        binary = find_binary("prometheus")
        self._tmp = tempfile.TemporaryDirectory(prefix="streamrec-prometheus-")
        tmp = Path(self._tmp.name)
        (tmp / "prometheus.yml").write_text(yaml.safe_dump(self.config()))
        self.port = free_port()
        log = (tmp / "prometheus.log").open("wb")
        self._proc = subprocess.Popen(
            [
                binary,
                f"--config.file={tmp / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        try:
            self._wait_ready(tmp / "prometheus.log")
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, log: Path) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise MonitoringError(
                    f"prometheus: exited with code {self._proc.returncode} before it was ready "
                    f"on {self.url}; its log ends with:\n{_tail(log)}"
                )
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        raise MonitoringError(
            f"prometheus: not ready on {self.url} after {self.start_timeout_s:.0f} s; "
            f"its log ends with:\n{_tail(log)}"
        )

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def targets_up(self) -> dict[str, bool]:
        """Scrape address -> whether the last scrape succeeded (``up == 1``)."""
        data = query(self.url, f'up{{job="{self.job}"}}')
        up = {t: False for t in self.targets}
        for series in data["result"]:
            up[series["metric"]["instance"]] = series["value"][1] == "1"
        return up


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# --- Querying ------------------------------------------------------------------------------


def query(prom_url: str, expr: str, timeout_s: float = 10.0) -> dict[str, Any]:
    """``/api/v1/query`` at the current time; returns ``data`` or raises with the API error."""
    url = f"{prom_url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            body = json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        # Prometheus answers a bad query with 400/422 and a JSON body naming the problem.
        try:
            body = json.loads(exc.read())
        except ValueError:
            body = {"status": "error", "error": f"HTTP {exc.code}"}
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise MonitoringError(f"prometheus {prom_url}: query failed ({exc})") from exc
    if body.get("status") != "success":
        raise MonitoringError(
            f"{body.get('errorType', 'error')}: {body.get('error', 'no error text')}"
        )
    data: dict[str, Any] = body["data"]
    return data


def _series_count(data: dict[str, Any]) -> int:
    if data["resultType"] in ("vector", "matrix"):
        return len(data["result"])
    return 1  # scalar or string: one value


def check_queries(prom_url: str, queries: Iterable[Query]) -> list[QueryResult]:
    """Run each query against ``prom_url``: accepted, and every probe returns >= 1 series."""
    results: list[QueryResult] = []
    for q in queries:
        try:
            whole = _series_count(query(prom_url, q.expr))
            counts = (
                [whole]
                if q.probes == (q.expr,)
                else [_series_count(query(prom_url, p)) for p in q.probes]
            )
        except MonitoringError as exc:
            results.append(QueryResult(q, False, 0, error=str(exc)))
            continue
        fewest = min(counts) if counts else 0
        error = None
        if not counts:
            error = "no vector operand to probe: the condition compares constants only"
        elif fewest == 0:
            empty = [p for p, c in zip(q.probes, counts, strict=True) if c == 0]
            error = "returned no series: " + "; ".join(empty)
        firing = whole if q.kind == "alert" else None
        results.append(QueryResult(q, error is None, fewest, firing, error))
    return results


def run_monitoring_check(
    targets: Sequence[str],
    wait_s: float = 20.0,
    *,
    dashboard_paths: Sequence[Path] = DASHBOARDS,
    rule_paths: Sequence[Path] = RULE_FILES,
    config_path: Path = PROMETHEUS_CONFIG,
    min_scrapes: int = 3,
) -> MonitoringReport:
    """promtool checks, then a real Prometheus scraping ``targets``, then every query.

    Queries run once every target has been scraped ``min_scrapes`` times (a rate needs two
    samples) and again every 2 s until all pass or ``wait_s`` has gone by since the server was
    ready: a worker that has just started may export some series only after its first batch.
    The report holds the last round of results.
    """
    queries = extract_queries(dashboard_paths, rule_paths)
    report = MonitoringReport(
        targets=[scrape_address(t) for t in targets],
        config=promtool_check_config(config_path),
        rules=promtool_check_rules(rule_paths),
    )
    with PrometheusServer(targets) as prom:
        deadline = time.monotonic() + wait_s
        time.sleep(min_scrapes * prom.scrape_interval_s)
        while True:
            report.targets_up = prom.targets_up()
            if all(report.targets_up.values()):
                report.results = check_queries(prom.url, queries)
                if all(r.ok for r in report.results):
                    break
            if time.monotonic() >= deadline:
                if not report.results:
                    report.results = check_queries(prom.url, queries)
                break
            time.sleep(2.0)
    return report
