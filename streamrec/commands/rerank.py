"""``streamrec train-reranker``, ``streamrec calibrate`` and ``streamrec evaluate-slates``."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from serving.slate_eval import Calibrated

FORMAT_HELP = "s3rec | ml-100k | ml-1m | rechorus | yoochoose | events"


def _fail(message: str) -> typer.Exit:
    typer.secho(message, err=True, fg=typer.colors.RED)
    return typer.Exit(code=2)


def train_reranker(
    model: Annotated[Path, typer.Option(help="encoder directory; the reranker is saved into it")],
    data: Annotated[Path, typer.Option(help="interaction log the encoder was trained on")],
    fmt: Annotated[str, typer.Option("--format", help=FORMAT_HELP)],
    candidates: Annotated[int, typer.Option(help="C retrieved per training case")] = 100,
    prefixes: Annotated[int, typer.Option(help="newest training positions per user")] = 10,
    epochs: int = 30,
    patience: int = 3,
    dim: int = 32,
    layers: int = 1,
    heads: int = 2,
    lr: float = 1e-3,
    batch_size: int = 256,
    seed: int = 42,
    threads: Annotated[int, typer.Option(help="torch CPU threads")] = 2,
    progress: bool = True,
    covisit: Annotated[
        bool,
        typer.Option(
            help="read the encoder's co-visitation table when it has one (candidates from the "
            "boosted scores, the boost as a feature; the worker then applies the table before "
            "the reranker); --no-covisit: the encoder's scores alone, and the worker leaves "
            "the table off under this reranker"
        ),
    ] = True,
    cross_fit: Annotated[
        bool,
        typer.Option(
            help="train on cases logged by a second encoder that never saw them (trained first "
            "with the model's settings, without each user's last two training steps), instead "
            "of the newest training positions, whose retrieval the model has memorised"
        ),
    ] = False,
    cross_fit_dir: Annotated[
        Path | None,
        typer.Option(help="where the second encoder lives (default: <model>-cross-fit; reused)"),
    ] = None,
) -> None:
    """Train the listwise reranker on the encoder's logged top-C candidates."""
    import torch

    from serving.artifacts import ArtifactError, load_model
    from serving.data import DataError, leave_one_out, load_interactions
    from serving.reranker import (
        RerankerConfig,
        RerankTrainConfig,
        cross_fitted_encoder,
        heldout_candidates,
        model_attributes,
        save_reranker,
    )
    from serving.reranker import train_reranker as train

    torch.set_num_threads(threads)
    try:
        encoder = load_model(model, device="cpu")
        split = leave_one_out(load_interactions(data, fmt))
        cfg = RerankTrainConfig(
            candidates=candidates,
            prefixes=0 if cross_fit else prefixes,
            epochs=epochs,
            patience=patience,
            lr=lr,
            batch_size=batch_size,
            seed=seed,
            progress=progress,
        )
        shape: dict[str, object] = {"dim": dim, "layers": layers, "heads": heads}
        if not covisit:
            shape["covisit"] = False
        heldout = None
        if cross_fit:
            aux_dir = cross_fit_dir or model.with_name(model.name + "-cross-fit")
            typer.echo(f"cross-fitted encoder: {aux_dir}")
            aux = cross_fitted_encoder(encoder, split, aux_dir, progress=progress)
            heldout = heldout_candidates(
                aux,
                split,
                encoder.vocab,
                steps=2,
                candidates=candidates,
                seq_len=RerankerConfig(1, 1).max_len,
                covisit=encoder.covisit if covisit else None,  # weight 0 reads as none
            )
        # A model trained with item attributes gives the reranker its category feature.
        result = train(
            encoder,
            split,
            cfg,
            model=shape,
            heldout=heldout,
            categories=model_attributes(encoder),
        )
    except (ArtifactError, DataError, FileNotFoundError, ValueError) as exc:
        raise _fail(str(exc)) from exc
    version = save_reranker(
        result.reranker,
        model,
        metrics={"valid": result.valid, "best_epoch": result.best_epoch},
    )
    v = result.valid
    typer.echo(
        f"valid NDCG@10 retrieval {v['retrieval']['NDCG@10']:.4f} -> rerank "
        f"{v['rerank']['NDCG@10']:.4f} ({result.train_cases} training cases, "
        f"{result.seconds:.0f}s)"
    )
    weight = result.reranker.meta.get("covisit_weight", 0.0)
    typer.echo(
        f"co-visitation: read by the reranker (weight {weight:g})"
        if result.reranker.cfg.covisit
        else "co-visitation: not read (the encoder has no table, or --no-covisit)"
    )
    if v["rerank"]["NDCG@10"] <= v["retrieval"]["NDCG@10"]:
        typer.secho(
            "the reranker does not beat retrieval on validation: the worker serves better "
            f"without it (remove {model}/reranker.*)"
            + ("" if cross_fit else "; --cross-fit trains it on cases like the ones it serves"),
            err=True,
            fg=typer.colors.YELLOW,
        )
    from serving.slate_eval import calibrate as fit

    try:
        fits = fit(encoder, split, reranker=result.reranker, candidates=candidates, model_dir=model)
    except ValueError as exc:  # e.g. no validation target retrieved: T stays 1
        typer.secho(f"calibration skipped: {exc}", err=True, fg=typer.colors.YELLOW)
    else:
        echo_calibrated(fits)
    typer.echo(f"saved {version} to {model}")


