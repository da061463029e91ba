"""Prometheus metrics (`GET /metrics`): one registry per app, so several apps in one process (tests) never
share counters. Every process counts what it does itself: an API process its requests and sockets,
a process with workers its batches and outcomes (`zypher-ws worker --metrics-port` serves those)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from .records import Prediction

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.http_requests = Counter(
            "zypher_http_requests", "HTTP requests by route and status", ["method", "route", "status"], registry=r
        )
        self.http_duration = Histogram(
            "zypher_http_request_duration_seconds", "HTTP request handling time", ["route"],
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.predictions = Counter("zypher_predictions", "Predictions by final status", ["status"], registry=r)
        self.queue_depth = Gauge("zypher_queue_depth", "Predictions waiting in the queue", registry=r)
        self.in_flight = Gauge("zypher_predictions_in_flight", "Predictions being run by the model here", registry=r)
        self.queue_wait = Histogram(
            "zypher_queue_wait_seconds", "From accepted to started", buckets=LATENCY_BUCKETS, registry=r
        )
        self.model_time = Histogram(
            "zypher_model_seconds", "From started to finished (the model call)", buckets=LATENCY_BUCKETS, registry=r
        )
        self.end_to_end = Histogram(
            "zypher_end_to_end_seconds", "From accepted to finished", buckets=LATENCY_BUCKETS, registry=r
        )
        self.batch_size = Histogram(
            "zypher_batch_size", "Predictions per model call", buckets=BATCH_BUCKETS, registry=r
        )
        self.websockets = Gauge("zypher_websocket_connections", "Open WebSocket connections", registry=r)
        self.sse = Gauge("zypher_sse_connections", "Open Server-Sent Events streams", registry=r)
        self.slow_clients = Counter(
            "zypher_slow_clients_dropped", "WebSockets closed for falling behind their outbox", registry=r
        )
        # Labelled children by label values: `.labels()` takes a lock and checks its arguments every call.
        self._children: dict[tuple[Any, ...], Any] = {}

    def _child(self, metric: Any, *values: str) -> Any:
        key = (metric, *values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*values)
        return child

    # -- what the HTTP layer reports ---------------------------------------------------------------------

    def request_done(self, method: str, route: str, status: int, seconds: float) -> None:
        self._child(self.http_requests, method, route, str(status)).inc()
        self._child(self.http_duration, route).observe(seconds)

    # -- what workers report ---------------------------------------------------------------------------

    def batch_started(self, started: Sequence[Prediction]) -> None:
        self.batch_size.observe(len(started))
        self.in_flight.inc(len(started))
        for p in started:
            if p.started_at is not None:
                self.queue_wait.observe(max(0.0, p.started_at - p.created_at))

    def batch_finished(self, started: int, finished: Sequence[Prediction]) -> None:
        self.in_flight.dec(started)
        self.finished(finished)

    def finished(self, predictions: Sequence[Prediction]) -> None:
        for p in predictions:
            if not p.status.terminal or p.completed_at is None:
                continue
            self._child(self.predictions, p.status.value).inc()
            self.end_to_end.observe(max(0.0, p.completed_at - p.created_at))
            if p.started_at is not None:
                self.model_time.observe(max(0.0, p.completed_at - p.started_at))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


def response(metrics: Metrics) -> web.Response:
    return web.Response(body=metrics.exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST})
