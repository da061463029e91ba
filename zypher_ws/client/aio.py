"""AsyncClient: the service's HTTP API and its WebSocket, for asyncio code."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncGenerator, Iterable, Sequence
from contextlib import aclosing
from types import TracebackType
from typing import Any
from urllib.parse import quote

import aiohttp
from yarl import URL

from .errors import ConnectionFailed, ProtocolError, Timeout, error_from_envelope
from .live import POLL, LiveSocket, StreamWatcher, Watcher, unique
from .records import Chunk, Prediction, Progress
from .retry import Backoff, Clock, RetryPolicy, Sleep, parse_retry_after

RETRIED_STATUSES = frozenset({429, 503})
POLL_CONCURRENCY = 8  # GETs in flight at once while polling many ids


class AsyncClient:
    """A client of one zypher-ws service. Use it as `async with AsyncClient(url) as client:`, or call
    `close()`. One instance serves any number of tasks of one event loop: it holds one HTTP connection
    pool and one WebSocket, which every `watch` and `wait` shares.

    `token` goes in the `Authorization` header and in the WebSocket's protocol header, never in a URL.
    `timeout` bounds each HTTP request (keep it above the server's `--sync-timeout`, 30 s by default, for
    `predict`). `retry` says what is retried and for how long; `clock` and `sleep` are what it measures
    and waits with (tests pass their own).
    """

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8080",
        token: str | None = None,
        *,
        timeout: float | None = 60.0,
        retry: RetryPolicy | None = None,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._token = token
        self._timeout = timeout
        self.retry = retry if retry is not None else RetryPolicy()
        self._clock = clock
        self._sleep = sleep
        self._http: aiohttp.ClientSession | None = None
        self._closed = False
        self._live = LiveSocket(self._session, self._url("ws"), token, self.retry, clock, sleep)
        # Streams on a socket of their own, which keeps their chunks: watches and waits stay as light as before.
        self._streams = LiveSocket(self._session, self._url("ws"), token, self.retry, clock, sleep, streaming=True)

    # -- lifecycle -----------------------------------------------------------------------------------

    async def __aenter__(self) -> AsyncClient:
        self._session()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the WebSocket and the connections; watches still running raise ZypherClientError."""
        if self._closed:
            return
        self._closed = True
        await self._live.close()
        await self._streams.close()
        if self._http is not None:
            await self._http.close()

    def _session(self) -> aiohttp.ClientSession:
        # Made on first use, inside the event loop that will run it.
        if self._closed:
            raise RuntimeError("the client is closed")
        if self._http is None:
            headers = {"Authorization": f"Bearer {self._token}"} if self._token is not None else {}
            self._http = aiohttp.ClientSession(headers=headers, timeout=aiohttp.ClientTimeout(total=self._timeout))
        return self._http

    def _url(self, path: str) -> URL:
        return URL(f"{self.base_url}/{path}", encoded=True)

    # -- predictions ------------------------------------------------------------------------------------

    async def predict(
        self,
        input: Any,
        model: str | None = None,
        version: str | None = None,
        *,
        idempotency_key: str | None = None,
        timeout: float | None = None,
        webhook: str | None = None,
        webhook_events_filter: Sequence[str] | None = None,
        stream: bool = False,
    ) -> Prediction:
        """Run one prediction and return it finished (succeeded, failed or canceled).

        A server that answers `202` because its sync timeout ran out is followed to the end; with
        `timeout`, one still unfinished that many seconds after the call began raises Timeout (it
        carries on on the server). The request carries an Idempotency-Key (a new uuid4
        unless given), so a retry after a dropped connection never runs the prediction twice.

        `webhook`: a URL the server POSTs the prediction's events to, signed (docs/webhooks.md);
        `webhook_events_filter` which of `start`, `output`, `completed` (the server's default:
        completed). A URL the server will not send to raises InvalidWebhook."""
        started = self._clock()
        hook = _webhook_fields(webhook, webhook_events_filter)
        data = await self._post_predict(input, model, version, idempotency_key, hook, run_async=False, stream=stream)
        prediction = Prediction.from_dict(data)
        if prediction.terminal:
            return prediction
        remaining = None if timeout is None else max(0.0, timeout - (self._clock() - started))
        return await self.wait(prediction.prediction_id, timeout=remaining)

    async def submit(
        self,
        input: Any,
        model: str | None = None,
        version: str | None = None,
        *,
        idempotency_key: str | None = None,
        webhook: str | None = None,
        webhook_events_filter: Sequence[str] | None = None,
        stream: bool = False,
    ) -> Prediction:
        """Queue one prediction and return its record at once (status `queued`); follow it with `wait`,
        `watch` or `stream`. Carries an Idempotency-Key (a new uuid4 unless given): retries never queue it
        twice. `webhook` and `webhook_events_filter` as for `predict`. `stream=True` asks a model that both
        streams and batches for its stream (a model that only streams streams anyway)."""
        hook = _webhook_fields(webhook, webhook_events_filter)
        data = await self._post_predict(input, model, version, idempotency_key, hook, run_async=True, stream=stream)
        return Prediction.from_dict(data)

    async def get(self, prediction_id: str) -> Prediction:
        """The prediction's record as it is now (NotFound for an unknown or expired id)."""
        data = await self._request("GET", f"predict/{_segment(prediction_id)}", dropped_ok=True)
        return Prediction.from_dict(data)

    async def cancel(self, prediction_id: str) -> Prediction:
        """Cancel a queued or running prediction; its canceled record. AlreadyFinished if it has ended."""
        # Not retried after a dropped connection: a cancel that got through would answer 409 the second time.
        data = await self._request("DELETE", f"predict/{_segment(prediction_id)}", dropped_ok=False)
        return Prediction.from_dict(data)

    async def wait(self, prediction_id: str, timeout: float | None = None) -> Prediction:
        """The prediction once finished: over the shared WebSocket, or by polling GET with backoff where
        WebSocket is unavailable. Raises Timeout after `timeout` seconds (the prediction carries on)."""

        async def follow() -> Prediction:
            last: Prediction | None = None
            async with aclosing(self.watch([prediction_id])) as states:
                async for state in states:
                    last = state
            assert last is not None and last.terminal
            return last

        task = asyncio.ensure_future(follow())
        try:
            done, _ = await asyncio.wait({task}, timeout=timeout)
            if not done:
                raise Timeout(f"prediction {prediction_id} did not finish within {timeout:g} s")
            return task.result()
        finally:
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    async def watch(self, prediction_ids: Iterable[str]) -> AsyncGenerator[Prediction, None]:
        """Each new state of these predictions, as it happens, until every one is finished.

        All watches of a client share one WebSocket. When it drops, the client reconnects with backoff
        and subscribes again; a state is yielded only if it is past the last one yielded for its id, so
        nothing repeats, and each prediction's terminal state comes exactly once (a state that began and
        ended while disconnected is not seen: the snapshot on reconnect carries the current one). Where
        WebSocket is unavailable it polls instead. NotFound for an unknown id.
        """
        async with aclosing(self._follow(self._live, Watcher(unique(prediction_ids)))) as items:
            async for item in items:
                assert isinstance(item, Prediction)
                yield item

    async def stream(
        self, prediction_id: str, *, from_index: int = -1
    ) -> AsyncGenerator[Prediction | Chunk | Progress, None]:
        """What a streaming prediction produces, in order, as it happens: its states (`Prediction`; a
        queued one again each time its `queue_position` moves), its output chunks (`Chunk`, each index
        exactly once, from 0, or from `from_index + 1`), and its progress reports (`Progress`). The last
        item is its terminal state, after its last chunk.

        Streams share a WebSocket of their own. When it drops (or the server restarts), the client
        reconnects with backoff and asks for the chunks after the last one it has (`from_index`), so none
        is lost or repeated. Where WebSocket is unavailable it polls the record instead, whose `result`
        holds the chunks so far. NotFound for an unknown id."""
        async with aclosing(self._follow(self._streams, StreamWatcher(prediction_id, from_index))) as items:
            async for item in items:
                yield item

    async def _follow(
        self, socket: LiveSocket, watcher: Watcher
    ) -> AsyncGenerator[Prediction | Chunk | Progress, None]:
        """What `watcher` is given over `socket` (or by polling, where WebSocket is unavailable), until
        every one of its ids has had its terminal state."""
        polling: Backoff | None = None
        try:
            await socket.add(watcher)
            while watcher.remaining or not watcher.queue.empty():
                if polling is not None and watcher.queue.empty():
                    await self._poll(watcher, polling)
                    continue
                item = await watcher.queue.get()
                if item is POLL:
                    polling = self.retry.backoff(self._clock)
                    continue
                if isinstance(item, BaseException):
                    raise item
                assert isinstance(item, (Prediction, Chunk, Progress))
                yield item
        finally:
            socket.remove(watcher)

    async def _poll(self, watcher: Watcher, backoff: Backoff) -> None:
        """One round of GETs over the watcher's unfinished ids; a pause first when nothing was new."""
        limit = asyncio.Semaphore(POLL_CONCURRENCY)

        async def one(pid: str) -> bool:
            async with limit:
                return watcher.offer(await self.get(pid))

        news = await asyncio.gather(*(one(pid) for pid in sorted(watcher.remaining)))
        if any(news):
            backoff.reset()
        else:
            await self._sleep(backoff.poll_delay())

    # -- HTTP ---------------------------------------------------------------------------------------

    async def _post_predict(
        self,
        input: Any,
        model: str | None,
        version: str | None,
        key: str | None,
        webhook: dict[str, Any],
        *,
        run_async: bool,
        stream: bool,
    ) -> Any:
        headers = {
            "Content-Type": "application/json",
            "Idempotency-Key": key if key is not None else uuid.uuid4().hex,
        }
        if run_async:
            headers["Prefer"] = "respond-async"
        fields: dict[str, Any] = {"input": input, **webhook, **({"stream": True} if stream else {})}
        body = json.dumps(fields, separators=(",", ":"), allow_nan=False).encode()
        return await self._request("POST", _predict_path(model, version), body=body, headers=headers, dropped_ok=True)

    async def _request(
        self,
        method: str,
        path: str,
        *,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        dropped_ok: bool,
    ) -> Any:
        """The JSON body of a success, or of a failed prediction's 500 (its record).

        503 and 429 are retried, as is a connection that could not be made, or (with `dropped_ok`, for
        requests that are safe to repeat) one that dropped, until the retry time runs out."""
        url = self._url(path)
        backoff = self.retry.backoff(self._clock)
        while True:
            try:
                async with self._session().request(method, url, data=body, headers=headers) as resp:
                    status, raw, retry_after_header = resp.status, await resp.read(), resp.headers.get("Retry-After")
            except asyncio.TimeoutError:
                raise Timeout(f"{method} {url}: no answer within {self._timeout:g} s") from None
            except aiohttp.ClientConnectorError as exc:  # nothing was sent
                await self._again(backoff, None, ConnectionFailed(f"{method} {url}: {exc}"))
                continue
            except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:  # it may have arrived
                failure = ConnectionFailed(f"{method} {url}: {exc or type(exc).__name__}")
                if not dropped_ok:
                    raise failure from exc
                await self._again(backoff, None, failure)
                continue
            data = _json(raw, status)
            if status < 400 or (status == 500 and isinstance(data, dict) and "prediction_id" in data):
                if data is None:
                    raise ProtocolError(f"{method} {url}: HTTP {status} without a body")
                return data
            retry_after = parse_retry_after(retry_after_header)
            error = error_from_envelope(data, status, retry_after)
            if status not in RETRIED_STATUSES:
                raise error
            await self._again(backoff, retry_after, error)

    async def _again(self, backoff: Backoff, retry_after: float | None, failure: Exception) -> None:
        """Wait for the next attempt, or raise `failure` if it would come after the retry time."""
        delay = backoff.delay(retry_after)
        if delay is None:
            raise failure
        await self._sleep(delay)


def _webhook_fields(webhook: str | None, events: Sequence[str] | None) -> dict[str, Any]:
    """The request body's webhook fields; the server checks the URL and the names."""
    if webhook is None:
        if events is not None:
            raise ValueError("webhook_events_filter needs a webhook")
        return {}
    if events is None:
        return {"webhook": webhook}
    if isinstance(events, str):
        raise ValueError(f"webhook_events_filter is a list of event names (got the string {events!r})")
    return {"webhook": webhook, "webhook_events_filter": list(events)}


def _predict_path(model: str | None, version: str | None) -> str:
    if model is None:
        if version is not None:
            raise ValueError("a version needs a model")
        return "predict"
    if version is None:
        return f"models/{_segment(model)}/predict"
    return f"models/{_segment(model)}/versions/{_segment(version)}/predict"


def _segment(value: str) -> str:
    """One path segment, percent-encoded: an id or a name never reaches another route."""
    return quote(value, safe="")


def _json(raw: bytes, status: int) -> Any:
    if not raw:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        if status < 400:
            raise ProtocolError(f"HTTP {status} with a body that is not JSON: {raw[:200]!r}") from None
        return None  # a proxy's error page, say: the status says enough
