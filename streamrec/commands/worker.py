"""``streamrec worker``, ``streamrec demo``, ``streamrec bench stream``, ``streamrec publish``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from streamrec.settings import Settings

console = Console()
err_console = Console(stderr=True)

bench_app = typer.Typer(help="Benchmarks through the real broker (figures + JSON report).")
publish_app = typer.Typer(help="Publish items, events or a model notice to Kafka.")


def _fail(message: str) -> None:
    err_console.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(1)


def _numbers(text: str, option: str, *, integer: bool = False) -> list[float]:
    """A comma-separated list of positive numbers ('' for none), or a clear error."""
    out: list[float] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            value = float(int(part)) if integer else float(part)
        except ValueError:
            value = -1.0
        if value <= 0:
            kind = "positive integers" if integer else "positive numbers"
            _fail(f"{option}: expected {kind} separated by commas, got {part!r} in {text!r}")
        out.append(value)
    return out


def worker(
    passthrough: Annotated[
        bool,
        typer.Option(help="Benchmark reference: forward raw events, no model (not for use)."),
    ] = False,
) -> None:
    """Run a stream worker (configured by STREAMREC_* environment variables; see README)."""
    from streams.run import WorkerConfigError, run_worker

    try:
        settings = Settings()
        run_worker(settings, passthrough=passthrough)
    except WorkerConfigError as exc:
        _fail(str(exc))


def demo(
    data: Annotated[Path | None, typer.Option(help="Real dataset to train on and replay")] = None,
    fmt: Annotated[str | None, typer.Option("--format", help="Format of --data")] = None,
    model: Annotated[Path | None, typer.Option(help="Use this trained model directory")] = None,
    events: Annotated[int, typer.Option(help="Events to replay")] = 5000,
    rate: Annotated[float, typer.Option(help="Replay rate, events/s (0 = full speed)")] = 500.0,
    workdir: Annotated[Path, typer.Option(help="Where models, logs and reports go")] = Path(
        "runs/demo"
    ),
    keep_kafka: Annotated[bool, typer.Option(help="Leave the local broker running")] = False,
) -> None:
    """Start local Kafka, train a small model, run the worker, replay events, summarise."""
    from streamrec.demo import DemoError, run_demo

    if (data is None) != (fmt is None):
        _fail("--data and --format go together (e.g. --data ml-100k/u.data --format ml-100k)")
    try:
        run_demo(
            Settings(),
            console,
            data=data,
            fmt=fmt,
            model=model,
            n_events=events,
            rate=rate or None,
            workdir=workdir,
            keep_kafka=keep_kafka,
        )
    except DemoError as exc:
        _fail(str(exc))


@bench_app.command("stream")
def bench_stream(
    events: Annotated[int, typer.Option(help="Events per run")] = 30000,
    json_out: Annotated[Path, typer.Option("--json", help="Report path")] = Path(
        "reports/bench-stream.json"
    ),
    sweep: Annotated[str, typer.Option(help="Batch sizes for the sweep, comma separated")] = (
        "32,128,512"
    ),
    sweep_events: Annotated[int, typer.Option(help="Events per sweep run")] = 15000,
    workdir: Annotated[Path, typer.Option()] = Path("runs/bench"),
    reranker: Annotated[
        bool, typer.Option(help="Also run the full pipeline with a trained reranker (A/B)")
    ] = False,
    rates: Annotated[
        str,
        typer.Option(
            help="Paced runs (passthrough and full): offered events/s, comma separated; '' for none"
        ),
    ] = "500,1000,2000",
    rate_seconds: Annotated[
        float, typer.Option(min=1.0, help="Length of each paced run (s)")
    ] = 15.0,
) -> None:
    """Replay N events at full speed through the real broker, compare with a passthrough;
    then latency at paced loads."""
    from streamrec.bench_stream import run_stream_bench

    sizes = [int(x) for x in _numbers(sweep, "--sweep", integer=True)]
    report = run_stream_bench(
        Settings(),
        console,
        n_events=events,
        json_out=json_out,
        sweep=sizes,
        sweep_events=sweep_events,
        workdir=workdir,
        reranker=reranker,
        rates=_numbers(rates, "--rates"),
        rate_seconds=rate_seconds,
    )
    if not report["accounting"]["ok"]:
        _fail(f"accounting sums do not hold: {json.dumps(report['accounting'])}")


@publish_app.command("model")
def publish_model(
    model_dir: Annotated[Path, typer.Argument(help="Directory written by `streamrec train`")],
) -> None:
    """Tell every worker to hot-swap to MODEL_DIR (a notice on the control topic)."""
    from streamrec.publish import publish_model_notice

    try:
        version = publish_model_notice(Settings(), model_dir)
    except (FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
    console.print(f"published model [bold]{version}[/] from {model_dir}")


@publish_app.command("items")
def publish_items(
    path: Annotated[Path, typer.Argument(help="JSON lines of streamrec.items records")],
) -> None:
    """Publish catalog records (JSON lines) to the items topic, keyed by item_id."""
    from streamrec.publish import publish_jsonl

    n = publish_jsonl(Settings(), path, kind="items")
    console.print(f"published {n} items")


@publish_app.command("events")
def publish_events(
    path: Annotated[Path, typer.Argument(help="JSON lines of streamrec.events records")],
    rate: Annotated[float, typer.Option(help="events/s (0 = full speed)")] = 0.0,
) -> None:
    """Publish events (JSON lines) to the events topic, keyed by user_id."""
    from streamrec.publish import publish_jsonl

    n = publish_jsonl(Settings(), path, kind="events", rate=rate or None)
    console.print(f"published {n} events")


def register(app: typer.Typer) -> None:
    app.command()(worker)
    app.command()(demo)
    app.add_typer(bench_app, name="bench")
    app.add_typer(publish_app, name="publish")
