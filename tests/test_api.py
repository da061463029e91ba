from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import sqlite3
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aiohttp.test_utils import TestClient
from aiohttp_swagger3.validators import ValidatorError, schema_to_validator
from openapi_spec_validator import validate

from fakes import TERMINAL, WAIT, GatedModel, make_settings
from helpers import ClientFactory, listener_count, stored_count
from zypher_ws.http.app import create_app
from zypher_ws.http.keys import SERVICE, SETTINGS
from zypher_ws.http.middleware import _flatten
from zypher_ws.http.openapi import PREDICT_REQUEST_ENVELOPE
from zypher_ws.json_codec import MAX_DEPTH
from zypher_ws.models import MockModel

HOLDOUT = Path(__file__).parent / "data" / "digits_holdout.npz"
ASYNC = {"Async-Mode": "true"}


async def terminal_record(client: TestClient, location: str) -> dict[str, Any]:
    """The record at `location` once it is terminal: wait on the service (no polling), then GET it."""
    await client.app[SERVICE].wait(location.rsplit("/", 1)[-1], WAIT)
    resp = await client.get(location)
    assert resp.status == 200
    record: dict[str, Any] = await resp.json()
    assert record["status"] in TERMINAL, record
    return record


def assert_error(body: dict[str, Any], code: str) -> str:
    assert set(body) == {"error"}, body
    assert body["error"]["code"] == code, body
    assert body["error"]["message"]
    message: str = body["error"]["message"]
    return message


# -- the real default model end to end ------------------------------------------------------------


async def test_sync_digits_returns_the_right_label(make_client: ClientFactory) -> None:
    client = await make_client()  # default settings: the real digits model
    with np.load(HOLDOUT) as data:
        images, labels = data["images"][:10], data["labels"][:10]
    for image, label in zip(images.tolist(), labels.tolist(), strict=True):
        resp = await client.post("/predict", json={"input": image})
        assert resp.status == 200
        record = await resp.json()
        assert record["status"] == "succeeded"
        assert record["result"]["label"] == label
        assert record["model"] == {"name": "digits", "version": "1.0.0"}
        assert record["error"] is None
        assert record["links"] == {"self": f"/predict/{record['prediction_id']}"}
        for key in ("created_at", "started_at", "completed_at"):
            assert record[key].endswith("Z")


async def test_async_digits_then_poll_location(make_client: ClientFactory) -> None:
    client = await make_client()
    with np.load(HOLDOUT) as data:
        image, label = data["images"][0].reshape(8, 8).tolist(), int(data["labels"][0])
    resp = await client.post("/predict", json={"input": image}, headers=ASYNC)
    assert resp.status == 202
    accepted = await resp.json()
    assert accepted["status"] == "queued" and accepted["result"] is None
    assert resp.headers["Location"] == f"/predict/{accepted['prediction_id']}"
    record = await terminal_record(client, resp.headers["Location"])
    assert record["status"] == "succeeded"
    assert record["result"]["label"] == label


# -- sync and async modes ---------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["true", "TRUE", "True", "1", "yes", "YES", " yes "])
async def test_async_mode_true_values(make_client: ClientFactory, gated: GatedModel, value: str) -> None:
    client = await make_client(model=gated)
    resp = await client.post("/predict", json={"input": {"x": 1}}, headers={"Async-Mode": value})
    assert resp.status == 202
    assert (await resp.json())["status"] == "queued"
    gated.release.set()


@pytest.mark.parametrize("value", ["false", "FALSE", "0", "no", "No"])
async def test_async_mode_false_values_wait(make_client: ClientFactory, value: str) -> None:
    client = await make_client(model=GatedModel(gated=False))
    resp = await client.post("/predict", json={"input": {"x": 2}}, headers={"Async-Mode": value})
    assert resp.status == 200
    assert (await resp.json())["result"] == {"echo": {"x": 2}}


@pytest.mark.parametrize("value", ["maybe", "", "2", "truthy"])
async def test_async_mode_other_values_are_rejected(make_client: ClientFactory, value: str) -> None:
    client = await make_client(model=GatedModel(gated=False))
    resp = await client.post("/predict", json={"input": {"x": 3}}, headers={"Async-Mode": value})
    assert resp.status == 400
    assert "Async-Mode" in assert_error(await resp.json(), "invalid_header")
    assert await stored_count(client.app) == 0


