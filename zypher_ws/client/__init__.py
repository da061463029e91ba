"""A Python client of zypher-ws: `Client` (blocking) and `AsyncClient` (asyncio), with the same methods.

    from zypher_ws.client import Client

    with Client("http://127.0.0.1:8080") as client:
        prediction = client.submit([0, 0, 2, 14, ...])
        print(client.wait(prediction.prediction_id).result)

Importing it loads neither numpy nor any model runtime, nor the server's modules. docs/client.md has an
example of each method.
"""

from ..records import Status
from .aio import AsyncClient
from .errors import (
    AlreadyFinished,
    ApiError,
    BackendUnavailable,
    BadRequest,
    BodyTooLarge,
    ConnectionFailed,
    DeadlineExceeded,
    Forbidden,
    IdempotencyConflict,
    InputTooLarge,
    InternalError,
    InvalidHeader,
    InvalidInferenceRequest,
    InvalidInput,
    InvalidJSON,
    InvalidWebhook,
    MethodNotAllowed,
    ModelError,
    ModelNotFound,
    ModelUnavailable,
    NotFound,
    NotReady,
    ProtocolError,
    QueueFull,
    RateLimited,
    RetryLater,
    StorageFull,
    StreamLimitExceeded,
    StreamNotSupported,
    Timeout,
    TooManySockets,
    TooManySubscriptions,
    Unauthorized,
    UnsupportedMediaType,
    WorkerLost,
    ZypherClientError,
)
from .records import (
    WEBHOOK_DEAD_LETTERED,
    WEBHOOK_DELIVERED,
    WEBHOOK_EVENTS,
    WEBHOOK_GONE,
    WEBHOOK_PENDING,
    ErrorDetail,
    ModelRef,
    Prediction,
    WebhookState,
)
from .retry import RetryPolicy
from .sync import Client

__all__ = [
    "WEBHOOK_DEAD_LETTERED",
    "WEBHOOK_DELIVERED",
    "WEBHOOK_EVENTS",
    "WEBHOOK_GONE",
    "WEBHOOK_PENDING",
    "AlreadyFinished",
    "ApiError",
    "AsyncClient",
    "BackendUnavailable",
    "BadRequest",
    "BodyTooLarge",
    "Client",
    "ConnectionFailed",
    "DeadlineExceeded",
    "ErrorDetail",
    "Forbidden",
    "IdempotencyConflict",
    "InputTooLarge",
    "InternalError",
    "InvalidHeader",
    "InvalidInferenceRequest",
    "InvalidInput",
    "InvalidJSON",
    "InvalidWebhook",
    "MethodNotAllowed",
    "ModelError",
    "ModelNotFound",
    "ModelRef",
    "ModelUnavailable",
    "NotFound",
    "NotReady",
    "Prediction",
    "ProtocolError",
    "QueueFull",
    "RateLimited",
    "RetryLater",
    "RetryPolicy",
    "Status",
    "StorageFull",
    "StreamLimitExceeded",
    "StreamNotSupported",
    "Timeout",
    "TooManySockets",
    "TooManySubscriptions",
    "Unauthorized",
    "UnsupportedMediaType",
    "WebhookState",
    "WorkerLost",
    "ZypherClientError",
]
