"""A streaming model for the streaming suite: it waits `wait_ms` (so that every subscriber is in place),
then yields `chunks` chunks, `interval_ms` apart (0: as fast as it can), each stamped with the wall-clock
time it was yielded, so a subscriber on the same machine can tell how long the chunk took to reach it.
An input with `hold_ms` yields only progress (every 50 ms) for that long: it keeps a worker busy while a
queue builds up behind it, and a cancel stops it at its next progress report.
Serve it with `--model bench.stream_model:StreamModel`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from zypher_ws import Progress

HOLD_TICK = 0.05  # seconds between a holding prediction's progress reports


class StreamModel:
    name = "stream-bench"
    version = "1"
    input_schema: dict[str, Any] = {
        "type": "object",
        "properties": {
            "chunks": {"type": "integer", "minimum": 0},
            "wait_ms": {"type": "number", "minimum": 0},
            "interval_ms": {"type": "number", "minimum": 0},
            "hold_ms": {"type": "number", "minimum": 0},
        },
    }
    output_schema: dict[str, Any] = {"type": "object"}

    def load(self) -> None:
        pass

    def predict_batch(self, inputs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Asked without `stream` (the suite always asks for it): how many chunks it would have yielded."""
        return [{"chunks": int(x.get("chunks", 0))} for x in inputs]

    def predict_stream(self, input: dict[str, Any]) -> Iterator[dict[str, Any] | Progress]:
        hold = input.get("hold_ms", 0) / 1000
        held = 0.0
        while held < hold:
            step = min(HOLD_TICK, hold - held)
            time.sleep(step)  # the model's own pace, in its executor thread
            held += step
            yield Progress(held / hold)
        time.sleep(input.get("wait_ms", 0) / 1000)
        interval = input.get("interval_ms", 0) / 1000
        for i in range(int(input.get("chunks", 0))):
            yield {"i": i, "t": time.time()}
            if interval:
                time.sleep(interval)