@pytest.mark.parametrize("prefer", ["respond-async", "respond-async, wait=10", "handling=lenient, RESPOND-ASYNC"])
async def test_prefer_respond_async(make_client: ClientFactory, gated: GatedModel, prefer: str) -> None:
    client = await make_client(model=gated)
    resp = await client.post("/predict", json={"input": {"x": 1}}, headers={"Prefer": prefer})
    assert resp.status == 202
    gated.release.set()


async def test_sync_timeout_answers_202_and_the_prediction_carries_on(
    make_client: ClientFactory, gated: GatedModel
) -> None:
    client = await make_client(model=gated, sync_timeout=0.05)
    resp = await client.post("/predict", json={"input": {"x": 4}})
    assert resp.status == 202
    record = await resp.json()
    assert record["status"] == "running"
    assert resp.headers["Location"] == record["links"]["self"]
    gated.release.set()
    done = await terminal_record(client, resp.headers["Location"])
    assert done["status"] == "succeeded" and done["result"] == {"echo": {"x": 4}}
    assert listener_count(client.app) == 0


async def test_sync_predict_hears_its_result_without_reading_it_back(
    make_client: ClientFactory, gated: GatedModel
) -> None:
    client = await make_client(model=gated)
    store = client.app[SERVICE].store
    reads: list[str] = []
    real_get = store.get

    async def counting_get(prediction_id: str) -> Any:
        reads.append(prediction_id)
        return await real_get(prediction_id)

    store.get = counting_get  # type: ignore[method-assign]
    pending = asyncio.create_task(client.post("/predict", json={"input": {"x": 7}}))
    await gated.wait_started(1)
    assert listener_count(client.app) == 1
    gated.release.set()
    resp = await pending
    assert resp.status == 200 and (await resp.json())["result"] == {"echo": {"x": 7}}
    assert reads == []  # it listened from before the prediction was queued
    assert listener_count(client.app) == 0


async def test_get_shows_queued_then_running_then_succeeded(make_client: ClientFactory, gated: GatedModel) -> None:
    client = await make_client(model=gated, workers=1, max_batch_size=1)
    first = await (await client.post("/predict", json={"input": {"x": 1}}, headers=ASYNC)).json()
    second = await (await client.post("/predict", json={"input": {"x": 2}}, headers=ASYNC)).json()
    await gated.wait_started(1)
    assert (await (await client.get(f"/predict/{first['prediction_id']}")).json())["status"] == "running"
    assert (await (await client.get(f"/predict/{second['prediction_id']}")).json())["status"] == "queued"
    gated.release.set()
    for rec in (first, second):
        done = await terminal_record(client, rec["links"]["self"])
        assert done["status"] == "succeeded"
        assert done["started_at"] <= done["completed_at"]


class AwkwardOutputModel(GatedModel):
    """Results that JSON encoders disagree on: integers past 64 bits, NaN, infinity, non-string keys."""

    def predict_batch(self, inputs: list[Any]) -> list[Any]:
        return [{"big": 2**70 + x["x"], "nan": float("nan"), "inf": [float("-inf")], 7: "seven"} for x in inputs]


def strict_json(text: str) -> Any:
    def reject(name: str) -> Any:
        raise AssertionError(f"{name} in a response: not valid JSON")

    return json.loads(text, parse_constant=reject)


async def test_results_are_always_valid_json(make_client: ClientFactory) -> None:
    client = await make_client(model=AwkwardOutputModel(gated=False))
    resp = await client.post("/predict", json={"input": {"x": 1}})
    assert resp.status == 200
    expected = {"big": 2**70 + 1, "nan": None, "inf": [None], "7": "seven"}
    record = strict_json(await resp.text())
    assert record["result"] == expected  # the big integer exact, not rounded through a float
    stored = strict_json(await (await client.get(record["links"]["self"])).text())
    assert stored["result"] == expected


# -- failures -------------------------------------------------------------------------------------


