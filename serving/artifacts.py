"""Encoder artifacts: ``model.safetensors`` + ``config.json`` + ``items.json``; never pickle.

``load_model`` returns a :class:`LoadedEncoder`, which satisfies ``serving.types.UserEncoder``:
the stream worker uses the model only through that protocol.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from serving.affinity import Affinity, AffinityConfig
from serving.calibration import slate_weight_of, temperature_of
from serving.covisit import CoVisitation, CoVisitError
from serving.data import Features, ItemVocab, gap_bucket, sequence_features
from serving.encoder import EncoderConfig, Past, SequenceEncoder, collate
from serving.train import resolve_device
from serving.types import EVENT_TYPE_ID, History, Step, step_items

STAGE = "artifacts"
WEIGHTS, CONFIG, ITEMS = "model.safetensors", "config.json", "items.json"
ATTRIBUTES = "attributes.json"  # attribute names of a model with item attributes
FORMAT_VERSION = 2  # 2: EncoderConfig.positions (version 1 artifacts count from the newest)


class ArtifactError(RuntimeError):
    """A model directory is missing a file or holds one that cannot be read."""


def save_model(
    model: SequenceEncoder,
    directory: Path | str,
    item_ids: Sequence[str],
    *,
    dataset: str = "",
    metrics: Mapping[str, object] | None = None,
    train: Mapping[str, object] | None = None,
    attributes: Sequence[str] = (),
) -> str:
    """Write the artifact files into ``directory``; returns the version id.

    ``attributes``: the names of a model's item attributes (index i + 1 = names[i]), so new
    catalog items can be embedded from their categories (``LoadedEncoder.attribute_vectors``).

    The version is the first 12 hex digits of the weights' sha256 plus a UTC timestamp, so
    identical weights are recognisable and two saves never collide silently.
    """
    if len(item_ids) != model.cfg.num_items:
        raise ArtifactError(
            f"{STAGE}: expected {model.cfg.num_items} item ids for the model, got {len(item_ids)}"
        )
    if attributes and len(attributes) != model.cfg.num_attrs:
        raise ArtifactError(
            f"{STAGE}: expected {model.cfg.num_attrs} attribute names for the model, "
            f"got {len(attributes)}"
        )
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(out / WEIGHTS))
    digest = hashlib.sha256((out / WEIGHTS).read_bytes()).hexdigest()[:12]
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    version = f"enc-{digest}-{stamp}"
    config = {
        "format_version": FORMAT_VERSION,
        "version": version,
        "created_at": datetime.now(UTC).isoformat(),
        "dataset": dataset,
        "model": model.cfg.to_dict(),
        "train": dict(train or {}),
        "metrics": dict(metrics or {}),
        "weights_sha256_12": digest,
    }
    (out / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (out / ITEMS).write_text(json.dumps(list(item_ids)) + "\n")
    if attributes:
        (out / ATTRIBUTES).write_text(json.dumps(list(attributes)) + "\n")
    return version


def _read_json(path: Path) -> object:
    if not path.is_file():
        raise ArtifactError(f"{STAGE}: expected {path.name} in {path.parent}, found no such file")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{STAGE}: expected valid JSON in {path}, got: {exc}") from exc


@dataclass(frozen=True, slots=True)
class _Cached:
    """One user's encoded window.

    ``steps`` history steps went in, ``first`` and ``last`` of them are how a continuation is
    recognised (the worker's windows only ever grow by appending); ``known`` of them were
    model inputs, the newest at ``last_ts``. ``kv (L, 2, H, max_len, D / H) float32`` holds
    every block's keys/values, ``[..., :known, :]`` filled; ``vector (D,)`` the user vector.
    """

    steps: int
    first: tuple[str, int, int]  # (item, type id, ts) of a step: ``_step_key``
    last: tuple[str, int, int]
    known: int
    last_ts: int
    kv: np.ndarray
    vector: np.ndarray

    def continued_by(self, history: Sequence[Step]) -> bool:
        n = self.steps
        return (
            len(history) >= n
            and _step_key(history, 0) == self.first
            and _step_key(history, n - 1) == self.last
        )


def _step_key(history: Sequence[Step], j: int) -> tuple[str, int, int]:
    """Step ``j`` of ``history`` as ``(item, type id, ts)``; read from a :class:`History`'s
    columns without building a ``Step`` (the cache checks two per user per batch)."""
    if isinstance(history, History):
        return history.items[j], history.type_ids[j], history.ts_ms[j]
    s = history[j]
    return s.item, EVENT_TYPE_ID.get(s.type, 0), s.ts_ms


class EncoderCache:
    """Per-user encoder state, least recently used evicted past ``capacity`` users.

    Memory: ``8 * layers * dim * max_len`` bytes per user (51 KB for the default dim 64,
    2 layers, 50 steps); a miss only costs a full re-encode, never a different result.
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"{STAGE}: expected cache capacity >= 1, got {capacity}")
        self.capacity = capacity
        self._users: OrderedDict[str, _Cached] = OrderedDict()
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._users)

    def get(self, key: str) -> _Cached | None:
        entry = self._users.get(key)
        if entry is not None:
            self._users.move_to_end(key)
        return entry

    def put(self, key: str, entry: _Cached) -> None:
        self._users[key] = entry
        self._users.move_to_end(key)
        while len(self._users) > self.capacity:
            self._users.popitem(last=False)


