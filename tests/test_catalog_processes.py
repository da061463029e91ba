"""API processes with no model files, serving what worker processes publish in Redis (catalog.py): real
API, worker and Redis processes, model files made here and given to the workers only."""

from __future__ import annotations

import signal
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from sklearn.datasets import load_digits, load_iris
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split

from helpers import eventually, run_server, run_worker, wait_all_terminal
from model_files import save_joblib, save_onnx

pytestmark = pytest.mark.slow  # real API, worker and Redis processes

HEARTBEAT = "0.2"  # seconds: workers announce (and API processes read) five times a second
GRACE = "2"  # seconds a model may go unserved before its queued predictions fail


@pytest.fixture(scope="module")
def trained() -> dict[str, Any]:
    iris = train_test_split(*load_iris(return_X_y=True), test_size=0.3, random_state=0)
    digits = train_test_split(*load_digits(return_X_y=True), test_size=0.25, random_state=0)
    return {
        "iris": iris,
        "iris_model": LogisticRegression(max_iter=2000).fit(iris[0], iris[2]),
        "digits": digits,
        "digits_model": LogisticRegression(max_iter=3000).fit(digits[0], digits[2]),
    }


def rows(matrix: Any) -> list[list[float]]:
    return [[float(v) for v in row] for row in matrix]


async def listed(http: aiohttp.ClientSession) -> dict[str, Any]:
    return {m["name"]: m for m in (await (await http.get("/models")).json())["models"]}


async def test_an_api_process_without_model_files_serves_a_workers_models_until_no_one_serves_them(
    redis_settings: dict[str, str], tmp_path: Path, trained: dict[str, Any]
) -> None:
    root = tmp_path / "worker-only" / "models"  # the workers' files: the API process is never told of them
    save_joblib(root / "iris" / "1" / "model.joblib", trained["iris_model"])
    save_onnx(root / "digits-onnx" / "1" / "model.onnx", trained["digits_model"], trained["digits"][0])
    redis = ("--backend", "redis", "--redis-url", redis_settings["redis_url"])
    redis += ("--redis-prefix", redis_settings["redis_prefix"], "--model-heartbeat", HEARTBEAT)
    empty = tmp_path / "api"
    empty.mkdir()
    _, X_iris, _, _ = trained["iris"]
    _, X_digits, _, _ = trained["digits"]
    async with AsyncExitStack() as stack:
        api = await stack.enter_async_context(
            run_server(*redis, "--workers", "0", "--model", "mock", "--unserved-grace", GRACE, cwd=str(empty))
        )
        http = await stack.enter_async_context(aiohttp.ClientSession(api.url))
        # Never published: unknown.
        resp = await http.post("/models/iris/predict", json={"input": [5.1, 3.5, 1.4, 0.2]})
        assert resp.status == 404 and (await resp.json())["error"]["code"] == "model_not_found"

        # A worker started later: the API process picks its models up without a restart.
        worker = await stack.enter_async_context(run_worker(*redis, "--model-repository", str(root)))

        async def both_listed() -> bool:
            return {"iris", "digits-onnx"} <= set(await listed(http))

        await eventually(both_listed, "serving the worker's models")
        models = await listed(http)
        iris = models["iris"]["versions"][0]
        assert (iris["runtime"], iris["state"], iris["served_by"]) == ("sklearn", "ready", 1)
        assert models["digits-onnx"]["versions"][0]["runtime"] == "onnx"
        assert (await http.get("/readyz")).status == 200

        # Predictions run on the worker; inputs are checked here, against the schema it published.
        ids = []
        for row in rows(X_iris[:10]):
            resp = await http.post("/models/iris/predict", json={"input": row}, headers={"Async-Mode": "true"})
            assert resp.status == 202, await resp.text()
            ids.append((await resp.json())["prediction_id"])
        records = await wait_all_terminal(http, ids)
        labels = [records[pid]["result"]["label"] for pid in ids]
        assert labels == trained["iris_model"].predict(X_iris[:10]).tolist()
        resp = await http.post("/models/digits-onnx/predict", json={"input": rows(X_digits[:1])[0]})
        assert resp.status == 200 and (await resp.json())["result"]["label"] == int(
            trained["digits_model"].predict(X_digits[:1])[0]
        )
        resp = await http.post("/models/iris/predict", json={"input": ["a", 3.5, 1.4, 0.2]})
        body = await resp.json()
        assert (
            resp.status == 400 and body["error"]["code"] == "invalid_input" and "input[0]" in body["error"]["message"]
        )
        resp = await http.post("/models/digits-onnx/predict", json={"input": [0] * 63})
        assert resp.status == 400 and (await resp.json())["error"]["code"] == "invalid_input"

        # Its metadata, its OpenAPI route and its Open Inference Protocol tensors, with no file here.
        meta = await (await http.get("/models/iris/versions/1")).json()
        assert meta["input_schema"]["minItems"] == meta["input_schema"]["maxItems"] == 4
        spec = await (await http.get("/swagger/swagger.json")).json()
        assert "/models/iris/predict" in spec["paths"] and "/models/digits-onnx/versions/1/predict" in spec["paths"]
        assert spec["components"]["schemas"]["ModelInput.iris.1"] == meta["input_schema"]
        oip = await (await http.get("/v2/models/digits-onnx")).json()
        assert oip["platform"] and [t["shape"] for t in oip["inputs"]] == [[-1, 64]]
        assert (await http.get("/v2/models/iris/ready")).status == 200

        # The worker stops: what is queued meanwhile waits out the grace, then fails with the code.
        worker.proc.send_signal(signal.SIGTERM)
        assert await worker.proc.wait() == 0
        waiting = []
        for row in rows(X_iris[:3]):
            resp = await http.post("/models/iris/predict", json={"input": row}, headers={"Async-Mode": "true"})
            assert resp.status == 202, await resp.text()  # within the grace: a worker may be restarting
            waiting.append((await resp.json())["prediction_id"])
        failed = await wait_all_terminal(http, waiting, timeout=30)
        for pid in waiting:
            record = failed[pid]
            assert record["status"] == "failed" and record["error"]["code"] == "model_unavailable", record
            assert record["attempts"] == 0 and record["started_at"] is None  # it never ran
        resp = await http.post("/models/iris/predict", json={"input": rows(X_iris[:1])[0]})
        assert resp.status == 503 and resp.headers["Retry-After"]
        assert (await resp.json())["error"]["code"] == "model_unavailable"
        assert "unavailable" in (await listed(http))["iris"]["versions"][0]
        # The API process's own model, which no worker has ever announced: the same, counted from its start.
        resp = await http.post("/predict", json={"input": 1})
        assert resp.status == 503 and (await resp.json())["error"]["code"] == "model_unavailable"

        # A worker again: the model is served again.
        await stack.enter_async_context(run_worker(*redis, "--model-repository", str(root), "--model", "iris"))

        async def served_again() -> bool:
            return (await listed(http))["iris"]["versions"][0].get("served_by") == 1

        await eventually(served_again, "serving iris again")
        resp = await http.post("/models/iris/predict", json={"input": rows(X_iris[:1])[0]})
        assert resp.status == 200 and (await resp.json())["status"] == "succeeded"


