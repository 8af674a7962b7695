"""The paced part of ``streamrec bench stream``: what counts as served, the plot, the CLI."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from typer.testing import CliRunner

from streamrec.bench_stream import _plot_paced, _sustained
from streamrec.cli import app


def _run(events_per_s: float, p50: float, p99: float) -> dict[str, Any]:
    return {"events_per_s": events_per_s, "latency_ms": {"p50": p50, "p99": p99}}


def _pair(rate: float, full: dict[str, Any]) -> dict[str, Any]:
    return {"offered_rate": rate, "passthrough": _run(rate, 5.0, 20.0), "full": full}


def test_sustained_rate_needs_the_latency_and_the_throughput() -> None:
    paced = [
        _pair(500, _run(499, 40.0, 90.0)),  # served
        _pair(1000, _run(998, 60.0, 100.0)),  # served: p99 exactly at the bound
        _pair(2000, _run(1500, 50.0, 80.0)),  # fast answers, but fell behind the offer
        _pair(4000, _run(3990, 300.0, 900.0)),  # kept up, too slow
    ]
    assert _sustained(paced, 100.0) == 1000
    assert _sustained(paced, 50.0) is None
    assert _sustained([], 100.0) is None


def test_paced_plot_is_written(tmp_path: Path) -> None:
    path = tmp_path / "paced.png"
    _plot_paced([_pair(500, _run(499, 40.0, 90.0)), _pair(1000, _run(990, 80, 300))], path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_rates_are_refused_before_anything_starts() -> None:
    result = CliRunner().invoke(app, ["bench", "stream", "--rates", "500,fast"])
    assert result.exit_code == 1
    assert "--rates: expected positive numbers separated by commas, got 'fast'" in result.output
    result = CliRunner().invoke(app, ["bench", "stream", "--sweep", "32,0"])
    assert result.exit_code == 1
    assert "--sweep: expected positive integers" in result.output
