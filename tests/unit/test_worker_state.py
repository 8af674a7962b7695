"""Local table state: dropped after an unclean stop (either guarantee), kept after a clean one."""

from __future__ import annotations

from pathlib import Path

from streamrec.settings import Settings
from streams.run import CLEAN_STOP_MARK, discard_unclean_table_state


def _tables(root: Path) -> Path:
    tables = root / "v1" / "tables"
    (tables / "sessions-0.db").mkdir(parents=True)
    (tables / "sessions-0.db" / "CURRENT").write_text("MANIFEST-000001\n")
    return tables


def test_exactly_once_drops_the_store_after_an_unclean_stop(tmp_path: Path) -> None:
    s = Settings(data_dir=tmp_path, processing_guarantee="exactly_once")
    tables = _tables(tmp_path)
    assert discard_unclean_table_state(s, tables) is True
    assert not tables.exists()
    # Nothing left to drop on the next start.
    assert discard_unclean_table_state(s, tables) is False


def test_exactly_once_keeps_the_store_after_a_clean_stop_and_consumes_the_mark(
    tmp_path: Path,
) -> None:
    s = Settings(data_dir=tmp_path, processing_guarantee="exactly_once")
    tables = _tables(tmp_path)
    (tmp_path / CLEAN_STOP_MARK).touch()
    assert discard_unclean_table_state(s, tables) is False
    assert (tables / "sessions-0.db" / "CURRENT").exists()
    # The mark is for one start only: a crash of this run must not find it.
    assert not (tmp_path / CLEAN_STOP_MARK).exists()
    assert discard_unclean_table_state(s, tables) is True


def test_at_least_once_drops_the_store_after_an_unclean_stop_too(tmp_path: Path) -> None:
    s = Settings(data_dir=tmp_path, processing_guarantee="at_least_once")
    tables = _tables(tmp_path)
    assert discard_unclean_table_state(s, tables) is True
    assert not tables.exists()


def test_at_least_once_keeps_the_store_after_a_clean_stop(tmp_path: Path) -> None:
    s = Settings(data_dir=tmp_path, processing_guarantee="at_least_once")
    tables = _tables(tmp_path)
    (tmp_path / CLEAN_STOP_MARK).touch()
    assert discard_unclean_table_state(s, tables) is False
    assert (tables / "sessions-0.db" / "CURRENT").exists()
