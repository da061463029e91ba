"""A store that cannot write (a full disk, Redis away): clear answers, /readyz says so, nothing is stranded.

The full disk is simulated by a SQLite store whose every transaction fails the way SQLite fails when the
filesystem is full (the real error, raised from inside the transaction), registered under a URL scheme
of its own: the backend registry is the seam.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from fakes import WAIT, GatedModel, make_settings
from zypher_ws import backends, workers
from zypher_ws.backends import Backend, Kind
from zypher_ws.backends.memory import LocalEventBus, MemoryQueue
from zypher_ws.backends.sqlite import SQLiteStore, path_from_url
from zypher_ws.http.app import create_app
from zypher_ws.http.keys import SERVICE
from zypher_ws.records import Outcome, Prediction
from zypher_ws.settings import Settings


class FillingStore(SQLiteStore):
    """SQLite whose transactions fail with SQLITE_FULL while `full` is set."""

    full = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.finish_failed = asyncio.Event()

    def _transaction(self, ops: list[Any], sync: bool = False) -> list[tuple[bool, Any]]:
        if self.full:
            ops = [_no_space] * len(ops)
        return super()._transaction(ops, sync)

    async def finish(self, outcomes: Sequence[Outcome]) -> list[Prediction]:
        try:
            return await super().finish(outcomes)
        except Exception:
            self.finish_failed.set()
            raise


def _no_space(conn: sqlite3.Connection) -> None:
    raise sqlite3.OperationalError("database or disk is full")


@pytest.fixture
def filling(monkeypatch: pytest.MonkeyPatch) -> list[FillingStore]:
    """Registers `filling-sqlite:///path`; the list holds the store each app opened."""
    opened: list[FillingStore] = []

    @asynccontextmanager
    async def open_filling(settings: Settings, url: str, listen: bool, readers: int) -> AsyncIterator[Backend]:
        store = FillingStore(path_from_url(url.replace("filling-", "", 1)), ttl=settings.result_ttl)
        await store.open()
        opened.append(store)

        async def open_queue(name: str, version: str, maxsize: int, levels: int = 0) -> MemoryQueue:
            return MemoryQueue(maxsize, levels)

        try:
            yield Backend(store, LocalEventBus(), open_queue)
        finally:
            await store.close()

    monkeypatch.setitem(backends.SCHEMES, "filling-sqlite", Kind(open_filling, shared=False))
    monkeypatch.setattr(workers, "RETRY_MAX", 0.01)  # retry at once: the test releases the disk itself
    return opened


async def test_a_full_disk_refuses_new_work_clearly_and_resumes_by_itself(
    aiohttp_client: Any, filling: list[FillingStore], tmp_path: Path
) -> None:
    gated = GatedModel()
    gated.bind(asyncio.get_running_loop())
    settings = make_settings(store=f"filling-sqlite:///{tmp_path / 'z.db'}")
    client = await aiohttp_client(create_app(settings, model=gated))
    service = client.app[SERVICE]
    await asyncio.wait_for(service.models.default.loaded.wait(), WAIT)
    store = filling[0]

    accepted = await client.post("/predict", json={"input": {"x": 1}}, headers={"Async-Mode": "true"})
    assert accepted.status == 202
    pid = (await accepted.json())["prediction_id"]
    await gated.wait_started()

    store.full = True
    gated.release.set()  # the model answers while the disk is full: its outcome cannot be written
    await asyncio.wait_for(store.finish_failed.wait(), WAIT)

    refused = await client.post("/predict", json={"input": {"x": 2}}, headers={"Async-Mode": "true"})
    assert refused.status == 503
    assert (await refused.json())["error"]["code"] == "storage_full"
    assert int(refused.headers["Retry-After"]) >= 1
    ready = await client.get("/readyz")
    assert ready.status == 503 and (await ready.json())["error"]["code"] == "storage_full"

    store.full = False  # space is freed: no restart, no client action
    done = await service.wait(pid, WAIT)
    assert done.status.value == "succeeded" and done.result == {"echo": {"x": 1}}
    assert len(gated.batches) == 1  # recorded from the outcome in hand, never run again
    assert (await client.get("/readyz")).status == 200
    again = await client.post("/predict", json={"input": {"x": 3}}, headers={"Async-Mode": "true"})
    assert again.status == 202


async def test_a_redis_blip_while_a_batch_finishes_is_retried_not_stranded(
    aiohttp_client: Any, redis_settings: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The outcome is written once Redis answers again: the batch does not stay `running` (held and
    looking fresh to other workers) until someone restarts the process."""
    from zypher_ws.backends.redis.store import RedisStore
    from zypher_ws.errors import BackendUnavailable

    failures = 2
    original = RedisStore.finish

    async def blip(self: RedisStore, outcomes: Sequence[Outcome]) -> list[Prediction]:
        nonlocal failures
        if failures:
            failures -= 1
            raise BackendUnavailable("Redis is unavailable: Connection reset by peer")
        return await original(self, outcomes)

    monkeypatch.setattr(RedisStore, "finish", blip)
    monkeypatch.setattr(workers, "RETRY_MAX", 0.01)
    gated = GatedModel(gated=False)
    gated.bind(asyncio.get_running_loop())
    client = await aiohttp_client(create_app(make_settings(**redis_settings), model=gated))
    await asyncio.wait_for(client.app[SERVICE].models.default.loaded.wait(), WAIT)
    resp = await client.post("/predict", json={"input": {"x": 7}})
    assert resp.status == 200
    record = await resp.json()
    assert record["status"] == "succeeded" and record["result"] == {"echo": {"x": 7}}
    assert failures == 0 and len(gated.batches) == 1


