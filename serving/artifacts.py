"""Encoder artifacts: ``model.safetensors`` + ``config.json`` + ``items.json``; never pickle.

``load_model`` returns a :class:`LoadedEncoder`, which satisfies ``serving.types.UserEncoder``:
the stream worker uses the model only through that protocol.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from serving.data import ItemVocab, sequence_features
from serving.encoder import EncoderConfig, SequenceEncoder, collate
from serving.train import resolve_device
from serving.types import EVENT_TYPE_ID, Step

STAGE = "artifacts"
WEIGHTS, CONFIG, ITEMS = "model.safetensors", "config.json", "items.json"
FORMAT_VERSION = 1


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
) -> str:
    """Write the three artifact files into ``directory``; returns the version id.

    The version is the first 12 hex digits of the weights' sha256 plus a UTC timestamp, so
    identical weights are recognisable and two saves never collide silently.
    """
    if len(item_ids) != model.cfg.num_items:
        raise ArtifactError(
            f"{STAGE}: expected {model.cfg.num_items} item ids for the model, got {len(item_ids)}"
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
    return version


def _read_json(path: Path) -> object:
    if not path.is_file():
        raise ArtifactError(f"{STAGE}: expected {path.name} in {path.parent}, found no such file")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{STAGE}: expected valid JSON in {path}, got: {exc}") from exc


class LoadedEncoder:
    """A trained encoder ready to serve: ``serving.types.UserEncoder``."""

    def __init__(
        self,
        model: SequenceEncoder,
        item_ids: Sequence[str],
        version: str,
        config: Mapping[str, object],
        device: torch.device,
    ) -> None:
        self.model = model.eval().to(device)
        self.vocab = ItemVocab(item_ids)
        self.config = dict(config)
        self.device = device
        self._version = version
        self._item_vectors: np.ndarray | None = None

    @property
    def version(self) -> str:
        return self._version

    @property
    def dim(self) -> int:
        return self.model.cfg.dim

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

    def features(self, history: Sequence[Step]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """A history as ``(items, types, ts_ms)`` ``(n,) int64`` arrays (0 = unknown item)."""
        n = len(history)
        items = np.fromiter((self.vocab.index.get(s.item, 0) for s in history), np.int64, n)
        types = np.fromiter((EVENT_TYPE_ID.get(s.type, 0) for s in history), np.int64, n)
        ts = np.fromiter((s.ts_ms for s in history), np.int64, n)
        return items, types, ts

    @torch.inference_mode()
    def encode(self, histories: Sequence[Sequence[Step]]) -> np.ndarray:
        """``(B, D) float32`` user vectors; steps on unknown items are skipped, the newest
        ``max_len`` known steps are used, and a history with no known item encodes to zeros
        (every item scores 0: the caller's popularity fallback decides)."""
        out = np.zeros((len(histories), self.dim), dtype=np.float32)
        feats, rows = [], []
        for b, history in enumerate(histories):
            items, types, ts = self.features(history)
            f = sequence_features(items, types, ts, self.max_len)
            if len(f):
                feats.append(f)
                rows.append(b)
        if feats:
            batch = collate(feats).to(self.device)
            out[rows] = self.model.user_vectors(batch).float().cpu().numpy()
        return out


def load_model(directory: Path | str, device: str | torch.device | None = None) -> LoadedEncoder:
    """Load an artifact directory written by :func:`save_model`. Never unpickles."""
    path = Path(directory)
    if not path.is_dir():
        raise ArtifactError(f"{STAGE}: expected a model directory, found nothing at {path}")
    config = _read_json(path / CONFIG)
    items = _read_json(path / ITEMS)
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        raise ArtifactError(f"{STAGE}: expected {path / CONFIG} to hold a 'model' object")
    if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
        raise ArtifactError(f"{STAGE}: expected {path / ITEMS} to hold a list of item id strings")
    try:
        cfg = EncoderConfig.from_dict(config["model"])
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
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ArtifactError(
            f"{STAGE}: expected weights matching config.json in {weights}: {exc}"
        ) from exc
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    return LoadedEncoder(model, items, str(config.get("version", "")), config, dev)
