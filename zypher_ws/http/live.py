"""Live results: the WebSocket protocol (`GET /ws`) and Server-Sent Events for one prediction."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import Any

from aiohttp import WSCloseCode, WSMsgType, web

from ..errors import (
    InternalError,
    InvalidHeader,
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
from ..records import OUTPUT, Prediction, StreamEvent
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


class _StreamFrames:
    """The encoded `output` or `progress` message of the stream event seen last, shared by its watchers."""

    def __init__(self) -> None:
        self._last: tuple[StreamEvent | None, bytes] = (None, b"")

    def __call__(self, event: StreamEvent) -> bytes:
        last, frame = self._last
        if last is not event:
            frame = dumps(event.to_message())
            self._last = (event, frame)
        return frame


stream_frame = _StreamFrames()


def from_index_of(value: Any) -> int | None:
    """A resume point: the index of the last chunk the client has (None: not resuming). Raises InvalidMessage."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidMessage(
            f"`from_index` must be the index of the last chunk you have, an integer from 0, not {value!r}"
        )
    return value


def text_frame(payload: bytes) -> bytes:
    """A final, unmasked text frame (RFC 6455 section 5.2), as a server sends it uncompressed."""
    n = len(payload)
    if n < 126:
        return bytes((0x81, n)) + payload
    if n < 1 << 16:
        return b"\x81\x7e" + n.to_bytes(2, "big") + payload
    return b"\x81\x7f" + n.to_bytes(8, "big") + payload


class _WireFrames:
    """text_frame of the payload seen last. The payloads of a state (or a stream event) are shared by all
    its watchers (_UpdateFrames, _StreamFrames), so a fan-out to 1,000 sockets frames it once, not 1,000
    times. One entry, swapped whole; keyed by identity, which is what sharing gives."""

    def __init__(self) -> None:
        self._last: tuple[bytes | None, bytes] = (None, b"")

    def __call__(self, payload: bytes) -> bytes:
        last, wire = self._last
        if last is not payload:
            wire = text_frame(payload)
            self._last = (payload, wire)
        return wire


wire_frame = _WireFrames()


def record_message(kind: str, prediction: Prediction) -> dict[str, Any]:
    """A message carrying a record: `subscribed`, `accepted` or `update` (WebSocket and SSE alike)."""
    return {"type": kind, "prediction": prediction.to_dict()}


