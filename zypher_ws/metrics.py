"""Prometheus metrics (`GET /metrics`): one registry per app, so several apps in one process (tests) never
share counters. Every process counts what it does itself: an API process its requests and sockets,
a process with workers its batches and outcomes (`zypher-ws worker --metrics-port` serves those)."""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from .records import DEAD_LETTERED, DELIVERED, PENDING, Prediction

if TYPE_CHECKING:
    from .webhooks.schedule import Settlement

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
# From an event to its delivery: milliseconds when the receiver is up, hours through the retry schedule.
WEBHOOK_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800, 7200, 36000, 86400)


class LoopHistogram(Collector):
    """A histogram observed only from the event loop, so without prometheus-client's lock per bucket.

    Four observations go with every sync prediction; this is a bisect and two additions each.
    """

    def __init__(
        self, name: str, documentation: str, labelnames: Sequence[str] = (), *, buckets: Sequence[float],
        registry: CollectorRegistry,
    ) -> None:  # fmt: skip
        self._name, self._documentation, self._labelnames = name, documentation, list(labelnames)
        self._bounds = [float(b) for b in buckets]
        self._series: dict[tuple[str, ...], _Series] = {}
        if not labelnames:
            self._unlabelled = self.labels()
        registry.register(self)

    def labels(self, *values: str) -> _Series:
        series = self._series.get(values)
        if series is None:
            series = self._series[values] = _Series(self._bounds)
        return series

    def observe(self, value: float) -> None:
        self._unlabelled.observe(value)

    def collect(self) -> Iterator[HistogramMetricFamily]:
        family = HistogramMetricFamily(self._name, self._documentation, labels=self._labelnames)
        les = [repr(b) for b in self._bounds] + ["+Inf"]  # 1.0, 0.0005: as prometheus-client writes them
        for values, series in list(self._series.items()):  # a worker's scrape runs on another thread
            cumulative, buckets = 0, []
            for le, count in zip(les, series.counts, strict=True):
                cumulative += count
                buckets.append((le, cumulative))
            family.add_metric(list(values), buckets, series.total)
        yield family


class _Series:
    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: list[float]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last is +Inf
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # buckets count values <= their bound
        self.total += value


class LoopCounter(Collector):
    """A counter incremented only from the event loop, so without prometheus-client's lock per increment
    (two go with every sync prediction). Exposed as prometheus-client exposes a Counter: `_total` and
    `_created` per series."""

    def __init__(
        self, name: str, documentation: str, labelnames: Sequence[str], *, registry: CollectorRegistry
    ) -> None:
        self._name, self._documentation, self._labelnames = name, documentation, list(labelnames)
        self._series: dict[tuple[str, ...], _Count] = {}
        registry.register(self)

    def labels(self, *values: str) -> _Count:
        series = self._series.get(values)
        if series is None:
            series = self._series[values] = _Count()
        return series

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(self._name, self._documentation, labels=self._labelnames)
        for values, series in list(self._series.items()):  # a worker's scrape runs on another thread
            family.add_metric(list(values), series.value, created=series.created)
        yield family


