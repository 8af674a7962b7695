"""``streamrec kafka ...`` (the local broker) and ``streamrec topics ...`` (topic creation)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from streamrec.kafka_config import KafkaConfigError
from streamrec.kafka_local import KafkaStatus, LocalKafka, LocalKafkaError
from streamrec.settings import load_settings
from streamrec.topics import TopicError, TopicSpec, design_topics, ensure_topics, list_topics

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)

kafka_app = typer.Typer(help="Run a real single-node Kafka broker (KRaft) on 127.0.0.1.")
topics_app = typer.Typer(help="Create and list the topics streamrec uses.")


@contextmanager
def _errors() -> Iterator[None]:
    """Expected failures become one red line and exit code 1, not a traceback."""
    try:
        yield
    except (LocalKafkaError, TopicError, KafkaConfigError, ValueError) as exc:
        err_console.print(f"[red]error:[/red] {exc}", markup=True, soft_wrap=True)
        raise typer.Exit(1) from exc


def _local(
    port: int | None = None, controller_port: int | None = None, data_dir: Path | None = None
) -> LocalKafka:
    return LocalKafka.from_settings(
        load_settings(), base_dir=data_dir, port=port, controller_port=controller_port
    )


def _print_status(status: KafkaStatus) -> None:
    if not status.running:
        console.print(f"kafka: [yellow]not running[/yellow] (base dir {status.base_dir})")
        return
    answer = (
        f"answering, {status.topics} topics"
        if status.answering
        else "[yellow]not answering yet[/yellow]"
    )
    console.print(
        f"kafka: [green]running[/green] pid {status.pid} on {status.bootstrap}, {answer}\n"
        f"       base dir {status.base_dir}"
    )


PortOpt = typer.Option(None, "--port", help="Broker port (default STREAMREC_LOCAL_KAFKA_PORT).")
CPortOpt = typer.Option(
    None, "--controller-port", help="KRaft controller port (STREAMREC_LOCAL_KAFKA_CONTROLLER_PORT)."
)
DirOpt = typer.Option(
    None, "--data-dir", help="Broker base dir (default STREAMREC_LOCAL_KAFKA_DIR)."
)


@kafka_app.command("fetch")
def fetch_cmd() -> None:
    """Download the broker jars from Maven Central (skipped when the cache is current)."""
    with _errors():
        local = _local()
        ran = local.fetch()
    state = "fetched into" if ran else "already current in"
    console.print(f"kafka jars {state} {local.jars_dir}")


@kafka_app.command("start")
def start_cmd(
    port: int | None = PortOpt,
    controller_port: int | None = CPortOpt,
    data_dir: Path | None = DirOpt,
    timeout: float = typer.Option(60.0, "--timeout", help="Seconds to wait for the broker."),
) -> None:
    """Start the broker in the background (or report the one already running)."""
    with _errors():
        local = _local(port, controller_port, data_dir)
        status = local.start(timeout_s=timeout)
    _print_status(status)
    console.print(f"export STREAMREC_KAFKA_BOOTSTRAP={status.bootstrap}")


@kafka_app.command("stop")
def stop_cmd(
    data_dir: Path | None = DirOpt,
    timeout: float = typer.Option(30.0, "--timeout", help="Seconds before SIGKILL."),
) -> None:
    """Stop the broker (SIGTERM, then SIGKILL after --timeout)."""
    with _errors():
        stopped = _local(data_dir=data_dir).stop(timeout_s=timeout)
    console.print("kafka: stopped" if stopped else "kafka: was not running")


@kafka_app.command("status")
def status_cmd(
    port: int | None = PortOpt,
    data_dir: Path | None = DirOpt,
) -> None:
    """Show whether the broker runs. Exit code 0 when running, 1 when not."""
    with _errors():
        status = _local(port=port, data_dir=data_dir).status()
    _print_status(status)
    if not status.running:
        raise typer.Exit(1)


@kafka_app.command("logs")
def logs_cmd(
    lines: int = typer.Option(50, "-n", "--lines", min=1, help="How many lines."),
    data_dir: Path | None = DirOpt,
) -> None:
    """Print the end of the broker log."""
    local = _local(data_dir=data_dir)
    tail = local.log_tail(lines)
    if not tail:
        err_console.print(f"[red]error:[/red] no broker log yet under {local.base_dir}")
        raise typer.Exit(1)
    # Plain print: log lines contain brackets that rich would read as markup.
    typer.echo(tail)


@topics_app.command("create")
def create_cmd(
    partitions: int | None = typer.Option(
        None, "--partitions", min=1, help="Partitions (default STREAMREC_TOPIC_PARTITIONS)."
    ),
) -> None:
    """Create every topic streamrec needs; existing ones are left alone."""
    with _errors():
        settings = load_settings()
        specs = design_topics(settings, partitions)
        try:
            results = ensure_topics(settings, specs)
        except TopicError as exc:
            _print_topic_results(specs, exc.results)
            raise
    _print_topic_results(specs, results)


def _print_topic_results(specs: list[TopicSpec], results: dict[str, str]) -> None:
    table = Table("topic", "partitions", "config", "status", "purpose")
    for spec in specs:
        state = results.get(spec.name, "not attempted")
        style = {"created": "green", "exists": "default"}.get(state, "red")
        config = ", ".join(f"{k}={v}" for k, v in spec.config.items())
        table.add_row(
            spec.name, str(spec.partitions), config, f"[{style}]{state}[/{style}]", spec.purpose
        )
    console.print(table)


@topics_app.command("list")
def list_cmd() -> None:
    """List the topics on the cluster (internal ones hidden)."""
    with _errors():
        settings = load_settings()
        topics = list_topics(settings)
    table = Table("topic", "partitions", title=f"topics on {settings.kafka_bootstrap}")
    for name, count in topics.items():
        table.add_row(name, str(count))
    console.print(table)


def register(app: typer.Typer) -> None:
    """Add the ``kafka`` and ``topics`` command groups to ``app``."""
    app.add_typer(kafka_app, name="kafka")
    app.add_typer(topics_app, name="topics")
