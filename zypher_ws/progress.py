"""What a streaming model yields to report progress instead of an output chunk (docs/models.md)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Progress:
    """Yield `Progress(0.4, "step 4 of 10")` from `predict_stream` to report how far along it is.

    `fraction` is from 0 to 1; `message` is free text for people (or None).
    """

    fraction: float
    message: str | None = None
