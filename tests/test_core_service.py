"""PredictionService without HTTP: submit, run, wait, watch, cancel, recover and sweep.

A scripted model on an executor the test steps through, and one worker's loop run a step at a time
(fakes.Core): every state in between can be asserted, and nothing sleeps.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any

import pytest

from fakes import WAIT, Core, DurableMemoryStore, ScriptedModel
from zypher_ws.errors import AlreadyFinished, IdempotencyConflict, InvalidInput, NotFound, NotReady, QueueFull
from zypher_ws.records import Job, Prediction, Status


async def loaded(*steps: Any, **settings: Any) -> Core:
    core = Core(ScriptedModel(*steps), **settings)
    await core.load()
    return core


def recorder() -> tuple[list[tuple[str, bool]], Any]:
    seen: list[tuple[str, bool]] = []

    def deliver(prediction: Prediction, snapshot: bool) -> None:
        seen.append((prediction.status.value, snapshot))

    return seen, deliver


# -- submit -----------------------------------------------------------------------------------------------


async def test_submit_stores_a_queued_prediction_and_queues_its_id() -> None:
    core = await loaded()
    p = await core.service.submit({"x": 1})
    assert (p.status, p.input, p.model_name, p.model_version) == (Status.QUEUED, {"x": 1}, "scripted", "0.1.0")
    assert p.attempts == 0 and p.started_at is None
    assert await core.store.get(p.prediction_id) == p
    assert await core.take_batch() == [Job(p.prediction_id)]
    assert core.model.calls == []  # nothing runs until a worker takes it


async def test_prediction_ids_are_uuid4_hex() -> None:
    core = await loaded()
    ids = [(await core.service.submit({"x": i})).prediction_id for i in range(20)]
    for pid in ids:
        parsed = uuid.UUID(hex=pid)
        assert parsed.version == 4
        assert pid == parsed.hex  # 32 lowercase hex digits, no dashes
    assert len(set(ids)) == 20


async def test_invalid_input_names_the_field_and_leaves_nothing_behind() -> None:
    core = await loaded()
    with pytest.raises(InvalidInput, match=r"input\.x: expected integer, got string"):
        await core.service.submit({"x": "one"})
    assert len(core.store) == 0 and await core.queue.depth() == 0


async def test_nothing_is_accepted_before_the_model_loads() -> None:
    core = Core(ScriptedModel())
    with pytest.raises(NotReady):
        await core.service.submit({"x": 1})
    with pytest.raises(NotReady, match=r"scripted version .* is still loading"):
        await core.service.check_ready()
    await core.load()
    await core.service.check_ready()
    await core.service.submit({"x": 1})
    assert len(core.store) == 1


async def test_without_workers_nothing_is_loaded_here_and_predictions_are_accepted() -> None:
    # The settings of an API process (workers elsewhere run the model); the backends here are in memory.
    core = Core(ScriptedModel(), workers=0, store="redis://127.0.0.1:6379/0")
    await core.load()  # only described: its schemas, for validation
    await core.service.check_ready()
    await core.service.submit({"x": 1})
    assert await core.queue.depth() == 1 and core.model.loads == 0


async def test_a_full_queue_refuses_and_stores_nothing() -> None:
    core = await loaded(max_queue=2)
    for x in (1, 2):
        await core.service.submit({"x": x})
    with pytest.raises(QueueFull):
        await core.service.submit({"x": 3})
    with pytest.raises(QueueFull):
        await core.service.run({"x": 3}, timeout=WAIT)
    assert len(core.store) == 2 and core.bus.listener_count() == 0
    with pytest.raises(NotReady, match="the queue is full"):
        await core.service.check_ready()


async def test_a_queue_that_fills_while_the_record_is_stored_takes_the_record_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    core = await loaded(max_queue=1)
    first = await core.service.submit({"x": 1})

    async def looks_empty() -> int:
        return 0  # another request filled it between the check and the put

    monkeypatch.setattr(core.queue, "depth", looks_empty)
    with pytest.raises(QueueFull):
        await core.service.run({"x": 2}, timeout=WAIT)
    assert len(core.store) == 1 and await core.store.get(first.prediction_id) == first
    assert core.bus.listener_count() == 0


async def test_an_idempotency_key_with_the_same_body_returns_the_first_prediction() -> None:
    core = await loaded()
    first = await core.service.submit({"x": 1, "y": [2, 3]}, idempotency_key="order-42")
    again = await core.service.submit({"y": [2, 3], "x": 1}, idempotency_key="order-42")  # same JSON, keys reordered
    assert again == first
    assert await core.queue.depth() == 1  # queued once
    with pytest.raises(IdempotencyConflict, match="order-42"):
        await core.service.submit({"x": 2}, idempotency_key="order-42")
    assert await core.queue.depth() == 1 and len(core.store) == 1


# -- run and wait -------------------------------------------------------------------------------------------


async def test_run_hears_the_result_without_reading_it_back(monkeypatch: pytest.MonkeyPatch) -> None:
    core = await loaded([{"y": 2}])
    reads: list[str] = []
    real_get = core.store.get

    async def counting_get(prediction_id: str) -> Prediction | None:
        reads.append(prediction_id)
        return await real_get(prediction_id)

    monkeypatch.setattr(core.store, "get", counting_get)
    running = asyncio.create_task(core.service.run({"x": 2}, timeout=WAIT))
    batch = core.run_batch(await core.take_batch())
    call = await core.executor.next_call()  # the model is called: the prediction is running
    assert not running.done() and core.bus.listener_count() == 1
    call.run()
    await asyncio.wait_for(batch, WAIT)
    p = await asyncio.wait_for(running, WAIT)
    assert (p.status, p.result, p.batch_size, p.attempts) == (Status.SUCCEEDED, {"y": 2}, 1, 1)
    assert reads == []  # it listened from before the prediction was queued
    assert core.bus.listener_count() == 0
    assert core.model.calls == [[{"x": 2}]]


async def test_run_returns_the_state_as_it_stands_when_the_timeout_runs_out_and_the_work_carries_on() -> None:
    core = await loaded([{"y": 1}])
    p = await core.service.run({"x": 1}, timeout=0)
    assert p.status is Status.QUEUED and core.bus.listener_count() == 0
    await core.work_once()
    done = await core.service.get(p.prediction_id)
    assert (done.status, done.result) == (Status.SUCCEEDED, {"y": 1})


async def test_run_with_a_used_idempotency_key_follows_the_earlier_prediction() -> None:
    core = await loaded([{"y": 1}])
    first = await core.service.submit({"x": 1}, idempotency_key="k")
    following = asyncio.create_task(core.service.run({"x": 1}, idempotency_key="k", timeout=WAIT))
    await core.work_once()
    p = await asyncio.wait_for(following, WAIT)
    assert (p.prediction_id, p.status) == (first.prediction_id, Status.SUCCEEDED)
    assert await core.queue.depth() == 0 and len(core.model.calls) == 1


async def test_wait_follows_a_prediction_to_its_end() -> None:
    core = await loaded([{"y": 1}])
    p = await core.service.submit({"x": 1})
    waiting = asyncio.create_task(core.service.wait(p.prediction_id, WAIT))
    await core.work_once()
    assert (await asyncio.wait_for(waiting, WAIT)).status is Status.SUCCEEDED
    assert core.bus.listener_count() == 0
    assert (await core.service.wait(p.prediction_id, WAIT)).status is Status.SUCCEEDED  # already over: at once


async def test_wait_returns_the_latest_state_when_the_timeout_runs_out() -> None:
    core = await loaded([{"y": 1}])
    p = await core.service.submit({"x": 1})
    batch = core.run_batch(await core.take_batch())
    call = await core.executor.next_call()
    assert (await core.service.wait(p.prediction_id, 0)).status is Status.RUNNING
    assert core.bus.listener_count() == 0
    call.run()
    await asyncio.wait_for(batch, WAIT)


async def test_an_unknown_id_is_not_found_everywhere() -> None:
    core = await loaded()
    _, deliver = recorder()
    for attempt in (
        core.service.get("nope"),
        core.service.wait("nope", WAIT),
        core.service.watch("nope", deliver),
        core.service.cancel("nope"),
    ):
        with pytest.raises(NotFound, match="no prediction nope"):
            await attempt
    assert core.bus.listener_count() == 0


async def test_watch_delivers_the_snapshot_then_each_change_once() -> None:
    core = await loaded([{"y": 1}])
    p = await core.service.submit({"x": 1})
    seen, deliver = recorder()
    watch = await core.service.watch(p.prediction_id, deliver)
    await core.work_once()
    assert seen == [("queued", True), ("running", False), ("succeeded", False)]
    assert watch.closed and core.bus.listener_count() == 0


async def test_one_raising_input_fails_only_itself_in_its_batch() -> None:
    core = await loaded(ValueError("bad item"), [{"y": 1}], ValueError("bad item"), [{"y": 3}], max_batch_size=3)
    ps = [await core.service.submit({"x": x}) for x in (1, 2, 3)]
    assert len(await core.work_once()) == 3
    done = [await core.service.get(p.prediction_id) for p in ps]
    assert [d.status for d in done] == [Status.SUCCEEDED, Status.FAILED, Status.SUCCEEDED]
    assert [d.result for d in done] == [{"y": 1}, None, {"y": 3}]
    assert done[1].error == {"code": "model_error", "message": "ValueError: bad item"}
    assert {d.batch_size for d in done} == {3}  # they ran as one batch (then one by one)


# -- cancel -------------------------------------------------------------------------------------------------


async def test_a_canceled_queued_prediction_never_runs() -> None:
    core = await loaded()  # an empty script: any model call fails the test
    p = await core.service.submit({"x": 1})
    seen, deliver = recorder()
    await core.service.watch(p.prediction_id, deliver)
    canceled = await core.service.cancel(p.prediction_id)
    assert canceled.status is Status.CANCELED and canceled.completed_at is not None
    assert seen == [("queued", True), ("canceled", False)]
    assert await core.work_once() == [Job(p.prediction_id)]  # the worker takes the job and skips it
    assert core.model.calls == []
    assert (await core.service.get(p.prediction_id)).status is Status.CANCELED


async def test_a_canceled_running_prediction_discards_its_result() -> None:
    core = await loaded([{"y": 1}])
    p = await core.service.submit({"x": 1})
    seen, deliver = recorder()
    await core.service.watch(p.prediction_id, deliver)
    batch = core.run_batch(await core.take_batch())
    call = await core.executor.next_call()
    assert (await core.service.cancel(p.prediction_id)).status is Status.CANCELED
    call.run()  # the model finishes anyway
    await asyncio.wait_for(batch, WAIT)
    record = await core.service.get(p.prediction_id)
    assert (record.status, record.result) == (Status.CANCELED, None)
    assert seen == [("queued", True), ("running", False), ("canceled", False)]


async def test_a_finished_prediction_cannot_be_canceled() -> None:
    core = await loaded([{"y": 1}])
    p = await core.service.submit({"x": 1})
    await core.work_once()
    with pytest.raises(AlreadyFinished, match="already succeeded"):
        await core.service.cancel(p.prediction_id)
    assert (await core.service.get(p.prediction_id)).status is Status.SUCCEEDED


# -- recover after a restart ------------------------------------------------------------------------------


async def test_recover_queues_unfinished_work_again_past_the_bound_and_fails_what_ran_too_often() -> None:
    store = DurableMemoryStore(ttl=60)
    # What the previous process left: one never started, one started once, one started twice.
    waiting, once, twice = (Prediction.new({"x": x}, model_name="scripted", model_version="0.1.0") for x in range(3))
    for p in (waiting, once, twice):
        await store.add(p)
    await store.start([once.prediction_id, twice.prediction_id])
    await store.recover(max_attempts=9)  # the first restart: running again later
    await store.start([twice.prediction_id])
    core = Core(ScriptedModel(), records=store, max_queue=1, max_attempts=2)
    seen, deliver = recorder()
    await core.service.watch(twice.prediction_id, deliver)

    assert await core.service.recover() == 2
    assert await core.queue.depth() == 2  # past --max-queue: what was accepted is never dropped
    assert [job.prediction_id for job in await core.take_batch()] == [waiting.prediction_id, once.prediction_id]
    lost = await core.service.get(twice.prediction_id)
    assert lost.status is Status.FAILED and lost.error is not None and lost.error["code"] == "worker_lost"
    assert seen == [("running", True), ("failed", False)]  # watchers hear it


async def test_recover_does_nothing_where_nothing_outlives_the_process() -> None:
    core = await loaded()
    await core.service.submit({"x": 1})
    assert await core.service.recover() == 0
    assert await core.queue.depth() == 1


# -- retention ----------------------------------------------------------------------------------------------


class SweepSpy:
    """Wraps a store's sweep: what time each sweep was given and what it removed, with an event per sweep."""

    def __init__(self, core: Core, monkeypatch: pytest.MonkeyPatch) -> None:
        self.core = core
        self.sweeps: list[tuple[float, int]] = []
        self.swept = asyncio.Event()
        self.fail_first = False
        self._sweep = core.store.sweep
        monkeypatch.setattr(core.store, "sweep", self)

    async def __call__(self, now: float) -> int:
        if self.fail_first:
            self.fail_first = False
            self.swept.set()
            raise OSError("disk away")
        removed = await self._sweep(now)
        self.sweeps.append((now, removed))
        self.swept.set()
        return removed

    async def sweep_at(self, now: float) -> None:
        """One pass of sweep_forever with its clock at `now`."""
        self.swept.clear()
        sweeper = asyncio.create_task(self.core.service.sweep_forever(clock=lambda: now))
        try:
            await asyncio.wait_for(self.swept.wait(), WAIT)
        finally:
            sweeper.cancel()
            await asyncio.gather(sweeper, return_exceptions=True)


