"""Live results: the WebSocket protocol (`GET /ws`) and Server-Sent Events for one prediction."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import Any

from aiohttp import WSCloseCode, WSMsgType, web

from ..errors import (
    InternalError,
    InvalidJSON,
    InvalidMessage,
    TooManySockets,
    TooManySubscriptions,
    UnknownOp,
    ZypherError,
)
from ..events import Watch
from ..json_codec import dumps, loads
from ..metrics import Metrics
from ..records import Prediction
from ..service import PredictionService
from ..settings import Settings
from ..webhooks.target import requested
from .access import WS_PROTOCOL, RateLimiter, check_origin, client_address, token_valid, websocket_token
from .envelopes import ws_error
from .keys import LIMITER, LIVE_CLIENTS, METRICS, SERVICE, SETTINGS, SOCKETS, STREAMS, WS_AUTHENTICATING

log = logging.getLogger(__name__)

SLOW_CLIENT_CLOSE = WSCloseCode.TRY_AGAIN_LATER  # 1013: the client fell behind its outbox
SLOW_CLIENT_GRACE = 10.0  # seconds a dropped client has to read its backlog and our 1013 before it is aborted
AUTH_TIMEOUT = 10.0  # seconds from the upgrade a socket has to authenticate when tokens are required
CLOSE_WAIT = 1.0  # seconds a client gets to answer our close frame at shutdown
DRAIN_TIMEOUT = 10.0  # seconds a subscribe waits for the client to read its outbox down to half
WRITE_BUFFER = 64 * 1024  # bytes aiohttp writes to a socket before it waits for the peer to take them


class _UpdateFrames:
    """The encoded `update` message of the state seen last.

    The bus hands one state to all its watchers in a row, so a prediction watched by N sockets (or
    event streams) is built and encoded once per state, not N times. One entry, swapped whole.
    """

    def __init__(self) -> None:
        self._last: tuple[Prediction | None, bytes] = (None, b"")

    def __call__(self, prediction: Prediction) -> bytes:
        last, frame = self._last
        if last is not prediction:
            frame = dumps(record_message("update", prediction))
            self._last = (prediction, frame)
        return frame


update_frame = _UpdateFrames()


def text_frame(payload: bytes) -> bytes:
    """A final, unmasked text frame (RFC 6455 section 5.2), as a server sends it uncompressed."""
    n = len(payload)
    if n < 126:
        return bytes((0x81, n)) + payload
    if n < 1 << 16:
        return b"\x81\x7e" + n.to_bytes(2, "big") + payload
    return b"\x81\x7f" + n.to_bytes(8, "big") + payload


def record_message(kind: str, prediction: Prediction) -> dict[str, Any]:
    """A message carrying a record: `subscribed`, `accepted` or `update` (WebSocket and SSE alike)."""
    return {"type": kind, "prediction": prediction.to_dict()}


class Outbox:
    """Encoded frames waiting for the socket, bounded in frames and in bytes.

    A frame that would pass either bound is refused, unless the outbox is empty: one record larger than
    the byte bound still goes out, alone.
    """

    def __init__(self, max_frames: int, max_bytes: int) -> None:
        self.max_frames = max_frames
        self.max_bytes = max_bytes
        self.size = 0  # bytes waiting
        self._frames: deque[bytes] = deque()
        self._filled = asyncio.Event()  # set while frames wait
        self._roomy = asyncio.Event()  # set while at most half full, or once closed
        self._roomy.set()

    def __len__(self) -> int:
        return len(self._frames)

    def put(self, frame: bytes) -> bool:
        """Queue `frame`; False (and nothing queued) when it would pass a bound."""
        if self._frames and (len(self._frames) >= self.max_frames or self.size + len(frame) > self.max_bytes):
            return False
        self._frames.append(frame)
        self.size += len(frame)
        self._filled.set()
        if not self.half_empty():
            self._roomy.clear()
        return True

    async def get(self) -> bytes:
        while not self._frames:
            self._filled.clear()
            await self._filled.wait()
        frame = self._frames.popleft()
        self.size -= len(frame)
        if self.half_empty():
            self._roomy.set()
        return frame

    def half_empty(self) -> bool:
        return 2 * len(self._frames) <= self.max_frames and 2 * self.size <= self.max_bytes

    async def roomy(self) -> None:
        """Return once the outbox is at most half full, or closed."""
        await self._roomy.wait()

    def close(self) -> None:
        """Nothing will take frames any more: wake whoever waits for room."""
        self._roomy.set()


class WsSession:
    """One socket's subscriptions and its bounded outbox. Never awaits the client from an event."""

    def __init__(
        self,
        ws: web.WebSocketResponse,
        service: PredictionService,
        settings: Settings,
        metrics: Metrics,
        limiter: RateLimiter,
        client: str,
        transport: asyncio.Transport | None,
    ) -> None:
        self.ws = ws
        self._transport = transport  # the connection's, to abort a dropped client that does not read
        self.metrics = metrics
        self.limiter = limiter
        self.client = client
        self.service = service
        self.settings = settings
        self.watches: dict[str, Watch] = {}
        self.outbox = Outbox(settings.ws_outbox, settings.ws_outbox_bytes)
        self.dropped = False
        self._closing: asyncio.Task[None] | None = None
        self._sender = asyncio.create_task(self._send_loop())

    # -- outgoing ---------------------------------------------------------------------------------

    def send(self, message: dict[str, Any]) -> None:
        self.send_frame(dumps(message))

    def send_frame(self, frame: bytes) -> None:
        """Send one JSON text frame, already encoded: at once where it can go straight out (_write_now),
        else through the outbox."""
        if self.dropped or (not self.outbox and self._write_now(frame)):
            return
        if not self.outbox.put(frame):
            # The client is not reading. Drop it rather than buffer without bound or slow the workers.
            self.drop()

    def _write_now(self, frame: bytes) -> bool:
        """Write an uncompressed frame to the transport now, if nothing waits before it (the outbox is
        empty, and what the sender took from it aiohttp has written already) and the kernel has taken
        all the transport was given (a client that reads slowly is bounded and dropped as before). A prediction watched by 1,000 sockets is then 1,000 writes in one
        callback, not 1,000 sender tasks woken one after another (about three times as long).
        A socket that negotiated permessage-deflate keeps aiohttp's compressor, through the outbox."""
        transport = self._transport
        if (
            transport is None
            or self.ws.compress
            or self.ws.closed
            or transport.is_closing()
            or transport.get_write_buffer_size()  # a backlog: the outbox and aiohttp's flow control
        ):
            return False
        transport.write(text_frame(frame))
        return True

    def drop(self) -> None:
        if self.dropped:
            return
        self.dropped = True
        self.metrics.slow_clients.inc()
        self.stop_watches()
        self._sender.cancel()
        self._closing = asyncio.create_task(self._close(SLOW_CLIENT_CLOSE, b"too slow: outbox full"))

    async def _send_loop(self) -> None:
        try:
            while True:
                frame = await self.outbox.get()
                await self.ws.send_frame(frame, WSMsgType.TEXT)
        finally:
            self.outbox.close()

    async def make_room(self) -> None:
        """Before a snapshot, let the sender bring the outbox down to half: the bound is there to drop
        clients that do not read, not ones that ask for many snapshots at once (a store whose reads do
        not yield, like memory://, would otherwise fill the outbox before the sender runs). A client
        that does not read it down within DRAIN_TIMEOUT is dropped."""
        if self.outbox.half_empty() or self.dropped:
            return
        try:
            await asyncio.wait_for(self.outbox.roomy(), DRAIN_TIMEOUT)
        except asyncio.TimeoutError:
            self.drop()

    async def _close(self, code: int, message: bytes) -> None:
        """Close a dropped socket with `code`, or abort its connection: it is gone SLOW_CLIENT_GRACE seconds
        after the drop either way.

        The close frame goes out behind what the transport still holds for the client, so only a client
        that reads gets it. One that does not read never lets aiohttp's close() drain the transport, and a
        transport that cannot drain never closes (asyncio's close() flushes first), so the connection,
        its buffers, its slot under --ws-max-per-client and, while it waits in receive() with nothing to
        wake it (the heartbeat stops with the close), the handler would stay for ever. So a client that has
        not read up to the close frame within SLOW_CLIENT_GRACE has its connection aborted: what is still
        unsent is discarded and the socket closed, without a close code.
        """
        asyncio.get_running_loop().call_later(SLOW_CLIENT_GRACE, self._abort_unflushed)
        try:
            await asyncio.wait_for(self.ws.close(code=code, message=message), SLOW_CLIENT_GRACE)
        except (asyncio.TimeoutError, ConnectionError):
            pass

    def _abort_unflushed(self) -> None:
        """Abort the connection unless it has closed, or is closing with nothing left to write."""
        transport = self._transport
        if transport is not None and (transport.get_write_buffer_size() or not transport.is_closing()):
            transport.abort()

    async def close(self) -> None:
        self.stop_watches()
        self._sender.cancel()
        await asyncio.gather(self._sender, return_exceptions=True)

    # -- subscriptions ------------------------------------------------------------------------------

    def stop_watches(self) -> None:
        for watch in self.watches.values():
            watch.stop()
        self.watches.clear()

    async def watch(self, prediction_id: str, first: str = "subscribed", request_id: Any = None) -> None:
        """Subscribe this socket; the first message (the current state) is of type `first`.

        Raises NotFound or TooManySubscriptions. Watching an id twice changes nothing.
        """
        if prediction_id in self.watches:
            return
        self.check_room()
        await self.make_room()
        if self.dropped:
            return

        def deliver(prediction: Prediction, snapshot: bool) -> None:
            if prediction.status.terminal:
                self.watches.pop(prediction_id, None)
            if not snapshot:
                self.send_frame(update_frame(prediction))
                return
            message = record_message(first, prediction)
            if first == "accepted":
                message["request_id"] = request_id
            self.send(message)

        watch = await self.service.watch(prediction_id, deliver)
        if not watch.closed:  # a terminal snapshot ends the watch at once
            self.watches[prediction_id] = watch

    def check_room(self) -> None:
        if len(self.watches) >= self.settings.ws_max_subscriptions:
            raise TooManySubscriptions(f"at most {self.settings.ws_max_subscriptions} subscriptions per socket")

    async def subscribe(self, ids: list[str], request_id: Any = None) -> None:
        for pid in ids:
            if self.dropped:
                return
            try:
                await self.watch(pid)
            except ZypherError as exc:
                self.send(ws_error(exc, request_id, prediction_id=pid))
            except Exception:
                log.exception("unhandled error subscribing a WebSocket")
                self.send(ws_error(InternalError(), request_id, prediction_id=pid))

    def unwatch(self, prediction_id: str) -> None:
        watch = self.watches.pop(prediction_id, None)
        if watch is not None:
            watch.stop()

    # -- incoming -------------------------------------------------------------------------------

    async def handle(self, raw: str) -> None:
        try:
            message = loads(raw)
        except ValueError as exc:
            self.send(ws_error(InvalidJSON(f"message is not valid JSON: {exc}")))
            return
        if not isinstance(message, dict):
            self.send(ws_error(InvalidMessage("a message is a JSON object with an `op`")))
            return
        request_id = message.get("request_id")
        op = message.get("op")
        try:
            if op == "ping":
                self.send({"type": "pong"})
            elif op == "auth":
                self.send({"type": "authenticated"})  # already: the socket got this far
            elif op == "subscribe":
                await self.subscribe(_ids(message), request_id)
            elif op == "unsubscribe":
                for pid in _ids(message):
                    self.unwatch(pid)
            elif op == "predict":
                if "input" not in message:
                    raise InvalidMessage("`predict` needs an `input`")
                self.check_room()  # refuse before submitting: an accepted prediction must be watched
                self.limiter.check(self.client)
                model, version = _model_of(message)
                prediction = await self.service.submit(
                    message["input"],
                    model=model,
                    version=version,
                    webhook=requested(message),
                    parameters=message.get("parameters"),
                )
                await self.watch(prediction.prediction_id, first="accepted", request_id=request_id)
            else:
                raise UnknownOp(f"unknown op {op!r}: use subscribe, unsubscribe, predict, ping or auth")
        except ZypherError as exc:
            self.send(ws_error(exc, request_id))
        except Exception:  # ours: answered like the others, since nothing may escape the upgraded socket
            log.exception("unhandled error answering a WebSocket message")
            self.send(ws_error(InternalError(), request_id))


