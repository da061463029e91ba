"""The prediction record as the client sees it: typed, and read tolerantly (fields it does not know are
ignored, so a newer server works; they stay in `raw`)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from ..records import DEAD_LETTERED, DELIVERED, GONE, PENDING, WEBHOOK_EVENTS, Status
from .errors import ProtocolError

__all__ = [
    "WEBHOOK_DEAD_LETTERED",
    "WEBHOOK_DELIVERED",
    "WEBHOOK_EVENTS",
    "WEBHOOK_GONE",
    "WEBHOOK_PENDING",
    "Chunk",
    "ErrorDetail",
    "ModelRef",
    "Prediction",
    "Progress",
    "Status",
    "WebhookState",
]

# The values of WebhookState.state (plain strings, as the server sends them; docs/webhooks.md).
WEBHOOK_PENDING = PENDING  # an attempt is due at next_attempt_at
WEBHOOK_DELIVERED = DELIVERED  # a 2xx answered it
WEBHOOK_GONE = GONE  # the receiver answered 410: no more attempts for this event
WEBHOOK_DEAD_LETTERED = DEAD_LETTERED  # the last attempt failed, or the address was refused: given up


@dataclass(frozen=True, slots=True)
class ModelRef:
    name: str
    version: str | None = None


@dataclass(frozen=True, slots=True)
class ErrorDetail:
    """Why a prediction failed: `model_error` when the model raised on its input, for example."""

    code: str
    message: str


@dataclass(frozen=True, slots=True)
class Chunk:
    """One output chunk of a streaming prediction: `index` counts from 0, in the order the model yielded."""

    prediction_id: str
    index: int
    value: Any


@dataclass(frozen=True, slots=True)
class Progress:
    """A streaming model's report of how far it is: `fraction` from 0 to 1, and an optional message."""

    prediction_id: str
    fraction: float
    message: str | None = None

    @classmethod
    def from_dict(cls, prediction_id: str, value: Any) -> Progress | None:
        if not isinstance(value, dict):
            return None
        fraction, message = value.get("fraction"), value.get("message")
        if not isinstance(fraction, (int, float)) or isinstance(fraction, bool):
            return None
        return cls(prediction_id, float(fraction), message if isinstance(message, str) else None)


@dataclass(frozen=True, slots=True)
class WebhookState:
    """Where a prediction's webhook goes and how the delivery of its latest event stands (docs/webhooks.md)."""

    url: str
    """The URL without its query string and fragment (the server never shows those)."""
    events: tuple[str, ...]
    """The filter: `start`, `output`, `completed`."""
    event: str | None = None
    """`"start"`, `"output"` or `"completed"` (of WEBHOOK_EVENTS): the latest event sent or being sent; None
    until the first."""
    state: str | None = None
    """A WEBHOOK_* string: `"pending"`, `"delivered"`, `"gone"` (the receiver answered 410) or
    `"dead_lettered"`; None until the first event."""
    attempts: int = 0
    last_status: int | None = None
    """The HTTP status of the last attempt; None without an answer."""
    last_error: str | None = None
    """Why the last attempt had no answer: `timeout`, `connection_error`, `address_not_allowed`."""
    next_attempt_at: datetime | None = None
    delivered_at: datetime | None = None

    @property
    def delivered(self) -> bool:
        """The latest event reached the receiver (a 2xx answered it)."""
        return self.state == WEBHOOK_DELIVERED


