"""The catalog of model versions that workers serve (catalog.py): the Redis scripts against a real Redis,
and an API process following a catalog the test scripts, with the catalog's clock in the test's hands."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any

import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient

from fakes import WAIT, GatedModel, make_settings
from zypher_ws.backends.redis.catalog import RedisCatalog
from zypher_ws.backends.redis.keys import RedisKeys
from zypher_ws.catalog import CatalogFollower, CatalogState, Key
from zypher_ws.errors import InvalidInput, ModelUnavailable
from zypher_ws.http.app import create_app
from zypher_ws.http.keys import CATALOG, OPENAPI, REPOSITORY, SERVICE
from zypher_ws.models import MockModel


def description(n_features: int = 4, *, max_queue: int = 100, name: str = "iris") -> str:
    """What a worker publishes of an sklearn-like model taking `n_features` numbers."""
    schema = {"type": "array", "items": {"type": "number"}, "minItems": n_features, "maxItems": n_features}
    return json.dumps(
        {
            "name": name,
            "version": "1",
            "runtime": "sklearn",
            "input_schema": schema,
            "output_schema": {"type": "object"},
            "inputs": [{"name": "input", "datatype": "FP64", "shape": [n_features], "json": False}],
            "outputs": [{"name": "output", "datatype": "BYTES", "shape": [], "json": True}],
            "config": {
                "max_queue": max_queue,
                "max_batch_size": 8,
                "priority_levels": 0,
                "default_priority_level": None,
                "default_timeout_us": 0,
                "allow_timeout_override": True,
            },
        },
        sort_keys=True,
        separators=(",", ":"),
    )


# -- the Redis scripts -----------------------------------------------------------------------------------


@pytest.fixture
async def redis_catalogs(redis_settings: dict[str, str]) -> Any:
    client = aioredis.Redis.from_url(redis_settings["redis_url"], decode_responses=True)
    keys = RedisKeys(redis_settings["redis_prefix"])
    yield RedisCatalog(client, keys, consumer="worker-a"), RedisCatalog(client, keys, consumer="worker-b")
    await client.aclose()


async def test_redis_catalog_counts_the_workers_of_a_version_and_keeps_it_known_once_they_go(
    redis_catalogs: tuple[RedisCatalog, RedisCatalog],
) -> None:
    a, b = redis_catalogs
    iris = ("iris", "1")
    assert await a.publish({iris: description()}, ttl=60) == []
    assert await b.publish({iris: description()}, ttl=60) == []  # the same description: no conflict
    state = await a.read()
    assert state.known == {iris: description()}
    assert set(state.servers[iris]) == {"worker-a", "worker-b"}
    assert state.served_until[iris] >= state.now + 59
    await a.withdraw([iris])
    assert set((await a.read()).servers[iris]) == {"worker-b"}
    await b.withdraw([iris])
    state = await a.read()
    assert iris not in state.servers and state.known == {iris: description()}  # known, served by no one
    assert state.served_until[iris] <= state.now  # since the last one withdrew: the grace runs from then


async def test_redis_catalog_drops_a_worker_that_stopped_announcing(
    redis_catalogs: tuple[RedisCatalog, RedisCatalog],
) -> None:
    a, b = redis_catalogs
    iris = ("iris", "1")
    await a.publish({iris: description()}, ttl=0)  # expires at once: a worker killed before its heartbeat
    await b.publish({iris: description()}, ttl=60)
    assert set((await a.read()).servers[iris]) == {"worker-b"}


async def test_redis_catalog_keeps_the_first_description_when_workers_disagree(
    redis_catalogs: tuple[RedisCatalog, RedisCatalog],
) -> None:
    a, b = redis_catalogs
    iris = ("iris", "1")
    await a.publish({iris: description(4)}, ttl=60)
    assert await b.publish({iris: description(5)}, ttl=60) == [(iris, "worker-a")]
    assert await a.publish({iris: description(4)}, ttl=60) == [(iris, "worker-b")]
    state = await a.read()
    assert state.known[iris] == description(4)  # not flapping with each heartbeat
    assert state.servers[iris] == {"worker-a": description(4), "worker-b": description(5)}
    await a.withdraw([iris])
    await b.publish({iris: description(5)}, ttl=60)  # the one left has the say
    assert (await a.read()).known[iris] == description(5)


async def test_a_worker_loading_a_version_holds_without_describing_it(
    redis_catalogs: tuple[RedisCatalog, RedisCatalog],
) -> None:
    a, b = redis_catalogs
    iris = ("iris", "1")
    assert await a.publish({iris: None}, ttl=60) == []  # loading: nothing to describe yet
    state = await a.read([iris])
    assert state.loading == {iris: frozenset({"worker-a"})} and iris not in state.servers
    assert state.known == {}  # not servable from a loading announcement
    assert state.served_until[iris] >= state.now + 59  # but it holds off the sweep
    assert await b.publish({iris: description()}, ttl=60) == []  # one loading disagrees with no one
    state = await b.read()
    assert state.known == {iris: description()} and set(state.servers[iris]) == {"worker-b"}
    assert state.loading == {iris: frozenset({"worker-a"})}


async def test_every_reader_gives_a_version_never_announced_the_same_first_seen_time(
    redis_catalogs: tuple[RedisCatalog, RedisCatalog],
) -> None:
    a, b = redis_catalogs  # two API processes serving a version no worker has announced
    iris = ("iris", "1")
    first = await a.read([iris])
    assert first.first_seen[iris] <= first.now and iris not in first.served_until
    assert (await b.read([iris])).first_seen[iris] == first.first_seen[iris]
    await b.publish({iris: description()}, ttl=60)
    later = await a.read([iris])
    assert later.served_until[iris] > later.now  # announced: its own time, not the first-seen one


# -- an API process following a catalog ------------------------------------------------------------------


class ScriptedCatalog:
    """A catalog whose state (and clock) the test sets."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.known: dict[Key, str] = {}
        self.served_until: dict[Key, float] = {}
        self.servers: dict[Key, dict[str, str]] = {}
        self.loading: dict[Key, frozenset[str]] = {}
        self.first_seen: dict[Key, float] = {}
        self.sweeps = True  # this process holds the sweep's lease
        self.before_read: list[Callable[[], None]] = []  # run one each read, in order: a catalog that moves

    async def publish(self, descriptions: Mapping[Key, str | None], ttl: float) -> list[tuple[Key, str]]:
        raise AssertionError("an API process without workers publishes nothing")

    async def withdraw(self, versions: Sequence[Key]) -> None:
        pass

    async def sweep_lease(self, ttl: float) -> bool:
        return self.sweeps

    async def retire(self, version: Key) -> bool:
        for known in (self.known, self.served_until, self.first_seen):
            known.pop(version, None)
        return True

    async def read(self, watch: Sequence[Key] = ()) -> CatalogState:
        if self.before_read:
            self.before_read.pop(0)()
        return CatalogState(
            now=self.now,
            known=dict(self.known),
            served_until=dict(self.served_until),
            servers={k: dict(v) for k, v in self.servers.items()},
            loading=dict(self.loading),
            first_seen={key: t for key, t in self.first_seen.items() if key in watch},
        )

    def serve(self, key: Key, **by_worker: str) -> None:
        self.servers[key] = dict(by_worker)
        self.known.setdefault(key, next(iter(by_worker.values())))
        self.served_until[key] = self.now + 15


