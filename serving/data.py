"""Interaction logs → per-user time-ordered sequences, leave-one-out split, model features.

Every loader returns the same :class:`Interactions` structure, so training and evaluation never
care where a log came from. Loaders take a path (``.gz`` is read transparently); datasets are
never copied into the project.

Feature building (:func:`sequence_features`) is shared by training, evaluation and
``LoadedEncoder.encode`` so the three see identical inputs for identical histories.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from serving.types import EVENT_TYPE_ID

STAGE = "data"

#: Time-gap buckets: 0 = padding, 1 = first step (no previous event), 2.. = 2 + floor(log2(1 + s))
#: for the gap in seconds to the previous step, capped so ~34 years share the last bucket.
GAP_BUCKETS = 32


class DataError(ValueError):
    """A data file or argument could not be turned into interactions."""


@dataclass(frozen=True, slots=True)
class UserHistory:
    """One user's interactions, oldest first."""

    user: str
    items: tuple[str, ...]
    types: tuple[str, ...]  # event type names, one of serving.types.EVENT_TYPES
    ts_ms: tuple[int, ...] | None  # epoch ms UTC; None when the source keeps only the order


@dataclass(frozen=True, slots=True)
class Interactions:
    """A whole log: user histories in a stable order, plus where it came from."""

    name: str
    users: tuple[UserHistory, ...]

    @property
    def has_time(self) -> bool:
        return any(u.ts_ms is not None for u in self.users)

    @property
    def num_interactions(self) -> int:
        return sum(len(u.items) for u in self.users)

    def item_ids(self) -> list[str]:
        """Distinct items in order of first appearance (a deterministic vocabulary)."""
        seen: dict[str, None] = {}
        for u in self.users:
            for it in u.items:
                seen.setdefault(it, None)
        return list(seen)


# ---------------------------------------------------------------------------------------------
# Reading files


def open_text(path: Path, encoding: str = "utf-8") -> io.TextIOBase:
    """Open a text file, gunzipping ``*.gz``; a missing file names the stage and the path."""
    if not path.is_file():
        raise FileNotFoundError(f"{STAGE}: expected a data file, found nothing at {path}")
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding=encoding, newline="")
    return open(path, encoding=encoding, newline="")


def _group(
    rows: Iterable[tuple[str, str, str, int | None]], name: str, sort_by_time: bool
) -> Interactions:
    """Group ``(user, item, type, ts_ms)`` rows by user; a stable sort on ts keeps file order."""
    per_user: dict[str, list[tuple[str, str, int | None]]] = {}
    for user, item, etype, ts in rows:
        per_user.setdefault(user, []).append((item, etype, ts))
    users = []
    for user, steps in per_user.items():
        has_ts = steps[0][2] is not None
        if sort_by_time and has_ts:
            steps.sort(key=lambda s: s[2] or 0)
        users.append(
            UserHistory(
                user=user,
                items=tuple(s[0] for s in steps),
                types=tuple(s[1] for s in steps),
                ts_ms=tuple(int(s[2] or 0) for s in steps) if has_ts else None,
            )
        )
    if not users:
        raise DataError(f"{STAGE}: expected at least one interaction in {name}, found none")
    return Interactions(name=name, users=tuple(users))


def _dataset_name(path: Path) -> str:
    base = path.name
    for suffix in (".gz", ".txt", ".csv", ".jsonl", ".json", ".data", ".dat"):
        base = base.removesuffix(suffix)
    return base or path.name


def load_s3rec(path: Path) -> Interactions:
    """S3-Rec sequence file: one line per user, ``user item item ...`` in time order, no ts."""
    users = []
    with open_text(path) as fh:
        for lineno, line in enumerate(fh, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) < 2:
                raise DataError(
                    f"{STAGE}: {path}:{lineno}: expected 'user item [item ...]', got {line!r}"
                )
            items = tuple(parts[1:])
            users.append(UserHistory(parts[0], items, ("rating",) * len(items), None))
    if not users:
        raise DataError(f"{STAGE}: expected at least one user line in {path}, found none")
    return Interactions(name=_dataset_name(path), users=tuple(users))


def _split_rows(
    path: Path, delimiter: str, min_fields: int, header: str | None
) -> Iterator[tuple[int, list[str]]]:
    with open_text(path) as fh:
        for lineno, row in enumerate(csv.reader(fh, delimiter=delimiter), 1):
            if not row or (lineno == 1 and header is not None and row[0] == header):
                continue
            if len(row) < min_fields:
                raise DataError(
                    f"{STAGE}: {path}:{lineno}: expected {min_fields} "
                    f"{delimiter!r}-separated fields, got {row!r}"
                )
            yield lineno, row


