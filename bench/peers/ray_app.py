"""Ray Serve on the mock model: `python ray_app.py --port N`, run by the peers suite in Ray's own virtual
environment (see bench/peers/suite.py), with its default HTTP proxy or, with RAY_SERVE_ENABLE_HA_PROXY=1
and RAY_SERVE_THROUGHPUT_OPTIMIZED=1 in the environment, its HAProxy high-throughput mode.

A local Ray cluster of its own on 127.0.0.1 (no dashboard, no usage stats), one replica, Ray Serve's own
batching (`@serve.batch`, at most 32 inputs, 2 ms wait, one batch at a time) and `max_ongoing_requests`
raised from its default of 5 so the replica sees enough requests to batch. The model runs in a thread
(asyncio.to_thread), as zypher-ws runs it in an executor, so the replica's event loop keeps taking
requests meanwhile. POST /predict {"input": ...} answers {"output": ...}; GET /predict answers "ok".
SIGTERM ends it: Ray's own handler stops the driver and the cluster's processes go with it (the suite
kills any left behind).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import sys
import threading
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from mock_model import BATCH_WAIT_S, MAX_BATCH, from_env  # beside this file, outside any package


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# Every Ray process on loopback: without this Ray takes the machine's outward address as the node's, for
# its own traffic between processes (GCS, raylet, actors) and for HAProxy's to the replica.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
# HAProxy's files and fixed ports (stats 8404, metrics 9101) moved to this run's own: set before Ray
# Serve reads its constants.
_tmp = os.environ.get("BENCH_PEER_TMP") or "/tmp"
os.environ.setdefault("RAY_SERVE_HAPROXY_CONFIG_FILE_LOC", f"{_tmp}/h/haproxy.cfg")
os.environ.setdefault("RAY_SERVE_HAPROXY_SOCKET_PATH", f"{_tmp}/h/admin.sock")
os.environ.setdefault("RAY_SERVE_HAPROXY_SERVER_STATE_BASE", f"{_tmp}/h")
os.environ.setdefault("RAY_SERVE_HAPROXY_SERVER_STATE_FILE", f"{_tmp}/h/server-state")
os.environ.setdefault("RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH", f"{_tmp}/h/metrics.sock")
os.environ.setdefault("RAY_SERVE_HAPROXY_STATS_PORT", str(_free_port()))
os.environ.setdefault("RAY_SERVE_HAPROXY_METRICS_PORT", str(_free_port()))
os.makedirs(f"{_tmp}/h", exist_ok=True)

import ray  # noqa: E402
from ray import serve  # noqa: E402
from starlette.requests import Request  # noqa: E402


@serve.deployment(num_replicas=1, max_ongoing_requests=1024, ray_actor_options={"num_cpus": 0})
class Mock:
    def __init__(self) -> None:
        self.model = from_env()

    @serve.batch(max_batch_size=MAX_BATCH, batch_wait_timeout_s=BATCH_WAIT_S)
    async def predict(self, inputs: list[Any]) -> list[Any]:
        return await asyncio.to_thread(self.model.predict_batch, inputs)

    async def __call__(self, request: Request) -> Any:
        if request.method == "GET":
            return "ok"
        body = await request.json()
        return {"output": await self.predict(body["input"])}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    ray.init(
        address="local",
        num_cpus=1,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        _temp_dir=f"{_tmp}/ray",
    )
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    serve.run(Mock.bind(), name="mock", route_prefix="/predict")
    threading.Event().wait()


if __name__ == "__main__":
    main()
