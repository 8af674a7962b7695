"""Train our encoder and a same-run SASRec peer on one dataset; full-ranking metrics + speed.

    python -m bench.encoder.run --dataset beauty --json reports/encoder-beauty.json

Both models see the identical leave-one-out split and are scored by the identical evaluator
(``serving.evaluate``: full ranking, history not excluded). Writes JSON with both metric
sets, ratios ours/peer, hyperparameters, wall times and encode throughput.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Annotated

if __package__ in (None, ""):  # run as a file: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch
import typer
from rich.console import Console

from bench.encoder.sasrec import SASRec, SASRecConfig, bce_one_negative
from bench.encoder.speed import measure
from serving.affinity import WEIGHT_GRID as AFFINITY_GRID
from serving.affinity import Affinity, AffinityConfig
from serving.artifacts import load_model, save_model
from serving.covisit import (
    CoVisitation,
    batch_booster,
    fit_covisit,
    sequences_before,
    summed_booster,
)
from serving.data import (
    EncodedLog,
    ItemVocab,
    LeaveOneOut,
    leave_one_out,
    load_interactions,
    load_item_attributes,
)
from serving.encoder import Batch, EncoderConfig
from serving.evaluate import EvalReport, evaluate_split, print_reports, write_json
from serving.train import (
    TrainConfig,
    TrainResult,
    fit,
    resolve_device,
    seed_everything,
    softmax_loss,
    train_encoder,
)

DATASETS: dict[str, tuple[str, str]] = {
    "beauty": ("s3rec/Beauty.txt.gz", "s3rec"),
    "yelp": ("s3rec/Yelp.txt.gz", "s3rec"),
    "lastfm": ("s3rec/LastFM.txt.gz", "s3rec"),
    "ml-100k": ("ml-100k/u.data.gz", "ml-100k"),
}
DEFAULT_ROOT = Path(os.environ.get("STREAMREC_DATA", "/work/shared/data"))
ATTRIBUTES: dict[str, tuple[Path, str]] = {
    "beauty": (DEFAULT_ROOT / "s3rec/Beauty_item2attributes.json.gz", "s3rec"),
    "yelp": (DEFAULT_ROOT / "s3rec/Yelp_item2attributes.json.gz", "s3rec"),
    "lastfm": (DEFAULT_ROOT / "s3rec/LastFM_item2attributes.json.gz", "s3rec"),
    "ml-100k": (DEFAULT_ROOT / "ml-100k/u.item", "ml-100k"),
}

console = Console()


def _full_softmax(model: torch.nn.Module, batch: Batch, targets: torch.Tensor) -> torch.Tensor:
    return softmax_loss(model, batch, targets, 0)  # type: ignore[arg-type]


def _reuse(model_dir: Path, device: str) -> tuple[TrainResult, list[str]]:
    """A saved model of ours, wrapped as the result of a training run (read from its config),
    and its item ids."""
    loaded = load_model(model_dir, device=device)
    config = loaded.config
    metrics = config.get("metrics", {})
    result = TrainResult(
        model=loaded.model,
        best_epoch=int(metrics.get("best_epoch", 0)) if isinstance(metrics, dict) else 0,
        best_valid=None,
        epochs_run=0,
        seconds=0.0,
        attributes=sorted(loaded.attribute_index, key=loaded.attribute_index.__getitem__),
    )
    return result, list(loaded.item_ids())


def _covisit_rows(
    name: str,
    model: torch.nn.Module,
    table: CoVisitation,
    split: LeaveOneOut,
    log_: EncodedLog,
    max_len: int,
    reports: dict[str, EvalReport],
    affinity: Affinity | None = None,
) -> dict[str, object]:
    """Test rows of ``model`` + co-visitation at the table's validation-chosen weight, with the
    counts of the training steps ('stored') and of every step before the test one ('online',
    what the worker holds); with ``affinity`` (weight > 0) also online table + affinity, what
    a worker without a reranker serves. Adds them to ``reports``."""
    online = CoVisitation.build(
        sequences_before(split, log_, "test"), table.num_items, table.config
    )
    out: dict[str, object] = {"weight": table.config.weight, "pairs": len(table)}
    rows = [
        ("co-visitation (stored", "test_stored", batch_booster(table)),
        ("co-visitation (online", "test_online", batch_booster(online)),
    ]
    if affinity is not None and affinity.weight > 0:
        out["affinity"] = affinity.to_config()
        both = summed_booster(batch_booster(online), affinity.booster())
        rows.append(("co-visitation + affinity (online", "test_online_affinity", both))
    for what, key, boost in rows:
        for excl in (False, True):
            label = f"{name} + {what}{', history excluded' if excl else ''})"
            rep = evaluate_split(
                model,  # type: ignore[arg-type]
                split,
                log_,
                "test",
                max_len=max_len,
                exclude_history=excl,
                boost=boost,
            )
            reports[label] = rep
            out[f"{key}{'_history_excluded' if excl else ''}"] = rep.to_json()
    return out


def _ratios(ours: dict[str, float], peer: dict[str, float]) -> dict[str, float | None]:
    return {k: round(v / peer[k], 3) if peer[k] > 0 else None for k, v in ours.items()}


def main(
    dataset: Annotated[str, typer.Option(help=f"one of {sorted(DATASETS)}")] = "beauty",
    json_out: Annotated[Path, typer.Option("--json", help="report path")] = Path(
        "reports/encoder.json"
    ),
    data_root: Annotated[Path, typer.Option(help="shared data folder")] = DEFAULT_ROOT,
    epochs: int = 200,
    peer_epochs: int = 200,
    patience: int = 5,
    eval_every: int = 2,
    dim: int = 64,
    layers: int = 2,
    heads: int = 2,
    ffn_mult: int = 2,
    dropout: float = 0.5,
    attn_dropout: float = 0.2,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    batch_size: int = 256,
    negatives: Annotated[int, typer.Option(help="0 = full softmax")] = 0,
    max_len: int = 50,
    seed: int = 42,
    threads: int = 2,
    device: str = "auto",
    model_out: Annotated[Path | None, typer.Option(help="also keep our artifact here")] = None,
    max_minutes: Annotated[float | None, typer.Option(help="training budget per model")] = None,
    peer_max_minutes: float | None = None,
    skip_peer: bool = False,
    attributes: Annotated[
        bool, typer.Option(help="add the dataset's item attributes (S3-Rec ids, ML genres)")
    ] = False,
    max_attrs: int = 8,
    peer_loss: Annotated[
        str,
        typer.Option(help="bce: SASRec as published (1 negative); ce: full softmax, as RecBole"),
    ] = "bce",
    ours_model: Annotated[
        Path | None,
        typer.Option(help="evaluate this saved model of ours instead of training one"),
    ] = None,
    covisit: Annotated[
        bool,
        typer.Option(help="also score both models with item-to-item co-visitation"),
    ] = True,
    filter_seen: Annotated[
        bool,
        typer.Option(
            help="fit the co-visitation and affinity weights with history excluded (a model "
            "given with --ours-model keeps the protocol it was fitted with)"
        ),
    ] = False,
    progress: bool = True,
) -> None:
    if dataset not in DATASETS:
        raise typer.BadParameter(
            f"bench: expected --dataset in {sorted(DATASETS)}, got {dataset!r}"
        )
    torch.set_num_threads(threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    rel, fmt = DATASETS[dataset]
    t0 = time.perf_counter()
    data = load_interactions(data_root / rel, fmt)
    split = leave_one_out(data)
    console.print(
        f"{dataset}: {len(data.users)} users, {len(data.item_ids())} items, "
        f"{data.num_interactions} interactions, timestamps={data.has_time}"
    )
    model_cfg = EncoderConfig(
        num_items=len(data.item_ids()),
        dim=dim,
        layers=layers,
        heads=heads,
        ffn_mult=ffn_mult,
        max_len=max_len,
        dropout=dropout,
        attn_dropout=attn_dropout,
        use_time=data.has_time,
    )
    train_cfg = TrainConfig(
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        weight_decay=weight_decay,
        patience=patience,
        eval_every=eval_every,
        negatives=negatives,
        max_minutes=max_minutes,
        seed=seed,
        device=device,
        progress=progress,
    )
    if peer_loss not in ("bce", "ce"):
        raise typer.BadParameter(f"bench: expected --peer-loss bce or ce, got {peer_loss!r}")
    if ours_model is not None:
        ours, ids = _reuse(ours_model, device)
        vocab = ItemVocab(ids)
        if list(vocab.ids) != data.item_ids():
            raise typer.BadParameter(f"bench: {ours_model} was trained on another item set")
        log_ = EncodedLog(data, vocab)
    else:
        attrs = load_item_attributes(*ATTRIBUTES[dataset]) if attributes else None
        ours, vocab, log_ = train_encoder(split, model_cfg, train_cfg, attrs, max_attrs)
    model_cfg = ours.model.cfg
    reports: dict[str, EvalReport] = {
        "ours": evaluate_split(ours.model, split, log_, "test", max_len=max_len),
        "ours (history excluded)": evaluate_split(
            ours.model, split, log_, "test", max_len=max_len, exclude_history=True
        ),
    }
    payload: dict[str, object] = {
        "dataset": dataset,
        "data": str(data_root / rel),
        "users": len(data.users),
        "items": len(vocab),
        "interactions": data.num_interactions,
        "protocol": (
            "leave-one-out, full ranking over all items; 'test' keeps history items in the "
            "ranking, 'test_history_excluded' scores the input sequence's items (not the "
            "target) -inf, as the S3-Rec/FMLP-Rec/BSARec line of papers does"
        ),
        "ours": {
            "test": reports["ours"].to_json(),
            "test_history_excluded": reports["ours (history excluded)"].to_json(),
            "valid": ours.best_valid.to_json() if ours.best_valid else None,
            "model": model_cfg.to_dict(),
            "train": train_cfg.to_dict(),
            "best_epoch": ours.best_epoch,
            "epochs_run": ours.epochs_run,
            "train_seconds": ours.seconds,
            "reused_from": str(ours_model) if ours_model else None,
        },
    }
    # Attribute affinity, built from our model's attribute table; the peer is given the same.
    aff_base = Affinity.of_model(ours.model, AffinityConfig())
    ours_aff: Affinity | None = None
    if covisit and split.cases("valid"):
        stored = load_model(ours_model, device=device) if ours_model else None
        if stored is not None and stored.covisit is not None:
            table, ours_aff = stored.covisit, stored.affinity
            fitted = stored.config.get("covisit_fit")
            history = fitted.get("validation_history") if isinstance(fitted, dict) else None
            filter_seen = history == "excluded"
        else:
            side = fit_covisit(
                ours.model,
                split,
                log_,
                len(vocab),
                max_len=max_len,
                affinity=aff_base,
                affinity_grid=AFFINITY_GRID,
                exclude_history=filter_seen,
            )
            table, ours_aff = side.table, side.affinity
        payload["ours_covisit"] = _covisit_rows(
            "ours", ours.model, table, split, log_, max_len, reports, ours_aff
        )
        payload["ours_covisit"]["validation_history"] = (  # type: ignore[index]
            "excluded" if filter_seen else "kept"
        )
    with tempfile.TemporaryDirectory() as tmp:
        out_dir = model_out or Path(tmp) / "model"
        save_model(
            ours.model,
            out_dir,
            vocab.ids,
            dataset=dataset,
            metrics=reports["ours"].metrics,
            train=train_cfg.to_dict(),
            attributes=ours.attributes,
        )
        loaded = load_model(out_dir, device=device)
        payload["speed"] = measure(loaded, batch=256, length=max_len, model_dir=out_dir)

    if not skip_peer:
        peer_cfg = SASRecConfig(num_items=len(vocab), max_len=max_len)
        peer_train = replace(
            train_cfg, epochs=peer_epochs, batch_size=128, max_minutes=peer_max_minutes
        )
        seed_everything(seed)
        peer = SASRec(peer_cfg).to(resolve_device(device))
        opt = torch.optim.Adam(peer.parameters(), lr=1e-3, betas=(0.9, 0.98))
        started = time.perf_counter()
        best_epoch, best_valid, epochs_run, _ = fit(
            peer,
            bce_one_negative if peer_loss == "bce" else _full_softmax,
            split,
            EncodedLog(data, ItemVocab(vocab.ids)),
            peer_train,
            max_len=max_len,
            optimizer=opt,
            desc="sasrec",
        )
        peer_seconds = round(time.perf_counter() - started, 1)
        reports["SASRec (peer)"] = evaluate_split(peer, split, log_, "test", max_len=max_len)
        reports["SASRec (peer, history excluded)"] = evaluate_split(
            peer, split, log_, "test", max_len=max_len, exclude_history=True
        )
        peer_metrics = reports["SASRec (peer)"].metrics
        peer_excl = reports["SASRec (peer, history excluded)"].metrics
        payload["peer"] = {
            "name": "SASRec (Kang & McAuley 2018), "
            + ("BCE + 1 negative" if peer_loss == "bce" else "full-softmax cross-entropy"),
            "test": reports["SASRec (peer)"].to_json(),
            "test_history_excluded": reports["SASRec (peer, history excluded)"].to_json(),
            "valid": best_valid.to_json() if best_valid else None,
            "model": peer_cfg.to_dict(),
            "train": peer_train.to_dict() | {"optimizer": "Adam(0.9, 0.98)"},
            "best_epoch": best_epoch,
            "epochs_run": epochs_run,
            "train_seconds": peer_seconds,
        }
        if "ours_covisit" in payload:
            # The peer gets the same side scores, fitted the same way on its own scores.
            with_aff = ours_aff is not None and ours_aff.weight > 0
            peer_fit = fit_covisit(
                peer,
                split,
                log_,
                len(vocab),
                max_len=max_len,
                affinity=aff_base if with_aff else None,
                affinity_grid=AFFINITY_GRID if with_aff else (),
                exclude_history=filter_seen,
            )
            payload["peer_covisit"] = _covisit_rows(
                "SASRec (peer)",
                peer,
                peer_fit.table,
                split,
                log_,
                max_len,
                reports,
                peer_fit.affinity,
            )
            for proto, key in (("", "ratio"), (", history excluded", "ratio_history_excluded")):
                peer_alone = reports[f"SASRec (peer{', history excluded' if proto else ''})"]
                payload["ours_covisit"][key] = _ratios(  # type: ignore[index]
                    reports[f"ours + co-visitation (online{proto})"].metrics, peer_alone.metrics
                )
                ours_served = f"ours + co-visitation + affinity (online{proto})"
                if ours_served in reports:
                    payload["ours_covisit"][f"{key}_with_affinity"] = _ratios(  # type: ignore[index]
                        reports[ours_served].metrics, peer_alone.metrics
                    )
                    peer_served = f"SASRec (peer) + co-visitation + affinity (online{proto})"
                    if peer_served in reports:
                        payload["ours_covisit"][f"{key}_same_side_scores"] = _ratios(  # type: ignore[index]
                            reports[ours_served].metrics, reports[peer_served].metrics
                        )
        payload["ratio_ours_over_peer"] = _ratios(reports["ours"].metrics, peer_metrics)
        payload["ratio_ours_over_peer_history_excluded"] = _ratios(
            reports["ours (history excluded)"].metrics, peer_excl
        )
    payload["wall_seconds"] = round(time.perf_counter() - t0, 1)
    print_reports(reports, console)
    console.print(payload.get("ratio_ours_over_peer", {}), payload["speed"])
    write_json(payload, json_out)
    console.print(f"wrote {json_out}")


if __name__ == "__main__":
    typer.run(main)