async def test_a_start_applied_but_unanswered_on_redis_is_taken_over_not_stranded(
    aiohttp_client: Any, redis_settings: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis ran the start, then the connection broke before its reply: retrying would find the records
    running and start nothing. The batch is released, taken over after --claim-idle, and run."""
    from zypher_ws.backends.redis.store import RedisStore
    from zypher_ws.errors import BackendUnavailable

    original = RedisStore.start
    lost_replies = 1

    async def applied_then_lost(
        self: RedisStore, prediction_ids: Sequence[str], *, now: float | None = None
    ) -> list[Prediction]:
        nonlocal lost_replies
        started = await original(self, prediction_ids, now=now)
        if lost_replies:
            lost_replies -= 1
            raise BackendUnavailable("Redis is unavailable: Connection closed by server")
        return started

    monkeypatch.setattr(RedisStore, "start", applied_then_lost)
    gated = GatedModel(gated=False)
    gated.bind(asyncio.get_running_loop())
    settings = make_settings(**redis_settings, claim_idle=0.3, max_attempts=3)
    client = await aiohttp_client(create_app(settings, model=gated))
    service = client.app[SERVICE]
    await asyncio.wait_for(service.models.default.loaded.wait(), WAIT)
    accepted = await client.post("/predict", json={"input": {"x": 5}}, headers={"Async-Mode": "true"})
    assert accepted.status == 202
    done = await service.wait((await accepted.json())["prediction_id"], WAIT)
    assert done.status.value == "succeeded" and done.result == {"echo": {"x": 5}}
    assert done.attempts == 2  # the first start counted: at-least-once, and said so
    assert lost_replies == 0 and len(gated.batches) == 1


async def test_a_redis_blip_while_a_batch_fills_runs_what_was_taken(
    redis_settings: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first read delivered entries to this worker; a failure of the read that waits for company must
    not drop them (they look held, so no other worker would ever run them)."""
    import redis.asyncio as aioredis
    import redis.exceptions

    from zypher_ws.backends.redis.keys import RedisKeys
    from zypher_ws.backends.redis.queue import RedisQueue
    from zypher_ws.backends.redis.store import RedisStore
    from zypher_ws.records import Job

    client = aioredis.Redis.from_url(redis_settings["redis_url"], decode_responses=True)
    keys = RedisKeys(redis_settings["redis_prefix"])
    queue = RedisQueue(
        client, keys, stream=keys.queue("m", "1"), store=RedisStore(client, keys), bus=LocalEventBus(), maxsize=10,
        consumer="c1",
        claim_idle=30, max_attempts=3,
    )  # fmt: skip
    try:
        await queue.ensure_group()
        await queue.put(Job("a" * 32))
        original, reads = RedisQueue._read, 0

        async def second_read_fails(self: RedisQueue, count: int, block_ms: int) -> list[Job]:
            nonlocal reads
            reads += 1
            if reads == 2:
                raise redis.exceptions.ConnectionError("Connection reset by peer")
            return await original(self, count, block_ms)

        monkeypatch.setattr(RedisQueue, "_read", second_read_fails)
        batch = await asyncio.wait_for(queue.get_batch(4, 0.05), WAIT)
        assert [job.prediction_id for job in batch] == ["a" * 32] and reads == 2
    finally:
        await queue.close()
        await client.aclose()


async def test_a_real_full_database_is_storage_full_and_recovers(tmp_path: Path) -> None:
    """SQLite's own SQLITE_FULL (a page limit standing in for the disk): the error is StorageFull whether
    SQLite rolled the transaction back itself or not, /readyz's check says so, and both recover."""
    from zypher_ws.errors import StorageFull
    from zypher_ws.records import Prediction as P

    store = SQLiteStore(tmp_path / "z.db", ttl=60)
    await store.open()
    conn = store._conn
    assert conn is not None
    pages = await store._run(lambda: conn.execute("PRAGMA page_count").fetchone()[0])
    await store._run(lambda: conn.execute(f"PRAGMA max_page_count = {pages}").fetchone())  # not a page more
    big = ["x" * 1000] * 200  # ~200 KB a record: past the limit at once
    with pytest.raises(StorageFull):
        await asyncio.gather(*(store.add(P.new(big, model_name="m", model_version="1")) for _ in range(5)))
    with pytest.raises(StorageFull):
        await store.check()
    await store._run(lambda: conn.execute("PRAGMA max_page_count = 1000000").fetchone())
    await store.check()  # room again: ready
    await store.add(P.new(big, model_name="m", model_version="1"))
    await store.close()


async def test_a_failed_start_leaves_deferred_predictions_startable(tmp_path: Path) -> None:
    """A batch of a deferred (sync) prediction and a stored one whose start cannot be written: the retry
    starts both, not only the stored one."""
    from zypher_ws.records import Prediction as P

    store = FillingStore(tmp_path / "z.db", ttl=60)
    await store.open()
    deferred, stored = P.new(1, model_name="m", model_version="1"), P.new(2, model_name="m", model_version="1")
    await store.add_deferred(deferred)
    await store.add(stored)
    ids = [deferred.prediction_id, stored.prediction_id]
    store.full = True
    with pytest.raises(Exception, match="no space left"):
        await store.start(ids)
    store.full = False
    started = await store.start(ids)
    assert sorted(p.prediction_id for p in started) == sorted(ids)
    await store.close()
