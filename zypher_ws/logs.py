"""Log lines: one per prediction state change (and one per request, http/access_log.py), as text or JSON.

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

from .records import Prediction

predictions_log = logging.getLogger("zypher_ws.predictions")


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


def state_changes(predictions: Iterable[Prediction]) -> None:
    """One line per prediction that changed state (a logger of its own, to silence it separately)."""
    if not predictions_log.isEnabledFor(logging.INFO):
        return
    for p in predictions:
        fields: dict[str, Any] = {"prediction_id": p.prediction_id, "status": p.status.value, "attempts": p.attempts}
        if p.error:
            fields["error_code"] = p.error.get("code")
        predictions_log.info("prediction %s %s", p.prediction_id, p.status.value, extra={"fields": fields})
