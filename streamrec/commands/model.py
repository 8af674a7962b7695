"""``streamrec train`` and ``streamrec evaluate``: the sequential encoder from the command line."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from serving.covisit import CoVisitConfig, CoVisitFit
    from serving.data import EncodedLog, LeaveOneOut
    from serving.evaluate import SequenceScorer

FORMAT_HELP = "s3rec | ml-100k | ml-1m | rechorus | yoochoose | events"


def _fail(message: str) -> typer.Exit:
    typer.secho(message, err=True, fg=typer.colors.RED)
    return typer.Exit(code=2)


def _log_epochs() -> None:
    """Without a progress bar, one log line per epoch (loss, validation NDCG@10) to stderr."""
    train_log = logging.getLogger("serving.train")
    train_log.setLevel(logging.INFO)
    # A second command in one process (tests) writes to its own stderr, not the first one's.
    for old in [h for h in train_log.handlers if h.get_name() == "streamrec-epochs"]:
        train_log.removeHandler(old)
    handler = logging.StreamHandler(sys.stderr)
    handler.set_name("streamrec-epochs")
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    train_log.addHandler(handler)


def train(
    data: Annotated[Path, typer.Option(help="interaction log (file or folder; .gz is fine)")],
    fmt: Annotated[str, typer.Option("--format", help=FORMAT_HELP)],
    out: Annotated[Path, typer.Option(help="model directory to write")],
    epochs: int = 200,
    dim: int = 64,
    layers: int = 2,
    heads: int = 2,
    max_len: int = 50,
    batch_size: int = 256,
    lr: float = 1e-3,
    dropout: float = 0.5,
    negatives: Annotated[int, typer.Option(help="0 = full softmax; N = sampled")] = 0,
    seed: int = 42,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda[:i]")] = "auto",
    patience: Annotated[int, typer.Option(help="validation rounds without gain")] = 10,
    eval_every: int = 1,
    attn_dropout: float = 0.2,
    weight_decay: float = 0.0,
    attributes: Annotated[
        Path | None,
        typer.Option(help="item attributes file: their embeddings join every item vector"),
    ] = None,
    attributes_format: Annotated[str, typer.Option(help="s3rec | ml-100k | items")] = "s3rec",
    max_attrs: Annotated[int, typer.Option(help="attributes kept per item")] = 8,
    max_minutes: Annotated[float | None, typer.Option(help="training time budget")] = None,
    progress: bool = True,
    covisit: Annotated[
        bool,
        typer.Option(help="also count item-to-item co-visitation and fit its weight"),
    ] = True,
    affinity: AffinityOption = True,
    filter_seen: FilterSeenOption = False,
) -> None:
    """Train the sequence encoder (leave-one-out; early stop on validation NDCG@10), then
    the co-visitation table beside it and the slate calibration."""
    if not progress:
        _log_epochs()
    # torch is imported here so the CLI's other commands start fast.
    from serving.artifacts import save_model
    from serving.data import DataError, leave_one_out, load_interactions, load_item_attributes
    from serving.encoder import EncoderConfig
    from serving.evaluate import evaluate_split, print_reports
    from serving.train import TrainConfig, train_encoder

    try:
        interactions = load_interactions(data, fmt)
        model_cfg = EncoderConfig(
            num_items=len(interactions.item_ids()),
            dim=dim,
            layers=layers,
            heads=heads,
            max_len=max_len,
            dropout=dropout,
            attn_dropout=attn_dropout,
            use_time=interactions.has_time,
        )
        train_cfg = TrainConfig(
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            weight_decay=weight_decay,
            max_minutes=max_minutes,
            patience=patience,
            eval_every=eval_every,
            negatives=negatives,
            seed=seed,
            device=device,
            progress=progress,
        )
        attrs = load_item_attributes(attributes, attributes_format) if attributes else None
        split = leave_one_out(interactions)
        result, vocab, log_ = train_encoder(split, model_cfg, train_cfg, attrs, max_attrs)
    except (DataError, FileNotFoundError, ValueError) as exc:
        raise _fail(str(exc)) from exc
    metrics: dict[str, object] = {"best_epoch": result.best_epoch, "train_seconds": result.seconds}
    if result.best_valid is not None:
        metrics["valid"] = result.best_valid.metrics
    if split.test:
        test = evaluate_split(result.model, split, log_, "test", max_len=max_len)
        excluded = evaluate_split(
            result.model, split, log_, "test", max_len=max_len, exclude_history=True
        )
        metrics["test"] = test.metrics
        metrics["test_history_excluded"] = excluded.metrics
        print_reports({"encoder": test, "encoder (history excluded)": excluded})
    version = save_model(
        result.model,
        out,
        vocab.ids,
        dataset=interactions.name,
        metrics=metrics,
        train=train_cfg.to_dict(),
        attributes=result.attributes,
    )
    typer.echo(f"saved {version} to {out}")
    if covisit and split.cases("valid"):
        from serving.covisit import store_covisit

        fit = fit_side_scores(
            result.model,
            split,
            log_,
            len(vocab.ids),
            max_len=max_len,
            affinity=affinity,
            filter_seen=filter_seen,
        )
        store_covisit(out, fit.table, fit)
        echo_covisit(fit)
    if split.cases("valid"):
        _calibrate(out, split, len(vocab.ids))


def _calibrate(model_dir: Path, split: LeaveOneOut, n_items: int) -> None:
    """Fit the slate calibration of a saved model (after its co-visitation table, whose boost
    is part of the scores the slate ordering reads)."""
    from serving.artifacts import load_model
    from serving.slate_eval import calibrate
    from streamrec.commands.rerank import echo_calibrated

    try:
        cal = calibrate(
            load_model(model_dir), split, candidates=min(100, n_items), model_dir=model_dir
        )
    except ValueError as exc:  # e.g. no validation target retrieved: T stays 1
        typer.secho(f"calibration skipped: {exc}", err=True, fg=typer.colors.YELLOW)
    else:
        echo_calibrated(cal)


def echo_covisit(fit: CoVisitFit) -> None:
    """One line: the co-visitation table and the weight validation chose."""
    tried = ", ".join(f"{w:g}: {v:.4f}" for w, v in fit.ndcg_by_weight.items())
    weight = fit.table.config.weight
    history = "history excluded" if fit.exclude_history else "history kept"
    typer.echo(
        f"co-visitation: {len(fit.table):,} item pairs; weight {weight:g} "
        + (f"(validation NDCG@10 {fit.gain:+.1%}" if weight else "(off: no validation gain")
        + f"; tried {tried} on {fit.users:,} users, {history})"
    )
    if fit.affinity is not None:
        aff = fit.affinity.weight
        tried = ", ".join(f"{w:g}: {v:.4f}" for w, v in fit.ndcg_by_affinity.items())
        typer.echo(
            f"attribute affinity: weight {aff:g} "
            + (
                f"(validation NDCG@10 {fit.affinity_gain:+.1%} over the table alone"
                if aff
                else "(off"
            )
            + f"; tried {tried})"
        )


COVISIT_MODES = ("online", "stored", "off")

AffinityOption = Annotated[
    bool,
    typer.Option(
        help="also weigh attribute affinity (brands and categories shared with the user's "
        "newest items) when the model has item attributes"
    ),
]
FilterSeenOption = Annotated[
    bool,
    typer.Option(
        help="choose the weights for a worker that filters seen items "
        "(STREAMREC_FILTER_SEEN=1): validation ranks without the user's history"
    ),
]


def fit_side_scores(
    model: SequenceScorer,
    split: LeaveOneOut,
    log_: EncodedLog,
    n_items: int,
    *,
    max_len: int,
    affinity: bool,
    filter_seen: bool,
    config: CoVisitConfig | None = None,
) -> CoVisitFit:
    """The co-visitation table and, for a model with item attributes (and ``affinity``),
    the attribute affinity, their weights chosen together on validation."""
    from serving.affinity import WEIGHT_GRID, Affinity, AffinityConfig
    from serving.covisit import fit_covisit

    aff = Affinity.of_model(model, AffinityConfig()) if affinity else None  # type: ignore[arg-type]
    return fit_covisit(
        model,
        split,
        log_,
        n_items,
        max_len=max_len,
        config=config,
        affinity=aff,
        affinity_grid=WEIGHT_GRID,
        exclude_history=filter_seen,
    )


def evaluate(
    model: Annotated[Path, typer.Option(help="model directory written by `streamrec train`")],
    data: Annotated[Path, typer.Option(help="interaction log (file or folder; .gz is fine)")],
    fmt: Annotated[str, typer.Option("--format", help=FORMAT_HELP)],
    json_out: Annotated[Path | None, typer.Option("--json", help="write the report here")] = None,
    split: Annotated[str, typer.Option(help="test | valid")] = "test",
    exclude_history: bool = False,
    device: str = "auto",
    covisit: Annotated[
        str,
        typer.Option(
            help="co-visitation rows: online (counted from every step before the held-out "
            "one, as the worker counts them) | stored (the table saved at training) | off"
        ),
    ] = "online",
) -> None:
    """Full-ranking leave-one-out HR/NDCG@{5,10,20} of a saved model on a log: the encoder
    alone and, when the model has a co-visitation weight, the encoder with it (and with its
    attribute affinity, when that has a weight)."""
    from serving.artifacts import ArtifactError, load_model
    from serving.covisit import CoVisitation, batch_booster, sequences_before, summed_booster
    from serving.data import DataError, EncodedLog, leave_one_out, load_interactions
    from serving.evaluate import Booster, EvalReport, evaluate_split, print_reports, write_json

    if split not in ("test", "valid"):
        raise _fail(f"evaluate: expected --split test or valid, got {split!r}")
    if covisit not in COVISIT_MODES:
        raise _fail(f"evaluate: expected --covisit in {list(COVISIT_MODES)}, got {covisit!r}")
    try:
        loaded = load_model(model, device=device)
        interactions = load_interactions(data, fmt)
    except (ArtifactError, DataError, FileNotFoundError, ValueError) as exc:
        raise _fail(str(exc)) from exc
    loo = leave_one_out(interactions)
    if not loo.cases(split):
        raise _fail(f"evaluate: expected users with >= 3 interactions in {data}, found none")
    log_ = EncodedLog(interactions, loaded.vocab)

    def scored(boost: Booster | None = None) -> EvalReport:
        return evaluate_split(
            loaded.model,
            loo,
            log_,
            split,
            max_len=loaded.max_len,
            exclude_history=exclude_history,
            boost=boost,
        )

    report = scored()
    report.extra = {"model_version": loaded.version, "data": str(data), "format": fmt}
    reports = {loaded.version: report}
    table = loaded.covisit
    payload = report.to_json()
    if table is not None and table.config.weight > 0 and covisit != "off":
        if covisit == "online":
            seqs = sequences_before(loo, log_, split)
            table = CoVisitation.build(seqs, len(loaded.vocab), table.config)
        with_table = scored(batch_booster(table))
        with_table.extra = {
            **report.extra,
            "covisit": covisit,
            "covisit_weight": table.config.weight,
            "covisit_pairs": len(table),
        }
        reports[f"+ co-visitation ({covisit})"] = with_table
        payload["covisit"] = with_table.to_json()
    else:
        table = None
    affinity = loaded.affinity
    if affinity is not None and affinity.weight > 0:
        # What a worker without a reranker serves: encoder + table + affinity.
        on_table = batch_booster(table) if table is not None else None
        both = summed_booster(on_table, affinity.booster())
        served = scored(both)
        served.extra = {**report.extra, "covisit": covisit if table is not None else "off"}
        served.extra["affinity"] = affinity.to_config()
        name = f"+ co-visitation ({covisit}) + affinity" if table is not None else "+ affinity"
        reports[name] = served
        payload["affinity"] = served.to_json()
    print_reports(reports)
    if json_out is not None:
        write_json(payload, json_out)
        typer.echo(f"wrote {json_out}")


def covisit(
    model: Annotated[Path, typer.Option(help="model directory written by `streamrec train`")],
    data: Annotated[Path, typer.Option(help="interaction log the model was trained on")],
    fmt: Annotated[str, typer.Option("--format", help=FORMAT_HELP)],
    window: Annotated[int, typer.Option(help="count items up to this many steps later")] = 3,
    lookback: Annotated[int, typer.Option(help="newest items of a user that boost")] = 3,
    top_k: Annotated[int, typer.Option(help="pairs kept per item")] = 200,
    device: str = "auto",
    affinity: AffinityOption = True,
    filter_seen: FilterSeenOption = False,
) -> None:
    """Count item-to-item co-visitation on the training steps, choose its weight (and the
    attribute affinity's) on the validation split and store both beside the model, then
    refit the slate calibration (`streamrec train` does all of this itself)."""
    from serving.artifacts import ArtifactError, load_model
    from serving.covisit import CoVisitConfig, store_covisit
    from serving.data import DataError, EncodedLog, leave_one_out, load_interactions

    try:
        loaded = load_model(model, device=device)
        loo = leave_one_out(load_interactions(data, fmt))
        config = CoVisitConfig(window=window, lookback=lookback, top_k=top_k)
        fit = fit_side_scores(
            loaded.model,
            loo,
            EncodedLog(loo.data, loaded.vocab),
            len(loaded.vocab),
            max_len=loaded.max_len,
            affinity=affinity,
            filter_seen=filter_seen,
            config=config,
        )
        store_covisit(model, fit.table, fit)
    except (ArtifactError, DataError, FileNotFoundError, ValueError) as exc:
        raise _fail(str(exc)) from exc
    echo_covisit(fit)
    _calibrate(model, loo, len(loaded.vocab))
    typer.echo(f"stored in {model}")


def register(app: typer.Typer) -> None:
    """Add ``train`` and ``evaluate`` to ``app``."""
    app.command("train")(train)
    app.command("evaluate")(evaluate)
    app.command("covisit")(covisit)
