"""Log lines: one per request and one per prediction state change, as text or one JSON object per line.

Structured fields travel in `extra={"fields": {...}}`. Inputs, results and tokens are never logged:
requests are logged by method, path (no query string), status and duration.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterable
from datetime import datetime, timezone
from typing import Any

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from .records import Prediction

predictions_log = logging.getLogger("zypher_ws.predictions")
PREDICTION_ID = web.ResponseKey("prediction_id", str)
"""Set on responses about one prediction, so the access log line names it."""


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, tz=timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            **getattr(record, "fields", {}),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)


class AccessLogger(AbstractAccessLogger):
    """One line per request: method, path, status, duration, and the prediction it concerned, if any."""

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
        fields = {
            "method": request.method,
            "path": request.path,
            "status": response.status,
            "duration_ms": round(time * 1000, 3),
            "remote": request.remote,
        }
        if prediction_id:
            fields["prediction_id"] = prediction_id
        self.logger.info(
            "%s %s %s %.1f ms%s",
            request.method,
            request.path,
            response.status,
            time * 1000,
            f" prediction {prediction_id}" if prediction_id else "",
            extra={"fields": fields},
        )


def state_changes(predictions: Iterable[Prediction]) -> None:
    """One line per prediction that changed state (a logger of its own, to silence it separately)."""
    if not predictions_log.isEnabledFor(logging.INFO):
        return
    for p in predictions:
        fields: dict[str, Any] = {"prediction_id": p.prediction_id, "status": p.status.value, "attempts": p.attempts}
        if p.error:
            fields["error_code"] = p.error.get("code")
        predictions_log.info("prediction %s %s", p.prediction_id, p.status.value, extra={"fields": fields})