async def test_a_killed_workers_predictions_end_model_unavailable_after_the_grace(
    redis_settings: dict[str, str], tmp_path: Path
) -> None:
    redis = ("--backend", "redis", "--redis-url", redis_settings["redis_url"])
    redis += ("--redis-prefix", redis_settings["redis_prefix"], "--model-heartbeat", HEARTBEAT)
    # The running one ends only once its entry has gone untouched for --claim-idle (the evidence that its
    # worker is gone, as for a take-over), so that is short here, in every process as it must be.
    redis += ("--claim-idle", "1")
    async with AsyncExitStack() as stack:
        api = await stack.enter_async_context(
            run_server(*redis, "--workers", "0", "--model", "mock", "--unserved-grace", GRACE, cwd=str(tmp_path))
        )
        http = await stack.enter_async_context(aiohttp.ClientSession(api.url))
        # One worker, whose one model call takes a minute: the first prediction runs, the others wait.
        worker = await stack.enter_async_context(
            run_worker(*redis, "--model", "mock", "--mock-latency-ms", "60000", "--workers", "1")
        )

        async def announced() -> bool:
            return bool((await listed(http))["mock"]["versions"][0].get("served_by"))

        await eventually(announced, "the worker announced")

        async def submit() -> str:
            resp = await http.post("/predict", json={"input": 1}, headers={"Async-Mode": "true"})
            assert resp.status == 202, await resp.text()
            return str((await resp.json())["prediction_id"])

        running = await submit()

        async def started() -> bool:
            return (await (await http.get(f"/predict/{running}")).json())["status"] == "running"

        await eventually(started, "the first prediction running")
        queued = [await submit(), await submit()]
        worker.proc.kill()  # no withdrawal: its announcement expires after three heartbeats
        await worker.proc.wait()
        records = await wait_all_terminal(http, [running, *queued], timeout=30)
        for pid in queued:
            assert records[pid]["error"]["code"] == "model_unavailable" and records[pid]["attempts"] == 0
        assert records[running]["status"] == "failed" and records[running]["attempts"] == 1
        assert records[running]["error"]["code"] == "model_unavailable"
        assert "the worker running it is gone" in records[running]["error"]["message"]
