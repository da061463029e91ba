"""What the client raises. A server's error answer is an `ApiError` of the class its `code` names; the
classes mirror the server's table (zypher_ws/errors.py), take each code from it, and a test checks that
every code there has its class here, under the same parent."""

from __future__ import annotations

from typing import Any, ClassVar

from .. import errors as table


class ZypherClientError(Exception):
    """Anything the client raises on purpose."""


class ConnectionFailed(ZypherClientError, ConnectionError):
    """The server could not be reached (or kept dropping the connection) for as long as retries may take."""


class Timeout(ZypherClientError, TimeoutError):
    """A request got no answer within the client's `timeout`, or `wait(timeout=...)` ran out before the
    prediction finished (it carries on on the server)."""


class ProtocolError(ZypherClientError):
    """The server answered something this client cannot read (not JSON, or no record where one was due)."""


class ApiError(ZypherClientError):
    """The server refused: its error `code` and `message`, the HTTP `status` (0 over the WebSocket) and,
    for a refusal that is only for now, `retry_after` seconds."""

    code: ClassVar[str] = table.ZypherError.code

    def __init__(
        self,
        message: str,
        *,
        status: int = 0,
        code: str | None = None,
        retry_after: float | None = None,
        prediction_id: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.retry_after = retry_after
        self.prediction_id = prediction_id
        if code is not None and code != type(self).code:
            self.code = code  # type: ignore[misc]  # a code this client has no class for (a newer server)

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class InternalError(ApiError):
    code = table.InternalError.code


class RetryLater(ApiError):
    """Refused for now: retried by the client until its retry time runs out. The parent of the 503s and
    of RateLimited, and the class of a 503 whose code this client does not know."""

    code = table.RetryLater.code


class BadRequest(ApiError):
    code = table.BadRequest.code


class InvalidJSON(BadRequest):
    code = table.InvalidJSON.code


class InvalidInput(BadRequest):
    code = table.InvalidInput.code


class InvalidHeader(BadRequest):
    code = table.InvalidHeader.code


class StreamNotSupported(BadRequest):
    code = table.StreamNotSupported.code


class InvalidWebhook(BadRequest):
    code = table.InvalidWebhook.code


class InvalidInferenceRequest(BadRequest):
    code = table.InvalidInferenceRequest.code


class InvalidMessage(BadRequest):
    code = table.InvalidMessage.code


class UnknownOp(InvalidMessage):
    code = table.UnknownOp.code


class Unauthorized(ApiError):
    code = table.Unauthorized.code


class Forbidden(ApiError):
    code = table.Forbidden.code


class NotFound(ApiError):
    code = table.NotFound.code


class ModelNotFound(NotFound):
    code = table.ModelNotFound.code


class MethodNotAllowed(ApiError):
    code = table.MethodNotAllowed.code


class AlreadyFinished(ApiError):
    code = table.AlreadyFinished.code


class IdempotencyConflict(ApiError):
    code = table.IdempotencyConflict.code


class RequestTimeout(ApiError):
    code = table.RequestTimeout.code


class ClientClosedRequest(ApiError):
    code = table.ClientClosedRequest.code


class BodyTooLarge(ApiError):
    code = table.BodyTooLarge.code


class UnsupportedMediaType(ApiError):
    code = table.UnsupportedMediaType.code


class TooManySubscriptions(ApiError):
    code = table.TooManySubscriptions.code


class TooManySockets(ApiError):
    code = table.TooManySockets.code


class InputTooLarge(ApiError):
    code = table.InputTooLarge.code


class RateLimited(RetryLater):
    code = table.RateLimited.code


class QueueFull(RetryLater):
    code = table.QueueFull.code


class NotReady(RetryLater):
    code = table.NotReady.code


class ModelUnavailable(RetryLater):
    code = table.ModelUnavailable.code


class StorageFull(RetryLater):
    code = table.StorageFull.code


class BackendUnavailable(RetryLater):
    code = table.BackendUnavailable.code


class ModelError(ApiError):
    code = table.ModelError.code


class DeadlineExceeded(ApiError):
    code = table.DeadlineExceeded.code


class StreamLimitExceeded(ApiError):
    code = table.StreamLimitExceeded.code


class WorkerLost(ApiError):
    code = table.WorkerLost.code


class HttpError(ApiError):
    code = table.HttpError.code


def _concrete(cls: type[ApiError]) -> list[type[ApiError]]:
    found = []
    for sub in cls.__subclasses__():
        found += [sub, *_concrete(sub)]
    return found


BY_CODE: dict[str, type[ApiError]] = {cls.code: cls for cls in _concrete(ApiError) if "code" in vars(cls)}
"""Each code's class."""

# HTTP statuses whose bare answers (no JSON envelope: a proxy's, say) still say what went wrong.
_BY_STATUS: dict[int, type[ApiError]] = {
    400: BadRequest,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    405: MethodNotAllowed,
    408: RequestTimeout,
    413: BodyTooLarge,
    415: UnsupportedMediaType,
    429: RateLimited,
    503: RetryLater,
}


def api_error(
    code: str | None,
    message: str,
    *,
    status: int = 0,
    retry_after: float | None = None,
    prediction_id: str | None = None,
) -> ApiError:
    """The exception for an error answer: by its code, else by its HTTP status."""
    cls = BY_CODE.get(code) if code else None
    if cls is None:
        cls = _BY_STATUS.get(status, InternalError if status >= 500 else ApiError)
    return cls(message, status=status, code=code, retry_after=retry_after, prediction_id=prediction_id)


def error_from_envelope(body: Any, status: int, retry_after: float | None = None) -> ApiError:
    """`{"error": {"code", "message"}}` (or anything else a server or proxy answered) as an ApiError."""
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        code, message = error.get("code"), error.get("message")
        return api_error(
            code if isinstance(code, str) else None,
            message if isinstance(message, str) else f"HTTP {status}",
            status=status,
            retry_after=retry_after,
        )
    return api_error(None, f"HTTP {status}", status=status, retry_after=retry_after)