class Outbox:
    """Encoded frames waiting for the socket, bounded in frames and in bytes.

    A frame that would pass either bound is refused, unless the outbox is empty: one record larger than
    the byte bound still goes out, alone. A stream's frames (`output`, `progress`, `queue`) count toward
    the byte bound only: a model yields chunks in bursts, and a resume replays many at once, so a frame
    count sized for records would drop clients that read.
    """

    def __init__(self, max_frames: int, max_bytes: int) -> None:
        self.max_frames = max_frames
        self.max_bytes = max_bytes
        self.size = 0  # bytes waiting
        self.counted = 0  # frames waiting that count toward max_frames
        # The frames waiting, with whether each is counted. Others may look (a session tests it for
        # emptiness on every push, with no call in between); only put() and get() change it.
        self.frames: deque[tuple[bytes, bool]] = deque()
        self._filled = asyncio.Event()  # set while frames wait
        self._roomy = asyncio.Event()  # set while at most half full, or once closed
        self._roomy.set()

    def __len__(self) -> int:
        return len(self.frames)

    def put(self, frame: bytes, *, counted: bool = True) -> bool:
        """Queue `frame`; False (and nothing queued) when it would pass a bound (`counted`: the frame bound too)."""
        if self.frames and ((counted and self.counted >= self.max_frames) or self.size + len(frame) > self.max_bytes):
            return False
        self.frames.append((frame, counted))
        self.size += len(frame)
        self.counted += counted
        self._filled.set()
        if not self.half_empty():
            self._roomy.clear()
        return True

    async def get(self) -> bytes:
        while not self.frames:
            self._filled.clear()
            await self._filled.wait()
        frame, counted = self.frames.popleft()
        self.size -= len(frame)
        self.counted -= counted
        if self.half_empty():
            self._roomy.set()
        return frame

    def half_empty(self) -> bool:
        return 2 * self.counted <= self.max_frames and 2 * self.size <= self.max_bytes

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
        # Where _write_now may write frames itself: an uncompressed socket's transport (permessage-deflate
        # is settled by the upgrade, before a session exists; a compressed socket keeps aiohttp's writer).
        self._direct = transport if transport is not None and not ws.compress else None
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

    def send_frame(self, frame: bytes, *, counted: bool = True) -> None:
        """Send one JSON text frame, already encoded: at once where it can go straight out (_write_now),
        else through the outbox (`counted`: toward --ws-outbox as well as its bytes)."""
        if self.dropped or (not self.outbox.frames and self._write_now(frame)):
            return
        if not self.outbox.put(frame, counted=counted):
            # The client is not reading. Drop it rather than buffer without bound or slow the workers.
            self.drop()

    def _write_now(self, frame: bytes) -> bool:
        """Write an uncompressed frame to the transport now, if nothing waits before it (the outbox is
        empty, and what the sender took from it aiohttp has written already) and the kernel has taken
        all the transport was given (a client that reads slowly is bounded and dropped as before). A prediction watched by 1,000 sockets is then 1,000 writes in one
        callback, not 1,000 sender tasks woken one after another (about three times as long).
        A socket that negotiated permessage-deflate keeps aiohttp's compressor, through the outbox."""
        transport = self._direct
        if (
            transport is None
            or self.ws.closed
            or transport.is_closing()
            or transport.get_write_buffer_size()  # a backlog: the outbox and aiohttp's flow control
        ):
            return False
        transport.write(wire_frame(frame))
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

    async def watch(
        self, prediction_id: str, first: str = "subscribed", request_id: Any = None, from_index: int | None = None
    ) -> None:
        """Subscribe this socket; the first message (the current state) is of type `first`, then a stream's
        chunks as `output` (from `from_index` + 1 when resuming) and its `progress`.

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

        def on_stream(event: StreamEvent) -> None:
            self.send_frame(stream_frame(event), counted=False)

        watch = await self.service.watch(prediction_id, deliver, on_stream=on_stream, from_index=from_index)
        if not watch.closed:  # a terminal snapshot ends the watch at once
            self.watches[prediction_id] = watch

    def check_room(self) -> None:
        if len(self.watches) >= self.settings.ws_max_subscriptions:
            raise TooManySubscriptions(f"at most {self.settings.ws_max_subscriptions} subscriptions per socket")

    async def subscribe(self, ids: list[str], request_id: Any = None, from_index: int | None = None) -> None:
        for pid in ids:
            if self.dropped:
                return
            try:
                await self.watch(pid, from_index=from_index)
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
                ids = _ids(message)
                from_index = from_index_of(message.get("from_index"))
                if from_index is not None and "prediction_ids" in message:
                    raise InvalidMessage("`from_index` resumes one prediction: give it with `prediction_id`")
                await self.subscribe(ids, request_id, from_index)
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
                    stream=_stream_of(message),
                )
                await self.watch(prediction.prediction_id, first="accepted", request_id=request_id)
            else:
                raise UnknownOp(f"unknown op {op!r}: use subscribe, unsubscribe, predict, ping or auth")
        except ZypherError as exc:
            self.send(ws_error(exc, request_id))
        except Exception:  # ours: answered like the others, since nothing may escape the upgraded socket
            log.exception("unhandled error answering a WebSocket message")
            self.send(ws_error(InternalError(), request_id))


def _stream_of(message: dict[str, Any]) -> bool:
    value = message.get("stream", False)
    if not isinstance(value, bool):
        raise InvalidMessage("`stream` must be true or false")
    return value


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
    """Server-Sent Events for one prediction: `subscribed`, then each `output`, `progress` and `update`, closing after the terminal one.

    ---
    summary: Follow one prediction as Server-Sent Events
    description: >
      `subscribed` carries the record so far (a stream's chunks 0..k in `result`, and `id: k`); then a
      stream's chunks as `output` events whose `id` is the chunk's index, its `progress`, and each status
      change as `update`. A client that reconnects with `Last-Event-ID: k` (an EventSource does) gets the
      chunks from k + 1: none twice, none missing. A queued prediction's place in line comes as `queue`
      events ({type, prediction_id, queue_position, estimated_start_at}), at once and on each change. A
      client that falls behind (more than --ws-outbox-bytes of events waiting) has its stream ended, to resume the
      same way.
    tags: [live]
    parameters:
      - {name: prediction_id, in: path, required: true, schema: {type: string}}
      - name: Last-Event-ID
        in: header
        required: false
        description: "the index of the last chunk received: replay from the next (400 invalid_header unless an integer from 0)"
        schema: {type: string}
    responses:
      '200':
        description: "text/event-stream of `subscribed`, `output`, `progress` and `update` events (data: their JSON message)"
        content:
          text/event-stream:
            schema:
              description: "One server-sent event; `data` is the JSON text of {type, prediction} (subscribed, update), {type, prediction_id, index, chunk} (output) or {type, prediction_id, fraction, message} (progress)"
              type: object
              required: [data]
              properties:
                event: {type: string, enum: [subscribed, output, progress, queue, update, shutdown]}
                id: {type: string, description: "a chunk's index (output; subscribed and progress: the last chunk's so far)"}
                data: {type: string}
      '400': {description: 'A Last-Event-ID that is not a chunk index (invalid_header)', content: {application/json: {schema: {$ref: '#/components/schemas/Error'}}}}
      '404': {description: 'Unknown id', content: {application/json: {schema: {$ref: '#/components/schemas/Error'}}}}
      '429': {description: 'Too many live connections from this address', content: {application/json: {schema: {$ref: '#/components/schemas/Error'}}}}
    """
    from_index = last_event_id(request)
    # Event streams and WebSockets share one cap per client address (--ws-max-per-client).
    with request.app[LIVE_CLIENTS].hold(client_address(request)):
        stream = EventStream(request, from_index)
        await stream.watch(request.match_info["prediction_id"])
        return await stream.serve()


def last_event_id(request: web.Request) -> int | None:
    raw = request.headers.get("Last-Event-ID")
    if raw is None or not raw.strip():
        return None
    value = raw.strip()
    if not (value.isascii() and value.isdigit()):
        raise InvalidHeader(
            f"Last-Event-ID must be the index of the last chunk received (an integer from 0), not {raw!r}"
        )
    return int(value)


class EventStream:
    """One Server-Sent Events response following one prediction (GET .../events, and a sync POST that
    asks for text/event-stream). Its queue holds at most --ws-outbox-bytes of stream events: a client that
    reads slower than the stream comes has its response ended, and resumes with Last-Event-ID."""

    def __init__(
        self, request: web.Request, from_index: int | None = None, *, cancel_on_disconnect: bool = False
    ) -> None:
        self.request = request
        self.service = request.app[SERVICE]
        self.settings = request.app[SETTINGS]
        self.from_index = from_index
        self.cancel_on_disconnect = cancel_on_disconnect
        self.prediction_id = ""
        self._events: deque[tuple[str, Prediction | StreamEvent | None]] = deque()
        self._stream_bytes = 0  # of the stream events waiting (bounded by --ws-outbox-bytes)
        self._ready = asyncio.Event()
        self._overflowed = False
        self._watch: Watch | None = None
        self._last_index = -1
        self._ended_by_shutdown = False

    def _put(self, kind: str, item: Prediction | StreamEvent | None) -> None:
        if self._overflowed:
            return
        if isinstance(item, StreamEvent):
            size = len(stream_frame(item))
            if self._events and self._stream_bytes + size > self.settings.ws_outbox_bytes:
                # The client is not keeping up: end the response once what waits is written; it resumes
                # from its last id.
                self._overflowed = True
                self.request.app[METRICS].slow_clients.inc()
                self._ready.set()
                return
            self._stream_bytes += size
        self._events.append((kind, item))
        self._ready.set()

    async def watch(self, prediction_id: str) -> None:
        """Follow it (raises NotFound before the response begins)."""
        self.prediction_id = prediction_id

        def deliver(prediction: Prediction, snapshot: bool) -> None:
            self._put("subscribed" if snapshot else "update", prediction)

        def on_stream(event: StreamEvent) -> None:
            self._put(event.kind, event)

        self._watch = await self.service.watch(prediction_id, deliver, on_stream=on_stream, from_index=self.from_index)

    async def serve(self, headers: dict[str, str] | None = None) -> web.StreamResponse:
        request, settings = self.request, self.settings
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", **(headers or {})}
        )
        streams = request.app[METRICS].sse
        streams.inc()
        request.app[STREAMS].add(self._end)
        # A sync stream that cancels when its client goes looks at the connection now and then: with no
        # event to write, nothing else would notice.
        tick = 1.0 if self.cancel_on_disconnect else (settings.ws_heartbeat or None)
        quiet = 0.0
        ended = False
        try:
            await response.prepare(request)
            while not (ended and not self._events):
                if not self._events:
                    self._ready.clear()
                    try:
                        await asyncio.wait_for(self._ready.wait(), tick)
                    except asyncio.TimeoutError:
                        quiet += tick or 0.0
                        if self.cancel_on_disconnect and _gone(request):
                            raise ConnectionResetError("the client went away") from None
                        if not self.cancel_on_disconnect or quiet >= (settings.ws_heartbeat or float("inf")):
                            quiet = 0.0
                            await response.write(b": keep-alive\n\n")  # proxies close idle streams
                        continue
                kind, item = self._events.popleft()
                if isinstance(item, StreamEvent):
                    self._stream_bytes -= len(stream_frame(item))
                if item is None:
                    await response.write(b"event: shutdown\ndata: %s\n\n" % dumps(SHUTDOWN_MESSAGE))
                    break
                await response.write(self._frame(kind, item))
                # A resume's replay may follow a terminal snapshot: the stream ends once it is written.
                ended = ended or (isinstance(item, Prediction) and item.status.terminal)
                if self._overflowed and not self._events:
                    break
            await response.write_eof()
        except (ConnectionError, asyncio.CancelledError):
            # The client went: the write failed, or the server (with handler_cancellation) cancelled us.
            if self.cancel_on_disconnect and not self._ended_by_shutdown:
                await asyncio.shield(asyncio.ensure_future(self._cancel()))
            raise
        finally:
            request.app[STREAMS].discard(self._end)
            streams.dec()
            if self._watch is not None:
                self._watch.stop()
        return response

    def _frame(self, kind: str, item: Prediction | StreamEvent) -> bytes:
        if isinstance(item, StreamEvent):
            if item.kind == OUTPUT:
                self._last_index = item.index
                return b"event: output\nid: %d\ndata: %s\n\n" % (item.index, stream_frame(item))
            ident = b"id: %d\n" % self._last_index if self._last_index >= 0 else b""
            return b"event: %s\n%sdata: %s\n\n" % (item.kind.encode(), ident, stream_frame(item))
        if kind == "update":
            return b"event: update\ndata: %s\n\n" % update_frame(item)
        ident = b""
        if item.stream and self.from_index is None and item.result:
            self._last_index = len(item.result) - 1
            ident = b"id: %d\n" % self._last_index
        return b"event: subscribed\n%sdata: %s\n\n" % (ident, dumps(record_message(kind, item)))

    def _end(self) -> None:
        self._ended_by_shutdown = True
        self._events.append(("shutdown", None))
        self._ready.set()

    async def _cancel(self) -> None:
        try:
            prediction = await self.service.cancel(self.prediction_id)
        except ZypherError:
            return  # finished meanwhile
        self.request.app[METRICS].finished([prediction])
        log.info("canceled %s: its sync stream's client went away", self.prediction_id)


def _gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()
