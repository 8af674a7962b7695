"""Charts of one run from its timeline: throughput, latency percentiles, online hit rate.

A timeline is JSON lines, one object per sample (about one a second), written by the demo and
the benchmarks; docs/monitoring.md defines the format. Counters are cumulative so a lost or
late sample does not lose events: rates come from differences between consecutive samples.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

COUNTERS = ("consumed", "produced", "rejected", "duplicates")
GAUGES = ("p50_ms", "p99_ms", "hit_rate_10")
SLO_MS = 100.0


class TimelineError(ValueError):
    """A timeline file does not follow the format of docs/monitoring.md."""


@dataclass(frozen=True)
class TimelinePoint:
    """One sample. Counters are cumulative since the start; gauges are ``None`` when unknown."""

    t: float  # seconds since the start of the run
    consumed: int
    produced: int
    rejected: int
    duplicates: int
    p50_ms: float | None
    p99_ms: float | None
    hit_rate_10: float | None


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def parse_point(obj: Any, where: str) -> TimelinePoint:
    """Validate one decoded line; ``where`` ("run.jsonl:3") prefixes every error."""
    if not isinstance(obj, dict):
        raise TimelineError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    missing = [k for k in ("t", *COUNTERS, *GAUGES) if k not in obj]
    if missing:
        raise TimelineError(f"{where}: expected keys {', '.join(missing)}, got {sorted(obj)}")
    if not _is_number(obj["t"]) or obj["t"] < 0:
        raise TimelineError(f"{where}: expected t >= 0 seconds, got {obj['t']!r}")
    for key in COUNTERS:
        value = obj[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise TimelineError(f"{where}: expected {key} a cumulative int >= 0, got {value!r}")
    for key in GAUGES:
        value = obj[key]
        if value is not None and (not _is_number(value) or value < 0):
            raise TimelineError(f"{where}: expected {key} a number >= 0 or null, got {value!r}")
    if obj["hit_rate_10"] is not None and obj["hit_rate_10"] > 1:
        raise TimelineError(
            f"{where}: expected hit_rate_10 a share in [0, 1], got {obj['hit_rate_10']!r}"
        )
    return TimelinePoint(
        t=float(obj["t"]),
        consumed=obj["consumed"],
        produced=obj["produced"],
        rejected=obj["rejected"],
        duplicates=obj["duplicates"],
        p50_ms=None if obj["p50_ms"] is None else float(obj["p50_ms"]),
        p99_ms=None if obj["p99_ms"] is None else float(obj["p99_ms"]),
        hit_rate_10=None if obj["hit_rate_10"] is None else float(obj["hit_rate_10"]),
    )


def read_timeline(path: Path) -> list[TimelinePoint]:
    """All samples of ``path``; time strictly increases and counters never go down."""
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise TimelineError(f"{path}: expected a readable timeline file ({exc})") from exc
    points: list[TimelinePoint] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path.name}:{number}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TimelineError(f"{where}: expected one JSON object per line ({exc})") from exc
        point = parse_point(obj, where)
        if points:
            prev = points[-1]
            if point.t <= prev.t:
                raise TimelineError(
                    f"{where}: expected t to increase, got {point.t} after {prev.t}"
                )
            for key in COUNTERS:
                if getattr(point, key) < getattr(prev, key):
                    raise TimelineError(
                        f"{where}: expected {key} to be cumulative (never decreasing), got "
                        f"{getattr(point, key)} after {getattr(prev, key)}"
                    )
        points.append(point)
    if not points:
        raise TimelineError(f"{path}: expected at least one sample, got an empty timeline")
    return points


def rates(points: Sequence[TimelinePoint], key: str) -> tuple[list[float], list[float]]:
    """Per-second rate of counter ``key`` between consecutive samples, at their midpoints."""
    times: list[float] = []
    values: list[float] = []
    for a, b in itertools.pairwise(points):
        times.append((a.t + b.t) / 2)
        values.append((getattr(b, key) - getattr(a, key)) / (b.t - a.t))
    return times, values


def _gauge(points: Sequence[TimelinePoint], key: str) -> tuple[list[float], list[float]]:
    pairs = [(p.t, getattr(p, key)) for p in points if getattr(p, key) is not None]
    return [t for t, _ in pairs], [v for _, v in pairs]


def write_report(points: Sequence[TimelinePoint], out_dir: Path, title: str = "") -> list[Path]:
    """Write throughput.png, latency.png and hit_rate.png to ``out_dir``; returns their paths."""
    import matplotlib

    # No display on servers and in CI; Agg renders straight to files.
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    prefix = f"{title}: " if title else ""
    written: list[Path] = []

    fig, ax = plt.subplots(figsize=(9, 4))
    for key in COUNTERS:
        ax.plot(*rates(points, key), label=key)
    ax.set(title=f"{prefix}throughput", xlabel="seconds since start", ylabel="messages / s")
    ax.legend()
    ax.grid(alpha=0.3)
    written.append(_save(fig, out_dir / "throughput.png"))

    fig, ax = plt.subplots(figsize=(9, 4))
    for key, label in (("p50_ms", "p50"), ("p99_ms", "p99")):
        ax.plot(*_gauge(points, key), label=label)
    ax.axhline(SLO_MS, color="red", linestyle="--", linewidth=1, label="SLO p99 100 ms")
    ax.set(title=f"{prefix}end-to-end latency", xlabel="seconds since start", ylabel="milliseconds")
    ax.legend()
    ax.grid(alpha=0.3)
    written.append(_save(fig, out_dir / "latency.png"))

    fig, ax = plt.subplots(figsize=(9, 4))
    ax.plot(*_gauge(points, "hit_rate_10"), label="hit rate @10")
    ax.set(
        title=f"{prefix}online hit rate @10",
        xlabel="seconds since start",
        ylabel="share of events",
        ylim=(0, 1),
    )
    ax.legend()
    ax.grid(alpha=0.3)
    written.append(_save(fig, out_dir / "hit_rate.png"))
    plt.close("all")
    return written


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path
