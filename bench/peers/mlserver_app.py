"""MLServer on the mock model: a custom runtime, served by `mlserver start bench/peers/mlserver_model`
(its model-settings.json names `mlserver_app.MockRuntime`) in MLServer's own virtual environment, run by
the peers suite (see bench/peers/suite.py).

MLServer's defaults (one parallel inference worker process, `debug`: DEBUG logs and access lines) and its adaptive
batching (`max_batch_size` 32, `max_batch_time` 2 ms, in model-settings.json). The V2 inference
protocol: POST /v2/models/mock/infer with one BYTES input `input` of shape [1] whose datum is the input's
JSON; the answer's BYTES output `output` holds the result's JSON. GET /v2/models/mock/ready.
"""

from __future__ import annotations

import json
import os
import sys

from mlserver import MLModel
from mlserver.codecs import StringCodec
from mlserver.types import InferenceRequest, InferenceResponse

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from mock_model import from_env  # beside this file, outside any package


class MockRuntime(MLModel):
    async def load(self) -> bool:
        self.model = from_env()
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        # A batch: MLServer has joined the requests' inputs along their first dimension.
        inputs = [json.loads(x) for x in StringCodec.decode_input(payload.inputs[0])]
        results = [json.dumps(r) for r in self.model.predict_batch(inputs)]
        output = StringCodec.encode_output("output", results, use_bytes=False)
        return InferenceResponse(model_name=self.name, model_version=self.version, id=payload.id, outputs=[output])
