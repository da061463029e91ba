"""Client: the AsyncClient's methods for code without an event loop.

An AsyncClient runs on a private event loop in a background thread; every call is handed to that loop
(`run_coroutine_threadsafe`) and waited for, so one Client may be shared between threads.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncGenerator, Coroutine, Iterable, Iterator, Sequence
from types import TracebackType
from typing import Any, TypeVar, cast

from .aio import AsyncClient
from .records import Chunk, Prediction, Progress
from .retry import Clock, RetryPolicy, Sleep

T = TypeVar("T")
_END = object()


class Client:
    """A client of one zypher-ws service, for synchronous code. Use it as `with Client(url) as client:`,
    or call `close()`. The same methods and arguments as AsyncClient, blocking (`sleep` runs on the
    client's own loop)."""

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
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="zypher-client", daemon=True)
        self._thread.start()
        self._lock = threading.Lock()
        self._closed = False
        self._async = AsyncClient(base_url, token, timeout=timeout, retry=retry, clock=clock, sleep=sleep)

    @property
    def base_url(self) -> str:
        return self._async.base_url

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        try:
            self._run(self._async.close(), closing=True)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
            self._loop.close()

    def _run(self, coro: Coroutine[Any, Any, T], *, closing: bool = False) -> T:
        if self._closed and not closing:
            coro.close()
            raise RuntimeError("the client is closed")
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("a Client's methods cannot be called from its own loop; use AsyncClient there")
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()  # interrupted (Ctrl-C): the call stops too
            raise

    # -- the AsyncClient's methods, blocking -------------------------------------------------------------

    def predict(
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
        """Run one prediction and return it finished; see AsyncClient.predict."""
        return self._run(
            self._async.predict(
                input,
                model,
                version,
                idempotency_key=idempotency_key,
                timeout=timeout,
                webhook=webhook,
                webhook_events_filter=webhook_events_filter,
                stream=stream,
            )
        )

    def submit(
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
        """Queue one prediction; its record at once. See AsyncClient.submit."""
        return self._run(
            self._async.submit(
                input,
                model,
                version,
                idempotency_key=idempotency_key,
                webhook=webhook,
                webhook_events_filter=webhook_events_filter,
                stream=stream,
            )
        )

    def get(self, prediction_id: str) -> Prediction:
        return self._run(self._async.get(prediction_id))

    def cancel(self, prediction_id: str) -> Prediction:
        return self._run(self._async.cancel(prediction_id))

    def wait(self, prediction_id: str, timeout: float | None = None) -> Prediction:
        """The prediction once finished; see AsyncClient.wait."""
        return self._run(self._async.wait(prediction_id, timeout))

    def watch(self, prediction_ids: Iterable[str]) -> Iterator[Prediction]:
        """Each new state of these predictions until every one is finished; see AsyncClient.watch.
        Leaving the loop early (or closing the iterator) ends the watch."""
        return self._iterate(self._async.watch(list(prediction_ids)))

    def stream(self, prediction_id: str, *, from_index: int = -1) -> Iterator[Prediction | Chunk | Progress]:
        """A streaming prediction's states, chunks and progress in order, ending with its terminal state;
        see AsyncClient.stream. Leaving the loop early (or closing the iterator) ends the stream."""
        return self._iterate(self._async.stream(prediction_id, from_index=from_index))

    def _iterate(self, items: AsyncGenerator[T, None]) -> Iterator[T]:
        try:
            while True:
                item = self._run(_next_or_end(items))
                if item is _END:
                    return
                yield cast(T, item)  # not _END, so a T
        finally:
            if not self._closed:
                self._run(items.aclose())


async def _next_or_end(items: AsyncGenerator[T, None]) -> T | object:
    try:
        return await items.__anext__()
    except StopAsyncIteration:
        return _END
