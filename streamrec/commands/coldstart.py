"""``streamrec fit-text`` (cold-start text projection) and ``streamrec fit-bundles``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

ITEMS_FORMAT_HELP = (
    "streamrec (streamrec.items JSON lines) | ml-100k (u.item) | "
    "ml-1m (movies.dat; plots from movies_extrainfos.dat.gz beside it)"
)
LOG_FORMAT_HELP = "s3rec | ml-100k | ml-1m | rechorus | yoochoose | events"


def _fail(message: str) -> typer.Exit:
    typer.secho(message, err=True, fg=typer.colors.RED)
    return typer.Exit(code=2)


def fit_text(
    model: Annotated[Path, typer.Option(help="model directory written by `streamrec train`")],
    items: Annotated[Path, typer.Option(help="item text file (or its folder for MovieLens)")],
    items_format: Annotated[str, typer.Option(help=ITEMS_FORMAT_HELP)] = "streamrec",
    log: Annotated[
        Path | None,
        typer.Option(help="training log, to store per-item counts for blending thin items"),
    ] = None,
    log_format: Annotated[str, typer.Option(help=LOG_FORMAT_HELP)] = "events",
    match_norm: Annotated[
        bool, typer.Option(help="rescale outputs to the median warm-item norm (measured worse)")
    ] = False,
    blend_k: Annotated[float, typer.Option(help="a = n / (n + k) for thin items")] = 5.0,
) -> None:
    """Fit the text → ID-space projection on the model's items; write it into MODEL."""
    # torch and the text encoder are imported here so the CLI's other commands start fast.
    from serving.data import DataError, load_interactions
    from serving.text import TextError, count_interactions, fit_text_projection, load_items

    try:
        catalog = load_items(items, items_format)
        counts = None
        if log is not None:
            data = load_interactions(log, log_format)
            counts = count_interactions([u.items for u in data.users])
        report = fit_text_projection(
            model, catalog, train_counts=counts, match_norm=match_norm, blend_k=blend_k
        )
    except (TextError, DataError, FileNotFoundError, ValueError) as exc:
        raise _fail(str(exc)) from exc
    typer.echo(
        f"fit-text: {report.train_items + report.heldout_items} warm items with text, "
        f"lambda={report.lam:g}; held-out ({report.heldout_items} items): "
        f"R²={report.heldout_r2:.3f} cosine={report.heldout_cosine:.3f} "
        f"norm ratio={report.heldout_norm_ratio:.3f}"
    )
    typer.echo(f"wrote text_projection.safetensors + text_projection.json to {model}")


def register(app: typer.Typer) -> None:
    """Add ``fit-text`` to ``app``."""
    app.command("fit-text")(fit_text)
