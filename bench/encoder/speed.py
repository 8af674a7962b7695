"""Encode throughput of a :class:`serving.artifacts.LoadedEncoder`, in user sequences per second.

Four paths, all at the given batch size and sequence length, under ``inference_mode``:
``tensor_last`` (a full re-encode: last position only in the final block), ``tensor_full``
(every position, the training-time forward), ``encode`` (``LoadedEncoder.encode`` from
``Step`` histories, i.e. id lookup + features + collate + forward + numpy) and
``cached_step`` (``LoadedEncoder.encode_users`` when each user's first ``length - 1`` steps
are cached: what the stream worker pays per event, from ``Step`` histories to numpy,
including the cache reads and writes).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from serving.artifacts import LoadedEncoder, load_model
from serving.encoder import Batch
from serving.types import Step


def _rate(fn: Callable[[], object], batch: int, min_seconds: float, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    n, started = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        elapsed = time.perf_counter() - started
        if elapsed >= min_seconds and n >= 3:
            return n * batch / elapsed


def measure(
    enc: LoadedEncoder,
    batch: int = 256,
    length: int = 50,
    min_seconds: float = 3.0,
    seed: int = 0,
    model_dir: Path | None = None,
) -> dict[str, float]:
    """Sequences/s for each path (see module docstring); ``cached_step`` needs the model's
    ``model_dir`` and positions counted from the oldest step."""
    rng = np.random.default_rng(seed)
    n_items = len(enc.item_ids())
    items = torch.from_numpy(rng.integers(1, n_items + 1, (batch, length)))
    types = torch.full((batch, length), 1, dtype=torch.int64)
    gaps = torch.from_numpy(rng.integers(1, 20, (batch, length)))
    tensors = Batch(items, types, gaps).to(enc.device)
    ids = enc.item_ids()
    histories = [
        [Step(ids[int(i) - 1], "view", 1_700_000_000_000 + 60_000 * t) for t, i in enumerate(row)]
        for row in items.tolist()
    ]
    model = enc.model

    def sync() -> None:
        if enc.device.type == "cuda":
            torch.cuda.synchronize()

    @torch.inference_mode()
    def last() -> None:
        model.user_vectors(tensors)
        sync()

    @torch.inference_mode()
    def full() -> None:
        model.hidden(tensors)[:, -1]
        sync()

    rates = {
        "batch": float(batch),
        "length": float(length),
        "tensor_last_seq_per_s": round(_rate(last, batch, min_seconds), 1),
        "tensor_full_seq_per_s": round(_rate(full, batch, min_seconds), 1),
        "encode_seq_per_s": round(_rate(lambda: enc.encode(histories), batch, min_seconds), 1),
        "threads": float(torch.get_num_threads()),
    }
    if model.cfg.positions == "oldest" and model_dir is not None:
        rates["cached_step_seq_per_s"] = round(
            _cached_rate(model_dir, enc.device, histories, batch, min_seconds), 1
        )
    return rates


def _cached_rate(
    model_dir: Path, device: torch.device, histories: list[list[Step]], batch: int, secs: float
) -> float:
    cached = load_model(model_dir, device=device, cache_users=batch)
    assert cached.cache is not None
    keys = [f"u{b}" for b in range(batch)]
    cached.encode_users(keys, [h[:-1] for h in histories])
    primed = [(k, cached.cache.get(k)) for k in keys]

    def step() -> None:
        for k, entry in primed:  # back to the primed state: every call appends one step
            assert entry is not None
            cached.cache.put(k, entry)  # type: ignore[union-attr]
        cached.encode_users(keys, histories)

    return _rate(step, batch, secs)


def main() -> None:
    """``python -m bench.encoder.speed --model DIR --json OUT [--threads N]``: the four rates
    for a saved model, and the cached step's speedup over a full re-encode (same run)."""
    import argparse
    import json

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    enc = load_model(args.model, device="cpu")
    rates = measure(
        enc, batch=args.batch, length=enc.max_len, min_seconds=args.seconds, model_dir=args.model
    )
    if "cached_step_seq_per_s" in rates:
        rates["cached_over_full_re_encode"] = round(
            rates["cached_step_seq_per_s"] / rates["encode_seq_per_s"], 2
        )
    rates["model_version"] = enc.version  # type: ignore[assignment]
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(rates, indent=2) + "\n")
    print(json.dumps(rates, indent=2))


if __name__ == "__main__":
    main()
