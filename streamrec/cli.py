"""The ``streamrec`` command line: one typer app, commands registered by their modules."""

from __future__ import annotations

import typer

from streamrec.commands import coldstart, kafka, model, monitoring, rerank, worker

app = typer.Typer(
    name="streamrec",
    help="streamrec: a real-time sequential recommender that lives on Kafka.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)

for module in (kafka, model, rerank, coldstart, worker, monitoring):
    module.register(app)


def main() -> None:
    app()