@dataclass(frozen=True, slots=True)
class Prediction:
    prediction_id: str
    status: Status
    model: ModelRef | None = None
    result: Any = None
    error: ErrorDetail | None = None
    created_at: datetime | None = None
    started_at: datetime | None = None
    completed_at: datetime | None = None
    expires_at: datetime | None = None
    attempts: int = 0
    batch_size: int | None = None
    queue_position: int | None = None
    """While queued, how many predictions run before it (0: it is next), where the server tells."""
    estimated_start_at: datetime | None = None
    """While queued, when the server expects it to start, from its recent throughput."""
    progress: Progress | None = None
    """What a streaming model last reported of its progress."""
    webhook: WebhookState | None = None
    """None for a prediction submitted without a webhook."""
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    """The record as the server sent it, fields this client does not know included."""

    @property
    def terminal(self) -> bool:
        """succeeded, failed or canceled: nothing changes after."""
        return self.status.terminal

    @property
    def succeeded(self) -> bool:
        return self.status is Status.SUCCEEDED

    def moved_in_line(self, message: dict[str, Any]) -> Prediction:
        """The same state at another place in line: a `queue` message's queue_position and estimated_start_at."""
        return replace(
            self,
            queue_position=_int_or_none(message.get("queue_position")),
            estimated_start_at=_time(message.get("estimated_start_at")),
        )

    @classmethod
    def from_dict(cls, data: Any) -> Prediction:
        if not isinstance(data, dict):
            raise ProtocolError(f"expected a prediction record, got {type(data).__name__}")
        pid, status = data.get("prediction_id"), data.get("status")
        if not isinstance(pid, str) or not isinstance(status, str):
            raise ProtocolError("a prediction record needs a prediction_id and a status")
        try:
            known = Status(status)  # type: ignore[call-arg]  # a lookup by value
        except ValueError:
            raise ProtocolError(f"unknown status {status!r}: this client is older than the server") from None
        metrics = data.get("metrics")
        attempts = data.get("attempts")
        return cls(
            prediction_id=pid,
            status=known,
            model=_model(data.get("model")),
            result=data.get("result"),
            error=_error(data.get("error")),
            created_at=_time(data.get("created_at")),
            started_at=_time(data.get("started_at")),
            completed_at=_time(data.get("completed_at")),
            expires_at=_time(data.get("expires_at")),
            attempts=attempts if isinstance(attempts, int) else 0,
            batch_size=_int_or_none(metrics.get("batch_size")) if isinstance(metrics, dict) else None,
            queue_position=_int_or_none(data.get("queue_position")),
            estimated_start_at=_time(data.get("estimated_start_at")),
            progress=Progress.from_dict(pid, data.get("progress")),
            webhook=_webhook(data.get("webhook")),
            raw=data,
        )


def _model(value: Any) -> ModelRef | None:
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    version = value.get("version")
    return ModelRef(value["name"], version if isinstance(version, str) else None)


def _webhook(value: Any) -> WebhookState | None:
    if not isinstance(value, dict) or not isinstance(value.get("url"), str):
        return None
    events = value.get("events")
    attempts = _int_or_none(value.get("attempts"))
    return WebhookState(
        url=value["url"],
        events=tuple(e for e in events if isinstance(e, str)) if isinstance(events, list) else (),
        event=_str_or_none(value.get("event")),
        state=_str_or_none(value.get("state")),
        attempts=attempts if attempts is not None else 0,
        last_status=_int_or_none(value.get("last_status")),
        last_error=_str_or_none(value.get("last_error")),
        next_attempt_at=_time(value.get("next_attempt_at")),
        delivered_at=_time(value.get("delivered_at")),
    )


def _error(value: Any) -> ErrorDetail | None:
    if not isinstance(value, dict):
        return None
    code, message = value.get("code"), value.get("message")
    return ErrorDetail(code if isinstance(code, str) else "unknown", message if isinstance(message, str) else "")


def _time(value: Any) -> datetime | None:
    """RFC 3339 (`2026-11-28T10:02:14.397Z`) as an aware datetime; anything unreadable as None."""
    if not isinstance(value, str):
        return None
    try:
        # Python 3.10's fromisoformat does not read a trailing Z.
        return datetime.fromisoformat(value[:-1] + "+00:00" if value.endswith(("Z", "z")) else value)
    except ValueError:
        return None


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) else None
