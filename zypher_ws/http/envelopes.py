"""The shapes every answer takes: JSON bodies, and the error envelope of HTTP and of the WebSocket,
each built by one function from the error's class (errors.py holds every status and code)."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from ..errors import ZypherError
from ..json_codec import dumps


def json_response(data: Any, *, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=dumps(data), status=status, headers=headers, content_type="application/json")


def error_response(error: ZypherError, *, status: int | None = None) -> web.Response:
    """`{"error": {"code", "message"}}` with the error's status (or aiohttp's, for a bare one) and headers."""
    return json_response({"error": error.to_dict()}, status=status or error.status, headers=error.headers or None)


def oip_error_response(error: ZypherError, *, status: int | None = None) -> web.Response:
    """The Open Inference Protocol's error shape, `{"error": "message"}`, for the /v2 routes."""
    return json_response({"error": error.message}, status=status or error.status, headers=error.headers or None)


def ws_error(error: ZypherError, request_id: Any = None, **extra: Any) -> dict[str, Any]:
    """The WebSocket's `error` message: the same `{"code", "message"}`, plus the request it answers."""
    return {"type": "error", "error": error.to_dict(), "request_id": request_id, **extra}
