"""The recommender a worker serves: model + index + catalog + pipeline, swappable at runtime.

Transport-free. The Faust agent calls ``recommend`` from one model thread; the catalog feed
calls ``upsert_item``/``delete_item`` and the control feed ``swap_model`` from their threads.
Mutations take one lock; ``recommend`` reads the current pipeline reference (swapped
atomically), so a model swap never blocks or mixes versions within a batch.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from schemas.models import Item
from serving.artifacts import LoadedEncoder, load_model
from serving.catalog import Catalog, ItemMeta
from serving.covisit import FILE as COVISIT_FILE
from serving.covisit import CoVisitation, CoVisitError
from serving.pipeline import FreshItems, Pipeline, Reranker, Slate, SlateRequest
from serving.reranker import load_reranker
from serving.text import ColdStart
from serving.types import Step
from streamrec.metrics import Metrics
from streamrec.settings import Settings

log = logging.getLogger("streamrec.service")
#: Model versions whose saved co-visitation counts are kept in ``data_dir/covisit``.
COVISIT_VERSIONS_KEPT = 3


class Recommender:
    """Serves slates for batches of user histories and follows catalog and model changes."""

    def __init__(
        self,
        encoder: LoadedEncoder,
        settings: Settings,
        metrics: Metrics | None = None,
        cold_start: ColdStart | None = None,
        reranker: Reranker | None = None,
    ) -> None:
        """cold_start: text-projected vectors for catalog items the encoder never saw; without
        it such items are known (their events are accepted) but not retrievable."""
        self.settings = settings
        self.metrics = metrics
        self.catalog = Catalog()
        self.cold_start = cold_start
        self.reranker = reranker
        # Catalog items the model has no embedding for, kept to re-embed after a model swap.
        self._cold_items: dict[str, Item] = {}
        self._lock = threading.Lock()
        self._model_dir: str | None = None
        self._saved_at = time.monotonic()
        self._saving: threading.Thread | None = None
        self._pipeline = self._build(encoder)
        self._set_vocab(encoder)
        self._publish_info()

    def _set_vocab(self, encoder: LoadedEncoder) -> None:
        self._encoder = encoder
        self._row_of = {item: i for i, item in enumerate(encoder.item_ids())}
        self._vectors = np.asarray(encoder.item_vectors(), dtype=np.float32)

    @classmethod
    def load(cls, settings: Settings, metrics: Metrics | None = None) -> Recommender:
        if settings.model_dir is None:
            raise ValueError("recommender: expected settings.model_dir, got None")
        cold_start = ColdStart.load(settings.model_dir)
        if cold_start is not None:
            # Load the sentence encoder now, not on the first new item: that item must be
            # retrievable within a second of its publication.
            cold_start.text_encoder.encode(["warm-up"])
        rec = cls(
            load_model(settings.model_dir, cache_users=settings.encoder_cache_users),
            settings,
            metrics,
            cold_start,
            load_reranker(settings.model_dir),
        )
        rec._model_dir = str(Path(settings.model_dir).resolve())
        return rec

    # --- building -----------------------------------------------------------------------
    def _on_stage(self, name: str, seconds: float) -> None:
        if self.metrics is not None:
            self.metrics.stage_duration.labels(stage=name).observe(seconds)

    def _build(self, encoder: LoadedEncoder) -> Pipeline:
        fresh = FreshItems(encoder.dim)
        pipeline = Pipeline.from_settings(
            encoder,
            self.catalog,
            self.settings,
            on_stage=self._on_stage,
            fresh=fresh,
            fresh_slots=self.settings.fresh_slots,
            reranker=self.reranker,
        )
        affinity = pipeline.covisit.affinity
        log.info(
            "slate ordering %s, diversity %g (%s); co-visitation %s; attribute affinity %s; %s",
            pipeline.order.ordering,
            pipeline.order.diversity,
            pipeline.diversity_source,
            f"weight {pipeline.covisit.weight:g}, {len(pipeline.covisit.table):,} pairs"
            if pipeline.covisit.table is not None
            else "off",
            f"weight {affinity.weight:g}" if affinity is not None else "off",
            "no reranker"
            if self.reranker is None
            else f"reranker {getattr(self.reranker, 'version', '?')} scores the top "
            f"{pipeline.rerank.top or self.settings.candidates} candidates",
        )
        fitted = getattr(encoder, "config", {}).get("covisit_fit")
        history = fitted.get("validation_history") if isinstance(fitted, dict) else None
        if history == "excluded" and not self.settings.filter_seen:
            log.warning(
                "the co-visitation and affinity weights of %s were chosen for a worker that "
                "filters seen items (streamrec train --filter-seen); this one keeps them: set "
                "STREAMREC_FILTER_SEEN=1",
                encoder.version,
            )
        self._restore_covisit(pipeline)
        # Items the catalog already retired or marked unavailable stay out of the new index.
        blocked = [i for i in encoder.item_ids() if not self.catalog.is_available([i])[0]]
        if blocked:
            pipeline.index.remove(blocked)
        known = set(encoder.item_ids())
        cold = [i for i in self._cold_items.values() if i.item_id not in known and i.available]
        if cold:
            vectors, ok = self._cold_vectors(encoder, cold)
            embedded = [item for item, good in zip(cold, ok, strict=True) if good]
            if embedded:
                pipeline.index.upsert([i.item_id for i in embedded], vectors[ok])
                for item, vector in zip(embedded, vectors[ok], strict=True):
                    fresh.put(item.item_id, vector)
        return pipeline

    def _cold_vectors(
        self, encoder: LoadedEncoder, items: Sequence[Item]
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(n, D)`` vectors for items the model has no ID row for, and ``(n,) bool`` which
        got one: projected from their text (cold start) when a projection is fitted, else the
        model's own embedding of their categories (a model trained with item attributes)."""
        if self.cold_start is not None:
            return self.cold_start.vectors_for(items), np.ones(len(items), dtype=bool)
        return encoder.attribute_vectors([i.categories for i in items])

    def _publish_info(self) -> None:
        if self.metrics is None:
            return
        self.metrics.model_info.clear()
        # The label carries the index version at model load (a build), not every mutation:
        # a label that changed per catalog update would churn series.
        self.metrics.model_info.labels(
            model_version=self.model_version, index_version=self.index_version
        ).set(1)
        self.metrics.index_items.set(self.index_size)

    # --- read side ----------------------------------------------------------------------
    @property
    def model_version(self) -> str:
        return self._pipeline.encoder.version

    @property
    def index_version(self) -> str:
        return self._pipeline.index.version

    @property
    def index_size(self) -> int:
        return len(self._pipeline.index)

    def knows_item(self, item_id: str) -> bool:
        """An item is known if the model has an embedding for it or the catalog lists it."""
        return item_id in self._row_of or item_id in self.catalog

    def recommend(
        self, histories: Sequence[tuple[str, Sequence[Step]] | tuple[str, Sequence[Step], int]]
    ) -> list[Slate]:
        """One slate per ``(user_id, history[, events ever])``, in order. Runs in the model
        thread. The event count lets the encoder cache extend a user's window step by step."""
        pipeline = self._pipeline  # one version for the whole batch
        cache = getattr(pipeline.encoder, "cache", None)
        before = (cache.hits, cache.misses) if cache is not None else (0, 0)
        slates = pipeline.recommend([SlateRequest(*h) for h in histories])
        if cache is not None and self.metrics is not None:
            lookups = self.metrics.encoder_cache_lookups
            lookups.labels(result="hit").inc(cache.hits - before[0])
            lookups.labels(result="miss").inc(cache.misses - before[1])
            self.metrics.encoder_cache_users.set(len(cache))
        table = pipeline.covisit.table
        if self.metrics is not None:
            self.metrics.covisit_pairs.set(len(table) if table is not None else 0)
        every = self.settings.covisit_snapshot_s
        if table is not None and every > 0 and time.monotonic() - self._saved_at >= every:
            self.save_covisit(pipeline)
        return slates

    # --- co-visitation counts across restarts --------------------------------------------
    def covisit_path(self, version: str) -> Path:
        """Where the counts of model ``version`` are saved: one file per model version, so a
        worker never reads counts made over another vocabulary."""
        return Path(self.settings.data_dir) / "covisit" / version / COVISIT_FILE

    def save_covisit(self, pipeline: Pipeline | None = None, *, wait: bool = False) -> Path | None:
        """Save the table's merged counts on a background thread, one save at a time: a save
        still running skips this one, unless ``wait`` (then it waits for it, saves, and
        returns once the file is written)."""
        pipeline = pipeline or self._pipeline
        table = pipeline.covisit.table
        if table is None:
            return None
        if self._saving is not None and self._saving.is_alive():
            if not wait:
                return None
            self._saving.join()
        self._saved_at = time.monotonic()
        path = self.covisit_path(pipeline.encoder.version)
        write = table.snapshot()

        def run() -> None:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                write(path)
                # Counts of older model versions: keep the few newest (a swap back finds its
                # own), drop the rest so model swaps do not fill the disk.
                versions = sorted(
                    (d for d in path.parent.parent.iterdir() if d.is_dir()),
                    key=lambda d: d.stat().st_mtime,
                    reverse=True,
                )
                for old in versions[COVISIT_VERSIONS_KEPT:]:
                    shutil.rmtree(old, ignore_errors=True)
            except OSError as exc:  # a full or read-only disk must not stop the worker
                log.warning("co-visitation counts not saved to %s: %s", path, exc)

        self._saving = threading.Thread(target=run, name="covisit-save", daemon=True)
        self._saving.start()
        if wait:
            self._saving.join()
        return path

    def _restore_covisit(self, pipeline: Pipeline) -> None:
        """Replace the trained table with the counts saved for this model version, if any,
        read with the weight this pipeline uses."""
        table = pipeline.covisit.table
        path = self.covisit_path(pipeline.encoder.version)
        if table is None or not path.is_file():
            return
        try:
            saved = CoVisitation.load(path.parent, table.config.to_dict())
        except CoVisitError as exc:
            log.warning("co-visitation: saved counts ignored, starting from the trained: %s", exc)
            return
        if saved is None or saved.num_items != table.num_items:
            log.warning(
                "co-visitation: saved counts in %s are over %s items, the model has %d; "
                "starting from the trained ones",
                path,
                "no" if saved is None else saved.num_items,
                table.num_items,
            )
            return
        pipeline.covisit.table = saved.with_weight(table.config.weight)
        log.info(
            "co-visitation: %s pairs restored from %s (the trained table had %s)",
            f"{len(saved):,}",
            path,
            f"{len(table):,}",
        )

    # --- catalog ------------------------------------------------------------------------
    def upsert_item(self, item: Item) -> None:
        meta = ItemMeta(
            available=item.available,
            price=item.price,
            categories=tuple(item.categories),
            title=item.title,
        )
        with self._lock:
            self.catalog.upsert(item.item_id, meta)
            pipeline = self._pipeline
            index = pipeline.index
            if not item.available:
                index.remove([item.item_id])
                self._fresh(pipeline).remove(item.item_id)
                return
            if index.contains(item.item_id):
                return
            vector = self._vector_for(pipeline, item)
            if vector is not None:
                index.upsert([item.item_id], vector[None, :])
                if item.item_id not in self._row_of:
                    self._fresh(pipeline).put(item.item_id, vector)

    @staticmethod
    def _fresh(pipeline: Pipeline) -> FreshItems:
        assert pipeline.fresh is not None  # every pipeline we build has one
        return pipeline.fresh

    def _vector_for(self, pipeline: Pipeline, item: Item) -> np.ndarray | None:
        """The embedding for an item that is not in the index: the model's own when it has
        one (the item was retired and came back), else one projected from its text (cold
        start), else the model's own embedding of its categories (a model trained with item
        attributes), else None (known but not retrievable until the next model)."""
        row = self._row_of.get(item.item_id)
        if row is not None:
            return self._vectors[row]
        self._cold_items[item.item_id] = item
        vectors, ok = self._cold_vectors(self._encoder, [item])
        return vectors[0] if ok[0] else None

    def delete_item(self, item_id: str) -> None:
        with self._lock:
            self._cold_items.pop(item_id, None)
            self.catalog.delete(item_id)
            self._pipeline.index.remove([item_id])
            self._fresh(self._pipeline).remove(item_id)

    # --- models -------------------------------------------------------------------------
    def swap_model(self, model_dir: str | Path) -> bool:
        """Load ``model_dir`` and serve it from the next batch on. Returns False if it is the
        model already serving (same version)."""
        encoder = load_model(model_dir, cache_users=self.settings.encoder_cache_users)
        if encoder.version == self.model_version:
            return False
        cold_start = ColdStart.load(model_dir)
        reranker = load_reranker(model_dir)
        with self._lock:
            self.cold_start = cold_start
            self.reranker = reranker
            pipeline = self._build(encoder)
            self._set_vocab(encoder)
            self._pipeline = pipeline
            self._model_dir = str(Path(model_dir).resolve())
        self._publish_info()
        log.info("model swapped to %s (%d items)", encoder.version, len(pipeline.index))
        return True
