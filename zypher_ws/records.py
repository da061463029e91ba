"""The prediction record and its lifecycle: queued -> running -> succeeded | failed | canceled."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields, make_dataclass, replace
from enum import Enum
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

R = TypeVar("R", bound="DataclassInstance")


class _RandomIds:
    """uuid4 hex strings, as uuid.uuid4().hex makes them (os.urandom, version 4, RFC 4122 variant), from
    random bytes read 256 ids at a time: one getrandom(2) where every prediction made one. The version
    and variant bits of the whole pool are set at once, and the pool turned into hex once, so an id is
    a slice of a string. A forked child starts a pool of its own, so no two processes hand out the same ids."""

    BATCH = 256

    def __init__(self) -> None:
        self._pool = ""
        self._at = 0
        os.register_at_fork(after_in_child=self._forget)

    def _forget(self) -> None:
        self._pool, self._at = "", 0

    def __call__(self) -> str:
        at = self._at
        if at >= len(self._pool):
            self._pool, at = self._refill(), 0
        self._at = at + 32
        return self._pool[at : at + 32]

    def _refill(self) -> str:
        raw = bytearray(os.urandom(16 * self.BATCH))
        raw[6::16] = raw[6::16].translate(_VERSION_4)  # what uuid.UUID(version=4) sets
        raw[8::16] = raw[8::16].translate(_RFC_4122)
        return raw.hex()


_VERSION_4 = bytes(b & 0x0F | 0x40 for b in range(256))  # the high nibble of byte 6 is the version
_RFC_4122 = bytes(b & 0x3F | 0x80 for b in range(256))  # the top two bits of byte 8 are the variant


new_prediction_id = _RandomIds()


class Status(str, Enum):
    rank: int  # position in the lifecycle; a watcher never moves backwards
    terminal: bool
    text: str  # the value, as a plain attribute: Enum's `value` is a property, four times the cost

    def __new__(cls, value: str, rank: int) -> Status:
        # Plain attributes, not properties: every watcher and store checks them on every change.
        member = str.__new__(cls, value)
        member._value_ = value
        member.rank = rank
        member.terminal = rank == 2
        member.text = value
        return member

    QUEUED = ("queued", 0)
    RUNNING = ("running", 1)
    SUCCEEDED = ("succeeded", 2)
    FAILED = ("failed", 2)
    CANCELED = ("canceled", 2)


def rfc3339(ts: float | None) -> str | None:
    """UTC with milliseconds, `2026-11-28T10:02:14.397Z`. Every record carries four: kept cheap (each
    second's text made once, the milliseconds' looked up: nothing formatted per call)."""
    if ts is None:
        return None
    ms = int(ts * 1000)
    second = ms // 1000
    text = _SECONDS.get(second)
    if text is None:
        if len(_SECONDS) >= 256:
            _SECONDS.clear()  # a record's four times fall in two seconds or so: this holds many records'
        text = _SECONDS[second] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
    return text + _MILLISECONDS[ms - second * 1000]


_SECONDS: dict[int, str] = {}
_MILLISECONDS = tuple(f".{ms:03d}Z" for ms in range(1000))


WEBHOOK_EVENTS = ("start", "output", "completed")
"""Cog's event names, in lifecycle order."""

OUTPUT_EVERY = 0.5  # seconds: a stream sends `output` at most this often while its chunks come

# How the delivery of a webhook's latest event stands.
PENDING = "pending"  # an attempt is due at next_attempt_at
DELIVERED = "delivered"  # a 2xx answered it
GONE = "gone"  # the receiver answered 410: no more attempts for this event
DEAD_LETTERED = "dead_lettered"  # the last attempt failed, or the address was refused: given up