class LoadedEncoder:
    """A trained encoder ready to serve: ``serving.types.UserEncoder``.

    ``cache_users > 0`` keeps that many users' keys/values (:class:`EncoderCache`), so
    :meth:`encode_users` costs one step per new event instead of the whole window; it needs
    a model with ``positions='oldest'`` and is ignored otherwise.
    """

    def __init__(
        self,
        model: SequenceEncoder,
        item_ids: Sequence[str],
        version: str,
        config: Mapping[str, object],
        device: torch.device,
        cache_users: int = 0,
    ) -> None:
        self.model = model.eval().to(device)
        self.vocab = ItemVocab(item_ids)
        self.config = dict(config)
        self.device = device
        self._version = version
        self._item_vectors: np.ndarray | None = None
        cacheable = cache_users > 0 and model.cfg.positions == "oldest"
        self.cache = EncoderCache(cache_users) if cacheable else None
        self.attribute_index: dict[str, int] = {}
        #: Item-to-item co-visitation counts stored with the model (``serving.covisit``).
        self.covisit: CoVisitation | None = None
        #: Attribute affinity with its fitted weight (``serving.affinity``).
        self.affinity: Affinity | None = None

    @property
    def version(self) -> str:
        return self._version

    @property
    def dim(self) -> int:
        return self.model.cfg.dim

    @property
    def temperature(self) -> float:
        """Calibrated temperature of the retrieval scores (``serving.calibration``; 1.0 when
        the artifact was never calibrated)."""
        return temperature_of(self.config)

    def slate_weight(self, ordering: str) -> float | None:
        """Diversity weight chosen on validation for ``ordering`` over the retrieval scores
        (``serving.calibration``); None when the artifact has none."""
        return slate_weight_of(self.config, ordering)

    @property
    def max_len(self) -> int:
        return self.model.cfg.max_len

    def item_ids(self) -> Sequence[str]:
        return self.vocab.ids

    def item_vectors(self) -> np.ndarray:
        """``(N, D) float32``; row i is ``item_ids()[i]``."""
        if self._item_vectors is None:
            table = self.model.item_table().detach()[1:]
            self._item_vectors = table.float().cpu().numpy().copy()
        return self._item_vectors

    @torch.inference_mode()
    def attribute_vectors(
        self, categories: Sequence[Sequence[str]]
    ) -> tuple[np.ndarray, np.ndarray]:
        """What the model's item table gives an item it has no ID row for: the mean
        embedding of its attributes the model knows. Returns ``(n, D) float32`` vectors and
        ``(n,) bool`` rows that had at least one known attribute (zeros elsewhere)."""
        out = np.zeros((len(categories), self.dim), dtype=np.float32)
        known = np.zeros(len(categories), dtype=bool)
        emb = self.model.attr_emb
        if emb is None or not self.attribute_index:
            return out, known
        table = emb.weight.detach().float().cpu().numpy()
        for r, names in enumerate(categories):
            rows = sorted({self.attribute_index[n] for n in names if n in self.attribute_index})
            if rows:
                out[r] = table[rows[: self.model.cfg.max_attrs]].mean(axis=0)
                known[r] = True
        return out, known

    def features(self, history: Sequence[Step]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """A history as ``(items, types, ts_ms)`` ``(n,) int64`` arrays (0 = unknown item)."""
        n = len(history)
        get = self.vocab.index.get
        if isinstance(history, History):  # the worker's columns: no Step per entry
            items = np.fromiter((get(i, 0) for i in history.items), np.int64, n)
            return (
                items,
                np.array(history.type_ids, dtype=np.int64).reshape(n),
                np.array(history.ts_ms, dtype=np.int64).reshape(n),
            )
        items = np.fromiter((get(s.item, 0) for s in history), np.int64, n)
        types = np.fromiter((EVENT_TYPE_ID.get(s.type, 0) for s in history), np.int64, n)
        ts = np.fromiter((s.ts_ms for s in history), np.int64, n)
        return items, types, ts

    def _model_inputs(self, history: Sequence[Step]) -> Features:
        items, types, ts = self.features(history)
        return sequence_features(items, types, ts, self.max_len)

    @torch.inference_mode()
    def encode(self, histories: Sequence[Sequence[Step]]) -> np.ndarray:
        """``(B, D) float32`` user vectors; steps on unknown items are skipped, the newest
        ``max_len`` known steps are used, and a history with no known item encodes to zeros
        (every item scores 0: the caller's popularity fallback decides)."""
        out = np.zeros((len(histories), self.dim), dtype=np.float32)
        feats, rows = [], []
        for b, history in enumerate(histories):
            f = self._model_inputs(history)
            if len(f):
                feats.append(f)
                rows.append(b)
        if feats:
            batch = collate(feats).to(self.device)
            out[rows] = self.model.user_vectors(batch).float().cpu().numpy()
        return out

    @torch.inference_mode()
    def encode_users(self, keys: Sequence[str], histories: Sequence[Sequence[Step]]) -> np.ndarray:
        """:meth:`encode` for users named by ``keys``, reusing and refreshing the cache.

        A user whose cached window the new history continues (same first step, the cached
        steps followed by new ones) costs only the new steps, from id lookup to the forward;
        anyone else is encoded in full. The result equals :meth:`encode` (parity tested).
        """
        if self.cache is None:
            return self.encode(histories)
        if len(keys) != len(histories):
            raise ValueError(
                f"{STAGE}: expected one key per history, got {len(keys)} and {len(histories)}"
            )
        out = np.zeros((len(histories), self.dim), dtype=np.float32)
        fresh: list[tuple[int, Features]] = []
        grow: list[tuple[int, Features, _Cached]] = []
        for b, (key, history) in enumerate(zip(keys, histories, strict=True)):
            entry = self.cache.get(key)
            if entry is not None and entry.continued_by(history):
                self.cache.hits += 1
                tail = self._tail(entry, history[entry.steps :])
                if len(tail) and entry.known + len(tail) <= self.max_len:
                    grow.append((b, tail, entry))
                    continue
                if not len(tail):  # nothing new the model knows: same vector
                    out[b] = entry.vector
                    if len(history) > entry.steps:
                        self.cache.put(key, self._moved(entry, history))
                    continue
            else:
                self.cache.misses += 1
            f = self._model_inputs(history)
            if len(f):
                fresh.append((b, f))
        if fresh:
            self._run(keys, histories, out, [(b, f, None) for b, f in fresh])
        if grow:
            self._run(keys, histories, out, grow)
        return out

    def _tail(self, entry: _Cached, steps: Sequence[Step]) -> Features:
        """Model inputs of ``steps`` appended to ``entry``'s window (gaps from its newest).

        Plain Python: a tail is one or two steps, where numpy's per-call cost dominates.
        """
        index = self.vocab.index
        items, types, gaps = [], [], []
        prev = entry.last_ts
        rows: Iterable[tuple[str, int, int]] = (
            zip(steps.items, steps.type_ids, steps.ts_ms, strict=True)
            if isinstance(steps, History)
            else ((s.item, EVENT_TYPE_ID.get(s.type, 0), s.ts_ms) for s in steps)
        )
        for item, type_id, ts in rows:
            i = index.get(item, 0)
            if i:
                items.append(i)
                types.append(type_id)
                gaps.append(gap_bucket(ts - prev))
                prev = ts
        return Features(*(np.array(x, dtype=np.int64) for x in (items, types, gaps)))

    @staticmethod
    def _moved(entry: _Cached, history: Sequence[Step]) -> _Cached:
        return replace(entry, steps=len(history), last=_step_key(history, len(history) - 1))

    def _run(
        self,
        keys: Sequence[str],
        histories: Sequence[Sequence[Step]],
        out: np.ndarray,
        rows: Sequence[tuple[int, Features, _Cached | None]],
    ) -> None:
        """One forward for ``rows``: all fresh windows, or all new steps of cached ones."""
        assert self.cache is not None
        cfg = self.model.cfg
        past: Past | None = None
        known = [e.known if e is not None else 0 for _, _, e in rows]
        width = max(known)
        if width:
            kv = np.stack([e.kv[..., :width, :] for _, _, e in rows if e is not None], axis=2)
            valid = np.arange(width)[None, :] < np.asarray(known)[:, None]  # (B, P)
            t = torch.from_numpy(kv).to(self.device)
            past = Past(
                tuple((t[i, 0], t[i, 1]) for i in range(cfg.layers)),
                torch.from_numpy(valid).to(self.device),
            )
        batch = collate([f for _, f, _ in rows]).to(self.device)
        vectors, own = self.model.extend(batch, past)
        vec = vectors.float().cpu().numpy()
        new_kv = torch.stack([torch.stack(pair) for pair in own]).float().cpu().numpy()
        t_new = new_kv.shape[4]
        vocab = self.vocab.index
        for r, (b, f, e) in enumerate(rows):
            k, start = len(f), known[r]
            if e is None:
                buf = np.zeros(
                    (cfg.layers, 2, cfg.heads, cfg.max_len, cfg.dim // cfg.heads), np.float32
                )
            else:
                # Appending after ``known`` leaves the entry's own steps untouched, so the
                # buffer is shared with the entry being replaced.
                buf = e.kv
            buf[..., start : start + k, :] = new_kv[:, :, r, :, t_new - k :]
            history = histories[b]
            out[b] = vec[r]
            n = len(history)
            last = _step_key(history, n - 1)
            last_ts = last[2]
            items = step_items(history)
            for j in range(n - 1, -1, -1):
                if items[j] in vocab:
                    last_ts = _step_key(history, j)[2]
                    break
            self.cache.put(
                keys[b],
                _Cached(
                    steps=n,
                    first=_step_key(history, 0),
                    last=last,
                    known=start + k,
                    last_ts=last_ts,
                    kv=buf,
                    vector=vec[r].copy(),
                ),
            )


def load_model(
    directory: Path | str, device: str | torch.device | None = None, cache_users: int = 0
) -> LoadedEncoder:
    """Load an artifact directory written by :func:`save_model`. Never unpickles.

    ``cache_users``: see :class:`LoadedEncoder` (the stream worker sets it).
    """
    path = Path(directory)
    if not path.is_dir():
        raise ArtifactError(f"{STAGE}: expected a model directory, found nothing at {path}")
    config = _read_json(path / CONFIG)
    items = _read_json(path / ITEMS)
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        raise ArtifactError(f"{STAGE}: expected {path / CONFIG} to hold a 'model' object")
    if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
        raise ArtifactError(f"{STAGE}: expected {path / ITEMS} to hold a list of item id strings")
    raw = dict(config["model"])
    if int(config.get("format_version", 1)) < 2:
        raw.setdefault("positions", "newest")
    try:
        cfg = EncoderConfig.from_dict(raw)
    except (TypeError, ValueError) as exc:
        raise ArtifactError(
            f"{STAGE}: expected valid model settings in {path / CONFIG}: {exc}"
        ) from exc
    if len(items) != cfg.num_items:
        raise ArtifactError(
            f"{STAGE}: expected {cfg.num_items} ids in {path / ITEMS}, got {len(items)}"
        )
    weights = path / WEIGHTS
    if not weights.is_file():
        raise ArtifactError(f"{STAGE}: expected {WEIGHTS} in {path}, found no such file")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ArtifactError(f"{STAGE}: expected readable safetensors in {weights}: {exc}") from exc
    model = SequenceEncoder(cfg)
    if cfg.max_attrs == 0:  # artifacts from before item attributes have no such buffer
        state.setdefault("item_attrs", torch.zeros(cfg.num_items + 1, 0, dtype=torch.int64))
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ArtifactError(
            f"{STAGE}: expected weights matching config.json in {weights}: {exc}"
        ) from exc
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    loaded = LoadedEncoder(model, items, str(config.get("version", "")), config, dev, cache_users)
    if cfg.num_attrs and (path / ATTRIBUTES).is_file():
        names = _read_json(path / ATTRIBUTES)
        if not isinstance(names, list) or len(names) != cfg.num_attrs:
            raise ArtifactError(
                f"{STAGE}: expected {cfg.num_attrs} attribute names in {path / ATTRIBUTES}"
            )
        loaded.attribute_index = {str(n): i + 1 for i, n in enumerate(names)}
    covisit = config.get("covisit")
    if isinstance(covisit, dict):
        try:
            loaded.covisit = CoVisitation.load(path, covisit)
        except CoVisitError as exc:
            raise ArtifactError(str(exc)) from exc
        if loaded.covisit is not None and loaded.covisit.num_items != cfg.num_items:
            raise ArtifactError(
                f"{STAGE}: expected a co-visitation table over the model's {cfg.num_items} "
                f"items in {path}, got one over {loaded.covisit.num_items}"
            )
    affinity = config.get("affinity")
    if isinstance(affinity, dict):
        try:
            loaded.affinity = Affinity.of_model(model, AffinityConfig.from_dict(affinity))
        except (TypeError, ValueError) as exc:
            raise ArtifactError(
                f"{STAGE}: expected valid affinity settings in {path}: {exc}"
            ) from exc
    return loaded
