"""One place that turns every failure into `{"error": {"code", "message"}}` with the right status."""

from __future__ import annotations

import logging
import time
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler
from aiohttp_swagger3.swagger_route import RequestValidationFailed

from .access import bearer, is_public, token_valid
from .errors import InvalidInput, InvalidJSON, Unauthorized, UnsupportedMediaType, ZypherError
from .json_codec import json_response, loads
from .typedefs import METRICS, SETTINGS

log = logging.getLogger(__name__)

_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "body_too_large",
    415: "unsupported_media_type",
}


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return json_response({"error": {"code": code, "message": message}}, status=status, headers=headers)


def _flatten(errors: Any, prefix: str = "") -> list[str]:
    """swagger3's nested {"body": {"input": "is required"}} -> ["body.input: is required"]."""
    if isinstance(errors, dict):
        return [m for key, sub in errors.items() for m in _flatten(sub, f"{prefix}.{key}" if prefix else str(key))]
    return [f"{prefix}: {errors}" if prefix else str(errors)]


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        if request.method in ("POST", "PUT", "PATCH") and request.body_exists:
            if request.content_type != "application/json":
                raise UnsupportedMediaType(f"send application/json, not {request.content_type}")
        return await handler(request)
    except ZypherError as exc:
        return error_response(exc.status, exc.code, exc.message, exc.headers)
    except RequestValidationFailed as exc:
        return error_response(400, InvalidInput.code, "; ".join(_flatten(exc.errors)))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        if exc.status == 413:
            message = f"request body is larger than {request.app[SETTINGS].max_body} bytes"
        else:
            message = exc.reason
        headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        return error_response(exc.status, _HTTP_CODES.get(exc.status, "http_error"), message, headers)
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(500, "internal_error", "internal server error")


async def parse_json_body(request: web.Request) -> tuple[Any, bool]:
    """swagger3 media handler for application/json: malformed JSON is our 400 invalid_json."""
    try:
        # UTF-8 whatever the charset says (RFC 8259); undecodable bytes are malformed JSON too.
        return loads(await request.read()), False
    except ValueError as exc:  # UnicodeDecodeError included
        raise InvalidJSON(f"request body is not valid JSON: {exc}") from None


_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


@web.middleware
async def count_requests(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Counts and times every request by its route template (never the raw path: one series per id)."""
    started = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    finally:
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else "unmatched"
        method = request.method if request.method in _METHODS else "other"  # any token parses as a method
        request.app[METRICS].request_done(method, route, status, time.perf_counter() - started)


@web.middleware
async def require_token(request: web.Request, handler: Handler) -> web.StreamResponse:
    """With --api-token set, every route but the public ones needs `Authorization: Bearer <token>`.

    The WebSocket authenticates itself (protocol header or first message): browsers cannot set headers.
    """
    settings = request.app[SETTINGS]
    if settings.api_tokens and request.path != "/ws" and not is_public(request, settings):
        if not token_valid(bearer(request.headers.get("Authorization")), settings.api_tokens):
            raise Unauthorized()
    return await handler(request)
