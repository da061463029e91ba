"""Both stores through one suite: the lifecycle rules, idempotency, retention; SQLite across reopen."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import shutil
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from zypher_ws.backends import DefersWrites, Store, Sweeps
from zypher_ws.backends import sqlite as sqlite_backend
from zypher_ws.backends.memory import MemoryStore
from zypher_ws.backends.redis.keys import RedisKeys
from zypher_ws.backends.redis.store import RedisStore
from zypher_ws.backends.sqlite import SQLiteStore
from zypher_ws.errors import AlreadyFinished, IdempotencyConflict, NotFound
from zypher_ws.records import IdempotencyKey, Outcome, Prediction, Status


def new(value: object = 1) -> Prediction:
    return Prediction.new(value, model_name="m", model_version="1")


@pytest.fixture(params=["memory", "sqlite", "redis"])
def kind(request: pytest.FixtureRequest) -> tuple[str, dict[str, str]]:
    settings = request.getfixturevalue("redis_settings") if request.param == "redis" else {}
    return request.param, settings


@pytest.fixture
async def store(kind: tuple[str, dict[str, str]], tmp_path: Path) -> AsyncIterator[Store]:
    s: Store
    name, settings = kind
    if name == "memory":
        s = MemoryStore(ttl=60)
    elif name == "sqlite":
        sqlite = SQLiteStore(tmp_path / "z.db", ttl=60)
        await sqlite.open()
        s = sqlite
    else:
        client = aioredis.Redis.from_url(settings["redis_url"], decode_responses=True)
        s = RedisStore(client, RedisKeys(settings["redis_prefix"]), ttl=60)
        yield s
        await client.aclose()
        return
    yield s
    await s.close()


async def test_add_get_delete(store: Store) -> None:
    p = new({"a": [1, 2]})
    assert await store.add(p) == p
    assert await store.get(p.prediction_id) == p
    await store.delete(p.prediction_id)
    assert await store.get(p.prediction_id) is None


async def test_lifecycle(store: Store) -> None:
    a, b, c = new(1), new(2), new(3)
    for p in (a, b, c):
        await store.add(p)
    await store.cancel(c.prediction_id)
    started = await store.start([a.prediction_id, b.prediction_id, c.prediction_id, "unknown"])
    assert [p.prediction_id for p in started] == [a.prediction_id, b.prediction_id]
    assert all(p.status is Status.RUNNING and p.attempts == 1 and p.batch_size == 4 for p in started)
    assert await store.start([a.prediction_id]) == []  # only queued ones start
    await store.cancel(b.prediction_id)
    done = await store.finish([Outcome(a.prediction_id, result={"ok": 1}), Outcome(b.prediction_id, result=2)])
    assert [p.prediction_id for p in done] == [a.prediction_id]  # canceled b keeps its state
    got = await store.get(a.prediction_id)
    assert got is not None and got.status is Status.SUCCEEDED and got.result == {"ok": 1}
    assert got.expires_at == pytest.approx(got.completed_at + 60)  # type: ignore[operator]
    b_now = await store.get(b.prediction_id)
    assert b_now is not None and b_now.status is Status.CANCELED and b_now.result is None
    with pytest.raises(AlreadyFinished):
        await store.cancel(a.prediction_id)
    with pytest.raises(NotFound):
        await store.cancel("nope")


async def test_failed_outcome(store: Store) -> None:
    p = new()
    await store.add(p)
    await store.start([p.prediction_id])
    [failed] = await store.finish([Outcome(p.prediction_id, error={"code": "model_error", "message": "x"})])
    assert failed.status is Status.FAILED and failed.error == {"code": "model_error", "message": "x"}


async def test_fail_queued_goes_straight_from_queued_to_failed(store: Store) -> None:
    queued, running, canceled = new(1), new(2), new(3)
    for p in (queued, running, canceled):
        await store.add(p)
    await store.start([running.prediction_id])
    await store.cancel(canceled.prediction_id)
    error = {"code": "model_unavailable", "message": "no one serves it"}
    failed = await store.fail_queued([Outcome(p.prediction_id, error=error) for p in (queued, running, canceled)])
    assert [p.prediction_id for p in failed] == [queued.prediction_id]  # only a queued one: it never ran
    assert await store.fail_queued([]) == [] and await store.finish([]) == [] and await store.start([]) == []
    got = await store.get(queued.prediction_id)
    assert got is not None and got.status is Status.FAILED and got.error == error
    assert got.started_at is None and got.attempts == 0 and got.expires_at is not None
    for p, status in ((running, Status.RUNNING), (canceled, Status.CANCELED)):
        kept = await store.get(p.prediction_id)
        assert kept is not None and kept.status is status


async def test_start_fails_a_prediction_past_its_deadline_without_starting_it(store: Store) -> None:
    now = time.time()
    late = dataclasses.replace(new(1), deadline=now - 1)
    in_time, no_deadline = dataclasses.replace(new(2), deadline=now + 60), new(3)
    for p in (late, in_time, no_deadline):
        await store.add(p)
    changed = await store.start([late.prediction_id, in_time.prediction_id, no_deadline.prediction_id], now=now)
    assert [(p.prediction_id, p.status) for p in changed] == [
        (late.prediction_id, Status.FAILED),
        (in_time.prediction_id, Status.RUNNING),
        (no_deadline.prediction_id, Status.RUNNING),
    ]
    got = await store.get(late.prediction_id)
    assert got is not None and got.error is not None and got.error["code"] == "deadline_exceeded"
    assert got.started_at is None and got.attempts == 0


async def test_idempotency(store: Store) -> None:
    first = new(1)
    key = IdempotencyKey("k1", "fp-1")
    assert await store.add(first, key) == first
    again = await store.add(new(1), key)
    assert again.prediction_id == first.prediction_id
    with pytest.raises(IdempotencyConflict):
        await store.add(new(2), IdempotencyKey("k1", "fp-2"))
    other = new(3)
    assert (await store.add(other, IdempotencyKey("k2", "fp-1"))).prediction_id == other.prediction_id


async def test_sweep_deletes_only_expired_finished(store: Store) -> None:
    done, running, queued = new(1), new(2), new(3)
    for p in (done, running, queued):
        await store.add(p, IdempotencyKey(p.prediction_id, "fp"))
    await store.start([done.prediction_id, running.prediction_id])
    await store.finish([Outcome(done.prediction_id, result=1)])
    if isinstance(store, RedisStore):
        # Redis deletes expired keys itself: the finished record, and only it, carries the TTL.
        ttls = [await store._redis.pttl(store._keys.record(p.prediction_id)) for p in (done, running, queued)]
        assert 0 < ttls[0] <= 60_000 and ttls[1:] == [-1, -1]
        return
    assert isinstance(store, Sweeps)
    assert await store.sweep(time.time()) == 0
    assert await store.sweep(time.time() + 61) == 1
    assert await store.get(done.prediction_id) is None
    assert await store.get(running.prediction_id) is not None and await store.get(queued.prediction_id) is not None
    # The expired prediction's idempotency key went with it: the same key makes a new prediction.
    fresh = new(1)
    assert (await store.add(fresh, IdempotencyKey(done.prediction_id, "fp"))).prediction_id == fresh.prediction_id


async def test_memory_store_keeps_a_bounded_number_of_finished_records() -> None:
    store = MemoryStore(ttl=60, max_finished=3)
    unfinished = [await store.add(new(i)) for i in range(4)]
    finished = []
    for i in range(5):
        p = await store.add(new(10 + i))
        await store.start([p.prediction_id])
        finished += await store.finish([Outcome(p.prediction_id, result=i)])
    kept = [await store.get(p.prediction_id) for p in finished]
    assert kept[:2] == [None, None]  # the two oldest finished went first
    assert [p.result for p in kept[2:] if p is not None] == [2, 3, 4]
    assert None not in [await store.get(p.prediction_id) for p in unfinished]  # never unfinished ones
    assert len(store) == 4 + 3
    canceled = await store.cancel(unfinished[0].prediction_id)  # finishing by cancel counts too
    assert await store.get(canceled.prediction_id) is not None and await store.get(finished[2].prediction_id) is None


async def test_sqlite_survives_reopen_and_recovers_in_order(tmp_path: Path) -> None:
    path = tmp_path / "z.db"
    s = SQLiteStore(path, ttl=60)
    await s.open()
    preds = [new(i) for i in range(6)]
    for p in preds:
        await s.add(p)
    await s.start([preds[0].prediction_id])  # running when the process "died"
    await s.start([preds[1].prediction_id])
    await s.finish([Outcome(preds[1].prediction_id, result="done")])
    await s.close()

    s = SQLiteStore(path, ttl=60)
    await s.open()
    requeue, failed = await s.recover(max_attempts=3)
    assert [p.prediction_id for p in requeue] == [preds[0].prediction_id] + [p.prediction_id for p in preds[2:]]
    assert requeue[0].attempts == 1 and requeue[0].status is Status.QUEUED
    assert failed == []
    finished = await s.get(preds[1].prediction_id)
    assert finished is not None and finished.result == "done"
    # Started and lost twice more (attempts 2, then 3): at max_attempts it fails as worker_lost.
    await s.start([preds[0].prediction_id])
    requeue, _ = await s.recover(max_attempts=3)
    assert requeue[0].attempts == 2
    await s.start([preds[0].prediction_id])
    _, failed = await s.recover(max_attempts=3)
    assert [p.prediction_id for p in failed] == [preds[0].prediction_id]
    assert failed[0].error is not None and failed[0].error["code"] == "worker_lost"
    await s.close()


async def test_lifecycle_of_a_deferred_prediction(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "z.db", ttl=60)
    await store.open()
    assert isinstance(store, DefersWrites)
    a, b, c = new(1), new(2), new(3)
    for p in (a, b, c):
        assert await store.add_deferred(p) == p
        assert await store.get(p.prediction_id) == p
    await store.cancel(c.prediction_id)
    started = await store.start([a.prediction_id, b.prediction_id, c.prediction_id])
    assert [p.prediction_id for p in started] == [a.prediction_id, b.prediction_id]
    assert all(p.status is Status.RUNNING and p.attempts == 1 for p in started)
    assert (await store.get(a.prediction_id)) == started[0]
    await store.cancel(b.prediction_id)
    done = await store.finish([Outcome(a.prediction_id, result="ok"), Outcome(b.prediction_id, result=2)])
    assert [(p.prediction_id, p.status) for p in done] == [(a.prediction_id, Status.SUCCEEDED)]
    for p, status in ((a, Status.SUCCEEDED), (b, Status.CANCELED), (c, Status.CANCELED)):
        got = await store.get(p.prediction_id)
        assert got is not None and got.status is status
    with pytest.raises(AlreadyFinished):
        await store.cancel(a.prediction_id)
    d = new(4)
    await store.add_deferred(d)
    await store.delete(d.prediction_id)
    assert await store.get(d.prediction_id) is None
    late = dataclasses.replace(new(5), deadline=time.time() - 1)
    await store.add_deferred(late)
    [expired] = await store.start([late.prediction_id], now=time.time())
    assert expired.status is Status.FAILED and expired.started_at is None
    assert on_disk(tmp_path / "z.db")[late.prediction_id] == "failed"  # written once, failed
    orphan = new(6)
    await store.add_deferred(orphan)
    [failed] = await store.fail_queued([Outcome(orphan.prediction_id, error={"code": "c", "message": "m"})])
    assert failed.status is Status.FAILED and on_disk(tmp_path / "z.db")[orphan.prediction_id] == "failed"
    await store.close()


def on_disk(path: Path) -> dict[str, str]:
    with sqlite3.connect(path) as conn:
        return dict(conn.execute("SELECT id, status FROM predictions").fetchall())


async def test_sqlite_writes_a_deferred_prediction_once_it_is_finished(tmp_path: Path) -> None:
    path = tmp_path / "z.db"
    s = SQLiteStore(path, ttl=60)
    await s.open()
    ran, kept, canceled, cut_off = new(1), new(2), new(3), new(4)
    for p in (ran, kept, canceled, cut_off):
        await s.add_deferred(p)
    await s.start([ran.prediction_id, kept.prediction_id])
    assert on_disk(path) == {}  # added and started: nothing written
    await s.finish([Outcome(ran.prediction_id, result="done")])
    assert on_disk(path) == {ran.prediction_id: "succeeded"}  # one write, finished
    await s.persist(kept.prediction_id)  # before a 202: on disk as it stands, then as any other record
    await s.cancel(canceled.prediction_id)
    assert on_disk(path) == {
        ran.prediction_id: "succeeded",
        kept.prediction_id: "running",
        canceled.prediction_id: "canceled",
    }
    [finished] = await s.finish([Outcome(kept.prediction_id, result="later")])
    assert finished.status is Status.SUCCEEDED and finished.attempts == 1
    await s.close()  # what was never written is kept for the next start
    assert on_disk(path)[cut_off.prediction_id] == "queued"

    s = SQLiteStore(path, ttl=60)
    await s.open()
    requeue, _ = await s.recover(max_attempts=3)
    assert [p.prediction_id for p in requeue] == [cut_off.prediction_id]
    got = await s.get(kept.prediction_id)
    assert got is not None and got.result == "later"
    await s.close()


async def test_redis_reclaim_reruns_lost_work_until_max_attempts(redis_settings: dict[str, str]) -> None:
    client = aioredis.Redis.from_url(redis_settings["redis_url"], decode_responses=True)
    store = RedisStore(client, RedisKeys(redis_settings["redis_prefix"]), ttl=60)
    lost, queued, done = new(1), new(2), new(3)
    for p in (lost, queued, done):
        await store.add(p)
    await store.start([lost.prediction_id, done.prediction_id])
    await store.finish([Outcome(done.prediction_id, result=3)])
    ids = [lost.prediction_id, queued.prediction_id, done.prediction_id, "gone"]
    again, failed = await store.reclaim(ids, max_attempts=2)
    assert [p.prediction_id for p in again] == [lost.prediction_id, queued.prediction_id] and failed == []
    assert (await store.get(lost.prediction_id)).status is Status.QUEUED  # type: ignore[union-attr]
    await store.start([lost.prediction_id])  # second attempt, lost again
    again, failed = await store.reclaim([lost.prediction_id], max_attempts=2)
    assert again == [] and [p.prediction_id for p in failed] == [lost.prediction_id]
    assert failed[0].status is Status.FAILED and failed[0].error["code"] == "worker_lost"  # type: ignore[index]
    await client.aclose()


async def test_sqlite_fsyncs_the_commits_that_accept_or_cancel_and_no_others(tmp_path: Path) -> None:
    """--sqlite-synchronous ACCEPTED (the default): FULL for a commit that a 202 or a cancel waits on,
    NORMAL for the rest (a sync 200, starts and finishes), read back from the connection at each commit."""
    seen: list[int] = []

    class Observed(SQLiteStore):
        def _transaction(self, ops: list[Any], sync: bool = False) -> list[tuple[bool, Any]]:
            results = super()._transaction(ops, sync)
            assert self._conn is not None
            seen.append(self._conn.execute("PRAGMA synchronous").fetchone()[0])  # 1 NORMAL, 2 FULL
            return results

    s = Observed(tmp_path / "z.db", ttl=60)
    await s.open()
    accepted, sync_one, canceled, timed_out = new(1), new(2), new(3), new(4)
    await s.add(accepted)  # async submit: before its 202
    await s.start([accepted.prediction_id])
    await s.finish([Outcome(accepted.prediction_id, result=1)])
    await s.add_deferred(sync_one)
    await s.start([sync_one.prediction_id])
    await s.finish([Outcome(sync_one.prediction_id, result=2)])  # a sync 200: written once, not fsynced
    await s.add(canceled)
    await s.cancel(canceled.prediction_id)
    await s.add_deferred(timed_out)
    await s.persist(timed_out.prediction_id)  # a sync request's timeout: its 202 follows
    await s.close()
    assert seen == [2, 1, 1, 1, 2, 2, 2]


async def test_sqlite_checkpoints_off_the_commit_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Commits never checkpoint (SQLite's autocheckpoint is off): every CHECKPOINT_COMMITS commits the
    Checkpointer copies the WAL into the database on its own connection."""
    monkeypatch.setattr(sqlite_backend, "CHECKPOINT_COMMITS", 3)
    path = tmp_path / "z.db"
    s = SQLiteStore(path, ttl=60)
    await s.open()
    assert s._conn is not None and s._conn.execute("PRAGMA wal_autocheckpoint").fetchone() == (0,)
    assert s._checkpointer is not None
    ran = s._checkpointer.ran
    preds = [new(i) for i in range(3)]  # the schema was no commit of the store's: these are the first 3
    for p in preds[:2]:
        await s.add(p)
    assert not ran.is_set() and on_disk_alone(path, tmp_path) == []  # all in the WAL still
    await s.add(preds[2])
    assert await asyncio.to_thread(ran.wait, 10)
    assert sorted(on_disk_alone(path, tmp_path)) == sorted(p.prediction_id for p in preds)
    await s.close()
    assert s._checkpointer is None


