"""AsyncEngine: concurrent coroutines get the same greedy tokens as the synchronous engine,
cancelling a consumer aborts its request and frees its blocks, bad prompts fail only their
caller, and shutdown stops the loop thread without leaving consumers hanging."""

from __future__ import annotations

import asyncio
import random
import time

import pytest

from llm_engine.runtime import AsyncEngine, Engine, SamplingParams
from llm_engine.runtime.async_engine import EngineDeadError

GREEDY = SamplingParams(temperature=0, max_tokens=8)
LONG = SamplingParams(temperature=0, max_tokens=400)  # far more steps than any test waits for


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(320) for _ in range(rng.randint(3, 20))] for _ in range(n)]


def _load(engines) -> Engine:
    return Engine.load(engines("llama"), block_size=4, kv_cache_memory=4 << 20)


@pytest.fixture
def async_engine(engines):
    ae = AsyncEngine(_load(engines))
    yield ae
    ae.shutdown()


@pytest.fixture
def slow_steps(async_engine, monkeypatch):
    """5 ms more per engine step: the tiny engine decodes LONG in ~0.15 s on a fast CPU, so
    tests that cancel or time out a request in flight would race its end; at 400 steps x 5 ms
    it stays in flight for 2 s on any machine."""
    step = async_engine.engine.step

    def slow_step():
        time.sleep(0.005)
        return step()

    monkeypatch.setattr(async_engine.engine, "step", slow_step)


async def _settled(ae: AsyncEngine, timeout: float = 5.0) -> tuple[int, int, int]:
    """Poll (on the loop thread) until no request is left; returns (free, total, unfinished)."""
    deadline = time.monotonic() + timeout
    while True:
        state = await ae.run_sync(lambda e: (e.blocks.num_free_blocks, e.blocks.num_blocks,
                                             e.num_unfinished))
        if (state[0] == state[1] and state[2] == 0) or time.monotonic() > deadline:
            return state
        await asyncio.sleep(0.01)


def test_concurrent_coroutines_match_sequential_generate(engines, async_engine):
    prompts = _prompts(8, seed=1)
    reference = _load(engines)
    expected = [reference.generate([p], GREEDY)[0].token_ids for p in prompts]

    async def one(prompt):
        deltas: list[int] = []
        async for out in async_engine.generate(prompt, GREEDY):
            deltas += out.delta_token_ids
        assert deltas == out.token_ids and out.finish_reason == "length"
        return out.token_ids

    async def main():
        return await asyncio.gather(*(one(p) for p in prompts))

    assert asyncio.run(main()) == expected
    assert async_engine.engine.stats["steps"] < 8 * GREEDY.max_tokens  # they shared steps


def test_cancelled_consumer_aborts_and_frees_blocks(async_engine, slow_steps):
    async def main():
        got_two = asyncio.Event()

        async def consume():
            n = 0
            async for _ in async_engine.generate(list(range(10, 30)), LONG):
                n += 1
                if n == 2:
                    got_two.set()

        task = asyncio.create_task(consume())
        await asyncio.wait_for(got_two.wait(), 10)
        used = await async_engine.run_sync(lambda e: e.blocks.num_free_blocks)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        free, total, unfinished = await _settled(async_engine)
        return used, free, total, unfinished

    used, free, total, unfinished = asyncio.run(main())
    assert used < total  # the request held blocks while it ran
    assert (free, unfinished) == (total, 0)
    assert async_engine.engine.stats["generated_tokens"] < LONG.max_tokens
    assert async_engine.alive


def test_wait_for_timeout_aborts_the_request(async_engine, slow_steps):
    async def main():
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(async_engine.complete(list(range(5, 25)), LONG), 0.2)
        state = await _settled(async_engine)
        after = await async_engine.complete([1, 2, 3], GREEDY)  # still serving
        return state, after

    (free, total, unfinished), after = asyncio.run(main())
    assert (free, unfinished) == (total, 0)
    assert after.finish_reason == "length" and len(after.token_ids) == GREEDY.max_tokens


def test_cancelled_while_the_loop_is_busy_keeps_the_engine_alive(async_engine):
    """Cancel coroutines whose command is still queued behind a slow one: the command must be
    dropped (not run into a cancelled future, which used to kill the loop thread), and a
    submission cancelled before it ran must not leave a request behind."""

    async def main():
        blocker = asyncio.ensure_future(async_engine.run_sync(lambda e: time.sleep(0.3)))
        await asyncio.sleep(0.05)  # the loop thread is now inside the sleep
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(async_engine.run_sync(lambda e: e.stats), 0.01)
        task = asyncio.create_task(async_engine.complete(list(range(40, 60)), LONG))
        await asyncio.sleep(0.05)  # the task is awaiting its queued add_request
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await blocker
        state = await _settled(async_engine)
        out = await async_engine.complete([4, 5, 6], GREEDY)
        return state, out

    (free, total, unfinished), out = asyncio.run(main())
    assert async_engine.alive and async_engine.error is None
    assert (free, unfinished) == (total, 0)
    assert out.finish_reason == "length"


def test_consumer_event_loop_closing_mid_stream_keeps_the_engine_alive(async_engine):
    """The loop a request's outputs are posted to closes while it still streams (asyncio.run
    returning races the abort its generator cleanup queues; here the cleanup never runs, which
    makes the race certain). Posting to a closed loop used to raise on the engine thread and
    kill it for every user; now the orphaned request is aborted."""

    async def first_output_only():
        agen = async_engine.generate(list(range(10, 30)), LONG)
        await agen.__anext__()
        return agen

    loop = asyncio.new_event_loop()
    agen = loop.run_until_complete(first_output_only())
    loop.close()  # no shutdown_asyncgens: the generator's finally (its abort) has not run

    async def after():
        state = await _settled(async_engine)
        out = await async_engine.complete([1, 2, 3], GREEDY)
        await agen.aclose()  # its late abort of an already-aborted request is harmless
        return state, out

    (free, total, unfinished), out = asyncio.run(after())
    assert async_engine.alive and async_engine.error is None
    assert (free, unfinished) == (total, 0)
    assert out.finish_reason == "length"


def test_bad_prompt_raises_to_its_caller_only(async_engine):
    async def main():
        return await asyncio.gather(
            async_engine.complete([1, 2, 999], GREEDY),
            async_engine.complete([], GREEDY),
            async_engine.complete("text prompt", GREEDY),  # llama's engine has a tokenizer
            async_engine.complete([7, 8, 9], GREEDY),
            return_exceptions=True)

    bad_id, empty, text, good = asyncio.run(main())
    assert isinstance(bad_id, ValueError) and "token ids" in str(bad_id)
    assert isinstance(empty, ValueError) and "empty" in str(empty)
    assert text.finish_reason == "length" and text.prompt == "text prompt"
    assert good.finish_reason == "length" and len(good.token_ids) == GREEDY.max_tokens
    assert async_engine.alive


def test_shutdown_stops_the_thread_and_fails_waiting_consumers(engines):
    ae = AsyncEngine(_load(engines))

    async def main():
        started = asyncio.Event()

        async def consume():
            async for _ in ae.generate(list(range(10, 30)), LONG):
                started.set()

        task = asyncio.create_task(consume())
        await asyncio.wait_for(started.wait(), 10)
        await asyncio.to_thread(ae.shutdown)
        with pytest.raises(EngineDeadError):
            await asyncio.wait_for(task, 5)  # not a hang
        with pytest.raises(EngineDeadError):
            await ae.complete([1, 2, 3], GREEDY)

    asyncio.run(main())
    assert not ae._thread.is_alive() and not ae.alive
