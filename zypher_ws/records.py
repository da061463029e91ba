"""The prediction record and its lifecycle: queued -> running -> succeeded | failed | canceled."""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field, fields, replace
from enum import Enum
from functools import lru_cache
from typing import Any


class Status(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL

    @property
    def rank(self) -> int:
        """Position in the lifecycle; a watcher never moves backwards."""
        return 2 if self.terminal else (1 if self is Status.RUNNING else 0)


TERMINAL = frozenset({Status.SUCCEEDED, Status.FAILED, Status.CANCELED})


def rfc3339(ts: float | None) -> str | None:
    """UTC with milliseconds, `2026-11-28T10:02:14.397Z`. Every record carries four: kept cheap."""
    if ts is None:
        return None
    ms = int(ts * 1000)
    return f"{_utc_second(ms // 1000)}.{ms % 1000:03d}Z"


@lru_cache(maxsize=256)
def _utc_second(second: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))


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

    @classmethod
    def new(cls, input: Any, *, model_name: str, model_version: str) -> Prediction:
        return cls(
            prediction_id=secrets.token_hex(16),  # 128 random bits, as many as a uuid4
            status=Status.QUEUED,
            model_name=model_name,
            model_version=model_version,
            input=input,
        )

    def started(self, *, batch_size: int) -> Prediction:
        return replace(
            self, status=Status.RUNNING, started_at=time.time(), batch_size=batch_size, attempts=self.attempts + 1
        )

    def requeued(self) -> Prediction:
        """Back to the queue after the process running it died (at-least-once)."""
        return replace(self, status=Status.QUEUED, started_at=None, batch_size=None)

    def finished(
        self, status: Status, *, ttl: float, result: Any = None, error: dict[str, str] | None = None
    ) -> Prediction:
        now = time.time()
        return replace(self, status=status, result=result, error=error, completed_at=now, expires_at=now + ttl)

    def to_row(self) -> dict[str, Any]:
        """Everything, input included, for a durable store."""
        return {name: getattr(self, name) for name in _ROW_FIELDS}

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Prediction:
        return cls(**{**row, "status": Status(row["status"])})

    def to_dict(self) -> dict[str, Any]:
        """The public record, as `GET /predict/{id}` and WebSocket messages carry it (never the input)."""
        return {
            "prediction_id": self.prediction_id,
            "status": self.status.value,
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
        }


_ROW_FIELDS = tuple(f.name for f in fields(Prediction))


@dataclass(frozen=True, slots=True)
class Job:
    """What travels through the work queue: only the id, since workers read the input from the record."""

    prediction_id: str
    receipt: str | None = None  # the queue's handle for acknowledging it, where the queue needs one
