"""The pure rules of webhook delivery: which state change sends which event, what is sent, and what an
attempt leads to. Every store runs `scheduled_by` in the transaction that writes the state change, and
`settle` decides what the next write after an attempt holds; nothing here does I/O."""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import urlsplit

from ..json_codec import dumps
from ..records import DEAD_LETTERED, DELIVERED, GONE, PENDING, Prediction, Status, Webhook, rfc3339

# Why an attempt got no HTTP answer (the record's `last_error`).
TIMEOUT = "timeout"
CONNECTION_ERROR = "connection_error"
ADDRESS_NOT_ALLOWED = "address_not_allowed"  # the host resolved to an address webhooks may not reach

JITTER = 0.2  # each delay of the schedule is stretched or shrunk by up to this fraction


def jitter() -> float:
    """The factor for one delay: spreads the retries of many events failing at once."""
    return random.uniform(1 - JITTER, 1 + JITTER)


@dataclass(frozen=True, slots=True)
class Delivery:
    """One event on its way: what the store keeps until it is delivered or given up."""

    webhook_id: str  # the same on every attempt, so receivers can drop repeats
    prediction_id: str
    event: str
    url: str
    body: bytes  # fixed when the event happened: every attempt sends (and signs) the same bytes
    event_at: float
    due_at: float
    attempts: int = 0  # attempts made so far
    receipt: str | None = None  # the store's handle for this attempt, where it needs one (Redis)

    @property
    def host(self) -> str:
        parts = urlsplit(self.url)
        return f"{(parts.hostname or '').lower()}:{parts.port or (443 if parts.scheme == 'https' else 80)}"

    def to_json(self) -> str:
        fields = {
            "id": self.webhook_id, "prediction_id": self.prediction_id, "event": self.event, "url": self.url,
            "body": self.body.decode(), "event_at": self.event_at, "due_at": self.due_at, "attempts": self.attempts,
        }  # fmt: skip
        return json.dumps(fields, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str, receipt: str | None = None) -> Delivery:
        f = json.loads(text)
        return cls(
            f["id"], f["prediction_id"], f["event"], f["url"], f["body"].encode(), f["event_at"], f["due_at"],
            f["attempts"], receipt,
        )  # fmt: skip


def _event_of(p: Prediction, pending: str) -> str | None:
    if p.status.terminal:
        return "completed"
    if p.status is Status.RUNNING and pending == "output":
        return "output"  # chunks committed: the event is named by their count (Webhook.event_id)
    if p.status is Status.RUNNING and p.attempts == 1:
        return "start"
    return None


def scheduled_by(p: Prediction, before: Prediction | None = None) -> Delivery | None:
    """The delivery that writing `p` schedules: one if this state is the change that made its event
    pending (`Prediction._next` marks it), else None. Cheap for a prediction without a webhook.

    `before`, the record this write replaces where the store has it: a write that leaves a pending event
    as it was (a stream's chunk commit while its `start` or `output` waits for its attempt, its last commit
    after a cancel) schedules nothing, since the write that made it pending did. A store that cannot tell
    (it does not read the record first) relies on the delivery's id to keep one."""
    w = p.webhook
    if w is None or w.state != PENDING or w.attempts or w.next_attempt_at is None:
        return None
    if before is not None and before.webhook == w:
        return None
    event, at = _event_of(p, w.event or ""), w.next_attempt_at
    if event is None or w.event != event:
        return None
    ident = w.event_id(p.prediction_id)
    assert ident is not None
    return Delivery(ident, p.prediction_id, event, w.url, payload(p, event, at), at, at)


def payload(p: Prediction, event: str, at: float) -> bytes:
    return dumps({"type": f"prediction.{event}", "timestamp": rfc3339(at), "data": p.to_dict()})


@dataclass(frozen=True, slots=True)
class Attempt:
    """What one POST got: an HTTP status, or the reason there was none."""

    status: int | None = None
    error: str | None = None  # TIMEOUT, CONNECTION_ERROR or ADDRESS_NOT_ALLOWED when status is None
    retry_after: float | None = None  # seconds, from the answer's Retry-After

    @property
    def result(self) -> str:
        """For metrics: `2xx`, `4xx`... or the error."""
        return f"{self.status // 100}xx" if self.status is not None else (self.error or CONNECTION_ERROR)


@dataclass(frozen=True, slots=True)
class Settlement:
    """What an attempt leads to: the event's new state, and the delivery again if it is retried."""

    delivery: Delivery  # as attempted
    attempt: Attempt
    outcome: str  # PENDING (retried at retry.due_at), DELIVERED, GONE or DEAD_LETTERED
    retry: Delivery | None
    at: float  # when the attempt ended

    def apply(self, webhook: Webhook) -> Webhook:
        """The record's webhook state after this attempt."""
        return webhook.attempted(
            state=self.outcome,
            attempts=self.delivery.attempts + 1,
            last_status=self.attempt.status,
            last_error=self.attempt.error,
            next_attempt_at=self.retry.due_at if self.retry is not None else None,
            delivered_at=self.at if self.outcome == DELIVERED else None,
        )

    def applies_to(self, p: Prediction | None) -> bool:
        """Whether the record still shows this event (a later one replaces it, as `completed` does `start`
        and a later `output` an earlier one)."""
        return (
            p is not None and p.webhook is not None and p.webhook.event_id(p.prediction_id) == self.delivery.webhook_id
        )


def settle(
    delivery: Delivery,
    attempt: Attempt,
    *,
    now: float,
    delays: Sequence[float],
    jitter: Callable[[], float] = jitter,
) -> Settlement:
    """2xx delivers; 410 stops; an address refused is given up at once; anything else (another status, a
    redirect, a timeout, a refused connection) is tried again after the next delay of the schedule (with
    jitter, and at least the Retry-After, capped at the longest delay) until there is none left."""
    made = delivery.attempts + 1
    status = attempt.status
    if status is not None and 200 <= status < 300:
        return Settlement(delivery, attempt, DELIVERED, None, now)
    if status == 410:
        return Settlement(delivery, attempt, GONE, None, now)
    if attempt.error == ADDRESS_NOT_ALLOWED or made > len(delays):
        return Settlement(delivery, attempt, DEAD_LETTERED, None, now)
    delay = delays[made - 1] * jitter()
    if attempt.retry_after is not None:
        delay = max(delay, min(attempt.retry_after, max(delays)))
    retry = replace(delivery, attempts=made, due_at=now + delay, receipt=None)
    return Settlement(delivery, attempt, PENDING, retry, now)


def retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds from a Retry-After header: a number of seconds, or an HTTP date. None if absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when: Any = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None or when.tzinfo is None:
        return None
    seconds: float = when.timestamp() - (time.time() if now is None else now)
    return max(0.0, seconds)
