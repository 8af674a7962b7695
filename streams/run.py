"""Process entry point of a stream worker: metrics server, model, catalog feed, Faust worker."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import faust
from prometheus_client import CollectorRegistry, disable_created_metrics, start_http_server

from serving.service import Recommender
from streamrec.metrics import Metrics
from streamrec.settings import Settings
from streams.app import StreamWorker
from streams.feeds import CatalogFeed, ControlFeed

log = logging.getLogger("streamrec.worker")


class WorkerConfigError(RuntimeError):
    """The worker cannot start with this configuration (message says what to change)."""


def build_worker(
    settings: Settings, registry: CollectorRegistry | None = None, passthrough: bool = False
) -> StreamWorker:
    """Everything but the event loop: metrics, model, index, catalog and control feeds."""
    registry = registry if registry is not None else CollectorRegistry()
    metrics = Metrics.create(registry)
    if passthrough:
        return StreamWorker(settings, None, metrics, passthrough=True)
    if settings.model_dir is None:
        raise WorkerConfigError(
            "no model: set STREAMREC_MODEL_DIR to a directory written by `streamrec train` "
            "(or run `streamrec demo`, which trains a small one)"
        )
    import torch

    # Leave a core to the event loop (decode, tables, sends) unless told otherwise.
    threads = settings.torch_threads or max(1, min(4, (os.cpu_count() or 2) - 1))
    torch.set_num_threads(threads)
    import faiss
    from threadpoolctl import threadpool_limits

    # Searches run batched from the one model thread; OpenMP fan-out on top of torch's
    # threads only oversubscribes the cores.
    faiss.omp_set_num_threads(threads)
    # numpy's own OpenBLAS (the batched search and MMR products) starts one spinning thread
    # per core by default: next to the event loop that tripled the model stages' wall time
    # and slowed the loop too (docs/bench-stream.md). Same cap as torch's.
    threadpool_limits(limits=threads, user_api="blas")
    recommender = Recommender.load(settings, metrics)
    worker = StreamWorker(settings, recommender, metrics)
    worker.feeds = [
        CatalogFeed(settings, recommender, metrics),
        ControlFeed(settings, recommender, metrics),
    ]
    return worker


#: Written into the data dir when a worker stops cleanly; removed when one starts.
CLEAN_STOP_MARK = "clean-stop"


def discard_unclean_table_state(settings: Settings, tabledir: Path) -> bool:
    """Drop the local table store unless the last worker here stopped cleanly.

    The local store (RocksDB) is written as a batch is processed, ahead of the changelog:
    under exactly-once before the batch's transaction commits, under at-least-once before
    the broker has the batch's slates (the changelog records wait for them). After a crash it
    can hold session writes whose slates never reached Kafka; their redelivered events would
    be taken for duplicates and never answered. Kafka Streams wipes its local state after an
    unclean stop under exactly-once; we do under both guarantees, and the table is rebuilt
    from the changelog (read committed under exactly-once). Returns True when something was
    dropped.
    """
    mark = settings.data_dir / CLEAN_STOP_MARK
    clean = mark.exists()
    mark.unlink(missing_ok=True)
    if clean or not tabledir.exists():
        return False
    log.warning(
        "the last worker on %s did not stop cleanly; dropping its local table state (%s), "
        "to be rebuilt from the changelog",
        settings.data_dir,
        tabledir,
    )
    shutil.rmtree(tabledir)
    return True


def run_worker(settings: Settings, passthrough: bool = False) -> None:
    """Run a worker until SIGINT/SIGTERM."""
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    os.makedirs(settings.data_dir, exist_ok=True)
    # ``*_created`` series double the exposition and no dashboard uses them.
    disable_created_metrics()
    registry = CollectorRegistry()
    worker = build_worker(settings, registry, passthrough=passthrough)
    start_http_server(settings.metrics_port, addr=settings.metrics_host, registry=registry)
    if worker.recommender is not None:
        log.info(
            "metrics on http://%s:%d/metrics; model %s; %d items indexed",
            settings.metrics_host,
            settings.metrics_port,
            worker.recommender.model_version,
            worker.recommender.index_size,
        )
    discard_unclean_table_state(settings, Path(worker.app.conf.tabledir))
    for feed in worker.feeds:
        feed.start()
    try:
        faust.Worker(
            worker.app,
            loglevel=settings.log_level,
            quiet=True,
            redirect_stdouts=False,
        ).execute_from_commandline()
    except SystemExit as exc:
        # mode exits 0 after a signal-driven stop; a crashed app (``_crashed``, mode's only
        # record of it) may have left uncommitted writes in the local store.
        if exc.code in (0, None) and not worker.app._crashed.is_set():
            (settings.data_dir / CLEAN_STOP_MARK).touch()
        raise
    finally:
        for feed in worker.feeds:
            feed.stop()
        worker.executor.shutdown(wait=False)
        if worker.recommender is not None:
            # The counts served since the last periodic save; read back on the next start.
            worker.recommender.save_covisit(wait=True)