def _model_of(message: dict[str, Any]) -> tuple[str | None, str | None]:
    """`predict`'s optional `model` and `version` (None: the default model, its default version)."""
    found = []
    for key in ("model", "version"):
        value = message.get(key)
        if value is not None and not isinstance(value, str):
            raise InvalidMessage(f"`{key}` must be a string")
        found.append(value)
    return found[0], found[1]


def _ids(message: dict[str, Any]) -> list[str]:
    if "prediction_ids" in message:
        ids = message["prediction_ids"]
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise InvalidMessage("`prediction_ids` must be a list of strings")
        return ids
    pid = message.get("prediction_id")
    if not isinstance(pid, str):
        raise InvalidMessage("give `prediction_id` (a string) or `prediction_ids` (a list of strings)")
    return [pid]


async def websocket(request: web.Request) -> web.StreamResponse:
    settings, service = request.app[SETTINGS], request.app[SERVICE]
    check_origin(request, settings)  # 403 before any upgrade
    client = client_address(request)
    live_clients = request.app[LIVE_CLIENTS]
    ws = web.WebSocketResponse(
        timeout=CLOSE_WAIT,
        heartbeat=settings.ws_heartbeat or None,
        max_msg_size=settings.ws_max_message,
        protocols=(WS_PROTOCOL,),
        writer_limit=WRITE_BUFFER,
    )
    if not settings.api_tokens or token_valid(websocket_token(request), settings.api_tokens):
        with live_clients.hold(client):  # 429 before any upgrade
            await ws.prepare(request)
            await _serve_socket(request, ws, service, client)
        return ws
    # Only authenticated sockets count toward --ws-max-per-client, so sockets that never authenticate
    # cannot lock out the users of their address (all of them, behind a gateway): they have a cap of their own.
    with request.app[WS_AUTHENTICATING].hold(client):  # 429 before any upgrade
        await ws.prepare(request)
        if not await _authenticate(ws, settings):
            return ws
    try:
        live_clients.acquire(client)
    except TooManySockets:
        await ws.close(code=WSCloseCode.TRY_AGAIN_LATER, message=b"too many sockets from this address")
        return ws
    try:
        await ws.send_frame(dumps({"type": "authenticated"}), WSMsgType.TEXT)
        await _serve_socket(request, ws, service, client)
    finally:
        live_clients.release(client)
    return ws


