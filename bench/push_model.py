"""A model for the push-latency runs: it waits `wait_ms` (long enough for every socket to subscribe),
then answers `{"done_at": <time.time()>}`, stamped as predict_batch returns. The record's `completed_at`
has a resolution of 1 ms, too coarse for a p99 of a few milliseconds; this stamp has the wall clock's full
precision and comes a moment before `completed_at` (the hop from the executor to the event loop and the
store's write lie between them), so a delay measured from it is the server's whole way from the model's
answer to the socket. Serve it with `--model bench.push_model:PushModel`.
"""

from __future__ import annotations

import time
from typing import Any


class PushModel:
    name = "push-bench"
    version = "1"
    input_schema: dict[str, Any] = {"type": "object", "properties": {"wait_ms": {"type": "number", "minimum": 0}}}
    output_schema: dict[str, Any] = {
        "type": "object",
        "required": ["done_at"],
        "properties": {"done_at": {"type": "number", "description": "seconds since the epoch, as it answered"}},
    }

    def load(self) -> None:
        pass

    def predict_batch(self, inputs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        time.sleep(max((x.get("wait_ms", 0) for x in inputs), default=0) / 1000)  # in its executor thread
        done_at = time.time()
        return [{"done_at": done_at} for _ in inputs]
