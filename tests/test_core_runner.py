"""The model runner, driven by a scripted model on an executor the test steps through: no threads, no sleeps."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from fakes import WAIT, ScriptedModel, StepExecutor
from zypher_ws.records import Outcome, Prediction
from zypher_ws.runner import ModelRunner

IDS = ["a", "b", "c"]
INPUTS = [{"x": 1}, {"x": 2}, {"x": 3}]


def model_error(message: str) -> dict[str, str]:
    return {"code": "model_error", "message": message}


def runner(model: ScriptedModel) -> ModelRunner:
    return ModelRunner(model, StepExecutor(auto=True))


async def test_a_batch_is_one_model_call_with_outcomes_in_order() -> None:
    model = ScriptedModel([{"y": 1}, {"y": 2}, {"y": 3}])
    outcomes = await runner(model).run(IDS, INPUTS)
    assert model.calls == [INPUTS]
    assert outcomes == [Outcome("a", result={"y": 1}), Outcome("b", result={"y": 2}), Outcome("c", result={"y": 3})]


async def test_a_raising_batch_is_retried_one_by_one_so_only_the_bad_item_fails() -> None:
    model = ScriptedModel(ValueError("bad item"), [{"y": 1}], ValueError("bad item"), [{"y": 3}])
    outcomes = await runner(model).run(IDS, INPUTS)
    assert model.calls == [INPUTS, [INPUTS[0]], [INPUTS[1]], [INPUTS[2]]]
    assert outcomes == [
        Outcome("a", result={"y": 1}),
        Outcome("b", error=model_error("ValueError: bad item")),
        Outcome("c", result={"y": 3}),
    ]


async def test_a_batch_with_the_wrong_number_of_outputs_is_retried_one_by_one() -> None:
    model = ScriptedModel([{"y": 1}], [{"y": 1}], [{"y": 2}, {"y": 2}])
    outcomes = await runner(model).run(IDS[:2], INPUTS[:2])
    assert model.calls == [INPUTS[:2], [INPUTS[0]], [INPUTS[1]]]
    assert outcomes == [
        Outcome("a", result={"y": 1}),
        Outcome("b", error=model_error("ValueError: model returned 2 outputs for 1 inputs")),
    ]


async def test_a_lone_input_that_raises_fails_after_one_call() -> None:
    model = ScriptedModel(RuntimeError("out of memory"))
    outcomes = await runner(model).run(["a"], [INPUTS[0]])
    assert model.calls == [[INPUTS[0]]]
    assert outcomes == [Outcome("a", error=model_error("RuntimeError: out of memory"))]


async def test_the_retries_run_one_after_another_in_the_executor() -> None:
    """Step by step: nothing is submitted until the call before it has finished."""
    model = ScriptedModel(ValueError("no"), [{"y": 1}], [{"y": 2}])
    executor = StepExecutor()
    run = asyncio.create_task(ModelRunner(model, executor).run(IDS[:2], INPUTS[:2]))
    for expected in (INPUTS[:2], [INPUTS[0]], [INPUTS[1]]):
        call = await executor.next_call()
        assert call.args == (expected,) and executor.pending == 0
        call.run()
    assert await asyncio.wait_for(run, WAIT) == [Outcome("a", result={"y": 1}), Outcome("b", result={"y": 2})]


async def test_load_runs_in_the_executor_and_marks_the_runner_ready() -> None:
    model = ScriptedModel()
    executor = StepExecutor()
    r = ModelRunner(model, executor)
    loading = asyncio.create_task(r.load())
    call = await executor.next_call()
    assert model.loads == 0 and not r.loaded  # handed to the executor, not run on the loop
    call.run()
    describing = await executor.next_call()  # the schemas too: a file model reads its file for them
    assert model.loads == 1 and not r.loaded
    describing.run()
    description = await asyncio.wait_for(loading, WAIT)
    assert r.loaded and r.loaded_event.is_set() and r.load_error is None
    assert description.input_schema == model.input_schema and description.output_schema == model.output_schema


async def test_a_failed_load_is_kept_for_readiness_and_raised() -> None:
    r = runner(ScriptedModel(load_error=OSError("weights not found")))
    with pytest.raises(OSError, match="weights not found"):
        await r.load()
    assert not r.loaded and not r.loaded_event.is_set()
    assert r.load_error == "failed to load: OSError: weights not found"


# -- predictions of several rows (Open Inference Protocol requests) ----------------------------------


def oip_prediction(rows: list[Any], request_id: str | None = None) -> Prediction:
    value = {"rows": rows, "id": request_id, "outputs": None}
    return Prediction.new(value, model_name="scripted", model_version="0.1.0", protocol="oip")


async def loaded(model: ScriptedModel) -> ModelRunner:
    ready = runner(model)
    await ready.load()
    return ready


def response(pid: str, ys: list[int], request_id: str | None = None) -> Outcome:
    texts = [json.dumps({"y": y}, separators=(",", ":")) for y in ys]
    answer: dict[str, Any] = {
        "model_name": "scripted",
        "model_version": "0.1.0",
        "outputs": [{"name": "output", "datatype": "BYTES", "shape": [len(ys)], "data": texts}],
    }
    if request_id is not None:
        answer["id"] = request_id
    return Outcome(pid, result=answer)


async def test_the_rows_of_every_prediction_share_model_calls_of_at_most_max_rows() -> None:
    native = Prediction.new({"x": 0}, model_name="scripted", model_version="0.1.0")
    two, three = oip_prediction([{"x": 1}, {"x": 2}], "r2"), oip_prediction([{"x": 3}, {"x": 4}, {"x": 5}])
    model = ScriptedModel([{"y": 0}, {"y": 1}, {"y": 2}, {"y": 3}], [{"y": 4}, {"y": 5}])
    outcomes = await (await loaded(model)).run_predictions([native, two, three], max_rows=4)
    assert model.calls == [[{"x": i} for i in range(4)], [{"x": 4}, {"x": 5}]]
    assert outcomes == [
        Outcome(native.prediction_id, result={"y": 0}),
        response(two.prediction_id, [1, 2], "r2"),
        response(three.prediction_id, [3, 4, 5]),
    ]


async def test_a_row_that_raises_fails_only_its_own_prediction() -> None:
    bad, good = oip_prediction([{"x": 1}, {"x": 2}]), oip_prediction([{"x": 3}])
    model = ScriptedModel(ValueError("row 2"), [{"y": 1}], ValueError("row 2"), [{"y": 3}])
    outcomes = await (await loaded(model)).run_predictions([bad, good], max_rows=8)
    assert outcomes == [
        Outcome(bad.prediction_id, error=model_error("ValueError: row 2")),
        response(good.prediction_id, [3]),
    ]


async def test_outputs_that_are_not_the_models_tensors_fail_the_prediction() -> None:
    prediction = oip_prediction([{"x": 1}])
    model = ScriptedModel([object()])  # not JSON: it cannot be a BYTES element of JSON text
    (outcome,) = await (await loaded(model)).run_predictions([prediction], max_rows=8)
    assert outcome.result is None and outcome.error is not None and outcome.error["code"] == "model_error"
