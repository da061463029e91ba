"""The catalog of model versions that workers serve (catalog.py): the Redis scripts against a real Redis,
and an API process following a catalog the test scripts, with the catalog's clock in the test's hands."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping, Sequence
from typing import Any

import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient

from fakes import WAIT, make_settings
from zypher_ws.backends.redis.catalog import RedisCatalog
from zypher_ws.backends.redis.keys import RedisKeys
from zypher_ws.catalog import CatalogFollower, CatalogState, Key
from zypher_ws.errors import InvalidInput, ModelUnavailable
from zypher_ws.http.app import create_app
from zypher_ws.http.keys import OPENAPI, SERVICE
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


# -- an API process following a catalog ------------------------------------------------------------------


class ScriptedCatalog:
    """A catalog whose state (and clock) the test sets."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.known: dict[Key, str] = {}
        self.served_until: dict[Key, float] = {}
        self.servers: dict[Key, dict[str, str]] = {}

    async def publish(self, descriptions: Mapping[Key, str], ttl: float) -> list[tuple[Key, str]]:
        raise AssertionError("an API process without workers publishes nothing")

    async def withdraw(self, versions: Sequence[Key]) -> None:
        pass

    async def read(self) -> CatalogState:
        return CatalogState(
            now=self.now,
            known=dict(self.known),
            served_until=dict(self.served_until),
            servers={k: dict(v) for k, v in self.servers.items()},
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
