"""``streamrec bench stream``: sustained throughput and end-to-end latency through the real
broker, next to a passthrough reference measured in the same run (same Faust machinery and
batching, no decoding, state or model), plus a batch-size sweep.

Latency is measured where a consumer would see it: the time a slate arrives on the
recommendations topic minus the event's ``ts``, which the replayer stamps at send time.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from serving.synthetic import make_shop, write_jsonl
from streamrec.demo import _train
from streamrec.kafka_local import LocalKafka
from streamrec.procs import WorkerProcess, free_port
from streamrec.replay import (
    OutputCollector,
    event_records,
    handled,
    make_producer,
    metric_sum,
    produce_records,
    scrape_metrics,
    write_json,
)
from streamrec.settings import Settings
from streamrec.topics import design_topics, ensure_topics


def _one_run(
    settings: Settings,
    events: list[dict[str, Any]],
    workdir: Path,
    label: str,
    passthrough: bool,
    items: list[dict[str, Any]],
    rate: float | None = None,
) -> dict[str, Any]:
    """Fresh topics and app id, a worker, a replay at full speed (or ``rate`` events/s);
    returns figures and sums."""
    tag = f"{label}-{time.strftime('%H%M%S')}"
    s = settings.model_copy(
        update={
            "app_id": f"bench-{tag}",
            "topic_events": f"bench.{tag}.events",
            "topic_items": f"bench.{tag}.items",
            "topic_recommendations": f"bench.{tag}.recs",
            "topic_dlq": f"bench.{tag}.dlq",
            "topic_control": f"bench.{tag}.control",
            "data_dir": workdir / tag,
            "metrics_port": free_port(),
        }
    )
    ensure_topics(s, design_topics(s))
    producer = make_producer(s)
    if items:
        produce_records(
            producer,
            s.topic_items,
            [(i["item_id"].encode(), json.dumps(i).encode()) for i in items],
        )
    worker = WorkerProcess(s, workdir / f"{tag}.log", passthrough=passthrough)
    with worker, OutputCollector(s) as collector:
        # Warm-up: a few events so partition assignment and first-batch costs are excluded.
        warm = [{**e, "event_id": f"warm-{i}-{e['event_id']}"} for i, e in enumerate(events[:200])]
        produce_records(producer, s.topic_events, event_records(warm))
        _wait_for(collector, len(warm) if passthrough else 1, 60)
        time.sleep(1.0)
        base = collector.snapshot()
        base_metrics = scrape_metrics(worker.metrics_url)
        pid = worker.proc.pid if worker.proc is not None else None
        cpu0 = _cpu_seconds(pid)
        t0 = time.time()
        sent = produce_records(producer, s.topic_events, event_records(events), rate=rate)
        deadline = time.time() + 180
        while time.time() < deadline:
            m = scrape_metrics(worker.metrics_url)
            done = (
                metric_sum(m, "streamrec_recommendations_produced_total")
                - metric_sum(base_metrics, "streamrec_recommendations_produced_total")
                if passthrough
                else handled(m) - handled(base_metrics)
            )
            if done >= sent:
                break
            # Scrapes cost the worker CPU (the exposition holds the GIL): poll at 1 Hz; the
            # figures come from slate arrival times, not from when this loop notices.
            time.sleep(1.0)
        cpu1 = _cpu_seconds(pid)
        load = os.getloadavg()[0]
        time.sleep(1.0)
        got = collector.snapshot()
        metrics = scrape_metrics(worker.metrics_url)
    received = got.recommendations - base.recommendations
    lat = got.latencies_ms[len(base.latencies_ms) :]
    end = got.last_at or time.time()
    seconds = max(1e-9, end - t0)
    import numpy as np

    arr = np.asarray(lat) if lat else np.asarray([np.nan])
    result: dict[str, Any] = {
        "label": label,
        "batch_size": s.batch_size,
        # Offered load (events/s) of a paced replay; None: full speed.
        "offered_rate": rate,
        "events": sent,
        "received": received,
        "seconds": round(seconds, 3),
        "events_per_s": round(sent / seconds, 1),
        # Worker process CPU (user + system, all threads) per event over the replay: less
        # sensitive than events/s to other load on a shared machine.
        "worker_cpu_ms_per_event": (
            round((cpu1 - cpu0) / sent * 1000, 4) if cpu0 is not None and cpu1 is not None else None
        ),
        # The machine's 1-minute load average at the end of the replay (shared machines).
        "load_avg_1m": round(load, 2),
        "latency_ms": {
            "p50": float(np.percentile(arr, 50)),
            "p99": float(np.percentile(arr, 99)),
            "p999": float(np.percentile(arr, 99.9)),
            "max": float(np.max(arr)),
        },
    }
    if not passthrough:
        accepted = metric_sum(metrics, "streamrec_events_consumed_total") - metric_sum(
            base_metrics, "streamrec_events_consumed_total"
        )
        rejected = metric_sum(metrics, "streamrec_events_rejected_total") - metric_sum(
            base_metrics, "streamrec_events_rejected_total"
        )
        dups = metrics.get("streamrec_events_duplicate_total", 0.0) - base_metrics.get(
            "streamrec_events_duplicate_total", 0.0
        )
        produced = metrics.get("streamrec_recommendations_produced_total", 0.0) - base_metrics.get(
            "streamrec_recommendations_produced_total", 0.0
        )
        coalesced = metrics.get(
            "streamrec_recommendations_coalesced_total", 0.0
        ) - base_metrics.get("streamrec_recommendations_coalesced_total", 0.0)
        dlq = got.dead_letters - base.dead_letters
        result["accounting"] = {
            "sent": sent,
            "accepted": accepted,
            "rejected": rejected,
            "duplicates": dups,
            "produced": produced,
            "coalesced": coalesced,
            "received_recommendations": received,
            "received_dlq": dlq,
            "ok": accepted + rejected + dups == sent
            and produced == accepted - coalesced
            and received == produced
            and dlq == rejected,
        }
        result["stage_seconds_mean"] = _stage_means(metrics)
    return result


def _cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU seconds of process ``pid`` so far (Linux ``/proc``), else None."""
    if pid is None:
        return None
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Fields after the parenthesised command name; utime and stime are the 12th and 13th.
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _stage_means(metrics: dict[str, float]) -> dict[str, float]:
    out: dict[str, float] = {}
    for key, value in metrics.items():
        if key.startswith("streamrec_stage_duration_seconds_sum{"):
            stage = key.split('stage="')[1].split('"')[0]
            count = metrics.get(key.replace("_sum{", "_count{"), 0.0)
            if count:
                out[stage] = round(value / count * 1000, 3)
    return out


