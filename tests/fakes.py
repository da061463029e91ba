"""Fakes that implement the real interfaces, for tests of the core and of the HTTP layer."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from zypher_ws.records import Status
from zypher_ws.settings import Settings

WAIT = 5.0  # seconds any awaited event may take before a test fails
TERMINAL = frozenset(s.value for s in Status if s.terminal)  # statuses as records carry them


def make_settings(**overrides: Any) -> Settings:
    defaults: dict[str, Any] = {"max_batch_delay_ms": 0.0, "shutdown_timeout": 1.0, "store": "memory://"}
    return Settings(**{**defaults, **overrides})


# -- models ---------------------------------------------------------------------------------------


class GatedModel:
    """A fake model that runs only when the test lets it.

    `started` is set (on the loop) each time a batch begins; the batch then waits for `release`.
    An input {"raise": "..."} makes predict_batch raise; otherwise the result echoes the input.
    """

    name = "gated"
    version = "0.0.1"
    input_schema: dict[str, Any] = {
        "type": "object",
        "properties": {"x": {"type": "integer"}, "raise": {"type": "string"}},
        "additionalProperties": False,
    }
    output_schema: dict[str, Any] = {"type": "object"}

    def __init__(self, *, gated: bool = True, load_gate: threading.Event | None = None) -> None:
        self.release = threading.Event()
        if not gated:
            self.release.set()
        self.load_gate = load_gate
        self.batches: list[list[Any]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._started = 0
        self._started_changed: asyncio.Event | None = None

    def load(self) -> None:
        if self.load_gate is not None:
            self.load_gate.wait(WAIT)

    def predict_batch(self, inputs: list[Any]) -> list[Any]:
        self.batches.append(list(inputs))
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._note_start)
        self.release.wait(WAIT)
        bad = [x["raise"] for x in inputs if "raise" in x]
        if bad:
            raise ValueError(bad[0])
        return [{"echo": x} for x in inputs]

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._started_changed = asyncio.Event()

    def _note_start(self) -> None:
        self._started += 1
        assert self._started_changed is not None
        self._started_changed.set()

    async def wait_started(self, count: int = 1) -> None:
        """Wait until `count` batches have begun in total."""
        assert self._started_changed is not None

        async def _wait() -> None:
            while self._started < count:
                self._started_changed.clear()  # type: ignore[union-attr]
                await self._started_changed.wait()  # type: ignore[union-attr]

        await asyncio.wait_for(_wait(), WAIT)
