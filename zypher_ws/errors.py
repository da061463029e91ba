"""Domain errors. Each carries its HTTP status and a stable `code`; one middleware renders them."""

from __future__ import annotations

import math
from typing import Any, ClassVar


class ZypherError(Exception):
    status: ClassVar[int] = 500
    code: ClassVar[str] = "internal_error"
    headers: dict[str, str]

    def __init__(self, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message}


class InvalidJSON(ZypherError):
    status = 400
    code = "invalid_json"


class InvalidInput(ZypherError):
    status = 400
    code = "invalid_input"


class InvalidMessage(ZypherError):
    """A WebSocket message that is JSON but not a valid request."""

    status = 400
    code = "invalid_message"


class UnknownOp(InvalidMessage):
    code = "unknown_op"


class TooManySubscriptions(ZypherError):
    status = 429
    code = "too_many_subscriptions"


class InvalidHeader(ZypherError):
    status = 400
    code = "invalid_header"


class NotFound(ZypherError):
    status = 404
    code = "not_found"


class AlreadyFinished(ZypherError):
    status = 409
    code = "already_finished"


class IdempotencyConflict(ZypherError):
    status = 409
    code = "idempotency_conflict"


class UnsupportedMediaType(ZypherError):
    status = 415
    code = "unsupported_media_type"


class QueueFull(ZypherError):
    status = 503
    code = "queue_full"

    def __init__(self, message: str = "the prediction queue is full; retry later", *, retry_after: int = 1) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after)})


class NotReady(ZypherError):
    status = 503
    code = "not_ready"

    def __init__(self, message: str = "the model is not loaded yet", *, retry_after: int = 1) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after)})


class BackendUnavailable(ZypherError):
    """The shared backend (Redis) did not answer. Retry; an Idempotency-Key makes a retried POST safe."""

    status = 503
    code = "backend_unavailable"

    def __init__(self, message: str = "the backend is unavailable; retry later", *, retry_after: int = 1) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after)})


class ModelError(ZypherError):
    """What a prediction records when the model raised on its input."""

    status = 500
    code = "model_error"


class Unauthorized(ZypherError):
    status = 401
    code = "unauthorized"

    def __init__(self, message: str = "send Authorization: Bearer <token>") -> None:
        super().__init__(message, headers={"WWW-Authenticate": "Bearer"})


class Forbidden(ZypherError):
    status = 403
    code = "forbidden"


class RateLimited(ZypherError):
    status = 429
    code = "rate_limited"

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(message, headers={"Retry-After": str(max(1, math.ceil(retry_after)))})


class TooManySockets(ZypherError):
    status = 429
    code = "too_many_sockets"


class InputTooLarge(ZypherError):
    """An input too large to check against the model's schema within the time a request may take."""

    status = 413
    code = "input_too_large"