@pytest.fixture
async def following(aiohttp_client: Any) -> tuple[TestClient, ScriptedCatalog, CatalogFollower]:
    client: TestClient = await aiohttp_client(create_app(make_settings(unserved_grace=60), model=MockModel()))
    service = client.app[SERVICE]
    await asyncio.wait_for(service.models.default.loaded.wait(), WAIT)
    catalog = ScriptedCatalog()
    changes: list[None] = []

    def on_change() -> None:
        from zypher_ws.http import openapi

        changes.append(None)
        openapi.document_again(client.app[OPENAPI], service.models)

    follower = CatalogFollower(
        settings=service.settings,
        models=service.models,
        catalog=catalog,
        store=service.store,
        bus=service.bus,
        on_change=on_change,
    )
    return client, catalog, follower


async def test_a_published_version_is_served_described_by_its_workers(
    following: tuple[TestClient, ScriptedCatalog, CatalogFollower],
) -> None:
    client, catalog, follower = following
    service = client.app[SERVICE]
    await follower.refresh()
    assert service.models.names() == ["mock"]  # nothing published yet
    catalog.serve(("iris", "1"), w1=description())
    await follower.refresh()
    iris = service.model("iris")
    assert iris.spec.runtime == "sklearn" and iris.runner is None and iris.served_by == 1
    assert iris.queue.maxsize == 100 and iris.settings.max_batch_size == 8  # the workers' own settings
    with pytest.raises(InvalidInput, match="input"):
        await service.submit([1, 2, 3], model="iris")
    listing = await (await client.get("/models")).json()
    assert [m["versions"][0]["served_by"] for m in listing["models"] if m["name"] == "iris"] == [1]
    spec = await (await client.get("/swagger/swagger.json")).json()
    assert "/models/iris/predict" in spec["paths"]
    assert spec["components"]["schemas"]["ModelInput.iris.1"]["minItems"] == 4
    oip = await (await client.get("/v2/models/iris")).json()
    assert oip["inputs"] == [{"name": "input", "datatype": "FP64", "shape": [-1, 4]}]
    await follower.refresh()
    assert service.model("iris") is iris  # the same description: the same deployment, validator and all