async def test_raising_model_fails_that_prediction_and_service_keeps_serving(make_client: ClientFactory) -> None:
    client = await make_client(model=GatedModel(gated=False))
    resp = await client.post("/predict", json={"input": {"raise": "boom"}})
    assert resp.status == 500
    record = await resp.json()
    assert record["status"] == "failed" and record["result"] is None
    assert record["error"]["code"] == "model_error"
    assert "boom" in record["error"]["message"]
    assert "Traceback" not in json.dumps(record)
    ok = await client.post("/predict", json={"input": {"x": 5}})
    assert ok.status == 200 and (await ok.json())["result"] == {"echo": {"x": 5}}


async def test_one_raising_item_does_not_fail_its_batch(make_client: ClientFactory, gated: GatedModel) -> None:
    client = await make_client(model=gated, workers=1, max_batch_size=8)
    blocker = await (await client.post("/predict", json={"input": {"x": 0}}, headers=ASYNC)).json()
    await gated.wait_started(1)  # the lone worker is busy, so the next three queue up and batch together
    inputs = [{"x": 1}, {"raise": "bad item"}, {"x": 3}]
    records = [await (await client.post("/predict", json={"input": i}, headers=ASYNC)).json() for i in inputs]
    gated.release.set()
    results = [await terminal_record(client, r["links"]["self"]) for r in [blocker, *records]]
    assert [r["status"] for r in results] == ["succeeded", "succeeded", "failed", "succeeded"]
    assert results[1]["result"] == {"echo": {"x": 1}} and results[3]["result"] == {"echo": {"x": 3}}
    assert "bad item" in results[2]["error"]["message"]
    assert inputs in gated.batches  # it really was one batch first, then retried one by one


async def test_malformed_json(make_client: ClientFactory) -> None:
    client = await make_client(model=GatedModel(gated=False))
    too_deep = '{"input": ' + "[" * 100_000 + "]" * 100_000 + "}"  # past the parser's recursion limit
    for body in ('{"input": ', "not json", '{"input": NaN}', "", b'{"input": "\xe5\xff"}', too_deep):
        resp = await client.post("/predict", data=body, headers={"Content-Type": "application/json"})
        assert resp.status == 400, body[:40]
        assert_error(await resp.json(), "invalid_json" if body else "invalid_input")
    assert (await client.post("/predict", json={"input": {"x": 1}})).status == 200  # and it keeps serving


@pytest.mark.parametrize("model", [None, MockModel()], ids=["digits", "mock"])
@pytest.mark.parametrize("depth", [MAX_DEPTH, 500, 1023])
async def test_nesting_the_parser_takes_but_deeper_than_max_depth_is_400(
    make_client: ClientFactory, model: MockModel | None, depth: int, caplog: pytest.LogCaptureFixture
) -> None:
    client = await make_client(model=model)
    body = '{"input": ' + "[" * depth + "]" * depth + "}"
    resp = await client.post("/predict", data=body, headers={"Content-Type": "application/json"})
    assert resp.status == 400
    assert "nested deeper than 128 levels" in assert_error(await resp.json(), "invalid_json")
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]  # no traceback: it is the client's
    assert await stored_count(client.app) == 0


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"input": list(range(63))}, "input"),
        ({"input": [0] * 63 + [17]}, "input[63]"),
        ({"input": [0] * 63 + ["a"]}, "input[63]"),
        ({"input": [[0] * 8] * 7 + [[0] * 7 + [-1]]}, "input[7][7]"),
        ({"inputs": [0] * 64}, "input"),
        ([0] * 64, "body"),
    ],
)
async def test_body_failing_the_schema_names_the_field(make_client: ClientFactory, body: Any, field: str) -> None:
    client = await make_client()
    resp = await client.post("/predict", json=body)
    assert resp.status == 400
    message = assert_error(await resp.json(), "invalid_input")
    assert field in message


@pytest.mark.parametrize("body", [None, b"", b"[]", b"null", b'"input"', b"3", b"{}", b'{"inputs": [1]}'])
async def test_predict_routes_refuse_a_bad_envelope_in_aiohttp_swagger3s_words(
    make_client: ClientFactory, body: bytes | None
) -> None:
    """The predict routes check their envelope themselves, not through aiohttp-swagger3's route wrapper:
    the 400 must be the one its validator of the same schema gives (its message, our envelope)."""
    errors: Any = "is required"  # what its route says of a request without a body
    if body:
        with pytest.raises(ValidatorError) as refused:
            schema_to_validator(PREDICT_REQUEST_ENVELOPE).validate(json.loads(body), True)
        errors = refused.value.error
    expected = "; ".join(_flatten({"body": errors}))
    client = await make_client(model=MockModel())
    for path in ("/predict", "/models/mock/predict", "/models/mock/versions/1.0.0/predict"):
        resp = await client.post(path, data=body, headers={"Content-Type": "application/json"})
        assert resp.status == 400, path
        assert assert_error(await resp.json(), "invalid_input") == expected, path
    assert await stored_count(client.app) == 0


