"""Clients that trickle, hoard connections or vanish: the service keeps answering everyone else."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import aiohttp
import pytest

from fakes import WAIT, make_settings
from helpers import run_server
from zypher_ws.http.app import create_app
from zypher_ws.http.connections import RESOURCE_LOG_INTERVAL, quiet_resource_errors
from zypher_ws.models import MockModel

HEAD = b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"


async def closed_by_server(reader: asyncio.StreamReader) -> bytes:
    """Everything the server sends until it closes the connection (bounded by WAIT)."""
    return await asyncio.wait_for(reader.read(), WAIT)


async def close_quietly(writer: asyncio.StreamWriter) -> None:
    writer.close()
    try:
        await writer.wait_closed()
    except ConnectionError:
        pass  # the server dropped it first


@pytest.mark.slow  # a real process: connections are guarded by its site
async def test_a_connection_that_never_finishes_its_head_is_closed_and_others_are_served() -> None:
    args = ("--model", "mock", "--store", "memory://", "--read-timeout", "1")
    async with run_server(*args) as server, aiohttp.ClientSession(server.url) as http:
        port = int(server.url.rsplit(":", 1)[1])
        slow = [await asyncio.open_connection("127.0.0.1", port) for _ in range(20)]
        for _, writer in slow:
            writer.write(HEAD)  # and never the blank line that ends it
        assert (await http.get("/healthz")).status == 200  # served meanwhile
        for reader, writer in slow:
            assert await closed_by_server(reader) == b""  # closed without an answer
            await close_quietly(writer)
        assert any("no request head within 1 s" in line for line in server.log)


@pytest.mark.slow  # a real process: connections are guarded by its site
async def test_connections_past_the_per_client_cap_are_refused_until_one_closes() -> None:
    args = ("--model", "mock", "--store", "memory://", "--max-connections-per-client", "4")
    async with run_server(*args) as server:
        port = int(server.url.rsplit(":", 1)[1])
        held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(4)]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        try:
            assert await closed_by_server(reader) == b""  # refused: closed at once, nothing answered
        except ConnectionResetError:
            pass  # the same refusal, seen as a reset
        await close_quietly(writer)
        await close_quietly(held.pop()[1])
        async with aiohttp.ClientSession(server.url) as http:

            async def served() -> int:
                while True:  # the closed one is released when the server sees it go
                    try:
                        return (await http.get("/healthz")).status
                    except aiohttp.ClientConnectionError:
                        await asyncio.sleep(0.05)

            assert await asyncio.wait_for(served(), WAIT) == 200
        for _, w in held:
            await close_quietly(w)


async def test_a_trickled_body_gets_408_and_the_connection_closes(aiohttp_client: Any) -> None:
    client = await aiohttp_client(create_app(make_settings(read_timeout=0.3), model=MockModel()))
    assert client.port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
    writer.write(HEAD + b"Content-Length: 1000\r\n\r\n" + b'{"input": [1, 2, ')
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
    assert head.startswith(b"HTTP/1.1 408 ")
    assert b"\r\nConnection: close\r\n" in head  # the rest of the body is not waited for
    length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
    body = await asyncio.wait_for(reader.readexactly(length), WAIT)
    assert b'"code":"request_timeout"' in body
    writer.close()
    await writer.wait_closed()


async def test_a_client_that_vanishes_mid_body_is_one_info_line_not_a_500_traceback(
    aiohttp_client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    client = await aiohttp_client(create_app(make_settings(), model=MockModel()))
    assert client.port is not None
    gone = asyncio.Event()

    class Spot(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "went away" in record.getMessage():
                gone.set()

    spot = Spot()
    logging.getLogger("zypher_ws").addHandler(spot)
    try:
        with caplog.at_level(logging.INFO):
            _, writer = await asyncio.open_connection("127.0.0.1", client.port)
            writer.write(HEAD + b"Content-Length: 1000\r\n\r\n" + b'{"input": [1, 2, ')
            await writer.drain()
            writer.close()
            await asyncio.wait_for(gone.wait(), WAIT)
            assert (await client.get("/healthz")).status == 200
    finally:
        logging.getLogger("zypher_ws").removeHandler(spot)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info], caplog.text


def test_running_out_of_file_descriptors_is_said_once_a_minute_without_a_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    loop = asyncio.new_event_loop()
    now = [1000.0]
    try:
        quiet_resource_errors(loop, clock=lambda: now[0])
        context = {"message": "socket.accept() out of system resource", "exception": OSError(24, "Too many open files")}
        with caplog.at_level(logging.INFO):
            for _ in range(100):
                loop.call_exception_handler(dict(context))
            now[0] += RESOURCE_LOG_INTERVAL
            loop.call_exception_handler(dict(context))
    finally:
        loop.close()
    lines = [r for r in caplog.records if "cannot accept connections" in r.getMessage()]
    assert len(lines) == 2
    assert all(r.exc_info is None for r in lines)
