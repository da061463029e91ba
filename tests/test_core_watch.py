"""Watch: a snapshot, then each later state exactly once and in order, whatever races the snapshot read."""

from __future__ import annotations

import asyncio

import pytest

from fakes import WAIT
from zypher_ws.backends.memory import LocalEventBus
from zypher_ws.events import Watch
from zypher_ws.records import Prediction, Status

QUEUED = Prediction.new({"x": 1}, model_name="m", model_version="1")
PID = QUEUED.prediction_id
RUNNING = QUEUED.started(batch_size=1)
SUCCEEDED = RUNNING.finished(Status.SUCCEEDED, ttl=60, result={"y": 1})
REQUEUED = RUNNING.requeued()  # taken over after its worker died
RUNNING_AGAIN = REQUEUED.started(batch_size=1)


class Recorder:
    """The consumer: what it was delivered, as (status, is_snapshot)."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, bool]] = []
        self.states: list[Prediction] = []

    def __call__(self, prediction: Prediction, snapshot: bool) -> None:
        self.seen.append((prediction.status.value, snapshot))
        self.states.append(prediction)


class SlowRead:
    """A store read that answers only when the test says, so events can arrive while it is in flight."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.answer: asyncio.Future[Prediction | None] = asyncio.get_running_loop().create_future()
        self.asked: list[str] = []

    async def __call__(self, prediction_id: str) -> Prediction | None:
        self.asked.append(prediction_id)
        self.started.set()
        return await self.answer


async def read_now(state: Prediction | None) -> SlowRead:
    read = SlowRead()
    read.answer.set_result(state)
    return read


async def test_the_snapshot_then_each_later_state_once_then_the_watch_ends() -> None:
    bus, seen = LocalEventBus(), Recorder()
    watch = Watch(bus, PID, seen)
    assert await watch.start(await read_now(QUEUED)) == QUEUED
    assert bus.listener_count() == 1
    await bus.publish([RUNNING])
    await bus.publish([RUNNING])  # a duplicate (a second announcement) is not delivered twice
    await bus.publish([SUCCEEDED])
    assert seen.seen == [("queued", True), ("running", False), ("succeeded", False)]
    assert seen.states[-1] is SUCCEEDED
    assert watch.closed and bus.listener_count() == 0  # a terminal state ends it
    await bus.publish([SUCCEEDED])
    assert len(seen.seen) == 3


async def test_states_published_during_the_read_come_after_the_snapshot_and_stale_ones_are_dropped() -> None:
    bus, seen = LocalEventBus(), Recorder()
    read = SlowRead()
    watch = Watch(bus, PID, seen)
    starting = asyncio.create_task(watch.start(read))
    await asyncio.wait_for(read.started.wait(), WAIT)
    assert bus.listener_count() == 1  # subscribed before reading
    await bus.publish([RUNNING])  # heard during the read: held back
    assert seen.seen == []
    read.answer.set_result(RUNNING)  # the read saw it too
    assert await asyncio.wait_for(starting, WAIT) == RUNNING
    assert seen.seen == [("running", True)]  # not repeated after the snapshot
    await bus.publish([SUCCEEDED])
    assert seen.seen == [("running", True), ("succeeded", False)]


async def test_completion_racing_the_read_yields_exactly_one_terminal_state() -> None:
    bus, seen = LocalEventBus(), Recorder()
    read = SlowRead()
    watch = Watch(bus, PID, seen)
    starting = asyncio.create_task(watch.start(read))
    await asyncio.wait_for(read.started.wait(), WAIT)
    await bus.publish([RUNNING, SUCCEEDED])
    read.answer.set_result(SUCCEEDED)
    await asyncio.wait_for(starting, WAIT)
    assert seen.seen == [("succeeded", True)]
    assert watch.closed and bus.listener_count() == 0


async def test_an_older_snapshot_is_followed_by_what_was_heard_during_the_read() -> None:
    bus, seen = LocalEventBus(), Recorder()
    read = SlowRead()
    watch = Watch(bus, PID, seen)
    starting = asyncio.create_task(watch.start(read))
    await asyncio.wait_for(read.started.wait(), WAIT)
    await bus.publish([RUNNING, SUCCEEDED])
    read.answer.set_result(QUEUED)  # the read was served before those changes were made
    await asyncio.wait_for(starting, WAIT)
    assert seen.seen == [("queued", True), ("running", False), ("succeeded", False)]


async def test_states_never_go_backwards() -> None:
    bus, seen = LocalEventBus(), Recorder()
    watch = Watch(bus, PID, seen)
    await watch.start(await read_now(RUNNING))
    await bus.publish([REQUEUED, RUNNING_AGAIN])  # a takeover restarts it: the watcher already said running
    await bus.publish([SUCCEEDED])
    assert seen.seen == [("running", True), ("succeeded", False)]


async def test_other_predictions_are_not_delivered() -> None:
    bus, seen = LocalEventBus(), Recorder()
    other = Prediction.new({"x": 2}, model_name="m", model_version="1")
    await Watch(bus, PID, seen).start(await read_now(QUEUED))
    await bus.publish([other.started(batch_size=1)])
    assert seen.seen == [("queued", True)]


async def test_two_watches_of_one_prediction_each_get_every_state() -> None:
    bus, first, second = LocalEventBus(), Recorder(), Recorder()
    await Watch(bus, PID, first).start(await read_now(QUEUED))
    await Watch(bus, PID, second).start(await read_now(QUEUED))
    await bus.publish([RUNNING, SUCCEEDED])
    assert first.seen == second.seen == [("queued", True), ("running", False), ("succeeded", False)]
    assert bus.listener_count() == 0


async def test_an_unknown_id_delivers_nothing_and_leaves_no_listener() -> None:
    bus, seen = LocalEventBus(), Recorder()
    watch = Watch(bus, PID, seen)
    assert await watch.start(await read_now(None)) is None
    assert watch.closed and bus.listener_count() == 0 and seen.seen == []


async def test_a_failing_read_raises_and_leaves_no_listener() -> None:
    bus, seen = LocalEventBus(), Recorder()
    read = SlowRead()
    read.answer.set_exception(ConnectionError("store away"))
    watch = Watch(bus, PID, seen)
    with pytest.raises(ConnectionError):
        await watch.start(read)
    assert watch.closed and bus.listener_count() == 0 and seen.seen == []


async def test_stop_ends_it_early_and_twice_is_harmless() -> None:
    bus, seen = LocalEventBus(), Recorder()
    watch = Watch(bus, PID, seen)
    await watch.start(await read_now(QUEUED))
    watch.stop()
    watch.stop()
    await bus.publish([RUNNING])
    assert seen.seen == [("queued", True)] and bus.listener_count() == 0