def echo_calibrated(result: Calibrated) -> None:
    """One line per scorer: its fitted temperature and its chosen diversity weight."""
    for name, cal in result.fits.items():
        w = result.weights[name]
        typer.echo(
            f"{name} scores: temperature {cal.temperature:.3f} (validation NLL "
            f"{cal.nll_at_1:.4f} at 1.0 -> {cal.nll:.4f}, {cal.cases} cases); {w.ordering} "
            f"diversity weight {w.diversity:g} (NDCG@{w.k} {w.ndcg_change:+.1%}, ILD@{w.k} "
            f"{w.ild_change:+.1%} on {w.users} validation users, "
            + ("seen items filtered)" if w.seen_filtered else "history kept)")
        )


def calibrate(
    model: Annotated[Path, typer.Option(help="encoder directory (with its reranker, if any)")],
    data: Annotated[Path, typer.Option(help="interaction log the models were trained on")],
    fmt: Annotated[str, typer.Option("--format", help=FORMAT_HELP)],
    candidates: Annotated[int, typer.Option(help="C retrieved per validation case")] = 100,
    threads: Annotated[int, typer.Option(help="torch CPU threads")] = 2,
    filter_seen: Annotated[
        bool | None,
        typer.Option(
            "--filter-seen/--keep-seen",
            help="choose for a worker that filters seen items (STREAMREC_FILTER_SEEN=1) or "
            "not; default: as the model's co-visitation weights were fitted",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Fit the score temperatures the slate ordering reads and choose its diversity weight for
    the default ordering, "expected" (validation split: the largest within 2% NDCG@10 of pure
    relevance); store both beside the encoder and reranker (weights and versions unchanged)."""
    import torch

    from serving.artifacts import ArtifactError, load_model
    from serving.data import DataError, leave_one_out, load_interactions
    from serving.reranker import RerankerError, load_reranker
    from serving.slate_eval import calibrate as fit

    torch.set_num_threads(threads)
    try:
        encoder = load_model(model, device="cpu")
        reranker = load_reranker(model)
        split = leave_one_out(load_interactions(data, fmt))
        fits = fit(
            encoder,
            split,
            reranker=reranker,
            candidates=candidates,
            model_dir=model,
            filter_seen=filter_seen,
        )
    except (ArtifactError, RerankerError, DataError, FileNotFoundError, ValueError) as exc:
        raise _fail(str(exc)) from exc
    echo_calibrated(fits)
    typer.echo(f"stored in {model}")


def evaluate_slates(
    model: Annotated[Path, typer.Option(help="encoder directory (with the reranker for rerank)")],
    data: Annotated[Path, typer.Option(help="interaction log (file or folder; .gz is fine)")],
    fmt: Annotated[str, typer.Option("--format", help=FORMAT_HELP)],
    stages: Annotated[str, typer.Option(help="retrieval | rerank | full")] = "full",
    json_out: Annotated[Path | None, typer.Option("--json", help="write the report here")] = None,
    plot: Annotated[Path | None, typer.Option(help="PNG of the diversity trade-off (full)")] = None,
    split: Annotated[str, typer.Option(help="test | valid")] = "test",
    candidates: int = 100,
    k: int = 10,
    diversity: Annotated[
        float | None, typer.Option(help="diversity weight to report; default: chosen on the curve")
    ] = None,
    ordering: Annotated[
        str, typer.Option(help="expected | dcg | mmr | dpp: the ordering of the diversity curve")
    ] = "expected",
    filter_seen: Annotated[
        bool,
        typer.Option(
            help="order what a worker with STREAMREC_FILTER_SEEN=1 orders (the user's history "
            "items dropped) on the diversity curve"
        ),
    ] = False,
    threads: int = 2,
) -> None:
    """HR/NDCG@k, intra-list diversity and coverage: retrieval vs rerank vs + diversity (the
    curve orders the reranker's scores, or retrieval's when the model has no reranker)."""
    import torch
    from rich.console import Console
    from rich.table import Table

    from serving.artifacts import ArtifactError, load_model
    from serving.data import DataError, leave_one_out, load_interactions
    from serving.reranker import RerankerError, load_reranker
    from serving.slate_eval import (
        ORDERINGS,
        STAGES,
        evaluate_slates,
        plot_tradeoff,
        write_report,
    )

    if stages not in STAGES:
        raise _fail(f"evaluate-slates: expected --stages in {list(STAGES)}, got {stages!r}")
    if ordering not in ORDERINGS:
        raise _fail(f"evaluate-slates: expected --ordering in {list(ORDERINGS)}, got {ordering!r}")
    if split not in ("test", "valid"):
        raise _fail(f"evaluate-slates: expected --split test or valid, got {split!r}")
    if plot is not None and stages != "full":
        raise _fail(f"evaluate-slates: expected --stages full with --plot, got {stages!r}")
    torch.set_num_threads(threads)
    try:
        encoder = load_model(model, device="cpu")
        reranker = load_reranker(model) if stages != "retrieval" else None
        if stages == "rerank" and reranker is None:
            raise ValueError(
                f"evaluate-slates: expected a reranker in {model} for --stages {stages}; "
                "run `streamrec train-reranker` first (--stages full orders the retrieval "
                "scores without one)"
            )
        loo = leave_one_out(load_interactions(data, fmt))
        report = evaluate_slates(
            encoder,
            loo,
            reranker=reranker,
            which=split,
            stages=stages,
            candidates=candidates,
            k=k,
            diversity=diversity,
            ordering=ordering,
            filter_seen=filter_seen,
        )
    except (ArtifactError, RerankerError, DataError, FileNotFoundError, ValueError) as exc:
        raise _fail(str(exc)) from exc
    report |= {"data": str(data), "format": fmt}
    table = Table(title=f"slates, split={split}, C={candidates}, users={report['users']}")
    table.add_column("method")
    keys = list(report["retrieval"])
    for key in keys:
        table.add_column(key, justify="right")
    rows = [("retrieval", report["retrieval"])]
    if report.get("seen_filtered"):
        rows.append(("retrieval, seen filtered", report["retrieval_filtered"]))
    if "rerank" in report:
        rows.append(("rerank", report["rerank"]))
        if report.get("seen_filtered"):
            rows.append(("rerank, seen filtered", report["rerank_filtered"]))
    if "at_diversity" in report:
        seen = ", seen filtered" if report["seen_filtered"] else ""
        label = f"{report['curve_of']}{seen} + {report['ordering']} {report['diversity']:g}"
        rows.append((label, report["at_diversity"]))
    for name, metrics in rows:
        table.add_row(name, *(f"{metrics[key]:.4f}" for key in keys))
    Console().print(table)
    if json_out is not None:
        write_report(report, json_out)
        typer.echo(f"wrote {json_out}")
    if plot is not None:
        plot_tradeoff(report, plot)
        typer.echo(f"wrote {plot}")


def register(app: typer.Typer) -> None:
    """Add ``train-reranker`` and ``evaluate-slates`` to ``app``."""
    app.command("train-reranker")(train_reranker)
    app.command("calibrate")(calibrate)
    app.command("evaluate-slates")(evaluate_slates)
