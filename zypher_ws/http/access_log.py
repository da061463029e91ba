"""The access log: one line per request, naming the prediction it concerned.

Inputs, results and tokens are never logged: requests are logged by method, path (no query string),
status and duration.
"""

from __future__ import annotations

import logging

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

PREDICTION_ID = web.ResponseKey("prediction_id", str)
"""Set on responses about one prediction, so the access log line names it."""


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
