"""The one middleware (every request counted, its token checked, every failure turned into
`{"error": {"code", "message"}}` with the right status), and reading request bodies."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler
from aiohttp_swagger3.swagger_route import RequestValidationFailed

from ..errors import (
    BodyTooLarge,
    ClientClosedRequest,
    InternalError,
    InvalidInput,
    InvalidJSON,
    RequestTimeout,
    Unauthorized,
    UnsupportedMediaType,
    ZypherError,
    error_class_for_status,
)
from ..json_codec import loads
from .access import bearer, is_public, token_valid
from .envelopes import error_response, oip_error_response
from .keys import METRICS, SETTINGS

log = logging.getLogger(__name__)

OIP_PREFIX = "/v2"


def _flatten(errors: Any, prefix: str = "") -> list[str]:
    """swagger3's nested {"body": {"input": "is required"}} -> ["body.input: is required"]."""
    if isinstance(errors, dict):
        return [m for key, sub in errors.items() for m in _flatten(sub, f"{prefix}.{key}" if prefix else str(key))]
    return [f"{prefix}: {errors}" if prefix else str(errors)]


_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_WITH_BODY = ("POST", "PUT", "PATCH")


@web.middleware
async def front(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every request, in one layer: counted and timed by its route template (never the raw path: one
    series per id), its bearer token checked (with --api-token), and every failure answered as JSON.

    One middleware, not one per job: each layer is a coroutine, a partial and an await per request, and
    three of them cost more than what they check on the common path.
    """
    started = time.perf_counter()
    status = 500
    path = request.path
    # The Open Inference Protocol's routes answer errors in its own shape, and take binary bodies.
    oip = path == OIP_PREFIX or path.startswith(OIP_PREFIX + "/")
    try:
        try:
            if request.method in _WITH_BODY and not oip and request.body_exists:
                if request.content_type != "application/json":
                    raise UnsupportedMediaType(f"send application/json, not {request.content_type}")
            settings = request.app[SETTINGS]
            # The WebSocket authenticates itself (protocol header or first message): browsers cannot set headers.
            if settings.api_tokens and path != "/ws" and not is_public(request, settings):
                if not token_valid(bearer(request.headers.get("Authorization")), settings.api_tokens):
                    raise Unauthorized()
            response = await handler(request)
        except ZypherError as exc:
            response = _envelope(oip, exc)
            if isinstance(exc, RequestTimeout):
                response.force_close()  # the rest of a trickled body is not worth waiting for
        except RequestValidationFailed as exc:
            response = _envelope(oip, InvalidInput("; ".join(_flatten(exc.errors))))
        except web.HTTPException as exc:
            if exc.status < 400:
                status = exc.status
                raise
            response = _envelope(oip, _from_http(exc, request), status=exc.status)
        except ConnectionResetError:
            # Not our failure, and nobody reads the answer: one line, no traceback, no 500.
            log.info("client %s went away during %s %s", request.remote, request.method, path)
            response = _envelope(oip, ClientClosedRequest("the client closed the connection"))
        except Exception:
            log.exception("unhandled error on %s %s", request.method, path)
            response = _envelope(oip, InternalError())
        status = response.status
        return response
    finally:
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else "unmatched"
        method = request.method if request.method in _METHODS else "other"  # any token parses as a method
        request.app[METRICS].request_done(method, route, status, time.perf_counter() - started)


def _envelope(oip: bool, error: ZypherError, *, status: int | None = None) -> web.Response:
    return oip_error_response(error, status=status) if oip else error_response(error, status=status)


def _from_http(exc: web.HTTPException, request: web.Request) -> ZypherError:
    """aiohttp's own refusals (no route, wrong method, body too large) in our envelope."""
    cls = error_class_for_status(exc.status)
    if cls is BodyTooLarge:
        return BodyTooLarge(f"request body is larger than {request.app[SETTINGS].max_body} bytes")
    headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
    return cls(exc.reason, headers=headers)


async def read_body(request: web.Request) -> bytes:
    """The whole body, within --read-timeout (RequestTimeout) and --max-body (aiohttp's 413)."""
    if request.content.is_eof():
        return await request.read()  # all here already (the usual small body): no timer to pay for
    timeout = request.app[SETTINGS].read_timeout
    try:
        # A client trickling its body must not hold a connection (and its buffer) for ever.
        return await asyncio.wait_for(request.read(), timeout or None)
    except asyncio.TimeoutError:
        raise RequestTimeout(f"the request body did not arrive within {timeout:g} s") from None


async def parse_json_body(request: web.Request) -> tuple[Any, bool]:
    """swagger3 media handler for application/json: malformed JSON is our 400 invalid_json."""
    body = await read_body(request)
    try:
        # UTF-8 whatever the charset says (RFC 8259); undecodable bytes are malformed JSON too.
        return loads(body), False
    except ValueError as exc:  # UnicodeDecodeError included
        raise InvalidJSON(f"request body is not valid JSON: {exc}") from None


async def predict_envelope(request: web.Request) -> dict[str, Any]:
    """The body of a predict route: a JSON object with `input` (openapi.PREDICT_REQUEST_ENVELOPE), refused
    with the 400 invalid_input aiohttp-swagger3 gives when it validates a route, in its words."""
    if not request.body_exists:
        raise InvalidInput("body: is required")
    body, _ = await parse_json_body(request)
    if not isinstance(body, dict):
        raise InvalidInput("body: value should be type of dict")
    if "input" not in body:
        raise InvalidInput("body.input: required property")
    return body
