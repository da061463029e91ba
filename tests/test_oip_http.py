"""The /v2 routes over HTTP, per backend: async infer with push and a durable record, the protocol's
error shape for every refusal (never a 500), readiness, tokens and the queue's bound."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import numpy as np
from aiohttp.test_utils import TestClient

from fakes import WAIT, GatedModel, GatedTensorModel, make_settings
from helpers import ClientFactory
from zypher_ws.http.app import create_app
from zypher_ws.http.keys import SERVICE
from zypher_ws.oip import parse_request

ROWS = {"inputs": [{"name": "x", "datatype": "INT64", "shape": [2], "data": [1, 2]}], "id": "req-9"}
ASYNC = {"Prefer": "respond-async"}


def expected_response(xs: list[int]) -> dict[str, Any]:
    texts = [json.dumps({"echo": {"x": x}}, separators=(",", ":")) for x in xs]
    return {
        "model_name": "gated",
        "model_version": "0.0.1",
        "id": "req-9",
        "outputs": [{"name": "output", "datatype": "BYTES", "shape": [len(xs)], "data": texts}],
    }


async def test_async_infer_answers_202_and_pushes_the_oip_response(make_client: ClientFactory) -> None:
    model = GatedTensorModel()
    client = await make_client(model=model)
    resp = await client.post("/v2/models/gated/infer", json=ROWS, headers=ASYNC)
    assert resp.status == 202
    record = await resp.json()
    location = resp.headers["Location"]
    assert location == f"/predict/{record['prediction_id']}" and record["status"] == "queued"

    async with client.ws_connect("/ws") as ws:
        await ws.send_json({"op": "subscribe", "prediction_id": record["prediction_id"]})
        first = await ws.receive_json(timeout=WAIT)
        assert first["type"] == "subscribed" and first["prediction"]["status"] in ("queued", "running")
        await model.wait_started()
        model.release.set()
        statuses = [first["prediction"]["status"]]
        while statuses[-1] != "succeeded":
            message = await ws.receive_json(timeout=WAIT)
            if message["type"] != "queue":  # its place in line while it waits
                statuses.append(message["prediction"]["status"])
        assert message["prediction"]["result"] == expected_response([1, 2])
    assert statuses[-2:] == ["running", "succeeded"]
    assert model.batches == [[{"x": 1}, {"x": 2}]]  # one prediction, both rows in one model call

    got = await (await client.get(location)).json()
    assert got["status"] == "succeeded" and got["result"] == expected_response([1, 2])


async def test_sync_infer_of_a_python_model(make_client: ClientFactory) -> None:
    client = await make_client(model=GatedTensorModel(gated=False))
    resp = await client.post("/v2/models/gated/versions/0.0.1/infer", json=ROWS)
    assert resp.status == 200 and resp.content_type == "application/json"
    assert await resp.json() == expected_response([1, 2])


async def test_binary_outputs_follow_the_json_header(make_client: ClientFactory) -> None:
    client = await make_client(model=GatedTensorModel(gated=False))
    body = {**ROWS, "parameters": {"binary_data_output": True}}
    resp = await client.post("/v2/models/gated/infer", json=body)
    raw = await resp.read()
    length = int(resp.headers["Inference-Header-Content-Length"])
    header = json.loads(raw[:length])
    (output,) = header["outputs"]
    assert "data" not in output and output["parameters"]["binary_data_size"] == len(raw) - length
    # The client side of the same codec reads the BYTES elements back.
    as_request = {"inputs": [{**output, "name": "output"}]}
    head = json.dumps(as_request).encode()
    (tensor,) = parse_request(head + raw[length:], str(len(head))).inputs
    assert tensor.array.tolist() == expected_response([1, 2])["outputs"][0]["data"]


async def test_a_failed_inference_is_the_protocols_error(make_client: ClientFactory) -> None:
    client = await make_client(model=GatedModel(gated=False))  # inputs x (INT64) and raise (BYTES)
    tensors = [
        {"name": "x", "datatype": "INT64", "shape": [1], "data": [1]},
        {"name": "raise", "datatype": "BYTES", "shape": [1], "data": ["boom"]},
    ]
    resp = await client.post("/v2/models/gated/infer", json={"inputs": tensors})
    assert resp.status == 500
    assert await resp.json() == {"error": "ValueError: boom"}


async def test_refusals_take_the_protocols_shape_never_a_500(make_client: ClientFactory) -> None:
    client = await make_client(model=GatedTensorModel(gated=False), max_body=4096)
    header = json.dumps(
        {"inputs": [{"name": "x", "datatype": "INT64", "shape": [4], "parameters": {"binary_data_size": 32}}]}
    ).encode()
    data = np.arange(4, dtype="<i8").tobytes()
    cases = [
        (
            "POST",
            "/v2/models/gated/infer",
            header + data[:-3],
            {"Inference-Header-Content-Length": str(len(header))},
            400,
        ),
        (
            "POST",
            "/v2/models/gated/infer",
            header + data + b"xx",
            {"Inference-Header-Content-Length": str(len(header))},
            400,
        ),
        ("POST", "/v2/models/gated/infer", header + data, {"Inference-Header-Content-Length": "9999"}, 400),
        ("POST", "/v2/models/gated/infer", header + data, {"Inference-Header-Content-Length": "-1"}, 400),
        ("POST", "/v2/models/gated/infer", b"{not json", {}, 400),
        ("POST", "/v2/models/gated/infer", b"x" * 5000, {}, 413),
        ("POST", "/v2/models/gated/infer", json.dumps(ROWS).encode(), {"Async-Mode": "maybe"}, 400),
        ("POST", "/v2/models/nothing/infer", json.dumps(ROWS).encode(), {}, 404),
        ("POST", "/v2/models/gated/versions/7/infer", json.dumps(ROWS).encode(), {}, 404),
        ("GET", "/v2/models/gated/infer", b"", {}, 405),
        ("GET", "/v2/nothing", b"", {}, 404),
    ]
    for method, path, body, headers, status in cases:
        resp = await client.request(method, path, data=body, headers=headers)
        answer = await resp.json()
        assert resp.status == status, (path, headers, answer)
        assert set(answer) == {"error"} and isinstance(answer["error"], str) and answer["error"], answer
    ok = await client.post(
        "/v2/models/gated/infer", data=header + data, headers={"Inference-Header-Content-Length": str(len(header))}
    )
    assert ok.status == 200, await ok.text()


async def test_a_full_queue_is_503_with_retry_after(make_client: ClientFactory) -> None:
    model = GatedTensorModel()
    client = await make_client(model=model, max_queue=1, workers=1)
    running = await client.post("/v2/models/gated/infer", json=ROWS, headers=ASYNC)
    assert running.status == 202
    await model.wait_started()
    queued = await client.post("/v2/models/gated/infer", json=ROWS, headers=ASYNC)
    assert queued.status == 202
    full = await client.post("/v2/models/gated/infer", json=ROWS)
    assert full.status == 503 and int(full.headers["Retry-After"]) >= 1
    assert await full.json() == {"error": "the prediction queue is full; retry later"}
    ready = await client.get("/v2/health/ready")
    assert ready.status == 503 and "queue is full" in (await ready.json())["error"]
    model.release.set()


async def test_health_and_metadata_before_the_model_loads(make_client: ClientFactory) -> None:
    import threading

    gate = threading.Event()
    client = await make_client(model=GatedTensorModel(gated=False, load_gate=gate), wait_loaded=False)
    live = await client.get("/v2/health/live")
    assert live.status == 200 and await live.json() == {"live": True}
    for path in ("/v2/health/ready", "/v2/models/gated/ready", "/v2/models/gated"):
        resp = await client.get(path)
        assert resp.status == 503 and "still loading" in (await resp.json())["error"], path
    gate.set()
    await asyncio.wait_for(client.app[SERVICE].models.default.loaded.wait(), WAIT)
    assert await (await client.get("/v2/health/ready")).json() == {"ready": True}
    ready = await client.get("/v2/models/gated/ready")
    assert await ready.json() == {"name": "gated", "version": "0.0.1", "ready": True}


async def test_tokens_guard_everything_but_health(make_client: ClientFactory) -> None:
    client = await make_client(model=GatedTensorModel(gated=False), api_tokens=("s3cret-token-0123456789",))
    assert (await client.get("/v2/health/live")).status == 200
    assert (await client.get("/v2/health/ready")).status == 200
    denied = await client.post("/v2/models/gated/infer", json=ROWS)
    assert denied.status == 401 and await denied.json() == {"error": "send Authorization: Bearer <token>"}
    assert (await client.get("/v2/models/gated")).status == 401
    allowed = await client.post(
        "/v2/models/gated/infer", json=ROWS, headers={"Authorization": "Bearer s3cret-token-0123456789"}
    )
    assert allowed.status == 200


async def test_an_async_infer_is_recovered_after_a_restart(aiohttp_client: Any, tmp_path: Path) -> None:
    """Accepted, then the process stops before it runs: the next start runs it from the stored record."""
    store = f"sqlite:///{tmp_path / 'z.db'}"
    first_model = GatedTensorModel()
    first_model.bind(asyncio.get_running_loop())
    first: TestClient = await aiohttp_client(create_app(make_settings(store=store, workers=1), model=first_model))
    await asyncio.wait_for(first.app[SERVICE].models.default.loaded.wait(), WAIT)
    accepted = await (await first.post("/v2/models/gated/infer", json=ROWS, headers=ASYNC)).json()
    await first_model.wait_started()
    await first.close()  # the batch is still in the model: the record stays running
    first_model.release.set()

    second_model = GatedTensorModel(gated=False)
    second_model.bind(asyncio.get_running_loop())
    second: TestClient = await aiohttp_client(create_app(make_settings(store=store), model=second_model))
    await asyncio.wait_for(second.app[SERVICE].models.default.loaded.wait(), WAIT)
    record = await second.app[SERVICE].wait(accepted["prediction_id"], WAIT)
    assert record.status.value == "succeeded" and record.attempts == 2
    assert record.result == expected_response([1, 2])
    assert second_model.batches == [[{"x": 1}, {"x": 2}]]
