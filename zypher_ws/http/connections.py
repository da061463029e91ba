"""Connections before they are requests: a cap per client address, a deadline for the first request
head, and quiet handling of running out of file descriptors.

aiohttp bounds a keep-alive connection's idle time, but not the time a new connection may take to send
its first request head, nor how many connections one address holds. A client that opens thousands of
connections and trickles bytes (slowloris) would otherwise hold file descriptors until the process has
none left and stops answering even its health checks. `GuardedSite` wraps each connection's aiohttp
protocol in a `Guard` that refuses connections over the per-address cap at once and closes one whose
first head has not arrived within `--read-timeout`. Bodies get the same deadline where they are read
(middleware.parse_json_body); later heads on a kept-alive connection fall under aiohttp's keep-alive
timeout.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web

from ..errors import TooManySockets
from .access import SocketCounter

log = logging.getLogger(__name__)

HEAD_END = b"\r\n\r\n"
HEAD_SCAN_LIMIT = 64 * 1024  # past this aiohttp rejects the head itself (431/400): stop looking
RESOURCE_LOG_INTERVAL = 60.0  # seconds between log lines about running out of file descriptors


class Guard(asyncio.Protocol):
    """Sits between the transport and aiohttp's protocol for one connection, passing everything on."""

    def __init__(self, inner: Any, limits: SocketCounter, head_timeout: float) -> None:
        self._inner = inner
        self._limits = limits
        self._head_timeout = head_timeout
        self._client: str | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._head = bytearray()
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        peer = transport.get_extra_info("peername")
        client = str(peer[0]) if isinstance(peer, tuple) and peer else "unknown"
        try:
            self._limits.acquire(client)
        except TooManySockets:
            transport.abort()  # before aiohttp sees it: no handler task, no buffers
            return
        self._client, self._transport = client, transport
        if self._head_timeout > 0:
            self._timer = asyncio.get_running_loop().call_later(self._head_timeout, self._too_slow)
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._timer is not None:
            self._head += data[:HEAD_SCAN_LIMIT]
            if HEAD_END in self._head or len(self._head) >= HEAD_SCAN_LIMIT:
                self._disarm()
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        if self._client is None:
            return None
        result: bool | None = self._inner.eof_received()
        return result

    def connection_lost(self, exc: Exception | None) -> None:
        if self._client is None:
            return  # refused: aiohttp never saw it
        self._disarm()
        self._limits.release(self._client)
        self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
            self._head = bytearray()

    def _too_slow(self) -> None:
        self._timer = None
        log.info("closed a connection from %s: no request head within %.0f s", self._client, self._head_timeout)
        if self._transport is not None:
            self._transport.abort()


class GuardedSite(web.TCPSite):
    """aiohttp's TCP site with every connection wrapped in a Guard."""

    def __init__(self, runner: web.AppRunner, host: str, port: int, *, limits: SocketCounter, head_timeout: float):
        super().__init__(runner, host, port)
        self._limits = limits
        self._head_timeout = head_timeout

    async def start(self) -> None:
        await web.BaseSite.start(self)  # registers the site with its runner; TCPSite.start would listen unguarded
        server = self._runner.server
        assert server is not None
        limits, timeout = self._limits, self._head_timeout

        def guarded() -> Guard:
            return Guard(server(), limits, timeout)

        self._server = await asyncio.get_running_loop().create_server(
            guarded, self._host, self._port, backlog=self._backlog, reuse_address=self._reuse_address
        )


def quiet_resource_errors(loop: asyncio.AbstractEventLoop, clock: Callable[[], float] = time.monotonic) -> None:
    """At the file-descriptor limit asyncio stops accepting for a moment and reports every failed accept
    with a traceback. Keep serving, and say so once a minute, without the traceback."""
    last = [-RESOURCE_LOG_INTERVAL]
    default = loop.get_exception_handler()

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if context.get("message", "").startswith("socket.accept() out of system resource"):
            now = clock()
            if now - last[0] >= RESOURCE_LOG_INTERVAL:
                last[0] = now
                log.error("cannot accept connections: %s (still serving the open ones; once a minute)", exc)
            return
        if default is not None:
            default(loop, context)
        else:
            loop.default_exception_handler(context)

    loop.set_exception_handler(handler)
