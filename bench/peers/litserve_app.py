"""LitServe on the mock model: `python litserve_app.py --port N`, run by the peers suite in LitServe's
own virtual environment (see bench/peers/suite.py).

One inference worker on the CPU and one API server process; LitServe's own batching (at most 32
inputs, 2 ms batch timeout) and its ZeroMQ queue between the two (`fast_queue`, which its docs
advise above 100 requests/s); its default INFO logs. POST /predict {"input": ...} answers {"output": ...}; GET /health.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import litserve as ls

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from mock_model import BATCH_WAIT_S, MAX_BATCH, from_env  # beside this file, outside any package


class MockAPI(ls.LitAPI):
    def setup(self, device: str) -> None:
        self.model = from_env()

    # No annotations on these two: LitServe reads them as the request's and response's types.
    def decode_request(self, request):
        return request["input"]

    def predict(self, inputs: list[Any]) -> list[Any]:  # a batch: LitServe's default batch() keeps the list
        return self.model.predict_batch(inputs)

    def encode_response(self, output):
        return {"output": output}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    api = MockAPI(max_batch_size=MAX_BATCH, batch_timeout=BATCH_WAIT_S)
    server = ls.LitServer(api, accelerator="cpu", devices=1, workers_per_device=1, fast_queue=True)
    server.run(host="127.0.0.1", port=args.port, num_api_servers=1, generate_client_file=False)


if __name__ == "__main__":
    main()
