"""Domain errors: the one table of error codes. Each class carries its HTTP status and a stable `code`
once; the HTTP and WebSocket envelopes are built from the class (http/errors.py), and records that end
failed carry `to_dict()`. Nothing else spells a code."""

from __future__ import annotations

import math
from typing import ClassVar


class ZypherError(Exception):
    status: ClassVar[int] = 500
    code: ClassVar[str] = "internal_error"
    headers: dict[str, str]

    def __init__(self, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}

    def to_dict(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


class InternalError(ZypherError):
    """Our bug: logged with its traceback, answered without it."""

    def __init__(self, message: str = "internal server error") -> None:
        super().__init__(message)


class RetryLater(ZypherError):
    """Refused for now, not for good: the answer carries `Retry-After` (seconds, at least 1).

    The parent of the 503s and of rate_limited, each raised with its own code. It has a code of its own
    too: inheriting the root's `internal_error` made that code look up this class (a 503 with
    `Retry-After`) where a record carries it, say an infer of a failed prediction."""

    status = 503
    code = "unavailable"
    default_message: ClassVar[str] = "unavailable; retry later"

    def __init__(self, message: str | None = None, *, retry_after: float = 1) -> None:
        super().__init__(message or self.default_message, headers={"Retry-After": str(max(1, math.ceil(retry_after)))})


# -- the request itself is wrong (4xx) ---------------------------------------------------------------


class BadRequest(ZypherError):
    status = 400
    code = "bad_request"


class InvalidJSON(BadRequest):
    code = "invalid_json"


class InvalidInput(BadRequest):
    code = "invalid_input"


class InvalidHeader(BadRequest):
    code = "invalid_header"


class InvalidWebhook(BadRequest):
    """A `webhook` URL or `webhook_events_filter` the service will not send to; nothing is stored."""

    code = "invalid_webhook"


class InvalidInferenceRequest(BadRequest):
    """An Open Inference Protocol request that is malformed or does not fit the model's tensors."""

    code = "invalid_inference_request"


class InvalidMessage(BadRequest):
    """A WebSocket message that is JSON but not a valid request."""

    code = "invalid_message"


class UnknownOp(InvalidMessage):
    code = "unknown_op"


class Unauthorized(ZypherError):
    status = 401
    code = "unauthorized"

    def __init__(self, message: str = "send Authorization: Bearer <token>") -> None:
        super().__init__(message, headers={"WWW-Authenticate": "Bearer"})


class Forbidden(ZypherError):
    status = 403
    code = "forbidden"


class NotFound(ZypherError):
    status = 404
    code = "not_found"


class ModelNotFound(NotFound):
    """No such model or version here; also the error of a recovered prediction whose model is gone."""

    code = "model_not_found"


class MethodNotAllowed(ZypherError):
    status = 405
    code = "method_not_allowed"


class AlreadyFinished(ZypherError):
    status = 409
    code = "already_finished"


class IdempotencyConflict(ZypherError):
    status = 409
    code = "idempotency_conflict"


class RequestTimeout(ZypherError):
    status = 408
    code = "request_timeout"


class ClientClosedRequest(ZypherError):
    """The client went away before its request was read: nginx's 499, for the access log only."""

    status = 499
    code = "client_closed_request"


class BodyTooLarge(ZypherError):
    status = 413
    code = "body_too_large"


class UnsupportedMediaType(ZypherError):
    status = 415
    code = "unsupported_media_type"


class TooManySubscriptions(ZypherError):
    status = 429
    code = "too_many_subscriptions"


class TooManySockets(ZypherError):
    status = 429
    code = "too_many_sockets"


class InputTooLarge(ZypherError):
    """An input too large to check against the model's schema within the time a request may take."""

    status = 413
    code = "input_too_large"


class RateLimited(RetryLater):
    status = 429
    code = "rate_limited"


# -- the service cannot take it now (503, with Retry-After) --------------------------------------------


class QueueFull(RetryLater):
    code = "queue_full"
    default_message = "the prediction queue is full; retry later"


class NotReady(RetryLater):
    code = "not_ready"
    default_message = "the model is not loaded yet"


class ModelUnavailable(RetryLater):
    """No process has served this model version for longer than --unserved-grace (redis): a prediction
    is refused, and one queued for it meanwhile ends failed with this code (docs/scaling.md)."""

    code = "model_unavailable"
    default_message = "no worker serves this model; retry later"


class StorageFull(RetryLater):
    """The store's disk is full: nothing new is accepted until writes succeed again (they are retried)."""

    code = "storage_full"
    default_message = "the store cannot write (no space left); retry later"


class BackendUnavailable(RetryLater):
    """The shared backend (Redis) did not answer. Retry; an Idempotency-Key makes a retried POST safe."""

    code = "backend_unavailable"
    default_message = "the backend is unavailable; retry later"


# -- what a failed prediction records ------------------------------------------------------------------


class ModelError(ZypherError):
    """The model raised on this input."""

    status = 500
    code = "model_error"


class DeadlineExceeded(ZypherError):
    """It waited in the queue past its timeout (parameters.timeout or the model's default_timeout_us):
    it was not run."""

    status = 504
    code = "deadline_exceeded"


class StreamLimitExceeded(ZypherError):
    """A streaming prediction yielded more chunks or bytes than --max-stream-chunks or --max-stream-bytes:
    it was stopped there, and its record keeps the chunks before the limit."""

    status = 500
    code = "stream_limit_exceeded"


class StreamNotSupported(BadRequest):
    """`stream: true` asked of a model that has no predict_stream."""

    code = "stream_not_supported"


class WorkerLost(ZypherError):
    """The process running it stopped --max-attempts times: it is not started again."""

    status = 500
    code = "worker_lost"


class HttpError(ZypherError):
    """Any other 4xx aiohttp answers by itself; the envelope carries aiohttp's status."""

    status = 400
    code = "http_error"


def error_class_for_status(status: int) -> type[ZypherError]:
    """The error a bare HTTP status maps to (aiohttp's own 404, 405, 413...), for one envelope everywhere."""
    return _BY_STATUS.get(status, HttpError)


# The generic class of each bare status: the one whose code names the status itself.
_BY_STATUS: dict[int, type[ZypherError]] = {
    cls.status: cls for cls in (BadRequest, Forbidden, NotFound, MethodNotAllowed, BodyTooLarge, UnsupportedMediaType)
}


def error_class_for_code(code: str) -> type[ZypherError]:
    """The class of a stable code (as a failed record carries it); ZypherError (500) for one unknown."""
    return _by_code(ZypherError).get(code, ZypherError)


def _by_code(root: type[ZypherError]) -> dict[str, type[ZypherError]]:
    found = {root.code: root}
    for sub in root.__subclasses__():
        found.update(_by_code(sub))
    return found