class _Count:
    __slots__ = ("created", "value")

    def __init__(self) -> None:
        self.value = 0.0
        self.created = time.time()

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.http_requests = LoopCounter(
            "zypher_http_requests", "HTTP requests by route and status", ["method", "route", "status"], registry=r
        )
        self.http_duration = LoopHistogram(
            "zypher_http_request_duration_seconds", "HTTP request handling time", ["route"],
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        # Per model version: `model` and `version` labels, so one slow or failing model shows as itself.
        m = ["model", "version"]
        self.predictions = LoopCounter("zypher_predictions", "Predictions by final status", [*m, "status"], registry=r)
        self.queue_depth = Gauge("zypher_queue_depth", "Predictions waiting in the queue", m, registry=r)
        self.in_flight = Gauge("zypher_predictions_in_flight", "Predictions being run by the model here", m, registry=r)
        self.queue_wait = LoopHistogram(
            "zypher_queue_wait_seconds", "From accepted to started", m, buckets=LATENCY_BUCKETS, registry=r
        )
        self.model_time = LoopHistogram(
            "zypher_model_seconds", "From started to finished (the model call)", m, buckets=LATENCY_BUCKETS,
            registry=r,
        )  # fmt: skip
        self.end_to_end = LoopHistogram(
            "zypher_end_to_end_seconds", "From accepted to finished", m, buckets=LATENCY_BUCKETS, registry=r
        )
        self.batch_size = LoopHistogram(
            "zypher_batch_size", "Predictions per model call", m, buckets=BATCH_BUCKETS, registry=r
        )
        self.websockets = Gauge("zypher_websocket_connections", "Open WebSocket connections", registry=r)
        self.sse = Gauge("zypher_sse_connections", "Open Server-Sent Events streams", registry=r)
        self.slow_clients = Counter(
            "zypher_slow_clients_dropped", "WebSockets closed for falling behind their outbox", registry=r
        )
        self.webhook_attempts = Counter(
            "zypher_webhook_attempts",
            "Webhook attempts by event and result: 2xx, 3xx, 4xx, 5xx, timeout, connection_error, address_not_allowed",
            ["event", "result"], registry=r,
        )  # fmt: skip
        self.webhook_deliveries = Counter(
            "zypher_webhook_deliveries", "Webhook events by how they ended: delivered, gone (410) or dead_lettered",
            ["event", "outcome"], registry=r,
        )  # fmt: skip
        self.webhook_dead_letters = Counter(
            "zypher_webhook_dead_letters", "Webhook events given up after their last attempt, or refused their address",
            ["event"], registry=r,
        )  # fmt: skip
        self.webhook_latency = LoopHistogram(
            "zypher_webhook_delivery_seconds", "From a webhook event to its delivery, retries included", ["event"],
            buckets=WEBHOOK_BUCKETS, registry=r,
        )  # fmt: skip
        self.webhook_in_flight = Gauge("zypher_webhook_in_flight", "Webhook attempts under way here", registry=r)
        # Labelled children by label values: `.labels()` takes a lock and checks its arguments every call.
        self._children: dict[tuple[Any, ...], Any] = {}
        self._last_finished: dict[tuple[str, str], float] = {}

    def _child(self, metric: Any, *values: str) -> Any:
        key = (metric, *values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*values)
        return child

    # -- what the HTTP layer reports ---------------------------------------------------------------------

    def request_done(self, method: str, route: str, status: int, seconds: float) -> None:
        self.http_requests.labels(method, route, str(status)).inc()  # dict lookups, no lock
        self.http_duration.labels(route).observe(seconds)

    # -- what workers report ---------------------------------------------------------------------------

    def batch_started(self, started: Sequence[Prediction]) -> None:
        model = _model_of(started[0])  # a batch is of one model version: it came off that version's queue
        self.batch_size.labels(*model).observe(len(started))
        self._child(self.in_flight, *model).inc(len(started))
        waits = self.queue_wait.labels(*model)
        for p in started:
            if p.started_at is not None:
                waits.observe(max(0.0, p.started_at - p.created_at))

    def batch_finished(self, started: Sequence[Prediction], finished: Sequence[Prediction]) -> None:
        self._child(self.in_flight, *_model_of(started[0])).dec(len(started))
        self.finished(finished)

    def finished(self, predictions: Sequence[Prediction]) -> None:
        model: tuple[str, str] | None = None
        for p in predictions:
            if not p.status.terminal or p.completed_at is None:
                continue
            if model != (p.model_name, p.model_version):  # a batch is of one model version: looked up once
                model = (p.model_name, p.model_version)
                end_to_end, model_time = self.end_to_end.labels(*model), self.model_time.labels(*model)
            self._last_finished[model] = p.completed_at
            self.predictions.labels(*model, p.status.text).inc()
            end_to_end.observe(max(0.0, p.completed_at - p.created_at))
            if p.started_at is not None:
                model_time.observe(max(0.0, p.completed_at - p.started_at))

    def figures(self, model: str, version: str) -> dict[str, Any]:
        """One model version's totals in this process: predictions by status, and (count, seconds) of
        queue waits, model time and end-to-end time, model calls, and when the last one finished."""

        def count(status: str) -> int:
            return int(self.predictions.labels(model, version, status).value)

        def total(histogram: LoopHistogram) -> tuple[int, float]:
            series = histogram.labels(model, version)
            return sum(series.counts), series.total

        return {
            "succeeded": count("succeeded"),
            "failed": count("failed"),
            "queue": total(self.queue_wait),
            "model": total(self.model_time),
            "end_to_end": total(self.end_to_end),
            "calls": total(self.batch_size)[0],
            "last_finished": self._last_finished.get((model, version)),
        }

    def set_queue_depth(self, model: str, version: str, depth: int) -> None:
        self._child(self.queue_depth, model, version).set(depth)

    # -- what the webhook loop reports ------------------------------------------------------------------

    def webhook_attempted(self, settlement: Settlement) -> None:
        event, outcome = settlement.delivery.event, settlement.outcome
        self._child(self.webhook_attempts, event, settlement.attempt.result).inc()
        if outcome != PENDING:
            self._child(self.webhook_deliveries, event, outcome).inc()
        if outcome == DEAD_LETTERED:
            self._child(self.webhook_dead_letters, event).inc()
        elif outcome == DELIVERED:
            self.webhook_latency.labels(event).observe(max(0.0, settlement.at - settlement.delivery.event_at))

    def exposition(self) -> bytes:
        """The Prometheus text format (content type `prometheus_client.exposition.CONTENT_TYPE_LATEST`)."""
        return generate_latest(self.registry)


def _model_of(prediction: Prediction) -> tuple[str, str]:
    return prediction.model_name, prediction.model_version
