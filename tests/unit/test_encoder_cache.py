"""The serving encoder's per-user cache: cached encoding equals full re-encoding, always."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from serving.artifacts import EncoderCache, LoadedEncoder, load_model, save_model
from serving.data import gap_bucket, gap_buckets
from serving.encoder import EncoderConfig, SequenceEncoder, serving_window
from serving.pipeline import Pipeline, SlateRequest
from serving.types import CachingUserEncoder, Step

torch.set_num_threads(1)
ITEMS = [f"i{k}" for k in range(40)]


def encoder(tmp_path: Path, cache_users: int, positions: str = "oldest") -> LoadedEncoder:
    torch.manual_seed(0)
    cfg = EncoderConfig(num_items=len(ITEMS), dim=16, heads=2, max_len=8, positions=positions)
    model = SequenceEncoder(cfg).eval()
    save_model(model, tmp_path / positions, ITEMS)
    return load_model(tmp_path / positions, device="cpu", cache_users=cache_users)


def test_serving_window_grows_then_restarts() -> None:
    assert [serving_window(n, 8) for n in range(0, 18)] == [
        0, 1, 2, 3, 4, 5, 6, 7, 8, 5, 6, 7, 8, 5, 6, 7, 8, 5,
    ]  # fmt: skip
    assert {serving_window(n, 50) for n in range(51, 500)} == set(range(26, 51))
    assert serving_window(3, 1) == 1


def test_cached_stream_equals_full_re_encode(tmp_path: Path) -> None:
    """A replay of interleaved users (unknown items, repeats, window restarts, evictions from
    a cache smaller than the user count, several new events per call) gives, at every call,
    exactly what a cache-free encoder computes."""
    cached, plain = encoder(tmp_path, cache_users=3), encoder(tmp_path, cache_users=0)
    assert isinstance(cached, CachingUserEncoder)
    assert cached.cache is not None
    assert plain.cache is None
    rng = np.random.default_rng(1)
    users: dict[str, list[Step]] = {f"u{k}": [] for k in range(5)}
    t = 1_700_000_000_000
    for _ in range(60):
        batch = rng.choice(list(users), size=int(rng.integers(1, 5)), replace=False)
        for u in batch:
            for _ in range(int(rng.integers(1, 3))):
                t += int(rng.integers(1, 10**7))
                item = "unknown" if rng.random() < 0.1 else ITEMS[int(rng.integers(40))]
                users[u].append(Step(item, str(rng.choice(["view", "click"])), t))
        windows = [users[u][-serving_window(len(users[u]), 8) :] for u in batch]
        got = cached.encode_users(list(batch), windows)
        np.testing.assert_allclose(got, plain.encode(windows), rtol=1e-5, atol=1e-6)
    assert cached.cache.hits > 50
    assert cached.cache.misses > 10
    assert len(cached.cache) == 3


def test_repeat_call_reuses_vector_and_changed_history_recomputes(tmp_path: Path) -> None:
    enc = encoder(tmp_path, cache_users=10)
    h = [Step("i1", "view", 1_000), Step("i2", "view", 2_000)]
    first = enc.encode_users(["u"], [h])
    np.testing.assert_array_equal(enc.encode_users(["u"], [h]), first)
    assert enc.cache is not None
    assert enc.cache.hits == 1
    other = [Step("i3", "view", 1_000), Step("i2", "view", 2_000)]  # not a continuation
    np.testing.assert_allclose(enc.encode_users(["u"], [other]), enc.encode([other]), atol=1e-6)
    assert enc.cache.misses == 2
    # A history with no known item encodes to zeros and leaves the cache alone.
    assert not enc.encode_users(["v"], [[Step("nope", "view", 0)]]).any()


def test_newest_positions_and_old_artifacts_do_not_cache(tmp_path: Path) -> None:
    assert encoder(tmp_path, cache_users=5, positions="newest").cache is None
    enc = encoder(tmp_path, cache_users=5)
    config_path = tmp_path / "oldest" / "config.json"
    config = json.loads(config_path.read_text())
    del config["model"]["positions"]
    config["format_version"] = 1
    config_path.write_text(json.dumps(config))
    old = load_model(tmp_path / "oldest", device="cpu", cache_users=5)
    assert old.model.cfg.positions == "newest"
    assert old.cache is None
    h = [[Step("i1", "view", 1), Step("i2", "view", 2)]]
    np.testing.assert_array_equal(old.encode_users(["u"], h), old.encode(h))
    assert enc.model.cfg.positions == "oldest"


def test_cache_errors() -> None:
    with pytest.raises(ValueError, match="cache capacity >= 1, got 0"):
        EncoderCache(0)


def test_encode_users_needs_one_key_per_history(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="one key per history, got 1 and 2"):
        encoder(tmp_path, cache_users=2).encode_users(["u"], [[], []])


def test_pipeline_reads_the_serving_window(tmp_path: Path) -> None:
    """The encode stage hands a caching encoder the user's window, so the slate equals one
    computed without any cache from the same window."""
    cached, plain = encoder(tmp_path, cache_users=4), encoder(tmp_path, cache_users=0)
    history = [Step(ITEMS[k % 40], "view", 1_000 * k) for k in range(11)]
    fast, slow = Pipeline.from_encoder(cached), Pipeline.from_encoder(plain)
    for n in range(1, 12):
        req = SlateRequest("u", history[:n], events=n)
        window = SlateRequest("u", history[:n][-serving_window(n, 8) :])
        assert fast.recommend([req])[0].item_ids == slow.recommend([window])[0].item_ids
    assert cached.cache is not None
    assert cached.cache.hits >= 6


def test_scalar_gap_bucket_matches_vector_one() -> None:
    rng = np.random.default_rng(0)
    gaps = np.concatenate(
        [rng.integers(-5_000, 10**12, 5_000), [0, 1, 999, 1_000, 1_001, 3_000, 10**15]]
    )
    ts = np.concatenate([[0], np.cumsum(gaps)])
    want = gap_buckets(ts, len(ts))[1:]
    assert [gap_bucket(int(g)) for g in gaps] == want.tolist()
