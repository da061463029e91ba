"""The protocol-free core that handlers call: submit, read, cancel and watch predictions."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import Callable
from typing import Any

from . import logs, oip
from .backends import Checks, DefersWrites, EventBus, Recovers, Store, Sweeps
from .backends.base import Listener
from .deployments import Deployment, Deployments
from .errors import (
    InvalidWebhook,
    ModelNotFound,
    NotFound,
    NotReady,
    QueueFull,
    StreamNotSupported,
    ZypherError,
)
from .events import Watch
from .queue_positions import QueuePositions
from .records import QUEUE, IdempotencyKey, Job, Outcome, Prediction, Status, StreamEvent, Webhook, make_job, rfc3339
from .settings import Settings
from .validation import is_prediction_id
from .waiting import Deadlines, settle
from .webhooks.target import AddressPolicy, WebhookRequest

log = logging.getLogger(__name__)


class PredictionService:
    """Predictions of every model served here: each goes to its model version's own queue."""

    def __init__(self, *, settings: Settings, models: Deployments, store: Store, bus: EventBus) -> None:
        self.settings = settings
        self.models = models
        self.store = store
        self.bus = bus
        self.stopping = False
        self._defers = store if isinstance(store, DefersWrites) else None
        self.positions = QueuePositions()
        """Where queued predictions watched here stand; its run_forever ticks (the app starts it)."""
        self._waiting: set[asyncio.Future[None]] = set()  # sync waits, settled when shutdown begins
        self._deadlines = Deadlines()
        self._webhook_policy = AddressPolicy(
            allow_private=settings.webhook_allow_private, allowed_hosts=settings.webhook_allowed_hosts
        )

    def stop(self) -> None:
        """Shutdown has begun: refuse new predictions, and let everyone waiting answer now with what
        they have (a sync request its unfinished record, a stream its last message). Accepted
        predictions stay where they are: durable ones resume on the next start."""
        self.stopping = True
        for waiting in tuple(self._waiting):
            settle(waiting)

    async def _settled_within(self, settled: asyncio.Future[None], timeout: float) -> None:
        """Until `settled` is settled, `timeout` runs out, or shutdown begins (at once if it has)."""
        if self.stopping:
            return
        self._waiting.add(settled)
        disarm = self._deadlines.arm(settled, timeout)
        try:
            await settled
        finally:
            disarm()
            self._waiting.discard(settled)

    async def check_ready(self) -> None:
        """Raise NotReady, BackendUnavailable or ModelUnavailable unless new predictions would be accepted
        now: every model is loaded (a failed one is named), the store answers, some model is served by a
        worker (redis) and some model's queue has room."""
        if self.stopping:
            raise NotReady("the service is shutting down")
        for deployment in self.models:
            deployment.check_ready(public=True)
        if isinstance(self.store, Checks):
            await self.store.check()
        # No model is served by any worker (redis): nothing would be taken. One among several is its own 503.
        unavailable = [d for d in self.models if d.unavailable is not None]
        if unavailable and len(unavailable) == len(self.models):
            only = len(unavailable) == 1
            raise unavailable[0].unavailable_error(None if only else "no worker serves any of this process's models")
        full = [d for d in self.models if await d.queue.depth() >= d.queue.maxsize]
        if len(full) == len(self.models):
            raise NotReady("the queue is full" if len(full) == 1 else "every model's queue is full")

    def model(self, name: str | None = None, version: str | None = None) -> Deployment:
        """The model version a request names (None: the default). Raises ModelNotFound."""
        return self.models.find(name, version)

    def _webhook(self, request: WebhookRequest | None) -> Webhook | None:
        """The webhook a new prediction carries, if the service may send it. Raises InvalidWebhook."""
        if request is None:
            return None
        if not self.settings.webhook_secrets:
            raise InvalidWebhook("this service sends no webhooks: it was started without --webhook-secret")
        self._webhook_policy.check(request.url)
        return Webhook(request.url, request.events)

    async def submit(
        self,
        value: Any,
        *,
        model: str | None = None,
        version: str | None = None,
        idempotency_key: str | None = None,
        webhook: WebhookRequest | None = None,
        protocol: str | None = None,
        parameters: Any = None,
        stream: bool = False,
    ) -> Prediction:
        """Validate, store and enqueue one prediction of a model (None: the default). Raises
        ModelNotFound, InvalidInput, InvalidWebhook, StreamNotSupported, NotReady or QueueFull.

        With `stream` the model's predict_stream runs it: its result is the list of chunks so far, pushed
        to watchers as they come (`watch`'s `on_stream`).

        With an idempotency key already used for the same model, input and webhook, returns that
        prediction as it is now (and runs nothing); with a different one, raises IdempotencyConflict.

        With `protocol="oip"` the value is an oip.InferRequest: one prediction of all its rows, whose
        result is the OIP response (InvalidInferenceRequest if it does not fit the model's tensors).

        `parameters` are the request's `priority` and `timeout` (queue_policy.py; an OIP request's own
        parameters are used).
        """
        deployment = self.models.find(model, version)
        prediction, _ = await self._submit(
            deployment, value, idempotency_key, None, webhook=webhook, protocol=protocol, parameters=parameters,
            stream=stream,
        )  # fmt: skip
        return prediction

    async def run(
        self,
        value: Any,
        *,
        model: str | None = None,
        version: str | None = None,
        idempotency_key: str | None = None,
        protocol: str | None = None,
        parameters: Any = None,
        timeout: float,
        webhook: WebhookRequest | None = None,
        stream: bool = False,
    ) -> Prediction:
        """Submit, then wait: the prediction once terminal, or as it stands when `timeout` runs out.

        It listens before the prediction is queued, so no change can slip past and nothing is read back.
        """
        settled = asyncio.get_running_loop().create_future()
        changes: list[Prediction] = []

        def on_change(prediction: Prediction) -> None:
            changes.append(prediction)
            if prediction.status.terminal:
                settle(settled)

        # Without a key the record may stay in this process until it is finished and be written once
        # then: if the process dies first, the client gets no answer (and retries), not a lost 202. With a
        # key it is stored first, so that concurrent and later retries find it.
        deployment = self.models.find(model, version)
        prediction, new = await self._submit(
            deployment,
            value,
            idempotency_key,
            on_change,
            defer=idempotency_key is None and not stream,  # a stream's chunks are committed as it runs
            webhook=webhook,
            protocol=protocol,
            parameters=parameters,
            stream=stream,
        )
        if not new:
            return await self.wait(prediction.prediction_id, timeout)  # an earlier prediction: follow it
        try:
            await self._settled_within(settled, timeout)
        finally:
            self.bus.unsubscribe(prediction.prediction_id, on_change)
        for change in changes:
            if change.status.rank >= prediction.status.rank:  # never backwards (a takeover restarts it)
                prediction = change
        if not prediction.status.terminal and self._defers is not None:
            await self._defers.persist(prediction.prediction_id)  # a 202 follows: on disk before it
        return prediction

    async def _submit(
        self,
        deployment: Deployment,
        value: Any,
        idempotency_key: str | None,
        listener: Listener | None,
        *,
        defer: bool = False,
        webhook: WebhookRequest | None = None,
        protocol: str | None = None,
        parameters: Any = None,
        stream: bool = False,
    ) -> tuple[Prediction, bool]:
        """The prediction, and False if it is an earlier one with the same idempotency key.

        `listener` hears every change of a new prediction from before it is queued; the caller unsubscribes.
        """
        if protocol == oip.PROTOCOL:
            parameters = value.parameters
            value = self._oip_input(deployment, value)
        else:
            deployment.validate(value)
        if stream and not deployment.streams:
            raise StreamNotSupported(
                f"model {deployment.name} version {deployment.version} has no predict_stream: leave out `stream`"
            )
        if stream and protocol == oip.PROTOCOL:
            raise StreamNotSupported("an Open Inference Protocol request does not stream")
        admission = deployment.policy.admit(parameters)
        hook = self._webhook(webhook)
        if self.stopping:
            raise NotReady("the service is shutting down")
        deployment.check_ready()
        deployment.check_served()
        queue = deployment.queue
        if await queue.depth() >= queue.maxsize:
            raise QueueFull()  # checked first too, so a full queue costs no store write
        prediction = Prediction.new(
            value,
            model_name=deployment.name,
            model_version=deployment.version,
            webhook=hook,
            protocol=protocol,
            priority=admission.priority,
            deadline=admission.deadline,
            stream=stream,
        )
        pid = prediction.prediction_id
        key = None
        if idempotency_key is not None:
            # The model is part of what the key names: the same key and input for another model conflicts.
            # The default model's fingerprint is of the input alone, as when one model was all there was,
            # so a retry across an upgrade still finds its prediction. A webhook is part of the body too.
            named = value if deployment.is_default else [deployment.name, deployment.version, value]
            if stream:
                named = {"stream": named}  # the same input streamed or not is not the same request
            if hook is not None:
                named = {"input": named, "webhook": [hook.url, *hook.events]}
            canonical = json.dumps(named, sort_keys=True, separators=(",", ":"))
            key = IdempotencyKey(idempotency_key, hashlib.sha256(canonical.encode()).hexdigest())
        if listener is not None:
            self.bus.subscribe(pid, listener)
        queued = False
        deployment.submit_begins()
        try:
            if defer and self._defers is not None:  # only ever without a key
                stored = await self._defers.add_deferred(prediction)
            else:
                stored = await self.store.add(prediction, key)
            if stored.prediction_id != pid:
                return stored, False
            try:
                await queue.put(make_job(pid, priority=admission.priority))
            except QueueFull:
                # Filled up while the record was being stored: take it back, so a 503 leaves nothing behind.
                await self.store.delete(pid)
                raise QueueFull() from None
            queued = True
        finally:
            deployment.submit_ends()
            if listener is not None and not queued:
                self.bus.unsubscribe(pid, listener)  # nothing of ours to hear
        logs.state_changes([prediction])
        return prediction, True

    @staticmethod
    def _oip_input(deployment: Deployment, request: oip.InferRequest) -> Any:
        """An OIP request as a prediction input: its rows, each checked against the model's schema."""
        deployment.check_ready()  # its tensors are known once it is
        description = deployment.description
        assert description is not None
        value = oip.to_input(
            request, description.tensors, description.input_schema, max_rows=deployment.settings.max_batch_size
        )
        for row in oip.rows_of(value):
            deployment.validate(row)
        return value

    async def get(self, prediction_id: str) -> Prediction:
        prediction = await self.store.get(prediction_id) if is_prediction_id(prediction_id) else None
        if prediction is None:
            raise NotFound(f"no prediction {prediction_id}")
        return prediction

    async def queue_depths(self) -> dict[Deployment, int]:
        """Predictions waiting to start (here, or in the shared queue), per model version."""
        return {d: await d.queue.depth() for d in self.models}

    async def recover(self) -> int:
        """Queue again what a previous process accepted but did not finish, each to its model version's
        queue; returns how many. One whose model version is no longer served ends failed
        (`model_not_found`) rather than waiting for a model that will not come."""
        if not isinstance(self.store, Recovers):
            return 0  # nothing outlives the process here, or the shared queue hands lost work over itself
        requeue, failed = await self.store.recover(self.settings.max_attempts)
        orphans = []
        for prediction in requeue:
            deployment = self.models.get(prediction.model_name, prediction.model_version)
            if deployment is None:
                orphans.append(prediction)
            else:
                await deployment.queue.put(Job(prediction.prediction_id, priority=prediction.priority), force=True)
        if orphans:
            failed += await self._fail_orphans(orphans)
        logs.state_changes(failed)
        await self.bus.publish(failed)
        return len(requeue) - len(orphans)

    async def _fail_orphans(self, orphans: list[Prediction]) -> list[Prediction]:
        log.warning(
            "%d unfinished predictions are of models no longer served (%s): they end failed",
            len(orphans),
            ", ".join(sorted({f"{p.model_name} version {p.model_version}" for p in orphans})),
        )
        # Straight from queued: they never ran. One found running (its process died) was requeued by recover.
        return await self.store.fail_queued(
            [
                Outcome(
                    p.prediction_id,
                    error=ModelNotFound(
                        f"model {p.model_name} version {p.model_version} is no longer served"
                    ).to_dict(),
                )
                for p in orphans
            ]
        )

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

        watch = await self.watch(prediction_id, deliver)
        try:
            await self._settled_within(settled, timeout)
        finally:
            watch.stop()
        return latest[-1]

    async def watch(
        self,
        prediction_id: str,
        deliver: Callable[[Prediction, bool], None],
        on_stream: Callable[[StreamEvent], None] | None = None,
        from_index: int | None = None,
    ) -> Watch:
        """Follow one prediction: `deliver(state, is_snapshot)` gets its current state at once, then each
        later one exactly once, in order, ending with the terminal one. Raises NotFound for an unknown id.
        Call `stop()` on the watch to stop early.

        With `on_stream`, a stream's chunks after the snapshot's (or, with `from_index` k, from k + 1) and
        its progress go there, each chunk once and in order, all before the terminal state."""
        watch = Watch(self.bus, prediction_id, deliver, on_stream=on_stream, from_index=from_index)
        snapshot = await watch.start(self.read_live)
        if snapshot is None:
            raise NotFound(f"no prediction {prediction_id}")
        if on_stream is not None and not watch.closed and watch.rank == 0:
            await self._follow_position(watch, snapshot, on_stream)
        return watch

    async def _follow_position(
        self, watch: Watch, snapshot: Prediction, on_stream: Callable[[StreamEvent], None]
    ) -> None:
        """A queued prediction's watcher hears its position at once, then on each change (at most once a
        second), until it starts; where the queue can tell (memory and SQLite, Redis)."""
        deployment = self.models.get(snapshot.model_name, snapshot.model_version)
        if deployment is None or not self.positions.tells(deployment.queue):
            return
        pid = snapshot.prediction_id

        def tell(position: int, estimate: float | None) -> bool:
            if watch.closed or watch.rank != 0:
                return False
            on_stream(StreamEvent(pid, QUEUE, position, chunk=estimate))
            return True

        try:
            now = await self.positions.position(deployment.queue, pid)
        except ZypherError as exc:
            log.info("could not read the queue position of %s: %s", pid, exc.message)
            now = None
        if watch.closed or (now is not None and not tell(*now)):
            return
        queue = deployment.queue
        self.positions.watch(queue, pid, tell, told=now[0] if now is not None else None)
        # The position watcher goes with the watch (socket closed, unsubscribed, terminal), not later.
        watch.on_stop(lambda: self.positions.unwatch(queue, pid, tell))

    async def shown(self, prediction: Prediction) -> dict[str, Any]:
        """The public record, with its place in line while it is queued (where the queue can tell)."""
        record = prediction.to_dict()
        if prediction.status is Status.QUEUED:
            deployment = self.models.get(prediction.model_name, prediction.model_version)
            if deployment is not None:
                try:
                    found = await self.positions.position(deployment.queue, prediction.prediction_id)
                except ZypherError:
                    found = None  # the record without it, rather than no record
                if found is not None:
                    record["queue_position"] = found[0]
                    record["estimated_start_at"] = rfc3339(found[1])
        return record

    async def read_live(self, prediction_id: str) -> Prediction | None:
        """The record, and of a running stream also the chunks pushed here and not committed yet."""
        prediction = await self.store.get(prediction_id)
        if prediction is None or not prediction.stream or prediction.status.terminal:
            return prediction
        start, tail = self.bus.uncommitted(prediction_id)  # no await since the read: as of the same moment
        have = list(prediction.result or ())
        if tail and start <= len(have) < start + len(tail):
            return prediction.streamed(have + tail[len(have) - start :], prediction.progress)
        return prediction

    async def sweep_forever(self, clock: Callable[[], float] = time.time) -> None:
        """Delete expired results now and then (a tenth of the TTL, at most a minute apart), where the
        store does not expire them itself."""
        if not isinstance(self.store, Sweeps):
            return
        while True:
            try:
                if removed := await self.store.sweep(clock()):
                    log.info("deleted %d expired predictions", removed)
            except Exception:
                log.exception("retention sweep failed; trying again later")
            await asyncio.sleep(min(max(self.settings.result_ttl / 10, 0.05), 60.0))
