"""The access log: one line per request, naming the prediction it concerned.

Inputs, results and tokens are never logged: requests are logged by method, path (no query string),
status and duration.
"""

from __future__ import annotations

import logging
import re
import time
from typing import Any

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.http_exceptions import HttpProcessingError

PREDICTION_ID = web.ResponseKey("prediction_id", str)
"""Set on responses about one prediction, so the access log line names it."""


class AccessLogger(AbstractAccessLogger):
    """One line per request: method, path, status, duration, and the prediction it concerned, if any."""

    _template: dict[str, Any] | None = None  # a record's attributes but its time and message (see log)

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)  # aiohttp skips log() entirely when False

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        prediction_id = response.get(PREDICTION_ID)
        if prediction_id is None and isinstance(request, web.Request):
            try:
                prediction_id = request.match_info.get("prediction_id")
            except AssertionError:  # a request so malformed it was never routed
                pass
        duration_ms = time * 1000
        fields = {
            "method": request.method,
            "path": request.path,
            "status": response.status,
            "duration_ms": round(duration_ms, 3),
            "remote": request.remote,
        }
        line = f"{fields['method']} {fields['path']} {fields['status']} {duration_ms:.1f} ms"
        if prediction_id:
            fields["prediction_id"] = prediction_id
            line += f" prediction {prediction_id}"
        self.logger.handle(self._record(line, fields))

    def _record(self, line: str, fields: dict[str, Any]) -> logging.LogRecord:
        """An INFO record of `line`, made with its message already rendered and handed to the logger's
        handlers, skipping Logger.info's argument handling (aiohttp has checked `enabled` first).

        LogRecord's constructor works out what is the same for every access line (the level's name, the
        module from a path, the thread and process): that is done once per connection, and each line's
        record is a copy of it with its own time and message, a third of the cost."""
        template = self._template
        if template is None:
            first = logging.LogRecord(self.logger.name, logging.INFO, "", 0, line, None, None)
            template = self._template = dict(vars(first))
        record: logging.LogRecord = _new_record(logging.LogRecord)
        attributes = vars(record)
        attributes.update(template)
        now = _time()  # as LogRecord sets created, msecs and relativeCreated
        attributes["created"] = now
        attributes["msecs"] = int((now - int(now)) * 1000) + 0.0
        attributes["relativeCreated"] = (now - logging._startTime) * 1000  # type: ignore[attr-defined]
        attributes["msg"] = line
        attributes["fields"] = fields
        return record


_new_record = object.__new__
_time = time.time


class MalformedRequestsAtInfo(logging.Filter):
    """aiohttp logs a request its parser rejects (answered 400) at ERROR with a traceback, on
    `aiohttp.server`. That is the client's mistake, not the service's: one INFO line without one,
    naming the kind of error but none of the bytes the client sent (they may hold a token)."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if not isinstance(error, HttpProcessingError) or not 400 <= error.code < 500:
            return True
        first_line = (error.message or "").strip().partition("\n")[0]
        kind = re.split("['\"]", first_line, maxsplit=1)[0].rstrip(" :") or type(error).__name__
        record.msg, record.args = "%s: %s %s", (record.getMessage(), error.code, kind)
        record.levelno, record.levelname = logging.INFO, "INFO"
        record.exc_info, record.exc_text = None, None
        return logging.getLogger(record.name).isEnabledFor(logging.INFO)


def log_malformed_requests_at_info() -> None:
    server_log = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, MalformedRequestsAtInfo) for f in server_log.filters):
        server_log.addFilter(MalformedRequestsAtInfo())