async def _serve_socket(
    request: web.Request, ws: web.WebSocketResponse, service: PredictionService, client: str
) -> None:
    try:
        await _converse(request, ws, service, client)
    except Exception:  # past the upgrade, aiohttp would write an HTTP 500 into the socket: close it instead
        log.exception("unhandled error on a WebSocket")
        await ws.close(code=WSCloseCode.INTERNAL_ERROR, message=b"internal error")


async def _converse(request: web.Request, ws: web.WebSocketResponse, service: PredictionService, client: str) -> None:
    settings, sockets, metrics = request.app[SETTINGS], request.app[SOCKETS], request.app[METRICS]
    session = WsSession(ws, service, settings, metrics, request.app[LIMITER], client, request.transport)
    sockets.add(ws)
    metrics.websockets.inc()
    try:
        await session.subscribe(request.query.getall("prediction_id", []))
        async for msg in ws:
            if msg.type is WSMsgType.TEXT:
                await session.handle(msg.data)
            elif msg.type is WSMsgType.BINARY:
                session.send(ws_error(InvalidMessage("send JSON text frames, not binary")))
            if session.dropped:
                break
    finally:
        sockets.discard(ws)
        metrics.websockets.dec()
        await session.close()


async def _authenticate(ws: web.WebSocketResponse, settings: Settings) -> bool:
    """With tokens configured and none in the protocol header, the first message must be
    `{"op": "auth", "token": "..."}`, within AUTH_TIMEOUT seconds of the upgrade; otherwise the socket
    closes with 1008. The deadline is absolute: aiohttp answers pings inside `receive()`, restarting its
    own timeout on each, so a client pinging every few seconds would otherwise never be closed."""
    token = None
    try:
        msg = await asyncio.wait_for(ws.receive(), AUTH_TIMEOUT)
        message = loads(msg.data) if msg.type is WSMsgType.TEXT else None
        if isinstance(message, dict) and message.get("op") == "auth" and isinstance(message.get("token"), str):
            token = message["token"]
    except (asyncio.TimeoutError, ValueError):
        pass
    if token_valid(token, settings.api_tokens):
        return True
    await ws.close(code=WSCloseCode.POLICY_VIOLATION, message=b"unauthorized: first send {op: auth, token}")
    return False


