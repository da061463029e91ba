"""Many models served at once, from a repository of real files: routes, versions, batching, failures,
per-model queues, and recovery of each model's predictions after a restart."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import sys
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient
from openapi_spec_validator import validate
from sklearn.datasets import load_digits, load_iris
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split

from fakes import WAIT, GatedModel, make_settings
from helpers import run_server, run_worker, wait_all_terminal
from model_files import save_add, save_joblib, save_onnx
from zypher_ws.backends.redis.keys import RedisKeys
from zypher_ws.http.app import create_app
from zypher_ws.http.keys import SERVICE
from zypher_ws.models import MockModel, ModelConfig, ModelSpec, spec_of

Split = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


@pytest.fixture(scope="module")
def trained() -> dict[str, Any]:
    """iris twice (two versions that answer differently) and digits, fitted on a train split."""
    iris: Split = train_test_split(*load_iris(return_X_y=True), test_size=0.3, random_state=0)
    digits: Split = train_test_split(*load_digits(return_X_y=True), test_size=0.25, random_state=0)
    return {
        "iris": iris,
        "iris_1": LogisticRegression(C=0.01, max_iter=2000).fit(iris[0], iris[2]),
        "iris_2": LogisticRegression(max_iter=2000).fit(iris[0], iris[2]),
        "digits": digits,
        "digits_model": LogisticRegression(max_iter=3000).fit(digits[0], digits[2]),
    }


@pytest.fixture
def repository(tmp_path: Path, trained: dict[str, Any]) -> Path:
    root = tmp_path / "models"
    save_joblib(root / "iris" / "1" / "model.joblib", trained["iris_1"])
    save_joblib(root / "iris" / "2" / "model.joblib", trained["iris_2"])
    save_onnx(root / "digits-onnx" / "1" / "model.onnx", trained["digits_model"], trained["digits"][0])
    config = {"max_batch_size": 64, "options": {"intra_op_threads": 1, "inter_op_threads": 1}}
    (root / "digits-onnx" / "config.json").write_text(json.dumps(config))
    save_add(root / "add" / "1" / "model.onnx")  # two inputs, A and B
    (root / "broken" / "1").mkdir(parents=True)
    (root / "broken" / "1" / "model.joblib").write_bytes(b"not a pickle")
    return root


async def serve(aiohttp_client: Any, **settings: Any) -> TestClient:
    client: TestClient = await aiohttp_client(create_app(make_settings(**settings)))
    await asyncio.wait_for(asyncio.gather(*(d.loaded.wait() for d in client.app[SERVICE].models)), WAIT * 4)
    return client


@pytest.fixture
async def client(aiohttp_client: Any, repository: Path) -> TestClient:
    return await serve(aiohttp_client, model_repository=str(repository), default_model="iris")


async def post(client: TestClient, path: str, body: Any, **headers: str) -> tuple[int, Any]:
    resp = await client.post(path, json=body, headers=headers)
    return resp.status, await resp.json()


def rows(matrix: np.ndarray) -> list[list[float]]:
    return [[float(v) for v in row] for row in matrix]


# -- the listing and the metadata ------------------------------------------------------------------------


async def test_models_lists_every_version_with_its_runtime_state_and_default(client: TestClient) -> None:
    listing = await (await client.get("/models")).json()
    assert listing["default"] == {"name": "iris", "version": "2"}
    by_name = {m["name"]: m for m in listing["models"]}
    assert sorted(by_name) == ["add", "broken", "digits-onnx", "iris"]
    iris = by_name["iris"]
    assert iris["default_version"] == "2"
    assert [(v["version"], v["runtime"], v["state"], v["default"]) for v in iris["versions"]] == [
        ("1", "sklearn", "ready", False),
        ("2", "sklearn", "ready", True),
    ]
    assert iris["versions"][0]["queue"] == {"depth": 0, "max": 1024}
    assert iris["versions"][0]["links"]["predict"] == "/models/iris/versions/1/predict"
    (broken,) = by_name["broken"]["versions"]
    assert broken["state"] == "failed" and "joblib cannot load it" in broken["error"]
    assert by_name["digits-onnx"]["versions"][0]["runtime"] == "onnx"


async def test_model_metadata_has_both_schemas_and_the_versions(client: TestClient) -> None:
    latest = await (await client.get("/models/iris")).json()
    first = await (await client.get("/models/iris/versions/1")).json()
    assert (latest["version"], first["version"], latest["versions"]) == ("2", "1", ["1", "2"])
    assert latest["input_schema"]["minItems"] == latest["input_schema"]["maxItems"] == 4
    assert set(latest["output_schema"]["properties"]) == {"label", "probabilities"}
    default = await (await client.get("/model")).json()
    assert (default["name"], default["version"]) == ("iris", "2")
    broken = await (await client.get("/models/broken")).json()
    assert broken["state"] == "failed" and broken["input_schema"] is None


# -- predictions ------------------------------------------------------------------------------------------


async def test_held_out_rows_through_http_answer_as_each_estimator(client: TestClient, trained: dict[str, Any]) -> None:
    _, X_test, _, y_test = trained["iris"]
    for path, estimator in [
        ("/predict", trained["iris_2"]),  # the default model, its highest version
        ("/models/iris/predict", trained["iris_2"]),
        ("/models/iris/versions/2/predict", trained["iris_2"]),
        ("/models/iris/versions/1/predict", trained["iris_1"]),
    ]:
        answers = await asyncio.gather(*(post(client, path, {"input": row}) for row in rows(X_test)))
        assert {status for status, _ in answers} == {200}
        labels = [record["result"]["label"] for _, record in answers]
        assert labels == estimator.predict(X_test).tolist(), path
        expected = estimator.predict_proba(X_test)
        for (_, record), p in zip(answers, expected, strict=True):
            assert record["model"]["name"] == "iris"
            assert [record["result"]["probabilities"][str(c)] for c in range(3)] == pytest.approx(p, abs=1e-6)
    version_1 = [r["model"]["version"] for _, r in answers]
    assert set(version_1) == {"1"}
    assert np.mean(np.array(labels) == y_test) > 0.6  # held out: the weaker version still learned


async def test_onnx_digits_accuracy_and_a_batch_answers_as_single_calls(
    client: TestClient, trained: dict[str, Any]
) -> None:
    _, X_test, _, y_test = trained["digits"]
    X_test, y_test = X_test[:120], y_test[:120]
    concurrent = await asyncio.gather(
        *(post(client, "/models/digits-onnx/predict", {"input": row}) for row in rows(X_test))
    )
    one_by_one = [await post(client, "/models/digits-onnx/versions/1/predict", {"input": row}) for row in rows(X_test)]
    assert {s for s, _ in concurrent} == {s for s, _ in one_by_one} == {200}
    labels = [r["result"]["label"] for _, r in concurrent]
    assert labels == [r["result"]["label"] for _, r in one_by_one] == trained["digits_model"].predict(X_test).tolist()
    for (_, a), (_, b) in zip(concurrent, one_by_one, strict=True):
        assert a["result"]["probabilities"] == pytest.approx(b["result"]["probabilities"], abs=1e-5)
    assert np.mean(np.array(labels) == y_test) > 0.9


async def test_a_multi_input_onnx_model_takes_an_object_of_tensors(client: TestClient) -> None:
    status, record = await post(client, "/models/add/predict", {"input": {"A": [1, 2, 3], "B": [0.5, 0.5, 0.5]}})
    assert status == 200 and record["result"] == {"C": [1.5, 2.5, 3.5]}
    assert record["model"] == {"name": "add", "version": "1"}


@pytest.mark.parametrize(
    ("path", "value", "named"),
    [
        ("/models/iris/predict", [5.1, 3.5, 1.4], "input"),
        ("/models/iris/versions/1/predict", ["a", 3.5, 1.4, 0.2], "input[0]"),
        ("/models/digits-onnx/predict", [0] * 63, "input"),
        ("/models/add/predict", {"A": [1, 2, 3]}, "B"),
        ("/models/add/predict", {"A": [1, 2, 3], "B": [1, 2]}, "input.B"),
    ],
)
async def test_wrong_shapes_and_types_are_400_naming_the_field(
    client: TestClient, path: str, value: Any, named: str
) -> None:
    status, body = await post(client, path, {"input": value})
    assert status == 400 and body["error"]["code"] == "invalid_input"
    assert named in body["error"]["message"]
    assert await (await client.get("/models")).json()  # still serving


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/models/nope/predict"),
        ("POST", "/models/iris/versions/9/predict"),
        ("GET", "/models/nope"),
        ("GET", "/models/iris/versions/9"),
    ],
)
async def test_an_unknown_model_or_version_is_404_model_not_found(client: TestClient, method: str, path: str) -> None:
    resp = await client.request(method, path, json={"input": [1, 2, 3, 4]})
    body = await resp.json()
    assert resp.status == 404 and body["error"]["code"] == "model_not_found"
    assert ("versions: 1, 2" in body["error"]["message"]) == ("iris" in path)


async def test_a_model_that_failed_to_load_is_named_by_readyz_and_the_others_serve(client: TestClient) -> None:
    ready = await client.get("/readyz")
    body = await ready.json()
    assert ready.status == 503 and body["error"]["code"] == "not_ready"
    # /readyz needs no token: it names the model; the reason (file paths) is in /models, behind the token.
    assert body["error"]["message"] == "model broken version 1 failed to load (GET /models says why)"
    status, refused = await post(client, "/models/broken/predict", {"input": [1]})
    assert status == 503 and refused["error"]["code"] == "not_ready" and "joblib" in refused["error"]["message"]
    status, record = await post(client, "/predict", {"input": [5.1, 3.5, 1.4, 0.2]})
    assert status == 200 and record["status"] == "succeeded"


async def test_websocket_predict_names_a_model_and_a_version(client: TestClient) -> None:
    async with client.ws_connect("/ws") as ws:
        await ws.send_json({"op": "predict", "model": "iris", "version": "1", "input": [5.1, 3.5, 1.4, 0.2]})
        accepted = await ws.receive_json(timeout=WAIT)
        assert accepted["type"] == "accepted" and accepted["prediction"]["model"] == {"name": "iris", "version": "1"}
        await ws.send_json({"op": "predict", "model": "nope", "input": [1], "request_id": "r1"})
        while (message := await ws.receive_json(timeout=WAIT))["type"] != "error":
            pass
        assert message["error"]["code"] == "model_not_found" and message["request_id"] == "r1"
        await ws.send_json({"op": "predict", "model": 3, "input": [1]})
        while (message := await ws.receive_json(timeout=WAIT))["type"] != "error":
            pass
        assert message["error"]["code"] == "invalid_message"


async def test_an_idempotency_key_names_one_model(client: TestClient) -> None:
    row = {"input": [5.1, 3.5, 1.4, 0.2]}
    first, record = await post(client, "/models/iris/versions/1/predict", row, **{"Idempotency-Key": "k-1"})
    again, same = await post(client, "/models/iris/versions/1/predict", row, **{"Idempotency-Key": "k-1"})
    other, conflict = await post(client, "/models/iris/versions/2/predict", row, **{"Idempotency-Key": "k-1"})
    assert (first, again, other) == (200, 200, 409)
    assert same["prediction_id"] == record["prediction_id"]
    assert conflict["error"]["code"] == "idempotency_conflict"


async def test_the_openapi_document_has_each_models_route_and_schemas(client: TestClient) -> None:
    spec = await (await client.get("/swagger/swagger.json")).json()
    validate(spec)  # the models' own schemas inside it too
    paths = spec["paths"]
    assert {"/models/iris/predict", "/models/iris/versions/1/predict", "/models/iris/versions/2/predict"} <= set(paths)
    assert {"/models/{name}/predict", "/models/{name}/versions/{version}/predict", "/models"} <= set(paths)
    body = paths["/models/iris/versions/1/predict"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/PredictRequest.iris.1"}
    schemas = spec["components"]["schemas"]
    iris_1 = await (await client.get("/models/iris/versions/1")).json()
    assert schemas["ModelInput.iris.1"] == iris_1["input_schema"]
    assert schemas["ModelOutput.iris.1"] == iris_1["output_schema"]
    assert schemas["ModelInput"] == schemas["ModelInput.iris.2"]  # the default's, for POST /predict
    assert "known once it has loaded" in schemas["ModelInput.broken.1"]["description"]


# -- per-model queues and recovery -------------------------------------------------------------------------


def gated(name: str, **config: Any) -> tuple[ModelSpec, GatedModel]:
    model = GatedModel()
    model.name = name
    model.bind(asyncio.get_running_loop())
    spec = ModelSpec(name=name, version=model.version, runtime="python", config=ModelConfig(**config))
    return spec, model


async def test_each_model_has_its_own_bounded_queue(aiohttp_client: Any) -> None:
    slow_spec, slow = gated("slow", max_queue=2, workers=1)
    fast = MockModel()
    models = [(spec_of(fast), fast), (slow_spec, slow)]
    client: TestClient = await aiohttp_client(create_app(make_settings(), models=models))
    await asyncio.wait_for(asyncio.gather(*(d.loaded.wait() for d in client.app[SERVICE].models)), WAIT)
    try:
        path, headers = "/models/slow/predict", {"Async-Mode": "true"}
        assert (await post(client, path, {"input": {"x": 0}}, **headers))[0] == 202
        await slow.wait_started()  # the first runs (and waits), two more fill the queue
        assert [(await post(client, path, {"input": {"x": i}}, **headers))[0] for i in (1, 2)] == [202, 202]
        status, refused = await post(client, path, {"input": {"x": 3}}, **headers)
        assert status == 503 and refused["error"]["code"] == "queue_full"
        status, record = await post(client, "/predict", {"input": "the fast model is not held up"})
        assert status == 200 and record["model"]["name"] == "mock"
        listing = await (await client.get("/models")).json()
        queues = {m["name"]: m["versions"][0]["queue"] for m in listing["models"]}
        assert queues == {"mock": {"depth": 0, "max": 1024}, "slow": {"depth": 2, "max": 2}}
        assert (await client.get("/readyz")).status == 200  # one full queue of two: still taking work
    finally:
        slow.release.set()


async def test_a_restart_requeues_each_models_predictions_and_fails_a_model_no_longer_served(
    aiohttp_client: Any, tmp_path: Path
) -> None:
    store = f"sqlite:///{tmp_path / 'z.db'}"
    first = [gated(name, workers=1) for name in ("a", "b", "c")]
    client: TestClient = await aiohttp_client(create_app(make_settings(store=store), models=first))
    await asyncio.wait_for(asyncio.gather(*(d.loaded.wait() for d in client.app[SERVICE].models)), WAIT)
    ids: dict[str, list[str]] = {}
    for name, model in [(spec.name, model) for spec, model in first]:
        assert name is not None
        for x in (1, 2):
            status, record = await post(client, f"/models/{name}/predict", {"input": {"x": x}}, **{"Async-Mode": "1"})
            assert status == 202
            ids.setdefault(name, []).append(record["prediction_id"])
        await model.wait_started()
    await client.close()  # a running and a queued prediction of each model stay in the store
    for _, model in first:
        model.release.set()

    second = [gated(name, workers=1) for name in ("a", "b")]  # "c" is no longer served
    for _, model in second:
        model.release.set()
    client = await aiohttp_client(create_app(make_settings(store=store), models=second))
    service = client.app[SERVICE]
    finals = {}
    for pids in ids.values():
        for pid in pids:
            finals[pid] = await service.wait(pid, WAIT)
    for spec, model in second:  # each model ran its own predictions, from its own queue
        assert sorted(x["x"] for batch in model.batches for x in batch) == [1, 2], spec.name
    for name in ("a", "b"):
        assert [finals[pid].status.value for pid in ids[name]] == ["succeeded", "succeeded"]
        assert [finals[pid].result for pid in ids[name]] == [{"echo": {"x": 1}}, {"echo": {"x": 2}}]
        assert {finals[pid].model_name for pid in ids[name]} == {name}
    for pid in ids["c"]:
        assert finals[pid].status.value == "failed"
        assert finals[pid].error == {"code": "model_not_found", "message": "model c version 0.0.1 is no longer served"}


# -- scale-out: a stream per model version, and workers for a chosen subset --------------------------------


@pytest.mark.slow  # real API, worker and Redis processes
async def test_redis_has_a_stream_per_model_and_a_worker_serves_the_models_it_is_given(
    redis_settings: dict[str, str], tmp_path: Path, trained: dict[str, Any]
) -> None:
    root = tmp_path / "models"
    save_joblib(root / "iris" / "1" / "model.joblib", trained["iris_2"])
    save_add(root / "add" / "1" / "model.onnx")
    backend = ("--backend", "redis", "--redis-url", redis_settings["redis_url"])
    backend += ("--redis-prefix", redis_settings["redis_prefix"], "--model-repository", str(root))
    _, X_test, _, _ = trained["iris"]
    X_test = X_test[:20]
    redis = aioredis.Redis.from_url(redis_settings["redis_url"])
    keys = RedisKeys(redis_settings["redis_prefix"])
    async with AsyncExitStack() as stack:
        models = ("model add version 1 ready", "model iris version 1 ready")
        api = await stack.enter_async_context(run_server(*backend, "--workers", "0", also=models))
        http = await stack.enter_async_context(aiohttp.ClientSession(api.url))

        async def submit(path: str, value: Any) -> str:
            resp = await http.post(path, json={"input": value}, headers={"Async-Mode": "true"})
            assert resp.status == 202, await resp.text()
            return str((await resp.json())["prediction_id"])

        iris_ids = [await submit("/models/iris/predict", row) for row in rows(X_test)]
        add_ids = [await submit("/models/add/versions/1/predict", {"A": [i, 0, 0], "B": [1, 1, 1]}) for i in range(5)]
        assert await redis.xlen(keys.queue("iris", "1")) == 20 and await redis.xlen(keys.queue("add", "1")) == 5

        # A worker for iris alone takes its whole queue in one batch, and leaves add's alone.
        iris_worker = await stack.enter_async_context(run_worker(*backend, "--model", "iris"))
        assert any("worker serving iris version 1 (ready)" in line for line in iris_worker.log)
        iris_records = await wait_all_terminal(http, iris_ids)
        labels = [iris_records[pid]["result"]["label"] for pid in iris_ids]
        assert labels == trained["iris_2"].predict(X_test).tolist()
        assert {iris_records[pid]["metrics"]["batch_size"] for pid in iris_ids} == {20}
        assert await redis.xlen(keys.queue("add", "1")) == 5
        assert {(await (await http.get(f"/predict/{pid}")).json())["status"] for pid in add_ids} == {"queued"}

        await stack.enter_async_context(run_worker(*backend, "--model", "add"))
        add_records = await wait_all_terminal(http, add_ids)
        assert [add_records[pid]["result"] for pid in add_ids] == [{"C": [i + 1, 1, 1]} for i in range(5)]
    await redis.aclose()


async def test_redis_moves_the_single_stream_of_earlier_versions_to_each_models_stream(
    aiohttp_client: Any, redis_settings: dict[str, str]
) -> None:
    from zypher_ws.backends.redis.store import RedisStore
    from zypher_ws.records import Prediction

    # What an earlier version left: records, and their ids in the one stream every model shared.
    redis = aioredis.Redis.from_url(redis_settings["redis_url"], decode_responses=True)
    keys = RedisKeys(redis_settings["redis_prefix"])
    store = RedisStore(redis, keys)
    fast = MockModel()
    waiting = [Prediction.new({"n": n}, model_name="mock", model_version=fast.version) for n in range(3)]
    gone = Prediction.new({"n": 9}, model_name="retired", model_version="1")
    for prediction in [*waiting, gone]:
        await store.add(prediction)
        await redis.xadd(keys.legacy_queue, {"id": prediction.prediction_id})
    await redis.xadd(keys.legacy_queue, {"id": "f" * 32})  # its record expired: dropped
    client: TestClient = await aiohttp_client(create_app(make_settings(**redis_settings), model=fast))
    service = client.app[SERVICE]
    finals = [await service.wait(p.prediction_id, WAIT) for p in waiting]
    assert [(p.status.value, p.input) for p in finals] == [("succeeded", {"n": n}) for n in range(3)]
    assert not await redis.exists(keys.legacy_queue)
    assert await redis.xlen(keys.queue("retired", "1")) == 1  # waits for a worker serving it, as any model's
    await redis.aclose()


async def test_legacy_entries_of_a_model_with_priority_levels_reach_its_level_streams(
    aiohttp_client: Any, redis_settings: dict[str, str]
) -> None:
    from zypher_ws.backends.redis.store import RedisStore
    from zypher_ws.records import Prediction

    # The single stream of earlier versions, for a model that now has priority levels: it reads only the
    # streams of its levels, so what was moved to its plain stream must go on to them.
    redis = aioredis.Redis.from_url(redis_settings["redis_url"], decode_responses=True)
    keys = RedisKeys(redis_settings["redis_prefix"])
    store = RedisStore(redis, keys)
    fast = MockModel()
    waiting = [Prediction.new({"n": n}, model_name="mock", model_version=fast.version) for n in range(3)]
    for prediction in waiting:
        await store.add(prediction)
        await redis.xadd(keys.legacy_queue, {"id": prediction.prediction_id})
    spec = dataclasses.replace(spec_of(fast), config=ModelConfig(priority_levels=2))
    client: TestClient = await aiohttp_client(create_app(make_settings(**redis_settings), models=[(spec, fast)]))
    service = client.app[SERVICE]
    finals = [await service.wait(p.prediction_id, WAIT) for p in waiting]
    assert [(p.status.value, p.input) for p in finals] == [("succeeded", {"n": n}) for n in range(3)]
    assert not await redis.exists(keys.legacy_queue)
    assert await redis.xlen(keys.queue("mock", fast.version)) == 0
    await redis.aclose()


@pytest.mark.slow  # a real worker process
async def test_a_worker_whose_model_fails_to_load_exits_naming_it(
    redis_settings: dict[str, str], tmp_path: Path, trained: dict[str, Any]
) -> None:
    root = tmp_path / "models"
    save_joblib(root / "iris" / "1" / "model.joblib", trained["iris_2"])
    (root / "broken" / "1").mkdir(parents=True)
    (root / "broken" / "1" / "model.joblib").write_bytes(b"not a pickle")
    args = ["--redis-url", redis_settings["redis_url"], "--redis-prefix", redis_settings["redis_prefix"]]
    args += ["--model-repository", str(root), "--default-model", "digits-onnx"]  # shared env: not a worker's
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "zypher_ws", "worker", *args, "--model", "iris", "--model", "broken",
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, stderr = await asyncio.wait_for(proc.communicate(), 60)
    last = stderr.decode().strip().splitlines()[-1]
    assert proc.returncode == 1
    assert last.startswith("zypher-ws: model broken version 1 failed to load: ModelLoadError"), stderr.decode()