def _number(path: Path, lineno: int, field: str, text: str) -> float:
    try:
        return float(text)
    except ValueError as exc:
        raise DataError(
            f"{STAGE}: {path}:{lineno}: expected numeric {field}, got {text!r}"
        ) from exc


def _file_in(path: Path, names: Sequence[str]) -> Path:
    """``path`` itself, or for a folder the first of ``names`` it holds."""
    if not path.is_dir():
        return path
    for name in names:
        if (path / name).is_file():
            return path / name
    raise FileNotFoundError(
        f"{STAGE}: expected one of {', '.join(names)} in the folder {path}, found none"
    )


def load_movielens_100k(path: Path) -> Interactions:
    """MovieLens-100K ``u.data`` (or its folder): tab-separated ``user item rating ts(s)``;
    sorted by time."""
    path = _file_in(path, ("u.data", "u.data.gz"))
    rows = (
        (r[0], r[1], "rating", int(_number(path, n, "timestamp", r[3]) * 1000))
        for n, r in _split_rows(path, "\t", 4, None)
    )
    return _group(rows, "ml-100k", sort_by_time=True)


def load_movielens_1m(path: Path) -> Interactions:
    """MovieLens-1M as available here: the SiReN folds ``user,movie,rating`` (no timestamps).

    ``path`` is a fold file or a directory holding ``siren_test_1m*.dat[.gz]``. The rows are
    NOT in time order (the timestamps were not recoverable), so the sequences are in file order;
    fine for smoke runs, not a sequential benchmark.
    """
    files = sorted(path.glob("siren_test_1m*.dat*")) if path.is_dir() else [path]
    if not files:
        raise FileNotFoundError(f"{STAGE}: expected siren_test_1m*.dat[.gz] files in {path}")

    def rows() -> Iterator[tuple[str, str, str, int | None]]:
        for f in files:
            for _, r in _split_rows(f, ",", 3, None):
                yield r[0], r[1], "rating", None

    return _group(rows(), "ml-1m", sort_by_time=False)


def load_rechorus(path: Path) -> Interactions:
    """ReChorus csv (e.g. Amazon Grocery): tab-separated ``user_id item_id time(s)``, header."""
    rows = (
        (r[0], r[1], "rating", int(_number(path, n, "time", r[2]) * 1000))
        for n, r in _split_rows(path, "\t", 3, "user_id")
    )
    return _group(rows, _dataset_name(path), sort_by_time=True)


def load_yoochoose(path: Path) -> Interactions:
    """session-rec YooChoose: tab-separated ``SessionId ItemId Time(s, float)``, header.

    A session plays the role of a user; every event is a click.
    """
    rows = (
        (r[0], r[1], "click", round(_number(path, n, "Time", r[2]) * 1000))
        for n, r in _split_rows(path, "\t", 3, "SessionId")
    )
    return _group(rows, _dataset_name(path), sort_by_time=True)


def parse_ts_ms(value: object) -> int:
    """Event time as epoch ms: an integer (ms) or an RFC 3339 string with a UTC offset."""
    if isinstance(value, bool):
        raise DataError(f"{STAGE}: expected ts as epoch ms or RFC 3339, got {value!r}")
    if isinstance(value, int | float) and math.isfinite(value):
        return int(value)
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError as exc:
            raise DataError(f"{STAGE}: expected ts as RFC 3339, got {value!r}") from exc
        if parsed.tzinfo is None:
            raise DataError(f"{STAGE}: expected ts with a UTC offset, got naive {value!r}")
        return int(parsed.astimezone(UTC).timestamp() * 1000)
    raise DataError(f"{STAGE}: expected ts as epoch ms or RFC 3339, got {value!r}")


