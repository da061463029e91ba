"""BentoML on the mock model: `bentoml serve bentoml_app:Mock --host 127.0.0.1 --port N` in this folder,
run by the peers suite in BentoML's own virtual environment (see bench/peers/suite.py).

One worker process; BentoML's adaptive batching (at most 32 inputs; it picks its own wait, within
`max_latency_ms`, left at its default of 60 s so that no request is refused under the 256-connection
load). A batchable API takes a list and BentoML joins the requests' lists along dimension 0: POST
/predict {"inputs": [INPUT]} answers [RESULT]. GET /readyz.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import bentoml

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from mock_model import MAX_BATCH, from_env  # beside this file, outside any package


@bentoml.service(workers=1)
class Mock:
    def __init__(self) -> None:
        self.model = from_env()

    @bentoml.api(batchable=True, max_batch_size=MAX_BATCH)
    def predict(self, inputs: list[Any]) -> list[Any]:
        return self.model.predict_batch(inputs)
