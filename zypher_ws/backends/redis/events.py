"""Status changes across processes: published on one Redis pub/sub channel, dispatched locally.

Pub/sub drops what is sent while a subscriber is disconnected, so after every (re)subscribe the bus
reads the current record of each prediction watched here and dispatches it. `Watch` drops states it
has already delivered, so a watcher still sees exactly one terminal state.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import redis.asyncio as aioredis

from ...errors import BackendUnavailable
from ...json_codec import dumps
from ...records import Prediction, StreamEvent
from ..base import Listener, StreamListener
from ..memory import LocalEventBus
from .keys import RedisKeys
from .store import UNAVAILABLE, translate_errors

log = logging.getLogger(__name__)

RECONNECT_DELAY = 0.5
LISTEN_TURN = 1.0  # longest one read of the channel waits, so a stop is heard within a second

ReadMany = Callable[[Sequence[str]], Awaitable[list[Prediction]]]


class RedisEventBus:
    def __init__(self, client: aioredis.Redis, keys: RedisKeys, read_many: ReadMany) -> None:
        self._redis = client
        self._channel = keys.events
        self._read_many = read_many
        self._local = LocalEventBus()
        self._connected = False  # while the channel subscription is live (to log a loss once)
        # listen() ends on this flag as well as on a cancel: redis-py can lose the cancel of a command in
        # flight (queue.py says how), and a listener that ended only on a cancel held up shutdown for ever.
        self._stopping = False

    def listener_count(self) -> int:
        return self._local.listener_count()

    @translate_errors
    async def publish(self, predictions: list[Prediction]) -> None:
        if predictions:
            await self._redis.publish(self._channel, dumps([p.to_row() for p in predictions]))

    @translate_errors
    async def publish_stream(self, events: list[StreamEvent]) -> None:
        # The same channel as status changes, so one prediction's chunks and its end arrive in order. An
        # object, where status changes are an array.
        if events:
            await self._redis.publish(self._channel, dumps({"stream": [e.to_row() for e in events]}))

    def subscribe_stream(self, prediction_id: str, listener: StreamListener) -> None:
        self._local.subscribe_stream(prediction_id, listener)

    def unsubscribe_stream(self, prediction_id: str, listener: StreamListener) -> None:
        self._local.unsubscribe_stream(prediction_id, listener)

    def uncommitted(self, prediction_id: str) -> tuple[int, list[Any]]:
        return self._local.uncommitted(prediction_id)

    def subscribe(self, prediction_id: str, listener: Listener) -> None:
        self._local.subscribe(prediction_id, listener)

    def unsubscribe(self, prediction_id: str, listener: Listener) -> None:
        self._local.unsubscribe(prediction_id, listener)

    def stop(self) -> None:
        """End listen() within one read of the channel (LISTEN_TURN)."""
        self._stopping = True

    async def listen(self) -> None:
        """Run until stopped (or cancelled): feed local listeners from the channel, resubscribing after
        Redis failures."""
        while not self._stopping:
            try:
                async with self._redis.pubsub() as pubsub:
                    await pubsub.subscribe(self._channel)
                    while not self._stopping:
                        # Bounded reads, not pubsub.listen()'s endless one, so the flag is seen.
                        message = await pubsub.get_message(timeout=LISTEN_TURN)
                        if message is None:
                            continue
                        if message["type"] == "subscribe":
                            self._connected = True
                            await self._catch_up()
                        elif message["type"] == "message":
                            rows = json.loads(message["data"])
                            if isinstance(rows, dict):
                                self._local.dispatch_stream([StreamEvent.from_row(row) for row in rows["stream"]])
                            else:
                                self._local.dispatch([Prediction.from_row(row) for row in rows])
            except (*UNAVAILABLE, BackendUnavailable) as exc:
                if self._connected:
                    log.warning("lost the Redis event channel (%s); reconnecting", exc)
                self._connected = False
                if not self._stopping:
                    await asyncio.sleep(RECONNECT_DELAY)

    async def _catch_up(self) -> None:
        """Dispatch the current state of everything watched here: it may have changed while we were away."""
        watched = self._local.watched_ids()
        if watched:
            self._local.dispatch(await self._read_many(watched))
