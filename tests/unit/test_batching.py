"""``streams.batching.take_batches`` on a Faust agent (Faust's in-process test context)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from typing import Any

import faust
import pytest

from streams.batching import take_batches

#: (values, seconds since the first put when the batch was handed over, acked when handed
#: over, acked when the agent asked for the next batch)
Seen = tuple[list[Any], float, list[bool], list[bool] | None]


def _run(
    max_: int,
    within: float,
    process_s: float,
    feed: Callable[[Any], Coroutine[Any, Any, None]],
    settle_s: float,
) -> list[Seen]:
    """Run an agent that batches with ``take_batches`` and spends ``process_s`` per batch;
    ``feed(ctx)`` puts the values."""
    app = faust.App(f"batching-{time.time_ns()}", store="memory://", web_enabled=False)
    seen: list[Seen] = []
    t0 = [0.0]
    previous: list[Any] = []

    @app.agent()
    async def agent(stream: Any) -> None:
        async for batch in take_batches(stream, max_, within):
            if seen:  # the previous batch's events, now that the next one was asked for
                values, at, acked, _ = seen[-1]
                seen[-1] = (values, at, acked, [e.message.acked for e in previous])
            seen.append(
                (
                    [e.value for e in batch],
                    time.monotonic() - t0[0],
                    [e.message.acked for e in batch],
                    None,
                )
            )
            previous[:] = batch
            await asyncio.sleep(process_s)

    async def main() -> None:
        async with agent.test_context() as ctx:
            t0[0] = time.monotonic()
            await feed(ctx)
            await asyncio.sleep(settle_s)

    asyncio.run(main())
    return seen


def test_full_batches_leave_at_once_and_the_rest_waits_for_its_deadline() -> None:
    async def feed(ctx: Any) -> None:
        for i in range(10):
            await ctx.put(i)

    seen = _run(max_=4, within=0.4, process_s=0.0, feed=feed, settle_s=1.0)
    assert [values for values, *_ in seen] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    # Full batches do not wait for the deadline; the last one is not sent before it.
    assert seen[1][1] < 0.4
    assert seen[2][1] >= 0.4


def test_the_next_batch_fills_during_processing_and_leaves_when_it_ends() -> None:
    """Events that arrive while a batch is processed form the next batch, which leaves as
    soon as the processing ends when its first event is already ``within`` old (Faust's
    ``take_events`` would wait ``within`` more after the processing)."""

    async def feed(ctx: Any) -> None:
        await ctx.put("a")
        await asyncio.sleep(0.4)  # "a" leaves at 0.3 s and is processed until ~1.3 s
        for v in ("b", "c"):
            await ctx.put(v)

    seen = _run(max_=100, within=0.3, process_s=1.0, feed=feed, settle_s=2.0)
    assert [values for values, *_ in seen] == [["a"], ["b", "c"]]
    first_at, second_at = seen[0][1], seen[1][1]
    assert 0.3 <= first_at < 0.6
    # Handed over when the first batch's processing ended, not ``within`` after it.
    assert second_at - (first_at + 1.0) < 0.25


def test_events_are_acked_only_after_their_batch_is_processed() -> None:
    async def feed(ctx: Any) -> None:
        for i in range(6):
            await ctx.put(i)

    seen = _run(max_=3, within=0.05, process_s=0.05, feed=feed, settle_s=0.5)
    assert [values for values, *_ in seen] == [[0, 1, 2], [3, 4, 5]]
    for _values, _at, acked_when_handed, acked_after in seen[:-1]:
        assert acked_when_handed == [False, False, False]
        assert acked_after == [True, True, True]


@pytest.mark.parametrize(("max_", "within"), [(0, 0.1), (5, 0.0)])
def test_rejects_a_batch_size_or_wait_that_cannot_work(max_: int, within: float) -> None:
    app = faust.App(f"batching-{time.time_ns()}", store="memory://", web_enabled=False)
    stream = app.stream(app.channel())

    async def first() -> None:
        await take_batches(stream, max_, within).__anext__()

    with pytest.raises(ValueError, match="take_batches: expected"):
        asyncio.run(first())