async def test_workers_that_disagree_are_named_and_the_first_description_is_kept(
    following: tuple[TestClient, ScriptedCatalog, CatalogFollower],
) -> None:
    client, catalog, follower = following
    catalog.serve(("iris", "1"), w1=description(4), w2=description(5, max_queue=7))
    await follower.refresh()
    iris = client.app[SERVICE].model("iris")
    assert iris.conflict is not None
    assert "w1" in iris.conflict and "w2" in iris.conflict
    assert "input_schema" in iris.conflict and "config.max_queue" in iris.conflict
    listing = await (await client.get("/models/iris")).json()
    assert listing["conflict"] == iris.conflict
    await client.app[SERVICE].submit([1, 2, 3, 4], model="iris")  # the first description's four features


async def test_a_new_description_of_a_version_replaces_it_and_its_validation(
    following: tuple[TestClient, ScriptedCatalog, CatalogFollower],
) -> None:
    client, catalog, follower = following
    service = client.app[SERVICE]
    catalog.serve(("iris", "1"), w1=description(4))
    await follower.refresh()
    await service.submit([1, 2, 3, 4], model="iris")
    # Its workers are replaced by ones with another file for the same version number.
    catalog.known[("iris", "1")] = description(5)
    catalog.serve(("iris", "1"), w2=description(5))
    await follower.refresh()
    with pytest.raises(InvalidInput):
        await service.submit([1, 2, 3, 4], model="iris")  # not the cached check of four numbers
    await service.submit([1, 2, 3, 4, 5], model="iris")
    spec = await (await client.get("/swagger/swagger.json")).json()
    assert spec["components"]["schemas"]["ModelInput.iris.1"]["minItems"] == 5


