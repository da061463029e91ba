"""The in-process batching queue: batch sizes, the wait for company, the bound."""

from __future__ import annotations

import asyncio

import pytest

from fakes import WAIT, ObservedQueue
from zypher_ws.errors import QueueFull
from zypher_ws.records import Job

JOBS = [Job(f"p{i}") for i in range(10)]


async def filled(n: int, maxsize: int = 100) -> ObservedQueue:
    queue = ObservedQueue(maxsize)
    for job in JOBS[:n]:
        await queue.put(job)
    return queue


async def get(queue: ObservedQueue, max_size: int, max_delay: float = 0.0) -> list[Job]:
    return await asyncio.wait_for(queue.get_batch(max_size, max_delay), WAIT)


# -- sizes --------------------------------------------------------------------------------------------


async def test_batches_come_in_order_and_never_above_the_size() -> None:
    queue = await filled(5)
    assert await get(queue, 2) == JOBS[0:2]
    assert await get(queue, 2) == JOBS[2:4]
    assert await get(queue, 2) == JOBS[4:5]  # what there is: no delay, no waiting
    assert await queue.depth() == 0


async def test_a_getter_waits_for_the_first_job() -> None:
    queue = ObservedQueue(10)
    getting = asyncio.create_task(get(queue, 4))
    await asyncio.wait_for(queue.waiting.wait(), WAIT)
    assert not getting.done()
    await queue.put(JOBS[0])
    assert await getting == [JOBS[0]]


async def test_one_job_wakes_one_getter_and_the_other_keeps_waiting() -> None:
    queue = ObservedQueue(10)
    first, second = asyncio.create_task(get(queue, 4)), asyncio.create_task(get(queue, 4))
    await asyncio.wait_for(queue.waiting.wait(), WAIT)
    await queue.put(JOBS[0])
    done, pending = await asyncio.wait({first, second}, timeout=WAIT, return_when=asyncio.FIRST_COMPLETED)
    assert [t.result() for t in done] == [[JOBS[0]]] and len(pending) == 1
    await queue.put(JOBS[1])
    assert await pending.pop() == [JOBS[1]]


# -- the delay: waiting for company -----------------------------------------------------------------------


async def test_jobs_put_during_the_delay_join_the_batch_which_returns_once_full() -> None:
    queue = await filled(1)
    # A delay far longer than the test may take: the batch must return because it is full.
    getting = asyncio.create_task(queue.get_batch(3, max_delay=60.0))
    await asyncio.wait_for(queue.waiting.wait(), WAIT)  # it holds the first job and waits for more
    assert await queue.depth() == 0
    await queue.put(JOBS[1])
    await asyncio.wait_for(queue.waiting.wait(), WAIT)
    await queue.put(JOBS[2])
    assert await asyncio.wait_for(getting, WAIT) == JOBS[:3]


async def test_a_partial_batch_returns_when_the_delay_runs_out() -> None:
    queue = await filled(1)
    loop = asyncio.get_running_loop()
    began = loop.time()
    assert await get(queue, 4, max_delay=0.02) == [JOBS[0]]
    assert loop.time() - began >= 0.02


async def test_a_full_queue_fills_the_batch_at_once_whatever_the_delay() -> None:
    queue = await filled(5)
    assert await get(queue, 4, max_delay=60.0) == JOBS[:4]


async def test_a_getter_canceled_while_it_waits_for_company_puts_its_jobs_back_in_order() -> None:
    queue = await filled(2)
    getting = asyncio.create_task(queue.get_batch(4, max_delay=60.0))
    await asyncio.wait_for(queue.waiting.wait(), WAIT)
    assert await queue.depth() == 0  # both taken
    await queue.put(JOBS[2])  # put while the getter is being canceled: it stays behind the returned ones
    getting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await getting
    assert await get(queue, 10) == JOBS[:3]


# -- the bound --------------------------------------------------------------------------------------------


async def test_put_past_the_bound_raises_at_once_and_taking_makes_room() -> None:
    queue = await filled(3, maxsize=3)
    with pytest.raises(QueueFull):
        await queue.put(JOBS[3])
    assert await queue.depth() == 3
    await get(queue, 1)
    await queue.put(JOBS[3])
    assert await get(queue, 10) == JOBS[1:4]


async def test_force_goes_past_the_bound() -> None:
    queue = await filled(2, maxsize=2)
    await queue.put(JOBS[2], force=True)  # recovery must not drop what was accepted
    assert await queue.depth() == 3
    with pytest.raises(QueueFull):
        await queue.put(JOBS[3])