async def test_large_invalid_inputs_keep_the_loop_responsive_and_get_small_answers(
    make_client: ClientFactory,
) -> None:
    """586 KiB bodies (under --max-body) that the digits schema rejects once blocked the loop ~8 s each."""
    client = await make_client()  # the real digits model
    loop = asyncio.get_running_loop()
    bodies = {
        json.dumps({"input": [16] * 150_000}).encode(): "input",  # its 400 once repeated all of it
        json.dumps({"input": [17] * 150_000}).encode(): "input",
        json.dumps({"input": [0, 0, 0, [17] * 150_000] + [0] * 60}).encode(): "input[3]",
    }
    assert all(500_000 < len(body) < client.app[SETTINGS].max_body for body in bodies)
    posted = asyncio.Event()

    async def post(body: bytes, field: str) -> None:
        resp = await client.post("/predict", data=body, headers={"Content-Type": "application/json"})
        raw = await resp.read()
        assert resp.status == 400 and len(raw) < 300, raw[:300]
        assert assert_error(json.loads(raw), "invalid_input").startswith(f"{field}: too large: "), raw

    async def post_all() -> None:
        try:
            for _ in range(2):
                await asyncio.gather(*(post(body, field) for body, field in bodies.items() for _ in range(2)))
        finally:
            posted.set()

    async def probe() -> list[float]:
        latencies = []
        while not latencies or not posted.is_set():
            started = loop.time()
            assert (await client.get("/healthz")).status == 200
            latencies.append(loop.time() - started)
        return latencies

    _, latencies = await asyncio.wait_for(asyncio.gather(post_all(), probe()), 120)
    assert max(latencies) < 0.5, latencies


async def post_with_raw_key(client: TestClient, key: bytes) -> tuple[int, dict[str, Any]]:
    """POST /predict with an Idempotency-Key of exactly these bytes (aiohttp's client would encode them)."""
    body = b'{"input": {"x": 1}}'
    reader, writer = await asyncio.open_connection(client.host, client.port)
    try:
        writer.write(
            b"POST /predict HTTP/1.1\r\nHost: test\r\nConnection: close\r\nContent-Type: application/json\r\n"
            b"Idempotency-Key: %s\r\nContent-Length: %d\r\n\r\n%s" % (key, len(body), body)
        )
        response = await asyncio.wait_for(reader.read(), WAIT)
    finally:
        writer.close()
        await writer.wait_closed()
    head, _, payload = response.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(payload)


@pytest.mark.parametrize("store", ["memory://", "sqlite"])
async def test_an_idempotency_key_no_store_can_keep_is_400_invalid_header(
    make_client: ClientFactory, tmp_path: Path, store: str, caplog: pytest.LogCaptureFixture
) -> None:
    client = await make_client(
        model=GatedModel(gated=False), store=store.replace("sqlite", f"sqlite:///{tmp_path / 'z.db'}")
    )
    for key in (b"\xff\xfe", "caf\u00e9".encode(), b"\xed\xa0\x80"):
        status, body = await post_with_raw_key(client, key)
        assert (status, body["error"]["code"]) == (400, "invalid_header"), key
        assert "Idempotency-Key" in body["error"]["message"]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert await stored_count(client.app) == 0
    for key in (b"order-42 ~!", b"k" * 255):
        status, body = await post_with_raw_key(client, key)
        assert status == 200 and body["status"] == "succeeded", key


async def test_wrong_content_type_is_415(make_client: ClientFactory) -> None:
    client = await make_client(model=GatedModel(gated=False))
    resp = await client.post("/predict", data='{"input": {}}', headers={"Content-Type": "text/plain"})
    assert resp.status == 415
    assert_error(await resp.json(), "unsupported_media_type")


