"""The repository extension: the index, and loading and unloading models while the server runs, with
tritonclient against a live server, guarded by API tokens; an unloaded model runs what it had accepted."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import numpy as np
import pytest
import tritonclient.http as httpclient
from onnx import TensorProto
from tritonclient.utils import InferenceServerException

from fakes import WAIT, make_settings
from helpers import eventually
from model_files import save_identity, save_simple
from zypher_ws.http.app import create_app
from zypher_ws.http.keys import SERVICE

T = TypeVar("T")
TOKEN = "repository-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def auth() -> dict[str, str]:
    """The header for tritonclient, a dict of its own each call: the client adds to the dict it is given."""
    return dict(AUTH)


@pytest.fixture
def repository(tmp_path: Path) -> Path:
    root = tmp_path / "models"
    save_simple(root / "simple" / "1" / "model.onnx")
    return root


async def start(aiohttp_server: Any, repository: Path, **settings: Any) -> tuple[str, Any]:
    app = create_app(make_settings(model_repository=str(repository), **settings))
    server = await aiohttp_server(app)
    await asyncio.wait_for(asyncio.gather(*(d.loaded.wait() for d in app[SERVICE].models)), WAIT)
    return f"127.0.0.1:{server.port}", app


async def triton(url: str, call: Callable[[httpclient.InferenceServerClient], T]) -> T:
    def run() -> T:
        client = httpclient.InferenceServerClient(url)
        try:
            return call(client)
        finally:
            client.close()

    return await asyncio.wait_for(asyncio.to_thread(run), WAIT)


def longs(values: np.ndarray) -> list[httpclient.InferInput]:
    tensor = httpclient.InferInput("X", list(values.shape), "INT64")
    tensor.set_data_from_numpy(values)
    return [tensor]


async def test_load_and_unload_a_model_with_tritonclient(aiohttp_server: Any, repository: Path) -> None:
    url, _ = await start(aiohttp_server, repository, api_tokens=(TOKEN,))
    save_identity(repository / "longs" / "1" / "model.onnx", TensorProto.INT64, ["batch", 2])  # added later
    values = np.array([[1, 2]], dtype=np.int64)

    def before(client: httpclient.InferenceServerClient) -> Any:
        index = client.get_model_repository_index(headers=auth())
        assert not client.is_model_ready("longs", headers=auth())
        client.load_model("longs", headers=auth())
        assert client.is_model_ready("longs", headers=auth())
        return (
            index,
            client.get_model_repository_index(headers=auth()),
            client.infer("longs", longs(values), headers=auth()),
        )

    index, loaded, result = await triton(url, before)
    assert index == [
        {"name": "longs", "version": "1", "state": "UNAVAILABLE", "reason": "unloaded"},
        {"name": "simple", "version": "1", "state": "READY", "reason": ""},
    ]
    assert loaded[0] == {"name": "longs", "version": "1", "state": "READY", "reason": ""}
    np.testing.assert_array_equal(result.as_numpy("Y"), values)

    def after(client: httpclient.InferenceServerClient) -> Any:
        client.unload_model("longs", headers=auth())
        assert not client.is_model_ready("longs", headers=auth())
        with pytest.raises(InferenceServerException) as caught:
            client.infer("longs", longs(values), headers=auth())
        return caught.value, client.get_model_repository_index(headers=auth())

    refused, index = await triton(url, after)
    assert refused.status() == "404" and refused.message().startswith("Request for unknown model: no model 'longs'")
    assert index[0] == {"name": "longs", "version": "1", "state": "UNAVAILABLE", "reason": "unloaded"}


async def test_loading_and_unloading_need_tokens(aiohttp_server: Any, repository: Path) -> None:
    url, _ = await start(aiohttp_server, repository)
    async with aiohttp.ClientSession(f"http://{url}") as http:
        for action in ("load", "unload"):
            resp = await http.post(f"/v2/repository/models/simple/{action}")
            assert resp.status == 403
            assert await resp.json() == {"error": "loading and unloading models needs API tokens (--api-token)"}
        assert (await http.post("/v2/repository/index")).status == 200  # reading it is not a change
    url, _ = await start(aiohttp_server, repository, api_tokens=(TOKEN,))
    async with aiohttp.ClientSession(f"http://{url}") as http:
        resp = await http.post("/v2/repository/models/simple/unload")
        assert resp.status == 401 and await resp.json() == {"error": "send Authorization: Bearer <token>"}


async def test_what_cannot_be_loaded_or_unloaded(aiohttp_server: Any, repository: Path) -> None:
    url, app = await start(aiohttp_server, repository, api_tokens=(TOKEN,), model=("mock",))
    (repository / "broken" / "1").mkdir(parents=True)
    (repository / "broken" / "1" / "model.onnx").write_bytes(b"not a graph")
    async with aiohttp.ClientSession(f"http://{url}", headers=AUTH) as http:
        cases = [
            ("/v2/repository/models/nothing/load", {}, 400, "cannot load model nothing: --model-repository"),
            ("/v2/repository/models/broken/load", {}, 400, "model broken version 1 failed to load: ModelLoadError"),
            ("/v2/repository/models/simple/load", {"parameters": {"config": "{}"}}, 400, "a load takes no parameters"),
            ("/v2/repository/models/nothing/unload", {}, 404, "Request for unknown model: no model 'nothing'"),
            ("/v2/repository/models/mock/unload", {}, 400, "model mock is the default model"),
        ]
        for path, body, status, message in cases:
            resp = await http.post(path, json=body)
            answer = await resp.json()
            assert resp.status == status and answer["error"].startswith(message), (path, answer)
    assert [d.name for d in app[SERVICE].models] == ["mock", "simple"]  # nothing failed is served


async def test_an_unloaded_model_runs_what_it_had_accepted(aiohttp_server: Any, repository: Path) -> None:
    (repository / "gated" / "1").mkdir(parents=True)
    (repository / "gated" / "config.json").write_text(
        json.dumps({"runtime": "python", "factory": "fakes:GatedTensorModel", "workers": 1, "max_batch_size": 1})
    )
    url, app = await start(aiohttp_server, repository, api_tokens=(TOKEN,), default_model="simple")
    service = app[SERVICE]
    model = service.models.get("gated", "1").model.model  # under the name the repository gives it
    model.bind(asyncio.get_running_loop())
    body = {"inputs": [{"name": "x", "datatype": "INT64", "shape": [1], "data": [7]}]}
    async with aiohttp.ClientSession(f"http://{url}", headers=AUTH) as http:
        ids = []
        for _ in range(3):
            resp = await http.post("/v2/models/gated/infer", json=body, headers={"Prefer": "respond-async"})
            ids.append((await resp.json())["prediction_id"])
        await model.wait_started()  # one runs, two wait in the queue
        unload = asyncio.create_task(http.post("/v2/repository/models/gated/unload"))
        await eventually(lambda: _unloading(service), "unloading")
        refused = await http.post("/v2/models/gated/infer", json=body)
        assert refused.status == 404
        index = await (await http.post("/v2/repository/index")).json()
        assert {"name": "gated", "version": "1", "state": "UNLOADING", "reason": ""} in index
        model.release.set()
        assert (await asyncio.wait_for(unload, WAIT)).status == 200
    for pid in ids:
        assert (await service.get(pid)).status.value == "succeeded"
    assert len(model.batches) == 3


async def _unloading(service: Any) -> bool:
    return "gated" not in service.models.names()


async def test_a_version_that_failed_to_load_is_loaded_again(aiohttp_server: Any, repository: Path) -> None:
    broken = repository / "longs" / "1" / "model.onnx"
    broken.parent.mkdir(parents=True)
    broken.write_bytes(b"not a graph")
    url, app = await start(aiohttp_server, repository, api_tokens=(TOKEN,))  # longs is the default (first)
    async with aiohttp.ClientSession(f"http://{url}", headers=AUTH) as http:
        assert (await http.get("/v2/health/ready")).status == 503  # a model failed to load
        save_identity(broken, TensorProto.INT64, ["batch", 2])  # fixed in place
        assert (await http.post("/v2/repository/models/longs/load")).status == 200
        assert (await http.get("/v2/health/ready")).status == 200
        assert (await http.get("/v2/models/longs/ready")).status == 200
    assert app[SERVICE].models.default.name == "longs" and app[SERVICE].models.default.state.value == "ready"


async def test_a_shutdown_while_a_model_unloads_stops_its_workers_too(aiohttp_server: Any, repository: Path) -> None:
    (repository / "gated" / "1").mkdir(parents=True)
    (repository / "gated" / "config.json").write_text(
        json.dumps({"runtime": "python", "factory": "fakes:GatedTensorModel", "workers": 1})
    )
    # The unload answers after 0.1 s (--sync-timeout), its model still draining: then the server stops.
    settings = make_settings(
        model_repository=str(repository), api_tokens=(TOKEN,), default_model="simple", sync_timeout=0.1
    )
    app = create_app(settings)
    server = await aiohttp_server(app)
    await asyncio.wait_for(asyncio.gather(*(d.loaded.wait() for d in app[SERVICE].models)), WAIT)
    deployment = app[SERVICE].models.get("gated", "1")
    model = deployment.model.model
    model.bind(asyncio.get_running_loop())
    body = {"inputs": [{"name": "x", "datatype": "INT64", "shape": [1], "data": [7]}]}
    async with aiohttp.ClientSession(f"http://127.0.0.1:{server.port}", headers=AUTH) as http:
        accepted = await (
            await http.post("/v2/models/gated/infer", json=body, headers={"Prefer": "respond-async"})
        ).json()
        await model.wait_started()
        assert (await http.post("/v2/repository/models/gated/unload")).status == 200
        assert deployment.state.value == "unloading"
        await server.close()  # the batch is still in the model: it gets --shutdown-timeout (1 s here)
    model.release.set()
    assert deployment.pool is not None and deployment.pool._tasks == []  # its workers stopped with the rest
    record = await app[SERVICE].get(accepted["prediction_id"])
    assert record.status.value == "running"  # as any batch cut short by a shutdown: recovered at the next start