SHUTDOWN_MESSAGE = {"type": "shutdown", "message": "the server is shutting down: reconnect and subscribe again"}


async def close_live(app: web.Application) -> None:
    """on_shutdown, once running batches have finished (and been pushed): every event stream ends with a
    `shutdown` event, every WebSocket gets a `shutdown` message and closes with 1001."""
    streams = app[STREAMS]
    for end in tuple(streams):
        end()
    frame = dumps(SHUTDOWN_MESSAGE)
    closing = [asyncio.create_task(_close_going_away(ws, frame)) for ws in app[SOCKETS].copy()]
    if closing:
        # A client whose writes are stuck must not hold the exit: stop waiting a little after CLOSE_WAIT.
        # (aiohttp closes the connection once the close frame is out, as this runs beside the handler.)
        await asyncio.wait(closing, timeout=CLOSE_WAIT + 1.0)


async def _close_going_away(ws: web.WebSocketResponse, frame: bytes) -> None:
    try:
        await ws.send_frame(frame, WSMsgType.TEXT)
        await ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutdown")
    except ConnectionError:
        pass  # gone already: it loses nothing, its predictions are in the store


async def prediction_events(request: web.Request) -> web.StreamResponse:
    """Server-Sent Events for one prediction: `subscribed`, then each `update`, closing after the terminal one.

    ---
    summary: Follow one prediction as Server-Sent Events
    tags: [live]
    parameters:
      - {name: prediction_id, in: path, required: true, schema: {type: string}}
    responses:
      '200':
        description: "text/event-stream of `subscribed` and `update` events whose data is {type, prediction}"
        content:
          text/event-stream:
            schema:
              description: One server-sent event; `data` is the JSON text of {type, prediction}
              type: object
              required: [data]
              properties:
                event: {type: string, enum: [subscribed, update, shutdown]}
                data: {type: string}
      '404': {description: 'Unknown id', content: {application/json: {schema: {$ref: '#/components/schemas/Error'}}}}
      '429': {description: 'Too many live connections from this address', content: {application/json: {schema: {$ref: '#/components/schemas/Error'}}}}
    """
    # Event streams and WebSockets share one cap per client address (--ws-max-per-client).
    with request.app[LIVE_CLIENTS].hold(client_address(request)):
        return await _stream_events(request)