def on_disk_alone(path: Path, tmp_path: Path) -> list[str]:
    """The ids in the database file itself, without its WAL: what checkpoints have copied there."""
    copy = tmp_path / "alone.db"
    shutil.copyfile(path, copy)
    with contextlib.closing(sqlite3.connect(copy)) as conn:
        try:
            return [row[0] for row in conn.execute("SELECT id FROM predictions")]
        except sqlite3.OperationalError:  # no table yet: even the schema is in the WAL
            return []
        finally:
            copy.unlink()


async def test_sqlite_hands_a_failed_commit_to_every_waiter_and_keeps_committing(tmp_path: Path) -> None:
    """A commit's outcome comes back from the store's thread in one loop callback: an error there (a bug
    of ours, not a conflict) reaches every write of that group commit, and the next commit works."""
    broken = [True]

    class Buggy(SQLiteStore):
        def _transaction(self, ops: list[Any], sync: bool = False) -> list[tuple[bool, Any]]:
            if broken[0]:
                broken[0] = False
                raise RuntimeError("a bug")  # on the store's thread: handed over, never lost there
            return super()._transaction(ops, sync)

    s = Buggy(tmp_path / "z.db", ttl=60)
    await s.open()
    first, second, third = new(1), new(2), new(3)
    outcomes = await asyncio.wait_for(asyncio.gather(s.add(first), s.add(second), return_exceptions=True), timeout=10)
    assert [str(o) for o in outcomes] == ["a bug", "a bug"]
    assert await s.add(third) == third
    assert await s.get(third.prediction_id) == third and await s.get(first.prediction_id) is None
    await s.close()