async def test_oversized_body_is_413(make_client: ClientFactory) -> None:
    client = await make_client(model=MockModel(), max_body=1024)
    resp = await client.post("/predict", json={"input": "x" * 2000})
    assert resp.status == 413
    assert "1024" in assert_error(await resp.json(), "body_too_large")
    ok = await client.post("/predict", json={"input": "x" * 100})
    assert ok.status == 200


async def test_unknown_id_is_404_and_unknown_route_and_method_are_json(make_client: ClientFactory) -> None:
    client = await make_client(model=GatedModel(gated=False))
    assert_error(await (await client.get("/predict/" + "0" * 32)).json(), "not_found")
    assert_error(await (await client.delete("/predict/nope")).json(), "not_found")
    resp = await client.get("/nowhere")
    assert resp.status == 404 and resp.content_type == "application/json"
    resp = await client.put("/predict")
    assert resp.status == 405
    assert_error(await resp.json(), "method_not_allowed")


async def test_queue_full_is_503_with_retry_after_and_stores_nothing(
    make_client: ClientFactory, gated: GatedModel
) -> None:
    client = await make_client(model=gated, workers=1, max_batch_size=1, max_queue=2)
    await client.post("/predict", json={"input": {"x": 0}}, headers=ASYNC)
    await gated.wait_started(1)  # taken off the queue: the queue now has room for exactly two
    for i in (1, 2):
        assert (await client.post("/predict", json={"input": {"x": i}}, headers=ASYNC)).status == 202
    before = await stored_count(client.app)
    for headers in (ASYNC, {}):  # sync requests go through the same queue
        resp = await client.post("/predict", json={"input": {"x": 9}}, headers=headers)
        assert resp.status == 503
        assert int(resp.headers["Retry-After"]) >= 1
        assert_error(await resp.json(), "queue_full")
    assert await stored_count(client.app) == before
    assert listener_count(client.app) == 0
    ready = await client.get("/readyz")
    assert ready.status == 503
    gated.release.set()


async def test_not_ready_until_the_model_loads(make_client: ClientFactory) -> None:
    load_gate = threading.Event()
    client = await make_client(model=GatedModel(gated=False, load_gate=load_gate), wait_loaded=False)
    assert (await client.get("/healthz")).status == 200
    resp = await client.get("/readyz")
    assert resp.status == 503
    assert_error(await resp.json(), "not_ready")
    resp = await client.post("/predict", json={"input": {"x": 1}})
    assert resp.status == 503 and "Retry-After" in resp.headers
    load_gate.set()
    await asyncio.wait_for(client.app[SERVICE].models.default.loaded.wait(), WAIT)
    assert (await client.get("/readyz")).status == 200
    assert (await client.post("/predict", json={"input": {"x": 1}})).status == 200


# -- cancel -------------------------------------------------------------------------------------------


async def test_cancel_queued_never_runs(make_client: ClientFactory, gated: GatedModel) -> None:
    client = await make_client(model=gated, workers=1, max_batch_size=1)
    await client.post("/predict", json={"input": {"x": 0}}, headers=ASYNC)
    await gated.wait_started(1)
    queued = await (await client.post("/predict", json={"input": {"x": 7}}, headers=ASYNC)).json()
    resp = await client.delete(queued["links"]["self"])
    assert resp.status == 200
    canceled = await resp.json()
    assert canceled["status"] == "canceled" and canceled["completed_at"]
    gated.release.set()
    # A later prediction finishing proves the worker went past the canceled one.
    after = await (await client.post("/predict", json={"input": {"x": 8}})).json()
    assert after["status"] == "succeeded"
    assert all({"x": 7} not in batch for batch in gated.batches)
    assert (await (await client.get(queued["links"]["self"])).json())["status"] == "canceled"


async def test_cancel_running_discards_its_result(make_client: ClientFactory, gated: GatedModel) -> None:
    client = await make_client(model=gated, workers=1, max_batch_size=1)
    running = await (await client.post("/predict", json={"input": {"x": 1}}, headers=ASYNC)).json()
    await gated.wait_started(1)
    resp = await client.delete(running["links"]["self"])
    assert resp.status == 200 and (await resp.json())["status"] == "canceled"
    gated.release.set()
    after = await (await client.post("/predict", json={"input": {"x": 2}})).json()
    assert after["status"] == "succeeded"  # the worker finished the canceled batch before this one
    record = await (await client.get(running["links"]["self"])).json()
    assert record["status"] == "canceled" and record["result"] is None


