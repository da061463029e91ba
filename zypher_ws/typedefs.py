"""Every application key in one place (typed, and free of import cycles)."""

from __future__ import annotations

from aiohttp import web

from .models import Model
from .service import PredictionService
from .settings import Settings

SETTINGS = web.AppKey("settings", Settings)
MODEL = web.AppKey("model", Model)
SERVICE = web.AppKey("service", PredictionService)
SOCKETS: web.AppKey[set[web.WebSocketResponse]] = web.AppKey("sockets")