def _wait_for(collector: OutputCollector, n: int, timeout_s: float) -> None:
    deadline = time.time() + timeout_s
    while collector.snapshot().recommendations < n:
        if time.time() > deadline:
            raise RuntimeError(f"bench: no output from the worker within {timeout_s:.0f} s")
        time.sleep(0.1)


def run_stream_bench(
    base: Settings,
    console: Console,
    *,
    n_events: int,
    json_out: Path,
    sweep: list[int],
    sweep_events: int,
    workdir: Path,
    reranker: bool = False,
    rates: list[float] | None = None,
    rate_seconds: float = 15.0,
) -> dict[str, Any]:
    """``reranker``: also run the full pipeline with a Transformer reranker trained on the
    same shop (its own encoder copy, ``workdir/model-rerank``) right after the run without
    one, and report the ratio of the two.

    ``rates``: paced runs, each offering that many events/s for ``rate_seconds``, the
    passthrough and then the full pipeline: latency under a load the worker may carry (a
    full-speed replay measures the backlog instead), and the highest offered rate the full
    pipeline served with p99 <= 100 ms."""
    workdir.mkdir(parents=True, exist_ok=True)
    kafka = LocalKafka.from_settings(base)
    was_running = kafka.status().running
    kafka.start()
    settings = base.model_copy(update={"kafka_bootstrap": kafka.bootstrap})
    try:
        shop = make_shop(
            n_items=2000, n_users=max(1000, n_events // 20), events_per_user=20, seed=3
        )
        model_dir = workdir / "model"
        train = workdir / "train.jsonl"
        if not train.exists():
            write_jsonl(shop.events[: min(len(shop.events), 60000)], train)
        if not (model_dir / "config.json").exists():
            _train(
                console,
                train,
                "events",
                model_dir,
                10,
                workdir / "train.log",
                ("--dim", "64", "--dropout", "0.1", "--patience", "3"),
            )
        rerank_dir = workdir / "model-rerank"
        if reranker and not (rerank_dir / "reranker.json").exists():
            shutil.rmtree(rerank_dir, ignore_errors=True)
            shutil.copytree(model_dir, rerank_dir)
            _train(
                console,
                train,
                "events",
                rerank_dir,
                5,
                workdir / "train-reranker.log",
                ("--prefixes", "5", "--patience", "2"),
                command="train-reranker",
            )
        settings = settings.model_copy(update={"model_dir": model_dir.resolve()})
        # Interleave users as live traffic would (make_shop lists them user by user).
        ordered = sorted(shop.events, key=lambda e: e["ts"])
        events = ordered[:n_events]
        console.print(f"passthrough reference: {len(events)} events...")
        ref = _one_run(settings, events, workdir, "passthrough", True, [])
        console.print(f"full pipeline: {len(events)} events...")
        full = _one_run(settings, events, workdir, "full", False, shop.items)
        reranked = None
        if reranker:
            console.print(f"full pipeline with the reranker: {len(events)} events...")
            s_rr = settings.model_copy(update={"model_dir": rerank_dir.resolve()})
            reranked = _one_run(s_rr, events, workdir, "full-rerank", False, shop.items)
        paced: list[dict[str, Any]] = []
        for rate in rates or []:
            n = max(1, int(rate * rate_seconds))
            console.print(f"paced: {rate:g} events/s for {n / rate:.0f} s...")
            pair: dict[str, Any] = {"offered_rate": rate, "events": n}
            for name, through in (("passthrough", True), ("full", False)):
                pair[name] = _one_run(
                    settings,
                    ordered[:n],
                    workdir,
                    f"{name}-r{rate:g}",
                    through,
                    [] if through else shop.items,
                    rate=rate,
                )
            paced.append(pair)
        runs = []
        for size in sweep:
            console.print(f"sweep: batch size {size}...")
            s = settings.model_copy(update={"batch_size": size})
            runs.append(_one_run(s, ordered[:sweep_events], workdir, f"b{size}", False, shop.items))
    finally:
        if not was_running:
            kafka.stop()
    extra = [reranked] if reranked is not None else []
    report: dict[str, Any] = {
        "machine": _machine(),
        "passthrough": ref,
        "full": full,
        "ratio_full_to_passthrough": round(full["events_per_s"] / ref["events_per_s"], 3),
        "cpu_ratio_full_to_passthrough": (
            round(full["worker_cpu_ms_per_event"] / ref["worker_cpu_ms_per_event"], 3)
            if full["worker_cpu_ms_per_event"] and ref["worker_cpu_ms_per_event"]
            else None
        ),
        "sweep": runs,
        "paced": paced,
        # The highest offered rate whose full-pipeline run kept up (>= 95% of it) with p99 <=
        # 100 ms; None when no paced run did (or none ran).
        "sustained_rate_p99_le_100ms": _sustained(paced, 100.0),
        "accounting": {
            "ok": all(
                r["accounting"]["ok"] for r in [full, *extra, *runs, *(p["full"] for p in paced)]
            ),
            "full": full["accounting"],
        },
        "targets": {
            "events_per_s>=5000": full["events_per_s"] >= 5000,
            # Latency is judged on the paced runs: a full-speed replay measures its backlog.
            "p99_ms<=100_at_5000_per_s": (_sustained(paced, 100.0) or 0) >= 5000,
            "ratio>=0.5": full["events_per_s"] / ref["events_per_s"] >= 0.5,
        },
    }
    if reranked is not None:
        report["full_rerank"] = reranked
        report["ratio_rerank_to_full"] = round(reranked["events_per_s"] / full["events_per_s"], 3)
        report["accounting"]["full_rerank"] = reranked["accounting"]
        report["targets"]["rerank_events_per_s>=5000"] = reranked["events_per_s"] >= 5000
        report["targets"]["rerank_p99_ms<=100"] = reranked["latency_ms"]["p99"] <= 100
    write_json(json_out, report)
    if runs:
        _plot_sweep(runs, json_out.with_suffix(".png"))
    if paced:
        _plot_paced(paced, json_out.with_name(json_out.stem + "-paced.png"))
    table = Table(title="stream benchmark")
    for col in ("run", "batch", "offered/s", "events/s", "p50 ms", "p99 ms", "p99.9 ms"):
        table.add_column(col, justify="right")
    for r in [ref, full, *extra, *runs, *(p[k] for p in paced for k in ("passthrough", "full"))]:
        lat = r["latency_ms"]
        table.add_row(
            r["label"],
            str(r["batch_size"]),
            "max" if r["offered_rate"] is None else f"{r['offered_rate']:g}",
            f"{r['events_per_s']:.0f}",
            f"{lat['p50']:.1f}",
            f"{lat['p99']:.1f}",
            f"{lat['p999']:.1f}",
        )
    console.print(table)
    console.print(
        f"full/passthrough throughput ratio: {report['ratio_full_to_passthrough']:.2f}; "
        f"accounting ok: {report['accounting']['ok']}; report: {json_out}"
    )
    if paced:
        best = report["sustained_rate_p99_le_100ms"]
        console.print(
            "highest paced rate served with p99 <= 100 ms: "
            + (f"{best:g} events/s" if best is not None else "none of the rates tried")
        )
    if reranked is not None:
        stages = reranked.get("stage_seconds_mean", {})
        console.print(
            f"with the reranker / without: {report['ratio_rerank_to_full']:.2f} of the "
            f"throughput; rerank stage {stages.get('rerank', float('nan')):.1f} ms per batch "
            f"(without: {full.get('stage_seconds_mean', {}).get('rerank', float('nan')):.1f})"
        )
    return report


def _machine() -> dict[str, Any]:
    import platform

    return {"cpus": os.cpu_count(), "platform": platform.platform()}


def _sustained(paced: list[dict[str, Any]], p99_ms: float) -> float | None:
    ok = [
        p["offered_rate"]
        for p in paced
        if p["full"]["latency_ms"]["p99"] <= p99_ms
        and p["full"]["events_per_s"] >= 0.95 * p["offered_rate"]
    ]
    return max(ok) if ok else None


def _plot_paced(paced: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [p["offered_rate"] for p in paced]
    for name, style in (("full", "-"), ("passthrough", "--")):
        for q, marker in (("p50", "o"), ("p99", "s")):
            ax.plot(
                xs,
                [p[name]["latency_ms"][q] for p in paced],
                linestyle=style,
                marker=marker,
                label=f"{name} {q}",
            )
    ax.axhline(100, color="red", linewidth=0.8, label="100 ms SLO")
    ax.set_yscale("log")
    ax.set_xlabel("offered events/s")
    ax.set_ylabel("end-to-end latency (ms)")
    ax.set_title("streamrec: latency under a paced load")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_sweep(runs: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [r["events_per_s"] for r in runs]
    ys = [r["latency_ms"]["p99"] for r in runs]
    ax.plot(xs, ys, "o-")
    for r, x, y in zip(runs, xs, ys, strict=True):
        ax.annotate(f"batch {r['batch_size']}", (x, y), textcoords="offset points", xytext=(5, 5))
    ax.set_xlabel("sustained events/s")
    ax.set_ylabel("p99 end-to-end latency (ms)")
    ax.set_title("streamrec: throughput vs p99 by micro-batch size")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