def url_shown(url: str) -> str:
    """A webhook URL as records and logs show it: without the query string and fragment, which often
    carry tokens. Only the delivery itself uses the whole URL."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}"


def webhook_id(prediction_id: str, event: str) -> str:
    """One id per prediction and event (and per chunk count for `output`, `msg_<id>_output_<n>`),
    derived rather than drawn: writing the same change twice (a retried Redis command) schedules one
    delivery, and the receiver can tell the event from the id."""
    return f"msg_{prediction_id}_{event}"


@dataclass(frozen=True, slots=True)
class Webhook:
    """Where a prediction's events go, and how the delivery of its latest event (`event`) stands."""

    url: str
    events: tuple[str, ...]
    event: str | None = None  # the latest event sent or being sent, once there is one
    state: str | None = None  # PENDING, DELIVERED, GONE or DEAD_LETTERED
    attempts: int = 0
    last_status: int | None = None  # the HTTP status of the last attempt; None without an answer
    last_error: str | None = None  # why the last attempt had no answer: timeout, connection_error, ...
    next_attempt_at: float | None = None
    delivered_at: float | None = None
    output_at: float | None = None  # when the latest `output` event happened (they are at most OUTPUT_EVERY apart)
    output_chunks: int = 0  # how many chunks the latest `output` event carried: it names the event

    def on(self, status: Status, attempts: int, at: float) -> Webhook:
        """After a change to `status`: a new pending event, if the change sends one the filter asks for.
        `start` goes with the first start only (a prediction run again after a crash does not start anew)."""
        if status.terminal:
            event = "completed"
        elif status is Status.RUNNING and attempts == 1:
            event = "start"
        else:
            return self
        if event not in self.events:
            return self
        return Webhook(
            self.url, self.events, event, PENDING, 0, None, None, at, None, self.output_at, self.output_chunks
        )

    def on_output(self, chunks: int, at: float) -> Webhook:
        """After a stream's chunks were committed, `chunks` of them in all: a new pending `output` event if
        the filter asks for it, the last one is OUTPUT_EVERY or longer ago, and nothing ended the stream
        (the `completed` event carries the chunks from then on)."""
        if "output" not in self.events or self.event == "completed" or chunks <= self.output_chunks:
            return self
        if self.output_at is not None and at - self.output_at < OUTPUT_EVERY:
            return self
        return Webhook(self.url, self.events, "output", PENDING, 0, None, None, at, None, at, chunks)

    def event_id(self, prediction_id: str) -> str | None:
        """The webhook-id of the latest event: one per prediction and event, and per chunk count for
        `output`, which a stream sends many times."""
        if self.event is None:
            return None
        return webhook_id(prediction_id, f"output_{self.output_chunks}" if self.event == "output" else self.event)

    def attempted(self, **changes: Any) -> Webhook:
        return replace(self, **changes)

    def to_row(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Webhook:
        return cls(**{**row, "events": tuple(row["events"])})

    def to_dict(self) -> dict[str, Any]:
        return {
            "url": url_shown(self.url),
            "events": list(self.events),
            "event": self.event,
            "state": self.state,
            "attempts": self.attempts,
            "last_status": self.last_status,
            "last_error": self.last_error,
            "next_attempt_at": rfc3339(self.next_attempt_at),
            "delivered_at": rfc3339(self.delivered_at),
        }


@dataclass(frozen=True, slots=True)
class Prediction:
    prediction_id: str
    status: Status
    model_name: str
    model_version: str
    input: Any
    result: Any = None
    error: dict[str, str] | None = None
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    completed_at: float | None = None
    batch_size: int | None = None
    attempts: int = 0
    expires_at: float | None = None
    webhook: Webhook | None = None
    protocol: str | None = None
    """None: the input is one model input and the result its output. "oip": an Open Inference Protocol
    request, whose input holds its rows (oip.rows_of) and whose result is the OIP response."""
    priority: int = 0
    """Its level in the model's queue (1 is the highest; 0: priorities off), kept for recovery."""
    deadline: float | None = None
    """When still queued after this (epoch seconds) it is not run: it ends failed, deadline_exceeded."""
    stream: bool = False
    """Run by the model's predict_stream: `result` is the list of chunks so far (committed ones, in a store)."""
    progress: dict[str, Any] | None = None
    """A streaming prediction's latest Progress, as {fraction, message}; None until it reports one."""

    @classmethod
    def new(
        cls,
        input: Any,
        *,
        model_name: str,
        model_version: str,
        webhook: Webhook | None = None,
        protocol: str | None = None,
        priority: int = 0,
        deadline: float | None = None,
        stream: bool = False,
    ) -> Prediction:
        return _record(
            new_prediction_id(),  # a real uuid4 (version nibble 4), as documented
            Status.QUEUED, model_name, model_version, input, None, None, time.time(), None, None, None, 0, None,
            webhook, protocol, priority, deadline, stream, None,
        )  # fmt: skip

    def started(self, *, batch_size: int) -> Prediction:
        return self._next(Status.RUNNING, time.time(), batch_size, self.attempts + 1, self.chunks_so_far())

    def requeued(self) -> Prediction:
        """Back to the queue after the process running it died (at-least-once). A stream keeps the chunks
        committed: its rerun skips as many as it yields again (docs/durability.md)."""
        return self._next(Status.QUEUED, None, None, self.attempts, self.chunks_so_far())

    def chunks_so_far(self) -> list[Any] | None:
        """A stream's chunks so far (a new list: records are shared), or None for a prediction that is not one."""
        return list(self.result or ()) if self.stream else None

    def streamed(self, chunks: list[Any], progress: dict[str, Any] | None) -> Prediction:
        """The same state, with more chunks committed and the latest progress."""
        return replace(self, result=chunks, progress=progress)

    def finished(
        self, status: Status, *, ttl: float, result: Any = None, error: dict[str, str] | None = None
    ) -> Prediction:
        now = time.time()
        return self._next(status, self.started_at, self.batch_size, self.attempts, result, error, now, now + ttl)

    def _next(
        self,
        status: Status,
        started_at: float | None,
        batch_size: int | None,
        attempts: int,
        result: Any = None,
        error: dict[str, str] | None = None,
        completed_at: float | None = None,
        expires_at: float | None = None,
    ) -> Prediction:
        """The next state, made by _record: dataclasses.replace costs more than Prediction(...) again."""
        webhook = self.webhook
        if webhook is not None:  # the change may send an event: it is pending in the same write
            webhook = webhook.on(status, attempts, completed_at or started_at or time.time())
        return _record(
            self.prediction_id, status, self.model_name, self.model_version, self.input, result, error,
            self.created_at, started_at, completed_at, batch_size, attempts, expires_at, webhook,
            self.protocol, self.priority, self.deadline, self.stream, self.progress,
        )  # fmt: skip

    def with_webhook(self, webhook: Webhook) -> Prediction:
        """The same state, with the webhook's delivery state moved on (an attempt was made)."""
        return replace(self, webhook=webhook)

    def to_row(self) -> dict[str, Any]:
        """Everything, input included, for a durable store."""
        row = {name: getattr(self, name) for name in _ROW_FIELDS}
        if self.webhook is not None:
            row["webhook"] = self.webhook.to_row()
        return row

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Prediction:
        status = Status(row["status"])  # type: ignore[call-arg]  # a lookup by value, not a new member
        webhook = row.get("webhook")
        if webhook is not None:
            return cls(**{**row, "status": status, "webhook": Webhook.from_row(webhook)})
        return cls(**{**row, "status": status})

    def to_dict(self) -> dict[str, Any]:
        """The public record, as `GET /predict/{id}` and WebSocket messages carry it (never the input)."""
        return {
            "prediction_id": self.prediction_id,
            "status": self.status.text,
            "model": {"name": self.model_name, "version": self.model_version},
            "result": self.result,
            "error": self.error,
            "created_at": rfc3339(self.created_at),
            "started_at": rfc3339(self.started_at),
            "completed_at": rfc3339(self.completed_at),
            "expires_at": rfc3339(self.expires_at),
            "attempts": self.attempts,
            "metrics": {"batch_size": self.batch_size},
            "links": {"self": f"/predict/{self.prediction_id}"},
            "webhook": self.webhook.to_dict() if self.webhook is not None else None,
            "stream": self.stream,
            "progress": self.progress,
            # Where it stands in line, while queued: not stored (the queue knows), filled in where shown.
            "queue_position": None,
            "estimated_start_at": None,
        }


_ROW_FIELDS = tuple(f.name for f in fields(Prediction))


def thawed(cls: type[R]) -> Callable[..., R]:
    """A constructor of the frozen slots dataclass `cls` that costs what a plain dataclass's does.

    A frozen dataclass's __init__ sets each field with object.__setattr__, about 1,400 instructions a
    field under CPython 3.11 against about 100 for a plain attribute: a Prediction (19 fields) costs
    28,000 instructions where a plain one costs 4,000, and every prediction makes three. Here a twin
    class with the same fields and slots, not frozen, builds the record, which then becomes a `cls`:
    their layouts are the same, so CPython lets the class be swapped. The record is as frozen as any.
    """
    twin = make_dataclass(
        f"{cls.__name__}Draft",
        [(f.name, f.type, field(default=f.default, default_factory=f.default_factory)) for f in fields(cls)],
        slots=True,
    )

    def make(*values: Any, **named: Any) -> R:
        record = twin(*values, **named)
        record.__class__ = cls
        return record  # type: ignore[no-any-return]

    return make


_record = thawed(Prediction)
"""Prediction(...), made at a plain dataclass's cost (the hot paths: a new prediction and each state)."""


OUTPUT = "output"  # a chunk a streaming model yielded
PROGRESS = "progress"  # a Progress it yielded
COMMITTED = "committed"  # its chunks up to `index` (a count) are in the store now
QUEUE = "queue"  # a queued prediction's position (`index`) and estimated start (`chunk`, epoch seconds)


@dataclass(frozen=True, slots=True)
class StreamEvent:
    """What a streaming prediction produces between its status changes, carried by the event bus."""

    prediction_id: str
    kind: str  # OUTPUT, PROGRESS or COMMITTED
    index: int = 0  # OUTPUT: the chunk's index (0 is the first); COMMITTED: how many chunks are stored;
    # QUEUE: how many wait before it (0: it is next)
    chunk: Any = None
    fraction: float | None = None
    message: str | None = None

    def to_row(self) -> list[Any]:
        return [self.prediction_id, self.kind, self.index, self.chunk, self.fraction, self.message]

    @classmethod
    def from_row(cls, row: list[Any]) -> StreamEvent:
        return cls(*row)

    def to_message(self) -> dict[str, Any]:
        """The WebSocket message (and SSE data) of an OUTPUT or PROGRESS event."""
        if self.kind == OUTPUT:
            return {"type": OUTPUT, "prediction_id": self.prediction_id, "index": self.index, "chunk": self.chunk}
        if self.kind == QUEUE:
            return {
                "type": QUEUE,
                "prediction_id": self.prediction_id,
                "queue_position": self.index,
                "estimated_start_at": rfc3339(self.chunk),
            }
        pid = self.prediction_id
        return {"type": PROGRESS, "prediction_id": pid, "fraction": self.fraction, "message": self.message}


@dataclass(frozen=True, slots=True)
class Job:
    """What travels through the work queue: only the id, since workers read the input from the record."""

    prediction_id: str
    receipt: str | None = None  # the queue's handle for acknowledging it, where the queue needs one
    priority: int = 0  # its level in the model's queue (1 is the highest; 0: priorities off)


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a worker learned about one prediction: a result, or an error."""

    prediction_id: str
    result: Any = None
    error: dict[str, str] | None = None
    progress: dict[str, Any] | None = None  # a stream's last progress


@dataclass(frozen=True, slots=True)
class IdempotencyKey:
    key: str
    fingerprint: str  # hash of the request body: one key, one body


make_job = thawed(Job)
"""Job(...) at a plain dataclass's cost, for the one queued with every prediction."""
make_outcome = thawed(Outcome)
"""Outcome(...) at a plain dataclass's cost, for the one of every prediction a model call answers."""
