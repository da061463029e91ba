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
from .records import Chunk, Prediction, Progress, Status
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

Item = Prediction | Chunk | Progress | BaseException | Poll


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


class StreamWatcher(Watcher):
    """A stream of one prediction: its states (a queued one again whenever its queue position moves), its
    progress reports, and each output chunk exactly once, in index order.

    It takes a chunk only if it is the next index, so the same chunk arriving twice (in a snapshot after a
    reconnect and in a replayed `output` message) goes out once; the socket asks again for what is missing.
    """

    def __init__(self, prediction_id: str, from_index: int = -1) -> None:
        # Below -1 no chunk would ever be the next one: the stream would end without yielding any.
        if isinstance(from_index, bool) or not isinstance(from_index, int) or from_index < -1:
            raise ValueError(f"from_index is the index of the last chunk you have (-1: none), not {from_index!r}")
        super().__init__([prediction_id])
        self.prediction_id = prediction_id
        self.next_index = from_index + 1  # the chunk it takes next
        self._position: int | None = None

    def offer(self, prediction: Prediction) -> bool:
        """Take the chunks this state carries that are new, and the state itself if it is new: the
        chunks before a terminal state, after any other. True if it took either (polling backs off only
        while nothing is new, and a stream's record brings new chunks far more often than new states)."""
        if prediction.prediction_id != self.prediction_id or not self.remaining:
            return False
        rank, last = prediction.status.rank, self._last_rank.get(self.prediction_id, -1)
        # A place not told (a snapshot's: the `queue` message after it tells) is no move.
        position = prediction.queue_position
        moved = rank == last and not prediction.terminal and position is not None and position != self._position
        taken = rank > last or moved
        if taken and not prediction.terminal:
            self._take_state(prediction)
        chunks = prediction.result if isinstance(prediction.result, list) and rank > 0 else []
        took = [self.offer_chunk(index, chunks[index]) for index in range(self.next_index, len(chunks))]
        if taken and prediction.terminal:
            self._take_state(prediction)
            self.remaining.clear()
        return taken or any(took)

    def _take_state(self, prediction: Prediction) -> None:
        self._last_rank[self.prediction_id] = prediction.status.rank
        self._position = prediction.queue_position
        self.queue.put_nowait(prediction)

    def offer_chunk(self, index: int, value: Any) -> bool:
        """Take chunk `index` if it is the next one; False for a repeat or one past a gap."""
        if index != self.next_index or not self.remaining:
            return False
        self.next_index += 1
        self.queue.put_nowait(Chunk(self.prediction_id, index, value))
        return True

    def offer_progress(self, progress: Progress) -> None:
        if self.remaining:
            self.queue.put_nowait(progress)


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
        *,
        streaming: bool = False,
    ) -> None:
        self._session = session
        self._url = url
        self._protocols, self._auth_token = ws_protocols(token)
        self._policy = policy
        self._clock = clock
        self._sleep = sleep
        self._watchers: dict[str, set[Watcher]] = {}
        self._latest: dict[str, Prediction] = {}  # the last state this socket saw of each watched id
        # A socket of streams keeps each watched id's chunks so far: a second stream of the same id starts
        # from them, and a resubscribe asks only for what comes after (`from_index`).
        self._streaming = streaming
        self._chunks: dict[str, list[Any]] = {}
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
                if isinstance(watcher, StreamWatcher):
                    for index, value in enumerate(self._chunks.get(pid, ())):
                        watcher.offer_chunk(index, value)
            if self._streaming:
                self._chunks.setdefault(pid, [])
        if self.unavailable:
            watcher.tell(POLL)
        elif self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="zypher-client-ws")
        elif self._ws is not None and new:
            # Sent behind whatever is on its way already: a watcher of these ids that just left has its
            # unsubscribe in a task of its own, and a subscribe sent first would be ignored by the server
            # (it still watches them) and then undone by that unsubscribe. Tasks start in the order they
            # were made and take the send lock first thing, so the sends go in that order too.
            self._spawn(self._subscribe(self._ws, new))
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
                self._chunks.pop(pid, None)
                dropped.append(pid)
        ws = self._ws
        if dropped and ws is not None and not ws.closed:
            self._spawn(self._send(ws, {"op": "unsubscribe", "prediction_ids": dropped}))

    def _tell_all(self, item: BaseException | Poll) -> None:
        for watcher in {w for watchers in self._watchers.values() for w in watchers}:
            watcher.tell(item)
        self._watchers.clear()
        self._latest.clear()
        self._chunks.clear()

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
        resumed = [pid for pid in ids if self._chunks.get(pid)]
        for pid in resumed:  # chunks up to this index are here already: the server replays the rest
            await self._send(ws, {"op": "subscribe", "prediction_id": pid, "from_index": len(self._chunks[pid]) - 1})
        if resumed:
            ids = [pid for pid in ids if not self._chunks.get(pid)]
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
        elif kind == "output" and self._streaming:
            self._output(message)
        elif kind == "progress" and self._streaming:
            self._progress(message)
        elif kind == "queue" and self._streaming:
            self._queue(message)
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
        chunks = self._chunks.get(pid)
        if chunks is not None and isinstance(prediction.result, list) and prediction.status.rank > 0:
            chunks.extend(prediction.result[len(chunks) :])
        for watcher in tuple(watchers):
            watcher.offer(prediction)
        if prediction.terminal:  # the server's watch has ended too
            del self._watchers[pid]
            self._latest.pop(pid, None)
            self._chunks.pop(pid, None)

    def _output(self, message: dict[str, Any]) -> None:
        pid, index = message.get("prediction_id"), message.get("index")
        if not isinstance(pid, str) or not isinstance(index, int) or "chunk" not in message:
            log.warning("ignoring an output message without prediction_id, index and chunk")
            return
        chunks = self._chunks.get(pid)
        if chunks is None or index < len(chunks):
            return  # not watched, or a chunk we have (a snapshot carried it)
        if index > len(chunks):
            # A gap (not what the server promises, but cheap to mend): ask again from the last one we have
            # (unsubscribing first, since subscribing to an id already watched changes nothing).
            ws = self._ws
            if ws is not None:
                resume: dict[str, Any] = {"op": "subscribe", "prediction_id": pid}
                if chunks:
                    resume["from_index"] = len(chunks) - 1
                self._spawn(self._resubscribe(ws, pid, resume))
            return
        chunks.append(message["chunk"])
        for watcher in tuple(self._watchers.get(pid, ())):
            if isinstance(watcher, StreamWatcher):
                watcher.offer_chunk(index, message["chunk"])

    def _queue(self, message: dict[str, Any]) -> None:
        """A queued prediction's new place in line: its last state again, with that place."""
        pid = message.get("prediction_id")
        latest = self._latest.get(pid) if isinstance(pid, str) else None
        if latest is None or latest.status is not Status.QUEUED:
            return
        moved = latest.moved_in_line(message)
        self._latest[latest.prediction_id] = moved
        for watcher in tuple(self._watchers.get(latest.prediction_id, ())):
            watcher.offer(moved)

    async def _resubscribe(self, ws: aiohttp.ClientWebSocketResponse[bool], pid: str, resume: dict[str, Any]) -> None:
        await self._send(ws, {"op": "unsubscribe", "prediction_id": pid})
        await self._send(ws, resume)

    def _progress(self, message: dict[str, Any]) -> None:
        pid = message.get("prediction_id")
        if not isinstance(pid, str):
            return
        progress = Progress.from_dict(pid, message)
        if progress is None:
            return
        for watcher in tuple(self._watchers.get(pid, ())):
            if isinstance(watcher, StreamWatcher):
                watcher.offer_progress(progress)

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
        self._chunks.pop(str(pid), None)  # the watchers go: so does what was kept for them
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
