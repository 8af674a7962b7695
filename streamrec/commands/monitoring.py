"""``streamrec check-monitoring`` (every dashboard and alert query against a real Prometheus)
and ``streamrec report`` (PNG charts of a run's timeline)."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from streamrec.monitoring import MonitoringError, MonitoringReport, run_monitoring_check
from streamrec.report import TimelineError, read_timeline, write_report
from streamrec.settings import load_settings

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)


def _print_report(report: MonitoringReport) -> None:
    for name, result in (("check config", report.config), ("check rules", report.rules)):
        mark = "[green]ok[/green]" if result.ok else "[red]FAIL[/red]"
        console.print(f"promtool {name}: {mark}")
        if not result.ok:
            console.print(result.output, markup=False)
    for target in report.targets:
        up = report.targets_up.get(target, False)
        console.print(f"target {target}: " + ("[green]up[/green]" if up else "[red]DOWN[/red]"))
    table = Table(title="Dashboard panels and alert rules against Prometheus")
    table.add_column("source")
    table.add_column("panel / alert")
    table.add_column("result")
    table.add_column("series", justify="right")
    table.add_column("firing", justify="right")
    for r in report.results:
        table.add_row(
            r.query.source,
            r.query.title,
            "[green]ok[/green]" if r.ok else f"[red]FAIL[/red] {r.error or ''}",
            str(r.series),
            "" if r.firing is None else str(r.firing),
        )
    console.print(table)
    passed = sum(r.ok for r in report.results)
    verdict = "[green]OK[/green]" if report.ok else "[red]FAILED[/red]"
    console.print(f"{verdict}: {passed}/{len(report.results)} queries returned series")


def check_monitoring_cmd(
    targets: list[str] = typer.Option(
        [],
        "--target",
        help="host:port of a worker's /metrics (repeatable). Default: "
        "STREAMREC_METRICS_HOST:STREAMREC_METRICS_PORT.",
    ),
    wait: float = typer.Option(
        20.0, "--wait", min=0.0, help="Seconds to keep scraping until every query has series."
    ),
    json_out: Path | None = typer.Option(None, "--json", help="Also write the report as JSON."),
) -> None:
    """Run every Grafana panel query and alert expression against a real Prometheus."""
    if not targets:
        settings = load_settings()
        targets = [f"{settings.metrics_host}:{settings.metrics_port}"]
    try:
        report = run_monitoring_check(targets, wait)
    except MonitoringError as exc:
        err_console.print(f"[red]error:[/red] {exc}", soft_wrap=True)
        raise typer.Exit(1) from exc
    _print_report(report)
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(report.as_dict(), indent=2) + "\n")
    if not report.ok:
        raise typer.Exit(1)


def report_cmd(
    timeline: Path = typer.Option(..., "--timeline", help="Timeline JSON lines of one run."),
    out: Path = typer.Option(..., "--out", help="Directory for the PNG charts."),
) -> None:
    """Draw throughput, latency percentiles and hit rate of a run (see docs/monitoring.md)."""
    try:
        points = read_timeline(timeline)
    except TimelineError as exc:
        err_console.print(f"[red]error:[/red] {exc}", soft_wrap=True)
        raise typer.Exit(1) from exc
    for path in write_report(points, out, title=timeline.stem):
        console.print(f"wrote {path}")


def register(app: typer.Typer) -> None:
    """Add ``check-monitoring`` and ``report`` to ``app``."""
    app.command("check-monitoring")(check_monitoring_cmd)
    app.command("report")(report_cmd)
