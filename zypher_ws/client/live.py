"""One shared WebSocket for every watch and wait of a client, over any number of prediction ids.

It connects when something is watched, subscribes every watched id, and hands each state to the
watchers of its id. When the connection drops it reconnects with backoff and subscribes again; the
server's `subscribed` snapshot then carries whatever happened meanwhile. Each watcher keeps the rank of
the last state it was given per id and takes only later ones, as the server's own watches do, so a
reconnect never repeats a state and a terminal state comes exactly once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Callable, Iterable
from typing import Any

import aiohttp
from yarl import URL

from .errors import ApiError, ConnectionFailed, Unauthorized, ZypherClientError, api_error
from .records import Prediction
from .retry import Backoff, Clock, RetryPolicy, Sleep, parse_retry_after

log = logging.getLogger(__name__)

WS_PROTOCOL = "zypher"
TOKEN_PROTOCOL_PREFIX = "bearer."  # Sec-WebSocket-Protocol: zypher, bearer.<token>
SUBSCRIBE_CHUNK = 500  # ids per subscribe message: 500 ids are ~18 KB, well under the server's 64 KiB frames
HEARTBEAT = 30.0  # seconds between our pings: a server gone without a close is noticed
POLICY_VIOLATION = 1008  # the server's close for a missing or wrong token
_TOKEN_CHARS = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")  # what may stand in a protocol name (RFC 9110 token)


class Poll:
    """Told to a watcher when WebSocket is unavailable (the upgrade was refused): poll instead."""


POLL = Poll()

Item = Prediction | BaseException | Poll


class Watcher:
    """One watch: its ids, the rank of the last state it took per id, and what it has yet to yield."""

    def __init__(self, ids: list[str]) -> None:
        self.ids = ids
        self.remaining = set(ids)  # not terminal yet, as far as it has been told
        self.queue: asyncio.Queue[Item] = asyncio.Queue()
        self._last_rank: dict[str, int] = {}

    def offer(self, prediction: Prediction) -> bool:
        """Take this state if it is past the last one of its id; True if taken."""
        pid = prediction.prediction_id
        if pid not in self.remaining or prediction.status.rank <= self._last_rank.get(pid, -1):
            return False
        self._last_rank[pid] = prediction.status.rank
        if prediction.terminal:
            self.remaining.discard(pid)
        self.queue.put_nowait(prediction)
        return True

    def tell(self, item: BaseException | Poll) -> None:
        self.queue.put_nowait(item)


def ws_protocols(token: str | None) -> tuple[tuple[str, ...], str | None]:
    """The subprotocols to offer, and the token to send as the first message instead (one that cannot
    stand in a protocol name). Either way the token never goes in the URL."""
    if token is None:
        return (WS_PROTOCOL,), None
    if _TOKEN_CHARS.match(token):
        return (WS_PROTOCOL, TOKEN_PROTOCOL_PREFIX + token), None
    return (WS_PROTOCOL,), token


class LiveSocket:
    def __init__(
        self,
        session: Callable[[], aiohttp.ClientSession],
        url: URL,
        token: str | None,
        policy: RetryPolicy,
        clock: Clock,
        sleep: Sleep,
    ) -> None:
        self._session = session
        self._url = url
        self._protocols, self._auth_token = ws_protocols(token)
        self._policy = policy
        self._clock = clock
        self._sleep = sleep
        self._watchers: dict[str, set[Watcher]] = {}
        self._latest: dict[str, Prediction] = {}  # the last state this socket saw of each watched id
        self._ws: aiohttp.ClientWebSocketResponse[bool] | None = None
        self._send_lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._closed = False
        self.unavailable = False  # the server (or a proxy) refused the upgrade: watchers poll
        self.connects = 0  # sockets opened, for tests and logs

    # -- watchers ---------------------------------------------------------------------------------

    async def add(self, watcher: Watcher) -> None:
        if self._closed:
            raise ZypherClientError("the client is closed")
        new = [pid for pid in watcher.ids if pid not in self._watchers]
        for pid in watcher.ids:
            self._watchers.setdefault(pid, set()).add(watcher)
            latest = self._latest.get(pid)
            if latest is not None:  # already subscribed by another watcher: its snapshot went to them
                watcher.offer(latest)
        if self.unavailable:
            watcher.tell(POLL)
        elif self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="zypher-client-ws")
        elif self._ws is not None and new:
            await self._subscribe(self._ws, new)
        # else: connecting; the subscribe on connect includes these ids

    def remove(self, watcher: Watcher) -> None:
        dropped = []
        for pid in watcher.ids:
            watchers = self._watchers.get(pid)
            if watchers is None:
                continue
            watchers.discard(watcher)
            if not watchers:
                del self._watchers[pid]
                self._latest.pop(pid, None)
                dropped.append(pid)
        ws = self._ws
        if dropped and ws is not None and not ws.closed:
            self._spawn(self._send(ws, {"op": "unsubscribe", "prediction_ids": dropped}))

    def _tell_all(self, item: BaseException | Poll) -> None:
        for watcher in {w for watchers in self._watchers.values() for w in watchers}:
            watcher.tell(item)
        self._watchers.clear()
        self._latest.clear()

    # -- the connection -------------------------------------------------------------------------------

    async def _run(self) -> None:
        backoff = self._policy.backoff(self._clock)
        while self._watchers and not self._closed:
            try:
                ws = await self._session().ws_connect(self._url, protocols=self._protocols, heartbeat=HEARTBEAT)
            except aiohttp.WSServerHandshakeError as exc:
                if exc.status == 401:
                    self._tell_all(Unauthorized(exc.message or "unauthorized", status=401))
                    return
                if exc.status in (429, 503):  # too many sockets, or not now: later
                    retry_after = parse_retry_after(exc.headers.get("Retry-After") if exc.headers else None)
                    if not await self._pause(backoff, retry_after, exc):
                        return
                    continue
                # 404 and the like: no WebSocket here (a proxy that does not pass upgrades, say).
                log.info("WebSocket unavailable at %s (HTTP %s): polling instead", self._url, exc.status)
                self.unavailable = True
                self._tell_all(POLL)
                return
            except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
                if not await self._pause(backoff, None, exc):
                    return
                continue
            self.connects += 1
            try:
                close_code, answered = await self._converse(ws)
            finally:
                self._ws = None
                await ws.close()
            if answered:
                backoff.reset()  # an outage starts now: it gets the whole retry time
            if close_code == POLICY_VIOLATION:
                self._tell_all(Unauthorized("the server closed the WebSocket: missing or wrong token"))
                return
            if self._watchers and not await self._pause(backoff, None, None):
                return

    async def _pause(self, backoff: Backoff, retry_after: float | None, cause: BaseException | None) -> bool:
        """Wait before reconnecting; False (and every watcher told) once the retry time has run out."""
        delay = backoff.delay(retry_after)
        if delay is None:
            failure = ConnectionFailed(f"no WebSocket to {self._url} for {self._policy.total:g} s: {cause}")
            self._tell_all(failure)
            return False
        await self._sleep(delay)
        return True

    async def _converse(self, ws: aiohttp.ClientWebSocketResponse[bool]) -> tuple[int | None, bool]:
        """Subscribe and hand out what arrives until the socket closes: its close code, and whether the
        server said anything (a socket closed at once, again and again, runs out the retry time)."""
        if self._auth_token is not None:
            await ws.send_str(json.dumps({"op": "auth", "token": self._auth_token}))
        self._ws = ws
        subscribing = asyncio.create_task(self._subscribe(ws, list(self._watchers)))
        answered = False
        try:
            async for msg in ws:
                if msg.type is aiohttp.WSMsgType.TEXT:
                    answered = True
                    self._handle(msg.data)
                elif msg.type is aiohttp.WSMsgType.ERROR:
                    break
        finally:
            subscribing.cancel()
            await asyncio.gather(subscribing, return_exceptions=True)
        return ws.close_code, answered

    async def _subscribe(self, ws: aiohttp.ClientWebSocketResponse[bool], ids: list[str]) -> None:
        for start in range(0, len(ids), SUBSCRIBE_CHUNK):
            await self._send(ws, {"op": "subscribe", "prediction_ids": ids[start : start + SUBSCRIBE_CHUNK]})

    async def _send(self, ws: aiohttp.ClientWebSocketResponse[bool], message: dict[str, Any]) -> None:
        async with self._send_lock:
            try:
                await ws.send_str(json.dumps(message))
            except (ConnectionError, RuntimeError, aiohttp.ClientError):
                pass  # the socket is going: the reconnect subscribes again

    def _handle(self, raw: str) -> None:
        try:
            message = json.loads(raw)
            kind = message["type"]
        except (ValueError, TypeError, KeyError):
            log.warning("ignoring a WebSocket message that is not one: %.200s", raw)
            return
        if kind in ("subscribed", "update", "accepted"):
            try:
                prediction = Prediction.from_dict(message.get("prediction"))
            except ZypherClientError as exc:
                log.warning("ignoring a WebSocket record: %s", exc)
                return
            self._deliver(prediction)
        elif kind == "error":
            self._error(message)
        # pong, authenticated, shutdown (a close follows, and then the reconnect): nothing to do

    def _deliver(self, prediction: Prediction) -> None:
        pid = prediction.prediction_id
        watchers = self._watchers.get(pid)
        if not watchers:
            return  # unsubscribed meanwhile
        latest = self._latest.get(pid)
        if latest is None or prediction.status.rank >= latest.status.rank:
            self._latest[pid] = prediction
        for watcher in tuple(watchers):
            watcher.offer(prediction)
        if prediction.terminal:  # the server's watch has ended too
            del self._watchers[pid]
            self._latest.pop(pid, None)

    def _error(self, message: dict[str, Any]) -> None:
        error = message.get("error")
        error = error if isinstance(error, dict) else {}
        pid = message.get("prediction_id")
        exc: ApiError = api_error(
            error.get("code") if isinstance(error.get("code"), str) else None,
            str(error.get("message", "error")),
            prediction_id=pid if isinstance(pid, str) else None,
        )
        watchers = self._watchers.pop(pid, None) if isinstance(pid, str) else None
        if not watchers:
            log.warning("WebSocket error: %s", exc)
            return
        self._latest.pop(str(pid), None)
        for watcher in watchers:
            watcher.tell(exc)

    # -- the end -------------------------------------------------------------------------------------

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def close(self) -> None:
        self._closed = True
        self._tell_all(ZypherClientError("the client is closed"))
        ws = self._ws
        if ws is not None:
            await ws.close()
        tasks = [t for t in (self._task, *self._background) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def unique(ids: Iterable[str]) -> list[str]:
    """The ids in their first order, each once."""
    return list(dict.fromkeys(ids))
