"""Runs the model off the event loop and turns each input into an Outcome."""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Any

from .errors import ModelError
from .models import Model
from .settings import Settings
from .store import Outcome

log = logging.getLogger(__name__)


def _error(exc: BaseException) -> dict[str, str]:
    return {"code": ModelError.code, "message": f"{type(exc).__name__}: {exc}"}


def make_executor(settings: Settings) -> Executor:
    # Threads suit numpy models, which release the GIL; one per concurrent batch.
    return ThreadPoolExecutor(max_workers=max(1, settings.workers), thread_name_prefix="zypher-model")


class ModelRunner:
    def __init__(self, model: Model, executor: Executor) -> None:
        self.model = model
        self._executor = executor
        self.loaded = False
        self.load_error: str | None = None
        self.loaded_event = asyncio.Event()

    async def load(self) -> None:
        """Load in the executor. A failure is kept for /readyz and re-raised."""
        try:
            await asyncio.get_running_loop().run_in_executor(self._executor, self.model.load)
        except Exception as exc:
            self.load_error = f"the model failed to load: {type(exc).__name__}: {exc}"
            raise
        self.loaded = True
        self.loaded_event.set()
        log.info("model %s %s loaded and ready", self.model.name, self.model.version)

    async def run(self, ids: list[str], inputs: list[Any]) -> list[Outcome]:
        """One model call for the batch; if it raises, each item alone, so one bad input fails only itself."""
        loop = asyncio.get_running_loop()
        try:
            results = await loop.run_in_executor(self._executor, self.model.predict_batch, inputs)
            if len(results) != len(inputs):
                raise ValueError(f"model returned {len(results)} outputs for {len(inputs)} inputs")
            return [Outcome(pid, result=r) for pid, r in zip(ids, results, strict=True)]
        except Exception as exc:
            if len(inputs) == 1:
                log.info("model raised on prediction %s: %r", ids[0], exc)
                return [Outcome(ids[0], error=_error(exc))]
            log.info("model raised on a batch of %d; retrying one by one: %r", len(inputs), exc)
        return [outcome for pid, x in zip(ids, inputs, strict=True) for outcome in await self.run([pid], [x])]