async def test_cancel_finished_is_409(make_client: ClientFactory) -> None:
    client = await make_client(model=GatedModel(gated=False))
    done = await (await client.post("/predict", json={"input": {"x": 1}})).json()
    resp = await client.delete(done["links"]["self"])
    assert resp.status == 409
    assert_error(await resp.json(), "already_finished")
    assert (await (await client.get(done["links"]["self"])).json())["status"] == "succeeded"


# -- load and documentation -------------------------------------------------------------------------


async def test_200_concurrent_async_submissions_all_complete_correctly(make_client: ClientFactory) -> None:
    client = await make_client(model=MockModel(), max_batch_delay_ms=2.0)
    inputs = [{"n": i, "tag": f"item-{i}"} for i in range(200)]
    responses = await asyncio.gather(*(client.post("/predict", json={"input": x}, headers=ASYNC) for x in inputs))
    assert [r.status for r in responses] == [202] * 200, [await r.text() for r in responses if r.status != 202][:2]
    locations = [r.headers["Location"] for r in responses]
    assert len(set(locations)) == 200
    records = await asyncio.gather(*(terminal_record(client, loc) for loc in locations))
    for x, record in zip(inputs, records, strict=True):
        digest = hashlib.sha256(json.dumps(x, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
        assert record["status"] == "succeeded"
        assert record["result"]["digest"] == digest


async def test_model_endpoint_describes_the_model(make_client: ClientFactory) -> None:
    client = await make_client()
    info = await (await client.get("/model")).json()
    assert info["name"] == "digits" and info["version"] == "1.0.0"
    assert "oneOf" in info["input_schema"]
    assert info["output_schema"]["required"] == ["label", "probabilities"]


async def test_openapi_spec_is_valid_and_complete(make_client: ClientFactory) -> None:
    client = await make_client()
    spec = await (await client.get("/swagger/swagger.json")).json()
    validate(spec)
    assert {"/predict", "/predict/{prediction_id}", "/model", "/healthz", "/readyz"} <= set(spec["paths"])
    schemas = spec["components"]["schemas"]
    assert schemas["ModelInput"]["oneOf"][0]["minItems"] == 64
    assert schemas["PredictRequest"]["properties"]["input"] == {"$ref": "#/components/schemas/ModelInput"}
    post = spec["paths"]["/predict"]["post"]
    assert {"200", "202", "400", "413", "415", "500", "503"} <= set(post["responses"])
    ui = await client.get("/swagger/")
    assert ui.status == 200 and "swagger" in (await ui.text()).lower()


async def test_sqlite_sync_prediction_is_on_disk_when_answered_200_or_202(aiohttp_client: Any, tmp_path: Path) -> None:
    """A sync request without a key is written once, finished, before its 200; or as it stands before a 202."""
    path = tmp_path / "z.db"
    gated = GatedModel()
    gated.bind(asyncio.get_running_loop())
    client = await aiohttp_client(create_app(make_settings(store=f"sqlite:///{path}", sync_timeout=0.2), model=gated))
    await asyncio.wait_for(client.app[SERVICE].models.default.loaded.wait(), WAIT)

    def on_disk() -> dict[str, str]:
        with sqlite3.connect(path) as conn:
            return dict(conn.execute("SELECT id, status FROM predictions").fetchall())

    late = await client.post("/predict", json={"input": {"x": 1}})  # the model is held: 202 after the timeout
    assert late.status == 202
    late_id = (await late.json())["prediction_id"]
    assert on_disk() == {late_id: "running"}
    gated.release.set()
    resp = await client.post("/predict", json={"input": {"x": 2}})
    assert resp.status == 200
    pid = (await resp.json())["prediction_id"]
    assert on_disk()[pid] == "succeeded"
    got = await client.get(f"/predict/{pid}")
    assert (await got.json())["status"] == "succeeded"
    await terminal_record(client, f"/predict/{late_id}")
    assert on_disk() == {late_id: "succeeded", pid: "succeeded"}
