"""Log lines: one per prediction state change (and one per request, http/access_log.py), as text or JSON.

Structured fields travel in `extra={"fields": {...}}`. Inputs, results and tokens are never logged:
requests are logged by method, path (no query string), status and duration.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from collections.abc import Iterable
from functools import lru_cache
from typing import Any

from .records import Prediction, Status

predictions_log = logging.getLogger("zypher_ws.predictions")


@lru_cache(maxsize=64)
def _local_second(second: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))


@lru_cache(maxsize=64)
def _utc_second(second: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class TextFormatter(logging.Formatter):
    """`%(asctime)s` as logging writes it (`2026-11-28 10:02:14,397`), its strftime done once a second.
    With TEXT_FORMAT, a line without a traceback is one f-string, not logging's %-style pass."""

    def format(self, record: logging.LogRecord) -> str:
        if self._fmt != TEXT_FORMAT or record.exc_info or record.exc_text or record.stack_info:
            return super().format(record)
        return f"{self.formatTime(record)} {record.levelname} {record.name}: {record.getMessage()}"

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return f"{_local_second(int(record.created))},{int(record.msecs):03d}"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": f"{_utc_second(int(record.created))}.{int(record.msecs):03d}+00:00",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            **getattr(record, "fields", {}),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class LoopFlushingHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes each line at once but flushes once per event-loop turn, not once per line: a burst of
    access lines (a batch's responses) costs one write(2). WARNING and above, and lines logged outside
    the loop's thread, are flushed at once; a SIGKILL loses at most the lines of the turn it lands in."""

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self._scheduled = False

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.stream.write(self.format(record) + self.terminator)
        except Exception:
            self.handleError(record)
            return
        if record.levelno < logging.WARNING:
            if self._scheduled:
                return  # this turn's flush is on its way
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                loop = None
            if loop is not None:
                self._scheduled = True
                loop.call_soon(self._flush_turn)
                return
        self.flush()

    def _flush_turn(self) -> None:
        self._scheduled = False
        self.flush()


def configure(level: str, fmt: str) -> None:
    # What our formats never show, logging need not look up for every record (the logging HOWTO's
    # "Optimization"): the caller's file and line, thread, process.
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    # stderr is line-buffered (a write per line); this stream is flushed by the handler instead.
    stream = open(  # lives as long as the process
        sys.stderr.fileno(), "w", buffering=1 << 16, encoding="utf-8", errors="backslashreplace", closefd=False
    )
    handler = LoopFlushingHandler(stream)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter(TEXT_FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)


# The normal lifecycle (queued, running, succeeded) is DEBUG: at INFO a prediction's one line is its request's
# access line, and the outcomes an operator acts on (failed, canceled, worker_lost) stand out on their own.
_STATE_LEVEL = {Status.QUEUED: logging.DEBUG, Status.RUNNING: logging.DEBUG, Status.SUCCEEDED: logging.DEBUG}


def state_changes(predictions: Iterable[Prediction]) -> None:
    """One line per prediction that changed state (a logger of its own, to silence it separately):
    DEBUG for queued, running and succeeded, INFO for failed and canceled."""
    enabled = predictions_log.isEnabledFor
    debug = enabled(logging.DEBUG)  # asked once a call: nearly every change is DEBUG, and INFO drops it
    for p in predictions:
        level = _STATE_LEVEL.get(p.status, logging.INFO)
        if not (debug if level == logging.DEBUG else enabled(level)):
            continue
        fields: dict[str, Any] = {"prediction_id": p.prediction_id, "status": p.status.value, "attempts": p.attempts}
        if p.error:
            fields["error_code"] = p.error.get("code")
        predictions_log.log(level, "prediction %s %s", p.prediction_id, p.status.value, extra={"fields": fields})
