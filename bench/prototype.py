"""A faithful reference of the Flask prototype zypher-ws replaces, for side-by-side benchmarks.

As its README describes: Flask, one `queue.Queue`, one worker thread calling the model per task,
results in a dict. `Async-Mode: true` answers 202 with the id at once; otherwise the request thread
waits for the worker to finish its task. Run with `flask --app bench.prototype:app run` or
`gunicorn bench.prototype:app`. The model comes from BENCH_MODEL (mock, mock50, cpu, digits).
"""

from __future__ import annotations

import os
import queue
import threading
import uuid
from typing import Any

from flask import Flask, jsonify, request

from bench.models import bench_model

app = Flask(__name__)
model = bench_model(os.environ.get("BENCH_MODEL", "mock"))
model.load()
task_queue: queue.Queue[tuple[str, Any]] = queue.Queue()
predictions: dict[str, dict[str, Any]] = {}
done: dict[str, threading.Event] = {}


def worker() -> None:
    while True:
        prediction_id, input_data = task_queue.get()
        try:
            predictions[prediction_id] = {"status": "completed", "result": model.predict_batch([input_data])[0]}
        except Exception as exc:  # the prototype reported failures in the record
            predictions[prediction_id] = {"status": "failed", "error": str(exc)}
        done.pop(prediction_id).set()
        task_queue.task_done()


threading.Thread(target=worker, daemon=True).start()


@app.post("/predict")
def predict() -> Any:
    body = request.get_json()
    prediction_id = uuid.uuid4().hex
    predictions[prediction_id] = {"status": "processing"}
    finished = done[prediction_id] = threading.Event()
    task_queue.put((prediction_id, body["input"]))
    if request.headers.get("Async-Mode", "").lower() == "true":
        return jsonify({"message": "Request received. Processing asynchronously.", "prediction_id": prediction_id}), 202
    finished.wait()
    return jsonify({"prediction_id": prediction_id, **predictions[prediction_id]})


@app.get("/predict/<prediction_id>")
def get_prediction(prediction_id: str) -> Any:
    record = predictions.get(prediction_id)
    if record is None:
        return jsonify({"error": "Prediction ID not found."}), 404
    if record["status"] == "processing":
        return jsonify({"error": "Prediction is still being processed."}), 400
    return jsonify({"prediction_id": prediction_id, "output": record["result"]})


@app.get("/healthz")
def healthz() -> Any:
    return jsonify({"status": "ok"})