def load_events(path: Path) -> Interactions:
    """A dump of ``streamrec.events``: JSON lines ``{event_id, user_id, item_id, type, ts}``.

    Duplicate ``event_id`` values are skipped (the topic is at-least-once); events are sorted
    by event time per user.
    """

    def rows() -> Iterator[tuple[str, str, str, int | None]]:
        seen: set[str] = set()
        with open_text(path) as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                    event_id, user, item = str(rec["event_id"]), rec["user_id"], rec["item_id"]
                    etype = rec["type"]
                    ts = parse_ts_ms(rec["ts"])
                except (json.JSONDecodeError, KeyError, TypeError, DataError) as exc:
                    raise DataError(
                        f"{STAGE}: {path}:{lineno}: expected a streamrec.events JSON record "
                        f"with event_id,user_id,item_id,type,ts; {type(exc).__name__}: {exc}"
                    ) from exc
                if etype not in EVENT_TYPE_ID:
                    raise DataError(
                        f"{STAGE}: {path}:{lineno}: expected type in {sorted(EVENT_TYPE_ID)}, "
                        f"got {etype!r}"
                    )
                if event_id in seen:
                    continue
                seen.add(event_id)
                yield str(user), str(item), etype, ts

    return _group(rows(), _dataset_name(path), sort_by_time=True)


FORMATS: dict[str, Callable[[Path], Interactions]] = {
    "s3rec": load_s3rec,
    "ml-100k": load_movielens_100k,
    "ml-1m": load_movielens_1m,
    "rechorus": load_rechorus,
    "yoochoose": load_yoochoose,
    "events": load_events,
}


def load_interactions(path: Path | str, fmt: str) -> Interactions:
    """Load ``path`` with the loader registered as ``fmt`` in :data:`FORMATS`."""
    loader = FORMATS.get(fmt)
    if loader is None:
        raise DataError(f"{STAGE}: expected format in {sorted(FORMATS)}, got {fmt!r}")
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{STAGE}: expected a data path, found nothing at {path}")
    return loader(path)


# ---------------------------------------------------------------------------------------------
# Item attributes (side information for the encoder and the reranker)


def load_item_attributes(path: Path | str, fmt: str) -> dict[str, list[str]]:
    """Attribute names per item id.

    Formats: ``s3rec`` (``*_item2attributes.json[.gz]``: item id -> attribute ids, S3-Rec's
    brand/category ids), ``ml-100k`` (``u.item``: genres; ``u.genre`` beside it names them),
    ``items`` (JSON lines of ``streamrec.items`` messages: ``categories``).
    """
    path = Path(path)
    # MovieLens files are Latin-1 (accented titles); the others are UTF-8 JSON.
    with open_text(path, "latin-1" if fmt == "ml-100k" else "utf-8") as fh:
        text = fh.read()
    if fmt == "s3rec":
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{STAGE}: expected a JSON object in {path}: {exc}") from exc
        if not isinstance(raw, dict):
            raise DataError(f"{STAGE}: expected a JSON object item -> attributes in {path}")
        return {str(k): [str(a) for a in v] for k, v in raw.items()}
    if fmt == "ml-100k":
        genre_file = path.with_name("u.genre")
        genres_path = genre_file if genre_file.exists() else path.with_name("u.genre.gz")
        with open_text(genres_path, "latin-1") as g:
            genres = [ln.split("|")[0] for ln in g.read().splitlines() if ln.strip()]
        out: dict[str, list[str]] = {}
        for line in text.splitlines():
            parts = line.split("|")
            if len(parts) >= 5 + len(genres):
                flags = parts[-len(genres) :]
                out[parts[0]] = [name for name, f in zip(genres, flags, strict=True) if f == "1"]
        return out
    if fmt == "items":
        out = {}
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                msg = json.loads(line)
                out[str(msg["item_id"])] = [str(c) for c in msg.get("categories") or []]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise DataError(
                    f"{STAGE}: expected an item message with item_id at {path}:{lineno}: {exc}"
                ) from exc
        return out
    raise DataError(f"{STAGE}: expected attribute format s3rec, ml-100k or items, got {fmt!r}")


def attribute_table(
    vocab: ItemVocab, attributes: dict[str, list[str]], max_attrs: int
) -> tuple[np.ndarray, list[str]]:
    """``(N + 1, max_attrs) int64`` attribute indices per model item (row 0 = padding, 0 =
    no attribute) and the attribute names (index i + 1 = names[i]), in first-seen order."""
    names: dict[str, int] = {}
    table = np.zeros((len(vocab) + 1, max_attrs), dtype=np.int64)
    for row, item in enumerate(vocab.ids, 1):
        for j, name in enumerate(dict.fromkeys(attributes.get(item, ()))):
            if j >= max_attrs:
                break
            table[row, j] = names.setdefault(name, len(names) + 1)
    return table, list(names)


# ---------------------------------------------------------------------------------------------
# Split


@dataclass(frozen=True, slots=True)
class EvalCase:
    """Predict ``users[user].items[cut]`` from the steps before it."""

    user: int
    cut: int