async def test_a_version_unserved_past_the_grace_refuses_predictions_until_served_again(
    following: tuple[TestClient, ScriptedCatalog, CatalogFollower],
) -> None:
    client, catalog, follower = following
    service = client.app[SERVICE]
    catalog.serve(("iris", "1"), w1=description())
    await follower.refresh()
    catalog.servers.clear()  # its worker stopped; its announcement held until served_until
    catalog.now = catalog.served_until[("iris", "1")] + 59
    await follower.refresh()
    await service.submit([1, 2, 3, 4], model="iris")  # within the grace: accepted, and queued
    catalog.now += 2
    await follower.refresh()
    with pytest.raises(ModelUnavailable, match="no worker has served model iris version 1 for 61 s"):
        await service.submit([1, 2, 3, 4], model="iris")
    resp = await client.post("/models/iris/predict", json={"input": [1, 2, 3, 4]})
    assert resp.status == 503 and resp.headers["Retry-After"] == "5"  # a heartbeat: when it may be back
    assert (await resp.json())["error"]["code"] == "model_unavailable"
    assert (await client.get("/v2/models/iris/ready")).status == 503
    assert (await (await client.get("/models/iris")).json())["unavailable"].startswith("no worker has served")
    # The process's own model runs here: served, announced or not.
    catalog.now += 120
    await follower.refresh()
    await service.submit({"x": 1}, model="mock")
    catalog.serve(("iris", "1"), w2=description())
    await follower.refresh()
    await service.submit([1, 2, 3, 4], model="iris")


async def test_a_published_version_that_streams_takes_stream_requests(
    following: tuple[TestClient, ScriptedCatalog, CatalogFollower],
) -> None:
    from zypher_ws.errors import StreamNotSupported

    client, catalog, follower = following
    service = client.app[SERVICE]
    catalog.serve(("iris", "1"), w1=description())
    catalog.serve(("tokens", "1"), w1=json.dumps({**json.loads(description(name="tokens")), "streams": True}))
    await follower.refresh()
    assert service.model("tokens").streams and not service.model("iris").streams
    streamed = await service.submit([1, 2, 3, 4], model="tokens", stream=True)
    assert streamed.stream
    with pytest.raises(StreamNotSupported):
        await service.submit([1, 2, 3, 4], model="iris", stream=True)


async def served_then_gone(catalog: ScriptedCatalog, follower: CatalogFollower) -> Key:
    """iris 1, published by a worker and followed; then that worker is gone (its announcement holds until
    served_until). Returns its key."""
    iris = ("iris", "1")
    catalog.serve(iris, w1=description())
    await follower.refresh()
    catalog.servers.clear()
    return iris


async def test_a_worker_loading_an_unserved_version_keeps_its_predictions_waiting(
    following: tuple[TestClient, ScriptedCatalog, CatalogFollower],
) -> None:
    client, catalog, follower = following
    service = client.app[SERVICE]
    iris = await served_then_gone(catalog, follower)
    # A new worker loads the model, slowly.
    catalog.loading[iris] = frozenset({"w2"})
    catalog.now = catalog.served_until[iris] + 120
    await follower.refresh()
    assert service.model("iris").unavailable is None and service.model("iris").served_by == 0
    await service.submit([1, 2, 3, 4], model="iris")


# -- the sweep against a real Redis queue ------------------------------------------------------------------


class RedisSweep:
    """An API process following a scripted catalog of one version, iris 1, whose stream is in a real Redis;
    the test plays its workers on that stream."""

    iris = ("iris", "1")

    def __init__(self, client: TestClient, catalog: ScriptedCatalog, follower: CatalogFollower, redis: Any) -> None:
        self.client = client
        self.service = client.app[SERVICE]
        self.catalog, self.follower, self.redis = catalog, follower, redis
        self.keys = RedisKeys(self.service.settings.redis_prefix)
        self.stream = self.keys.queue(*self.iris)

    async def take(self, consumer: str, count: int) -> dict[str, str]:
        """A worker takes the oldest entries; their entry ids by prediction id."""
        reply = await self.redis.xreadgroup(self.keys.group, consumer, {self.stream: ">"}, count=count)
        return {fields["id"]: entry_id for entry_id, fields in reply[0][1]}

    async def lose(self, entry_id: str) -> None:
        """Its holder has not touched the entry for longer than --claim-idle (30 s)."""
        await self.redis.xclaim(self.stream, self.keys.group, "gone", 0, [entry_id], idle=31_000, justid=True)

    def unserved_past_the_grace(self) -> None:
        self.catalog.servers.clear()
        self.catalog.now = self.catalog.served_until[self.iris] + 61

    async def left(self) -> list[str]:
        return [fields["id"] for _, fields in await self.redis.xrange(self.stream)]


