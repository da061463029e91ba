"""Every application key in one place (typed, and free of import cycles)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from ..catalog import CatalogFollower
from ..metrics import Metrics
from ..models import Model, ModelSpec
from ..repository import ModelRepository
from ..service import PredictionService
from ..settings import Settings
from ..webhooks.delivery import Dispatcher
from .access import RateLimiter, SocketCounter

SETTINGS = web.AppKey("settings", Settings)
MODELS: web.AppKey[list[tuple[ModelSpec, Model]]] = web.AppKey("models")
"""The model versions to serve, built (not loaded), each with its spec."""
OPENAPI: web.AppKey[dict[str, Any]] = web.AppKey("openapi")
"""The OpenAPI document swagger3 serves: each model's routes and schemas are added as it loads."""
SERVICE = web.AppKey("service", PredictionService)
REPOSITORY = web.AppKey("repository", ModelRepository)
"""Loading and unloading models at runtime (the OIP repository extension); set while the service runs."""
SOCKETS: web.AppKey[set[web.WebSocketResponse]] = web.AppKey("sockets")
STREAMS: web.AppKey[set[Callable[[], None]]] = web.AppKey("streams")
"""One callback per open event stream: calling it ends the stream with a `shutdown` event."""
METRICS = web.AppKey("metrics", Metrics)
LIMITER = web.AppKey("limiter", RateLimiter)
LIVE_CLIENTS = web.AppKey("live_clients", SocketCounter)
"""Authenticated WebSockets and event streams per client address (--ws-max-per-client)."""
WS_AUTHENTICATING = web.AppKey("ws_authenticating", SocketCounter)
"""WebSockets per client address still to send their auth message (--ws-max-authenticating)."""
DRAIN: web.AppKey[Callable[[], Awaitable[None]]] = web.AppKey("drain")
"""Stops the workers, letting running batches finish (set while the service runs)."""
WEBHOOKS = web.AppKey("webhooks", Dispatcher)
"""The webhook delivery loop, while the service runs with --webhook-secret (tests move its clock)."""
CATALOG = web.AppKey("catalog", CatalogFollower)
"""What this process follows of the models that worker processes publish (a shared backend; tests call
its `refresh`)."""
