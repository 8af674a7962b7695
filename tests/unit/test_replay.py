"""The collector's latency percentiles (demo and benchmark summaries)."""

from __future__ import annotations

import pytest

from streamrec.replay import Collected


def test_percentiles_of_all_and_of_the_later_slates() -> None:
    got = Collected(latencies_ms=[1000.0, 900.0, 10.0, 20.0, 30.0, 40.0])  # a slow start
    assert got.percentile(50) == pytest.approx(35.0)
    assert got.percentile(50, since=0.5) == pytest.approx(30.0)  # 20, 30, 40
    assert got.percentile(100, since=0.5) == 40.0
    assert Collected().percentile(50) is None
    assert got.percentile(50, since=1.0) is None  # nothing after all of them