@dataclass(frozen=True, slots=True)
class LeaveOneOut:
    """Last step = test, second-to-last = validation, the rest = train.

    Users with fewer than 3 steps contribute to training only.
    """

    data: Interactions
    train_cut: tuple[int, ...]  # per user: number of leading steps used for training
    valid: tuple[EvalCase, ...]
    test: tuple[EvalCase, ...]

    def cases(self, which: str) -> tuple[EvalCase, ...]:
        if which == "valid":
            return self.valid
        if which == "test":
            return self.test
        raise DataError(f"{STAGE}: expected split 'valid' or 'test', got {which!r}")


def leave_one_out(data: Interactions) -> LeaveOneOut:
    cuts, valid, test = [], [], []
    for i, u in enumerate(data.users):
        n = len(u.items)
        if n < 3:
            cuts.append(n)
            continue
        cuts.append(n - 2)
        valid.append(EvalCase(i, n - 2))
        test.append(EvalCase(i, n - 1))
    return LeaveOneOut(data, tuple(cuts), tuple(valid), tuple(test))


# ---------------------------------------------------------------------------------------------
# Features


class ItemVocab:
    """Item id ↔ model index; index 0 is padding, items are 1..N."""

    def __init__(self, item_ids: Sequence[str]) -> None:
        self.ids: list[str] = list(item_ids)
        self.index: dict[str, int] = {it: i + 1 for i, it in enumerate(self.ids)}
        if len(self.index) != len(self.ids):
            raise DataError(
                f"{STAGE}: expected distinct item ids, got {len(self.ids)} with repeats"
            )

    def __len__(self) -> int:
        return len(self.ids)

    def lookup(self, items: Iterable[str]) -> np.ndarray:
        """``(n,) int64`` model indices, 0 for unknown items."""
        return np.fromiter((self.index.get(it, 0) for it in items), dtype=np.int64)


def gap_buckets(ts_ms: np.ndarray | None, n: int) -> np.ndarray:
    """``(n,) int64`` log-bucketed gap to the previous step; all 1 when there are no times."""
    out = np.ones(n, dtype=np.int64)
    if ts_ms is None or n < 2:
        return out
    gap_s = np.maximum(np.diff(ts_ms.astype(np.float64)), 0.0) / 1000.0
    out[1:] = 2 + np.minimum(np.floor(np.log2(1.0 + gap_s)), GAP_BUCKETS - 3).astype(np.int64)
    return out


def gap_bucket(gap_ms: int) -> int:
    """:func:`gap_buckets` for one gap (a step after the first), in plain Python."""
    gap_s = max(gap_ms, 0) / 1000.0
    return 2 + min(math.floor(math.log2(1.0 + gap_s)), GAP_BUCKETS - 3)


@dataclass(frozen=True, slots=True)
class Features:
    """Model inputs for one sequence, oldest first, all ``(T,) int64``."""

    items: np.ndarray
    types: np.ndarray
    gaps: np.ndarray

    def __len__(self) -> int:
        return len(self.items)


def sequence_features(
    items: np.ndarray, types: np.ndarray, ts_ms: np.ndarray | None, keep: int
) -> Features:
    """Drop unknown items (index 0), compute time gaps on what is kept, keep the last ``keep``.

    The one place that turns a history into model inputs: training, evaluation and
    ``LoadedEncoder.encode`` all call it.
    """
    known = items > 0
    if not known.all():
        items, types = items[known], types[known]
        ts_ms = ts_ms[known] if ts_ms is not None else None
    gaps = gap_buckets(ts_ms, len(items))
    return Features(items[-keep:], types[-keep:], gaps[-keep:])


class EncodedLog:
    """A log's users as index arrays, ready for cutting into features."""

    def __init__(self, data: Interactions, vocab: ItemVocab) -> None:
        self.items = [vocab.lookup(u.items) for u in data.users]
        self.types = [
            np.fromiter((EVENT_TYPE_ID.get(t, 0) for t in u.types), dtype=np.int64)
            for u in data.users
        ]
        self.ts = [
            np.asarray(u.ts_ms, dtype=np.int64) if u.ts_ms is not None else None for u in data.users
        ]

    def prefix(self, user: int, cut: int, keep: int) -> Features:
        """Features of ``users[user]`` steps ``[0, cut)``, last ``keep`` known steps."""
        ts = self.ts[user]
        return sequence_features(
            self.items[user][:cut],
            self.types[user][:cut],
            ts[:cut] if ts is not None else None,
            keep,
        )

    def target(self, case: EvalCase) -> int:
        return int(self.items[case.user][case.cut])