async def test_the_sweep_deletes_finished_predictions_once_the_clock_passes_their_expiry(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    core = await loaded([{"y": 1}], result_ttl=3600)
    finished = await core.service.submit({"x": 1})
    await core.work_once()
    waiting = await core.service.submit({"x": 2})
    expires = (await core.service.get(finished.prediction_id)).expires_at
    assert expires is not None
    spy = SweepSpy(core, monkeypatch)

    await spy.sweep_at(expires - 1)
    assert spy.sweeps == [(expires - 1, 0)]
    assert (await core.service.get(finished.prediction_id)).status is Status.SUCCEEDED
    await spy.sweep_at(expires)
    assert spy.sweeps[-1] == (expires, 1)
    with pytest.raises(NotFound):
        await core.service.get(finished.prediction_id)
    assert (await core.service.get(waiting.prediction_id)).status is Status.QUEUED  # unfinished: never expires


async def test_a_failed_sweep_is_logged_and_tried_again(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    core = await loaded(result_ttl=0.5)  # sweeps 0.05 s apart, the shortest
    spy = SweepSpy(core, monkeypatch)
    spy.fail_first = True
    spy.swept.clear()
    sweeper = asyncio.create_task(core.service.sweep_forever(clock=lambda: 1.0))
    try:
        await asyncio.wait_for(spy.swept.wait(), WAIT)  # the failure
        spy.swept.clear()
        await asyncio.wait_for(spy.swept.wait(), WAIT)  # the next pass
    finally:
        sweeper.cancel()
        await asyncio.gather(sweeper, return_exceptions=True)
    assert spy.sweeps == [(1.0, 0)]
    failures = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert [r.getMessage() for r in failures] == ["retention sweep failed; trying again later"]