async def scripted_redis_app(
    aiohttp_client: Any, redis_settings: dict[str, str], monkeypatch: pytest.MonkeyPatch, **settings: Any
) -> tuple[TestClient, ScriptedCatalog, CatalogFollower]:
    """An app on a real Redis whose catalog reads are the test's (Redis's clock is not the test's): its
    own follower, driven by the test (a heartbeat of a minute: its rounds are the test's refreshes)."""
    catalog = ScriptedCatalog()

    async def read(self: RedisCatalog, watch: Sequence[Key] = ()) -> CatalogState:
        return await catalog.read(watch)

    monkeypatch.setattr(RedisCatalog, "read", read)
    config = make_settings(**redis_settings, **{"unserved_grace": 60, "model_heartbeat": 60, **settings})
    client: TestClient = await aiohttp_client(create_app(config, model=MockModel()))
    await asyncio.wait_for(client.app[SERVICE].models.default.loaded.wait(), WAIT)
    return client, catalog, client.app[CATALOG]


@pytest.fixture
async def sweep(
    aiohttp_client: Any, redis_settings: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[RedisSweep]:
    client, catalog, follower = await scripted_redis_app(aiohttp_client, redis_settings, monkeypatch, claim_idle=30)
    redis = aioredis.Redis.from_url(redis_settings["redis_url"], decode_responses=True)
    catalog.serve(RedisSweep.iris, w1=description())
    await follower.refresh()
    yield RedisSweep(client, catalog, follower, redis)
    await redis.aclose()


async def test_the_sweep_fails_only_what_no_live_worker_holds(sweep: RedisSweep) -> None:
    service = sweep.service
    running, lost, taken, waiting = [await service.submit([1, 2, 3, n], model="iris") for n in range(4)]
    # A worker takes three and starts two before any announcement of its lands (or while cut off).
    entries = await sweep.take("w2", 3)
    await service.store.start([running.prediction_id, lost.prediction_id])
    await sweep.lose(entries[lost.prediction_id])  # that one's worker is gone
    sweep.unserved_past_the_grace()
    await sweep.follower.refresh()
    after = {p.prediction_id: await service.store.get(p.prediction_id) for p in (running, lost, taken, waiting)}
    assert after[running.prediction_id].status.value == "running"  # a live worker runs it
    assert after[taken.prediction_id].status.value == "queued"  # a live worker has taken it
    assert after[lost.prediction_id].status.value == "failed" and after[lost.prediction_id].attempts == 1
    assert after[lost.prediction_id].error["code"] == "model_unavailable"
    assert after[waiting.prediction_id].status.value == "failed" and after[waiting.prediction_id].attempts == 0
    assert await sweep.left() == [running.prediction_id, taken.prediction_id]  # their worker acknowledges them


async def test_the_sweep_leaves_a_lost_ones_prediction_when_a_worker_announces_itself_meanwhile(
    sweep: RedisSweep,
) -> None:
    prediction = await sweep.service.submit([1, 2, 3, 4], model="iris")
    entries = await sweep.take("w1", 1)
    await sweep.service.store.start([prediction.prediction_id])
    await sweep.lose(entries[prediction.prediction_id])
    sweep.unserved_past_the_grace()
    # Between the round's read and the sweep a worker announces it (and takes the entry over in time).
    sweep.catalog.before_read = [lambda: None, lambda: sweep.catalog.serve(sweep.iris, w2=description())]
    await sweep.follower.refresh()
    assert (await sweep.service.store.get(prediction.prediction_id)).status.value == "running"
    assert await sweep.left() == [prediction.prediction_id]


class RecordingCatalog(ScriptedCatalog):
    """A catalog that keeps what a worker announces, and says when it does."""

    def __init__(self) -> None:
        super().__init__()
        self.announced: list[dict[Key, str | None]] = []
        self.changed = asyncio.Event()

    async def publish(self, descriptions: Mapping[Key, str | None], ttl: float) -> list[tuple[Key, str]]:
        self.announced.append(dict(descriptions))
        self.changed.set()
        return []

    async def next_announcement(self) -> dict[Key, str | None]:
        self.changed.clear()
        await asyncio.wait_for(self.changed.wait(), WAIT)
        return self.announced[-1]


async def test_a_worker_announces_a_version_while_it_loads_then_its_description(aiohttp_client: Any) -> None:
    from zypher_ws.catalog import publishing

    gate = threading.Event()
    model = GatedModel(gated=False, load_gate=gate)
    client: TestClient = await aiohttp_client(create_app(make_settings(model_heartbeat=60), model=model))
    service = client.app[SERVICE]
    catalog = RecordingCatalog()
    key = (model.name, model.version)
    async with publishing(catalog, service.models, service.settings):
        assert await catalog.next_announcement() == {key: None}  # loading: held, not described
        gate.set()
        announced = await catalog.next_announcement()  # at once once loaded, not a heartbeat later
        text = announced[key]
        assert text is not None and json.loads(text)["name"] == model.name


async def test_readyz_is_503_only_when_no_model_of_the_process_is_served(
    aiohttp_client: Any, redis_settings: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # No workers here: its own model (mock) is run by worker processes too, which have never announced it.
    client, catalog, follower = await scripted_redis_app(aiohttp_client, redis_settings, monkeypatch, workers=0)
    mock = (client.app[SERVICE].models.default.name, client.app[SERVICE].models.default.version)
    iris = ("iris", "1")
    catalog.serve(iris, w1=description())
    catalog.first_seen[mock] = catalog.now  # an API process first served it now (the time kept in Redis)
    await follower.refresh()
    assert (await client.get("/readyz")).status == 200
    catalog.now += 61  # mock is past its grace (from the shared first-seen time); iris is announced
    await follower.refresh()
    assert client.app[SERVICE].models.default.unavailable is not None
    assert (await client.get("/readyz")).status == 200  # one unavailable among several: its own 503s
    catalog.servers.clear()
    catalog.now = catalog.served_until[iris] + 61
    await follower.refresh()
    resp = await client.get("/readyz")
    assert resp.status == 503 and resp.headers["Retry-After"] == "60"  # a heartbeat
    assert (await resp.json())["error"]["code"] == "model_unavailable"


async def test_an_oip_sync_answer_of_a_model_no_one_serves_retries_after_a_heartbeat(sweep: RedisSweep) -> None:
    body = {"inputs": [{"name": "input", "datatype": "FP64", "shape": [1, 4], "data": [1, 2, 3, 4]}]}
    answer = asyncio.create_task(sweep.client.post("/v2/models/iris/infer", json=body))  # sync: it waits
    assert await sweep.redis.xread({sweep.stream: "0"}, count=1, block=int(WAIT * 1000))  # queued
    sweep.unserved_past_the_grace()
    await sweep.follower.refresh()  # it fails what waits, this one too: model_unavailable
    resp = await asyncio.wait_for(answer, WAIT)
    assert resp.status == 503 and resp.headers["Retry-After"] == "60"  # as a refused submit's: a heartbeat
    assert "no worker has served model iris version 1" in (await resp.json())["error"]


async def test_one_process_at_a_time_holds_the_sweeps_lease(redis_catalogs: tuple[RedisCatalog, RedisCatalog]) -> None:
    a, b = redis_catalogs
    assert await a.sweep_lease(60) and not await b.sweep_lease(60)
    assert await a.sweep_lease(60)  # its holder renews it, round after round
    assert not await b.sweep_lease(60)


async def test_a_process_without_the_sweeps_lease_refuses_but_fails_nothing(sweep: RedisSweep) -> None:
    waiting = await sweep.service.submit([1, 2, 3, 4], model="iris")
    sweep.unserved_past_the_grace()
    await sweep.redis.set(sweep.keys.models_sweep_lease, "another-api-process", px=60_000)
    await sweep.follower.refresh()
    assert sweep.service.model("iris").unavailable is not None  # refused here too
    assert (await sweep.service.store.get(waiting.prediction_id)).status.value == "queued"  # theirs to fail
    await sweep.redis.delete(sweep.keys.models_sweep_lease)  # that process is gone: its lease lapses
    await sweep.follower.refresh()
    assert (await sweep.service.store.get(waiting.prediction_id)).status.value == "failed"


async def test_a_model_unloaded_here_is_not_served_again_from_the_catalog_until_loaded_again(
    following: tuple[TestClient, ScriptedCatalog, CatalogFollower],
) -> None:
    client, catalog, follower = following
    service, repository = client.app[SERVICE], client.app[REPOSITORY]
    catalog.serve(("iris", "1"), w1=description())
    await follower.refresh()
    await repository.unload("iris", WAIT)
    await follower.refresh()  # its workers still publish it
    assert service.models.get("iris", "1") is None
    assert await repository.load("iris") == []  # no files here: served from the catalog again
    await follower.refresh()
    assert service.models.get("iris", "1") is not None


async def test_the_follower_changes_the_model_set_only_between_repository_loads(
    following: tuple[TestClient, ScriptedCatalog, CatalogFollower],
) -> None:
    client, catalog, follower = following
    service = client.app[SERVICE]
    catalog.serve(("iris", "1"), w1=description())
    async with service.models.lock:  # as a repository load holds it, between reading and changing the set
        refresh = asyncio.create_task(follower.refresh())
        for _ in range(10):
            await asyncio.sleep(0)  # yields only: the refresh gets every chance to go past the lock
        assert not refresh.done() and service.models.get("iris", "1") is None
    await asyncio.wait_for(refresh, WAIT)
    assert service.models.get("iris", "1") is not None


async def test_redis_retires_a_version_no_one_serves_only_with_its_streams_empty(
    redis_catalogs: tuple[RedisCatalog, RedisCatalog], redis_settings: dict[str, str]
) -> None:
    a, b = redis_catalogs
    keys = RedisKeys(redis_settings["redis_prefix"])
    redis = aioredis.Redis.from_url(redis_settings["redis_url"], decode_responses=True)
    iris = ("iris", "1")
    levels = json.loads(description())
    levels["config"]["priority_levels"] = 2
    await a.publish({iris: json.dumps(levels)}, ttl=60)
    assert not await b.retire(iris)  # a worker serves it
    await a.withdraw([iris])
    await redis.xadd(keys.queue(*iris) + ":p2", {"id": "p"})
    assert not await b.retire(iris)  # something waits on one of its level streams
    await redis.delete(keys.queue(*iris) + ":p2")
    await redis.xadd(keys.queue(*iris), {"id": "q"})
    await redis.xdel(keys.queue(*iris), *[entry for entry, _ in await redis.xrange(keys.queue(*iris))])
    assert await b.retire(iris)  # an empty stream, and no one serving it
    state = await b.read()
    assert iris not in state.known and iris not in state.served_until
    assert not await redis.exists(keys.queue(*iris), keys.model_servers(*iris))
    await redis.aclose()


async def test_a_version_unserved_past_the_retention_is_forgotten(
    following: tuple[TestClient, ScriptedCatalog, CatalogFollower],
) -> None:
    client, catalog, follower = following
    service = client.app[SERVICE]
    iris = await served_then_gone(catalog, follower)
    grace, retention = service.settings.unserved_grace, service.settings.catalog_retention
    catalog.now = catalog.served_until[iris] + grace + retention
    await follower.refresh()
    assert service.models.get(*iris) is not None  # unavailable, still known
    catalog.now += 1
    await follower.refresh()
    assert service.models.get(*iris) is None and iris not in catalog.known


async def test_a_version_another_process_retired_is_forgotten_here_too(
    following: tuple[TestClient, ScriptedCatalog, CatalogFollower],
) -> None:
    client, catalog, follower = following
    iris = await served_then_gone(catalog, follower)
    await catalog.retire(iris)  # by the process holding the sweep's lease
    await follower.refresh()
    assert client.app[SERVICE].models.get(*iris) is None