async def _stream_events(request: web.Request) -> web.StreamResponse:
    service, settings = request.app[SERVICE], request.app[SETTINGS]
    prediction_id = request.match_info["prediction_id"]
    # At most one per lifecycle rank, and one `shutdown` (None) when the server stops.
    events: asyncio.Queue[tuple[str, Prediction | None]] = asyncio.Queue()

    def deliver(prediction: Prediction, snapshot: bool) -> None:
        events.put_nowait(("subscribed" if snapshot else "update", prediction))

    def end() -> None:
        events.put_nowait(("shutdown", None))

    watch = await service.watch(prediction_id, deliver)
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    streams = request.app[METRICS].sse
    streams.inc()
    request.app[STREAMS].add(end)
    try:
        await response.prepare(request)
        while True:
            try:
                kind, prediction = await asyncio.wait_for(events.get(), settings.ws_heartbeat or None)
            except asyncio.TimeoutError:
                await response.write(b": keep-alive\n\n")  # proxies close idle streams
                continue
            if prediction is None:
                await response.write(b"event: shutdown\ndata: %s\n\n" % dumps(SHUTDOWN_MESSAGE))
                break
            data = update_frame(prediction) if kind == "update" else dumps(record_message(kind, prediction))
            await response.write(b"event: %s\ndata: %s\n\n" % (kind.encode(), data))
            if prediction.status.terminal:
                break
        await response.write_eof()
    finally:
        request.app[STREAMS].discard(end)
        streams.dec()
        watch.stop()
    return response
