"""The ceiling: a bare aiohttp handler that calls the model inline, with nothing else.

No validation, queue, store, batching or executor: the most one aiohttp process can serve here.
`python -m bench.ceiling --port 8080 --model mock`.
"""

from __future__ import annotations

import argparse

from aiohttp import web

from bench.models import MODELS, bench_model


def make_app(model_name: str) -> web.Application:
    model = bench_model(model_name)
    model.load()

    async def predict(request: web.Request) -> web.Response:
        body = await request.json()
        return web.json_response({"result": model.predict_batch([body["input"]])[0]})

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    app = web.Application()
    app.router.add_post("/predict", predict)
    app.router.add_get("/healthz", healthz)
    return app


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--model", choices=MODELS, default="mock")
    args = parser.parse_args()
    web.run_app(make_app(args.model), host="127.0.0.1", port=args.port, access_log=None, print=None)
