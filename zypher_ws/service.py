"""The protocol-free core that handlers call: submit, read, cancel and watch predictions."""

from __future__ import annotations

import asyncio
import hashlib
import json
from typing import Any

from . import logs
from .errors import NotFound, NotReady, QueueFull
from .events import EventBus, Listener, Watch
from .models import Model
from .records import Job, Prediction
from .runner import ModelRunner
from .settings import Settings
from .store import IdempotencyKey, Store
from .validation import InputValidator, is_prediction_id
from .waiting import settle, settled_within
from .work_queue import WorkQueue


class PredictionService:
    def __init__(
        self,
        *,
        settings: Settings,
        model: Model,
        runner: ModelRunner,
        store: Store,
        queue: WorkQueue,
        bus: EventBus,
    ) -> None:
        self.settings = settings
        self.model = model
        self.runner = runner
        self.store = store
        self.queue = queue
        self.bus = bus
        self._validate = InputValidator(model.input_schema)

    @property
    def model_ready(self) -> bool:
        """The model is loaded here, or runs elsewhere (an API-only process of the redis backend)."""
        return self.runner.loaded or self.settings.workers == 0

    async def check_ready(self) -> None:
        """Raise NotReady or BackendUnavailable unless a new prediction would be accepted now."""
        if not self.model_ready:
            raise NotReady(self.runner.load_error or "the model is not loaded yet")
        await self.store.check()
        if await self.queue.depth() >= self.queue.maxsize:
            raise NotReady("the queue is full")

    def validate_input(self, value: Any) -> None:
        """Raise InvalidInput naming the offending field, per the model's JSON Schema."""
        self._validate(value)

    async def submit(self, value: Any, *, idempotency_key: str | None = None) -> Prediction:
        """Validate, store and enqueue one prediction. Raises InvalidInput, NotReady or QueueFull.

        With an idempotency key already used for the same input, returns that prediction as it is now
        (and runs nothing); with a different input, raises IdempotencyConflict.
        """
        prediction, _ = await self._submit(value, idempotency_key, None)
        return prediction

    async def run(self, value: Any, *, idempotency_key: str | None = None, timeout: float) -> Prediction:
        """Submit, then wait: the prediction once terminal, or as it stands when `timeout` runs out.

        It listens before the prediction is queued, so no change can slip past and nothing is read back.
        """
        settled = asyncio.get_running_loop().create_future()
        changes: list[Prediction] = []

        def on_change(prediction: Prediction) -> None:
            changes.append(prediction)
            if prediction.status.terminal:
                settle(settled)

        prediction, new = await self._submit(value, idempotency_key, on_change)
        if not new:
            return await self.wait(prediction.prediction_id, timeout)  # an earlier prediction: follow it
        try:
            await settled_within(settled, timeout)
        finally:
            self.bus.unsubscribe(prediction.prediction_id, on_change)
        for change in changes:
            if change.status.rank >= prediction.status.rank:  # never backwards (a takeover restarts it)
                prediction = change
        return prediction

    async def _submit(
        self, value: Any, idempotency_key: str | None, listener: Listener | None
    ) -> tuple[Prediction, bool]:
        """The prediction, and False if it is an earlier one with the same idempotency key.

        `listener` hears every change of a new prediction from before it is queued; the caller unsubscribes.
        """
        self.validate_input(value)
        if not self.model_ready:
            raise NotReady()
        if await self.queue.depth() >= self.queue.maxsize:
            raise QueueFull()  # checked first too, so a full queue costs no store write
        prediction = Prediction.new(value, model_name=self.model.name, model_version=self.model.version)
        pid = prediction.prediction_id
        key = None
        if idempotency_key is not None:
            canonical = json.dumps(value, sort_keys=True, separators=(",", ":"))
            key = IdempotencyKey(idempotency_key, hashlib.sha256(canonical.encode()).hexdigest())
        if listener is not None:
            self.bus.subscribe(pid, listener)
        queued = False
        try:
            stored = await self.store.add(prediction, key)
            if stored.prediction_id != pid:
                return stored, False
            try:
                await self.queue.put(Job(pid))
            except QueueFull:
                # Filled up while the record was being stored: take it back, so a 503 leaves nothing behind.
                await self.store.delete(pid)
                raise QueueFull() from None
            queued = True
        finally:
            if listener is not None and not queued:
                self.bus.unsubscribe(pid, listener)  # nothing of ours to hear
        logs.state_changes([prediction])
        return prediction, True

    async def get(self, prediction_id: str) -> Prediction:
        prediction = await self.store.get(prediction_id) if is_prediction_id(prediction_id) else None
        if prediction is None:
            raise NotFound(f"no prediction {prediction_id}")
        return prediction

    async def recover(self) -> int:
        """Queue again what a previous process accepted but did not finish; returns how many."""
        requeue, failed = await self.store.recover(self.settings.max_attempts)
        for prediction in requeue:
            await self.queue.put(Job(prediction.prediction_id), force=True)
        logs.state_changes(failed)
        await self.bus.publish(failed)
        return len(requeue)

    async def cancel(self, prediction_id: str) -> Prediction:
        if not is_prediction_id(prediction_id):
            raise NotFound(f"no prediction {prediction_id}")
        prediction = await self.store.cancel(prediction_id)
        logs.state_changes([prediction])
        await self.bus.publish([prediction])
        return prediction

    async def wait(self, prediction_id: str, timeout: float) -> Prediction:
        """The prediction once terminal, or its latest state when `timeout` runs out first."""
        settled = asyncio.get_running_loop().create_future()
        latest: list[Prediction] = []

        def deliver(prediction: Prediction, snapshot: bool) -> None:
            latest.append(prediction)
            if prediction.status.terminal:
                settle(settled)

        watch = Watch(self.bus, prediction_id, deliver)
        if await watch.start(self.store.get) is None:
            raise NotFound(f"no prediction {prediction_id}")
        try:
            await settled_within(settled, timeout)
        finally:
            watch.stop()
        return latest[-1]
