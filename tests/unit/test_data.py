"""Loaders on tiny generated files, the leave-one-out split and feature building."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from serving.data import (
    FORMATS,
    DataError,
    EncodedLog,
    Interactions,
    ItemVocab,
    gap_buckets,
    leave_one_out,
    load_interactions,
    open_text,
    parse_ts_ms,
    sequence_features,
)


def write(path: Path, text: str) -> Path:
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text)
    return path


def test_formats_registry_names() -> None:
    assert set(FORMATS) == {"s3rec", "ml-100k", "ml-1m", "rechorus", "yoochoose", "events"}


@pytest.mark.parametrize("name", ["Beauty.txt", "Beauty.txt.gz"])
def test_s3rec_plain_and_gz(tmp_path: Path, name: str) -> None:
    path = write(tmp_path / name, "1 1 2 3\n2 4 5\n\n")
    data = load_interactions(path, "s3rec")
    assert data.name == "Beauty"
    assert [u.items for u in data.users] == [("1", "2", "3"), ("4", "5")]
    assert data.users[0].ts_ms is None
    assert not data.has_time
    assert data.num_interactions == 5
    assert data.item_ids() == ["1", "2", "3", "4", "5"]


def test_s3rec_rejects_user_without_items(tmp_path: Path) -> None:
    path = write(tmp_path / "x.txt", "1 1 2\n7\n")
    with pytest.raises(DataError, match=r"x.txt:2: expected 'user item"):
        load_interactions(path, "s3rec")


def test_s3rec_rejects_empty_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="at least one user line"):
        load_interactions(write(tmp_path / "e.txt", "\n"), "s3rec")


def test_movielens_100k_sorted_by_time(tmp_path: Path) -> None:
    path = write(tmp_path / "u.data.gz", "1\t10\t5\t300\n1\t11\t3\t100\n2\t10\t4\t50\n")
    data = load_interactions(path, "ml-100k")
    u1 = data.users[0]
    assert u1.items == ("11", "10")
    assert u1.ts_ms == (100_000, 300_000)
    assert u1.types == ("rating", "rating")


def test_movielens_100k_folder(tmp_path: Path) -> None:
    write(tmp_path / "u.data.gz", "1\t10\t5\t300\n2\t10\t4\t50\n")
    assert len(load_interactions(tmp_path, "ml-100k").users) == 2
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"one of u\.data, u\.data\.gz in the folder"):
        load_interactions(tmp_path / "empty", "ml-100k")


def test_movielens_100k_bad_timestamp(tmp_path: Path) -> None:
    path = write(tmp_path / "u.data", "1\t10\t5\tsoon\n")
    with pytest.raises(DataError, match="expected numeric timestamp"):
        load_interactions(path, "ml-100k")


def test_movielens_100k_too_few_fields(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="expected 4"):
        load_interactions(write(tmp_path / "u.data", "1\t10\n"), "ml-100k")


def test_movielens_1m_folds_in_directory(tmp_path: Path) -> None:
    write(tmp_path / "siren_test_1m1.dat.gz", "1,938,4\n2,5,3\n")
    write(tmp_path / "siren_test_1m2.dat.gz", "1,7,2\n")
    data = load_interactions(tmp_path, "ml-1m")
    assert data.users[0].items == ("938", "7")
    assert data.users[0].ts_ms is None


def test_movielens_1m_empty_directory(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="siren_test_1m"):
        load_interactions(tmp_path, "ml-1m")


def test_rechorus_skips_header(tmp_path: Path) -> None:
    text = "user_id\titem_id\ttime\n5\t3\t200\n5\t4\t100\n"
    data = load_interactions(write(tmp_path / "train.csv.gz", text), "rechorus")
    assert data.name == "train"
    assert data.users[0].items == ("4", "3")
    assert data.users[0].ts_ms == (100_000, 200_000)


def test_yoochoose_sessions_as_users_ms(tmp_path: Path) -> None:
    text = "SessionId\tItemId\tTime\n3\t21\t1396437466.94\n3\t22\t1396438212.318\n"
    data = load_interactions(write(tmp_path / "clicks.txt", text), "yoochoose")
    s = data.users[0]
    assert (s.user, s.items, s.types) == ("3", ("21", "22"), ("click", "click"))
    assert s.ts_ms == (1396437466940, 1396438212318)


def events_file(tmp_path: Path, records: list[object]) -> Path:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    return write(tmp_path / "events.jsonl", "\n".join(lines) + "\n")


def test_events_ms_and_rfc3339_sorted_and_deduped(tmp_path: Path) -> None:
    recs = [
        {"event_id": "a", "user_id": "u", "item_id": "x", "type": "view", "ts": 2_000},
        {
            "event_id": "b",
            "user_id": "u",
            "item_id": "y",
            "type": "purchase",
            "ts": "1970-01-01T00:00:01Z",
        },
        {"event_id": "a", "user_id": "u", "item_id": "x", "type": "view", "ts": 2_000},
        "",
    ]
    data = load_interactions(events_file(tmp_path, recs), "events")
    u = data.users[0]
    assert u.items == ("y", "x")
    assert u.types == ("purchase", "view")
    assert u.ts_ms == (1_000, 2_000)


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ("{not json", "JSONDecodeError"),
        ({"event_id": "a", "user_id": "u", "item_id": "x", "type": "view"}, "KeyError"),
        (
            {"event_id": "a", "user_id": "u", "item_id": "x", "type": "teleport", "ts": 1},
            "expected type in",
        ),
        (
            {
                "event_id": "a",
                "user_id": "u",
                "item_id": "x",
                "type": "view",
                "ts": "2024-01-01T00:00:00",
            },
            "naive",
        ),
    ],
)
def test_events_bad_records_name_line(tmp_path: Path, record: object, message: str) -> None:
    with pytest.raises(DataError, match=message) as err:
        load_interactions(events_file(tmp_path, [record]), "events")
    assert "events.jsonl:1" in str(err.value)


def test_events_empty_dump(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="at least one interaction"):
        load_interactions(events_file(tmp_path, [""]), "events")


@pytest.mark.parametrize("value", [True, None, [1], "yesterday", float("nan")])
def test_parse_ts_rejects(value: object) -> None:
    with pytest.raises(DataError, match="expected ts"):
        parse_ts_ms(value)


def test_parse_ts_offsets() -> None:
    assert parse_ts_ms("1970-01-01T01:00:01+01:00") == 1_000
    assert parse_ts_ms(5.9) == 5


def test_unknown_format_and_missing_path(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"expected format in .*got 'parquet'"):
        load_interactions(tmp_path, "parquet")
    with pytest.raises(FileNotFoundError, match="nothing at"):
        load_interactions(tmp_path / "nope.txt", "s3rec")
    with pytest.raises(FileNotFoundError, match="expected a data file"):
        open_text(tmp_path / "nope.txt")


def test_leave_one_out(tiny_log: Interactions) -> None:
    split = leave_one_out(tiny_log)
    lengths = [len(u.items) for u in tiny_log.users]
    assert len(split.test) == len(split.valid) == sum(n >= 3 for n in lengths)
    for user, n in enumerate(lengths):
        assert split.train_cut[user] == (n - 2 if n >= 3 else n)
    case = split.test[0]
    assert case.cut == lengths[case.user] - 1
    assert split.valid[0].cut == case.cut - 1
    assert split.cases("valid") is split.valid
    with pytest.raises(DataError, match="expected split 'valid' or 'test'"):
        split.cases("train")


def test_vocab_rejects_duplicates_and_maps_unknown_to_zero() -> None:
    vocab = ItemVocab(["a", "b"])
    assert vocab.lookup(["b", "zz", "a"]).tolist() == [2, 0, 1]
    with pytest.raises(DataError, match="distinct item ids"):
        ItemVocab(["a", "a"])


def test_gap_buckets() -> None:
    ts = np.array([0, 0, 1_000, 4_000, 10**15], dtype=np.int64)
    # gaps 0 s, 1 s, 3 s, huge -> 2 + floor(log2(1 + s)), capped at 31
    assert gap_buckets(ts, 5).tolist() == [1, 2, 3, 4, 31]
    assert gap_buckets(None, 3).tolist() == [1, 1, 1]


def test_sequence_features_skip_unknown_then_keep_last() -> None:
    items = np.array([3, 0, 4, 5], dtype=np.int64)
    types = np.array([1, 2, 3, 4], dtype=np.int64)
    ts = np.array([0, 500, 1_000, 4_000], dtype=np.int64)
    f = sequence_features(items, types, ts, keep=2)
    assert f.items.tolist() == [4, 5]
    assert f.types.tolist() == [3, 4]
    # the gap of item 4 is measured from item 3 (the unknown step in between is skipped)
    assert f.gaps.tolist() == [3, 4]


def test_encoded_log_prefix_and_target(tiny_log: Interactions) -> None:
    vocab = ItemVocab(tiny_log.item_ids())
    log = EncodedLog(tiny_log, vocab)
    case = leave_one_out(tiny_log).test[0]
    f = log.prefix(case.user, case.cut, keep=50)
    assert len(f) == case.cut
    assert vocab.ids[log.target(case) - 1] == tiny_log.users[case.user].items[case.cut]
