"""The Python client against the real app on a TCP port: every method through Client and AsyncClient,
the shared WebSocket, tokens, the polling fallback, retries and idempotency.

The sync Client blocks, so the tests call it from a worker thread (`asyncio.to_thread`) while the
server runs on the test's loop; models are gated by events the test sets.
"""

from __future__ import annotations

import asyncio
import base64
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web
from aiohttp.typedefs import Handler
from standardwebhooks import Webhook as Verifier

from fakes import WAIT, GatedModel, ManualClock, SteppedStream, make_settings
from helpers import Delivered, Receiver, assert_one_terminal_each_in_order
from zypher_ws.client import (
    AlreadyFinished,
    AsyncClient,
    Chunk,
    Client,
    ConnectionFailed,
    InvalidInput,
    InvalidWebhook,
    ModelNotFound,
    ModelRef,
    NotFound,
    Prediction,
    Progress,
    QueueFull,
    RetryPolicy,
    Status,
    Timeout,
    Unauthorized,
)
from zypher_ws.http import live
from zypher_ws.http.app import create_app
from zypher_ws.http.keys import SERVICE, SOCKETS, WEBHOOKS
from zypher_ws.models import MockModel, ModelSpec, spec_of
from zypher_ws.webhooks.schedule import Settlement

TOKEN = "s3cret-token-0123456789"
SECRET = "whsec_" + base64.b64encode(b"k" * 32).decode()
HOOKS = {"webhook_secrets": (SECRET,), "webhook_allow_private": True}  # the receiver is on 127.0.0.1


# -- a served app that records what reached it ----------------------------------------------------------


@dataclass
class Seen:
    """A request as it arrived; `status` is 0 until it is answered (a WebSocket's, when it closes)."""

    method: str
    path_qs: str
    idempotency_key: str | None
    ws_protocols: str | None
    status: int = 0


@dataclass
class Served:
    url: str
    app: web.Application
    seen: list[Seen] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)  # set at each request

    async def until(self, check: Callable[[], bool]) -> None:
        """Return once `check()` holds, looking again at each request that arrives (at most WAIT s)."""

        async def watch() -> None:
            while not check():
                self.arrived.clear()
                await self.arrived.wait()

        await asyncio.wait_for(watch(), WAIT)

    def paths(self, method: str, prefix: str) -> list[Seen]:
        return [s for s in self.seen if s.method == method and s.path_qs.startswith(prefix)]

    async def stored(self) -> int:
        return len(self.app[SERVICE].store)  # type: ignore[arg-type]  # the memory store of make_settings


Middleware = Callable[[web.Request, Handler], Any]


@pytest.fixture
def serve(aiohttp_server: Any) -> Callable[..., Any]:
    """serve(model, middleware=None, **settings) -> Served: the app on a port, each request recorded.

    `middleware` stands for what sits in front of the server (a proxy)."""

    async def start(model: Any, middleware: Middleware | None = None, **settings: Any) -> Served:
        """`model`: one model object, or a list of (ModelSpec, model) for several."""
        models = model if isinstance(model, list) else None
        for each in [m for _, m in models] if models is not None else [model]:
            if isinstance(each, (GatedModel, SteppedStream)):
                each.bind(asyncio.get_running_loop())
        app = create_app(make_settings(**settings), model=None if models else model, models=models)
        served = Served("", app)

        @web.middleware
        async def record(request: web.Request, handler: Handler) -> web.StreamResponse:
            headers = request.headers
            seen = Seen(
                request.method, request.path_qs, headers.get("Idempotency-Key"), headers.get("Sec-WebSocket-Protocol")
            )
            served.seen.append(seen)
            served.arrived.set()
            response = await handler(request)
            seen.status = response.status
            return response

        if middleware is not None:
            app.middlewares.insert(0, web.middleware(middleware))
        app.middlewares.insert(0, record)  # outermost: what the client sent, proxy or not
        server = await aiohttp_server(app)
        await asyncio.wait_for(asyncio.gather(*(d.loaded.wait() for d in app[SERVICE].models)), WAIT)
        served.url = f"http://127.0.0.1:{server.port}"
        return served

    return start


Serve = Callable[..., Any]


class HeldModel(GatedModel):
    """A GatedModel whose batches wait for `release` as long as a test may take, not WAIT seconds."""

    def predict_batch(self, inputs: list[Any]) -> list[Any]:
        self.batches.append(list(inputs))
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._note_start)
        self.release.wait(60)
        return [{"echo": x} for x in inputs]


# -- the same calls through either client ------------------------------------------------------------


class Api:
    """AsyncClient's methods, or Client's run in a worker thread: one test body for both."""

    def __init__(self, client: AsyncClient | Client) -> None:
        self.client = client

    async def _call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        method = getattr(self.client, name)
        if isinstance(self.client, AsyncClient):
            return await method(*args, **kwargs)
        return await asyncio.to_thread(method, *args, **kwargs)

    async def predict(self, *args: Any, **kwargs: Any) -> Prediction:
        return await self._call("predict", *args, **kwargs)  # type: ignore[no-any-return]

    async def submit(self, *args: Any, **kwargs: Any) -> Prediction:
        return await self._call("submit", *args, **kwargs)  # type: ignore[no-any-return]

    async def get(self, prediction_id: str) -> Prediction:
        return await self._call("get", prediction_id)  # type: ignore[no-any-return]

    async def cancel(self, prediction_id: str) -> Prediction:
        return await self._call("cancel", prediction_id)  # type: ignore[no-any-return]

    async def wait(self, prediction_id: str, timeout: float | None = None) -> Prediction:
        return await self._call("wait", prediction_id, timeout)  # type: ignore[no-any-return]

    async def watch(self, ids: list[str], first: asyncio.Event | None = None) -> list[Prediction]:
        """Every state the watch yields, until it ends; `first` is set when the first one arrives."""
        client, loop = self.client, asyncio.get_running_loop()

        def note(state: Prediction) -> Prediction:
            if first is not None:
                loop.call_soon_threadsafe(first.set)
            return state

        if isinstance(client, AsyncClient):
            return [note(state) async for state in client.watch(ids)]
        return await asyncio.to_thread(lambda: [note(state) for state in client.watch(ids)])

    async def stream(self, prediction_id: str, chunks: Callable[[int], None] | None = None, **kwargs: Any) -> list[Any]:
        """Every item the stream yields, until it ends; `chunks(n)` is called (on the loop) at each chunk,
        with the number of chunks so far."""
        client, loop = self.client, asyncio.get_running_loop()
        count = 0

        def note(item: Any) -> Any:
            nonlocal count
            if isinstance(item, Chunk) and chunks is not None:
                count += 1
                loop.call_soon_threadsafe(chunks, count)
            return item

        if isinstance(client, AsyncClient):
            return [note(item) async for item in client.stream(prediction_id, **kwargs)]
        return await asyncio.to_thread(lambda: [note(item) for item in client.stream(prediction_id, **kwargs)])


@pytest.fixture(params=["async", "sync"])
async def connect(request: pytest.FixtureRequest) -> AsyncIterator[Callable[..., Api]]:
    """connect(url, token=None, **options) -> Api over an AsyncClient or a Client; closed after the test."""
    made: list[AsyncClient | Client] = []

    def factory(url: str, token: str | None = None, **options: Any) -> Api:
        client: AsyncClient | Client
        client = AsyncClient(url, token, **options) if request.param == "async" else Client(url, token, **options)
        made.append(client)
        return Api(client)

    yield factory
    for client in made:
        if isinstance(client, AsyncClient):
            await client.close()
        else:
            await asyncio.to_thread(client.close)


Connect = Callable[..., Api]


# -- each method --------------------------------------------------------------------------------------


async def test_predict_returns_the_finished_typed_record(serve: Serve, connect: Connect) -> None:
    served = await serve(GatedModel(gated=False))
    api = connect(served.url)
    prediction = await api.predict({"x": 7})
    assert prediction.status is Status.SUCCEEDED and prediction.succeeded and prediction.terminal
    assert prediction.result == {"echo": {"x": 7}}
    assert prediction.model is not None and (prediction.model.name, prediction.model.version) == (
        GatedModel.name,
        GatedModel.version,
    )
    assert prediction.created_at and prediction.started_at and prediction.completed_at
    assert prediction.created_at <= prediction.started_at <= prediction.completed_at
    assert prediction.created_at.utcoffset() is not None  # aware, in UTC
    assert prediction.attempts == 1 and prediction.batch_size == 1 and prediction.error is None
    (post,) = served.paths("POST", "/predict")
    assert post.idempotency_key  # every predict carries one
    assert prediction == await api.get(prediction.prediction_id)


async def test_predict_of_an_input_the_model_raises_on_returns_the_failed_record(
    serve: Serve, connect: Connect
) -> None:
    served = await serve(GatedModel(gated=False))
    prediction = await connect(served.url).predict({"raise": "no such digit"})
    assert prediction.status is Status.FAILED and not prediction.succeeded
    assert prediction.error is not None and prediction.error.code == "model_error"
    assert "no such digit" in prediction.error.message and prediction.result is None


async def test_predict_follows_a_202_to_the_end(serve: Serve, connect: Connect) -> None:
    gated = GatedModel()
    served = await serve(gated, sync_timeout=0)  # every sync request answers 202 at once
    api = connect(served.url)
    predicting = asyncio.ensure_future(api.predict({"x": 1}))
    await gated.wait_started()
    gated.release.set()
    prediction = await asyncio.wait_for(predicting, WAIT)
    assert prediction.status is Status.SUCCEEDED and prediction.result == {"echo": {"x": 1}}
    assert [s.status for s in served.paths("POST", "/predict")] == [202]
    assert len(served.paths("GET", "/ws")) == 1  # followed over the WebSocket


async def test_submit_get_and_wait(serve: Serve, connect: Connect) -> None:
    gated = GatedModel()
    served = await serve(gated)
    api = connect(served.url)
    submitted = await api.submit({"x": 2})
    assert submitted.status is Status.QUEUED and submitted.result is None and submitted.started_at is None
    (post,) = served.paths("POST", "/predict")
    assert post.status == 202 and post.idempotency_key
    await gated.wait_started()
    assert (await api.get(submitted.prediction_id)).status is Status.RUNNING
    waiting = asyncio.ensure_future(api.wait(submitted.prediction_id))
    gated.release.set()
    done = await asyncio.wait_for(waiting, WAIT)
    assert done.status is Status.SUCCEEDED and done.result == {"echo": {"x": 2}}
    assert done == await api.get(submitted.prediction_id)


async def test_an_idempotency_key_given_is_sent_and_returns_the_same_prediction(serve: Serve, connect: Connect) -> None:
    served = await serve(GatedModel())
    api = connect(served.url)
    first = await api.submit({"x": 3}, idempotency_key="order-17")
    again = await api.submit({"x": 3}, idempotency_key="order-17")
    assert again.prediction_id == first.prediction_id
    assert [s.idempotency_key for s in served.paths("POST", "/predict")] == ["order-17", "order-17"]
    assert await served.stored() == 1


async def test_cancel_and_the_errors_it_raises(serve: Serve, connect: Connect) -> None:
    served = await serve(GatedModel())
    api = connect(served.url)
    submitted = await api.submit({"x": 4})
    canceled = await api.cancel(submitted.prediction_id)
    assert canceled.prediction_id == submitted.prediction_id and canceled.status is Status.CANCELED
    with pytest.raises(AlreadyFinished) as finished:
        await api.cancel(submitted.prediction_id)
    assert (finished.value.code, finished.value.status) == ("already_finished", 409)
    missing = "0" * 32
    with pytest.raises(NotFound) as not_found:
        await api.cancel(missing)
    assert (not_found.value.code, not_found.value.status) == ("not_found", 404)
    assert missing in not_found.value.message
    with pytest.raises(NotFound):
        await api.get("../model")  # quoted into one segment: never another route
    assert (await api.wait(submitted.prediction_id)).status is Status.CANCELED


async def test_an_invalid_input_raises_invalid_input_naming_the_field(serve: Serve, connect: Connect) -> None:
    served = await serve(GatedModel(gated=False))
    with pytest.raises(InvalidInput) as invalid:
        await connect(served.url).predict({"x": "seven"})
    assert invalid.value.status == 400 and invalid.value.code == "invalid_input" and "x" in invalid.value.message


async def test_wait_raises_timeout_and_the_prediction_carries_on(serve: Serve, connect: Connect) -> None:
    gated = GatedModel()
    served = await serve(gated)
    api = connect(served.url)
    submitted = await api.submit({"x": 5})
    with pytest.raises(Timeout):
        await api.wait(submitted.prediction_id, timeout=0.2)
    assert isinstance(Timeout("x"), TimeoutError)
    gated.release.set()
    assert (await api.wait(submitted.prediction_id, timeout=WAIT)).status is Status.SUCCEEDED


async def test_watch_yields_each_state_once_until_every_id_is_finished(serve: Serve, connect: Connect) -> None:
    gated = GatedModel()
    served = await serve(gated, max_batch_size=1, workers=1)
    api = connect(served.url)
    ids = [(await api.submit({"x": n})).prediction_id for n in range(3)]
    watching = asyncio.ensure_future(api.watch([*ids, ids[0]]))  # an id given twice is watched once
    await gated.wait_started()
    gated.release.set()
    states = await asyncio.wait_for(watching, WAIT)
    assert_one_terminal_each_in_order(states, ids)
    assert {s.prediction_id: s.result for s in states if s.terminal} == {
        pid: {"echo": {"x": n}} for n, pid in enumerate(ids)
    }
    assert len(served.paths("GET", "/ws")) == 1


async def test_unknown_id_in_a_watch_raises_not_found(serve: Serve, connect: Connect) -> None:
    served = await serve(GatedModel(gated=False))
    api = connect(served.url)
    with pytest.raises(NotFound) as not_found:
        await api.watch(["f" * 32])
    assert not_found.value.prediction_id == "f" * 32


def echo_version(version: str) -> tuple[ModelSpec, GatedModel]:
    model = GatedModel(gated=False)
    model.name, model.version = "echo", version
    return ModelSpec(name="echo", version=version, runtime="python"), model


async def test_model_and_version_pick_the_route(serve: Serve, connect: Connect) -> None:
    mock = MockModel()
    served = await serve([(spec_of(mock), mock), echo_version("1"), echo_version("2")])
    api = connect(served.url)
    default = await api.predict([1, 2])
    assert default.model is not None and default.model.name == "mock"
    latest = await api.predict({"x": 1}, model="echo")
    assert latest.model == ModelRef("echo", "2") and latest.result == {"echo": {"x": 1}}
    pinned = await api.predict({"x": 2}, model="echo", version="1")
    assert pinned.model == ModelRef("echo", "1") and pinned.result == {"echo": {"x": 2}}
    queued = await api.submit({"x": 3}, model="echo", version="1")
    assert (await api.wait(queued.prediction_id)).model == ModelRef("echo", "1")
    assert [s.path_qs for s in served.paths("POST", "/")] == [
        "/predict",
        "/models/echo/predict",
        "/models/echo/versions/1/predict",
        "/models/echo/versions/1/predict",
    ]
    with pytest.raises(ModelNotFound) as unknown:
        await api.predict({"x": 1}, model="nope")
    assert unknown.value.status == 404 and isinstance(unknown.value, NotFound)
    with pytest.raises(ModelNotFound):
        await api.submit({"x": 1}, model="echo", version="9")
    with pytest.raises(ModelNotFound):
        await api.predict({"x": 1}, model="echo/versions/1")  # one path segment, never another route
    with pytest.raises(ValueError):
        await api.predict({"x": 1}, version="1")


# -- the shared WebSocket ------------------------------------------------------------------------------


async def test_a_watch_sees_live_changes_and_a_later_watch_of_the_same_id_gets_its_current_state(
    serve: Serve,
) -> None:
    gated = GatedModel()
    served = await serve(gated)
    async with AsyncClient(served.url) as client:
        pid = (await client.submit({"x": 6})).prediction_id
        await gated.wait_started()
        async with aclosing(client.watch([pid])) as first, aclosing(client.watch([pid])) as second:
            assert (await asyncio.wait_for(anext(first), WAIT)).status is Status.RUNNING
            # The id is subscribed already, so the server sends no second snapshot: the socket's own
            # last state of it is what the second watch starts from.
            assert (await asyncio.wait_for(anext(second), WAIT)).status is Status.RUNNING
            gated.release.set()
            for states in (first, second):
                final = await asyncio.wait_for(anext(states), WAIT)
                assert final.status is Status.SUCCEEDED
                with pytest.raises(StopAsyncIteration):
                    await anext(states)
        assert len(served.paths("GET", "/ws")) == 1 and client._live.connects == 1


async def test_watch_reconnects_after_the_server_closes_the_socket(serve: Serve, connect: Connect) -> None:
    """A server shutting down sends `shutdown` and closes with 1001: the client connects again,
    subscribes again, and the prediction's terminal state still comes exactly once."""
    gated = GatedModel()
    served = await serve(gated)
    api = connect(served.url, retry=RetryPolicy(initial=0.01))
    ids = [(await api.submit({"x": n})).prediction_id for n in range(2)]
    first = asyncio.Event()
    watching = asyncio.ensure_future(api.watch(ids, first))
    await asyncio.wait_for(first.wait(), WAIT)  # subscribed: its socket is the server's
    assert len(served.app[SOCKETS]) == 1
    await live.close_live(served.app)  # what a SIGTERM does to sockets
    gated.release.set()  # finishes while the client may be away
    states = await asyncio.wait_for(watching, WAIT)
    assert_one_terminal_each_in_order(states, ids)
    assert len(served.paths("GET", "/ws")) >= 2


async def test_a_socket_idle_for_longer_than_the_retry_time_still_reconnects_when_it_drops(serve: Serve) -> None:
    """The retry time counts from the drop, not from the last message."""
    gated = GatedModel()
    served = await serve(gated)
    clock = ManualClock()

    async def sleep(seconds: float) -> None:
        clock.advance(seconds)
        await asyncio.sleep(seconds)

    async with AsyncClient(served.url, retry=RetryPolicy(total=1.0, initial=0.01), clock=clock, sleep=sleep) as client:
        pid = (await client.submit({"x": 1})).prediction_id
        async with aclosing(client.watch([pid])) as states:
            assert not (await asyncio.wait_for(anext(states), WAIT)).terminal
            clock.advance(3600)  # an hour without a message
            await live.close_live(served.app)
            gated.release.set()
            assert (await asyncio.wait_for(anext(states), WAIT)).status is Status.SUCCEEDED
        assert client._live.connects == 2


async def test_a_thousand_ids_watched_on_one_socket(serve: Serve) -> None:
    held = HeldModel()
    served = await serve(held)
    ids: list[str] = []
    async with AsyncClient(served.url) as client:
        limit = asyncio.Semaphore(16)

        async def submit(n: int) -> str:
            async with limit:
                return (await client.submit({"x": n})).prediction_id

        ids = list(await asyncio.gather(*(submit(n) for n in range(1000))))
        states: list[Prediction] = []
        async with aclosing(client.watch(ids)) as watch:
            while len({s.prediction_id for s in states}) < len(ids):  # every snapshot, nothing finished yet
                states.append(await asyncio.wait_for(anext(watch), WAIT))
            assert not any(s.terminal for s in states)
            assert len(served.app[SOCKETS]) == 1
            held.release.set()
            states += [state async for state in watch]
    assert_one_terminal_each_in_order(states, ids)
    assert len(served.paths("GET", "/ws")) == 1


# -- tokens -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("token", [TOKEN, "a token, with spaces: no protocol name"], ids=["protocol", "first-message"])
async def test_a_token_goes_in_headers_never_in_a_url(serve: Serve, connect: Connect, token: str) -> None:
    """A token that can stand in a protocol name goes in Sec-WebSocket-Protocol; any other is the first
    message. Over HTTP it is the Authorization header."""
    served = await serve(GatedModel(gated=False), api_tokens=(token,))
    api = connect(served.url, token)
    assert (await api.predict({"x": 1})).succeeded
    pid = (await api.submit({"x": 2})).prediction_id
    assert (await api.wait(pid)).succeeded
    assert_one_terminal_each_in_order(await api.watch([pid]), [pid])
    assert (await api.get(pid)).succeeded
    with pytest.raises(AlreadyFinished):
        await api.cancel(pid)
    assert all(token not in s.path_qs and "token" not in s.path_qs for s in served.seen)
    (upgrade, *_) = served.paths("GET", "/ws")
    assert upgrade.ws_protocols is not None
    assert (f"bearer.{token}" in upgrade.ws_protocols) == (token == TOKEN)

    anonymous = connect(served.url)
    with pytest.raises(Unauthorized) as refused:
        await anonymous.get(pid)
    assert refused.value.status == 401 and refused.value.code == "unauthorized"
    with pytest.raises(Unauthorized):
        await anonymous.wait(pid)  # the socket is closed with 1008
    with pytest.raises(Unauthorized):
        await connect(served.url, "wrong").submit({"x": 3})


# -- WebSocket unavailable -------------------------------------------------------------------------------


async def refuse_upgrades(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A proxy in front of the server that does not pass WebSocket upgrades."""
    if request.path == "/ws":
        return web.Response(status=404, text="Not Found")
    return await handler(request)


async def test_wait_and_watch_poll_when_websocket_is_unavailable(serve: Serve, connect: Connect) -> None:
    gated = GatedModel()
    served = await serve(gated, refuse_upgrades)
    pauses: list[float] = []

    async def sleep(seconds: float) -> None:
        pauses.append(seconds)
        await asyncio.sleep(seconds)

    api = connect(served.url, retry=RetryPolicy(initial=0.02, maximum=0.1), sleep=sleep)
    ids = [(await api.submit({"x": n})).prediction_id for n in range(2)]
    waiting = asyncio.ensure_future(api.wait(ids[0], timeout=WAIT))
    await gated.wait_started()
    await served.until(lambda: len(served.paths("GET", f"/predict/{ids[0]}")) >= 2)  # polled, twice
    gated.release.set()
    assert (await waiting).succeeded
    states = await asyncio.wait_for(api.watch(ids), WAIT)
    assert_one_terminal_each_in_order(states, ids)
    assert len(served.paths("GET", "/ws")) == 1  # refused once, then remembered
    assert pauses and all(0 < p <= 0.1 for p in pauses)


# -- retries and idempotency ------------------------------------------------------------------------


async def fill_the_queue(api: Api, gated: GatedModel) -> None:
    """With --workers 1 --max-batch-size 1 --max-queue 1: one running (held), one queued: full."""
    await api.submit({"x": 100})
    await gated.wait_started()
    await api.submit({"x": 101})


async def test_a_full_queue_is_retried_after_retry_after_with_one_key_and_makes_one_prediction(
    serve: Serve, connect: Connect
) -> None:
    gated = GatedModel()
    served = await serve(gated, workers=1, max_batch_size=1, max_queue=1)
    loop = asyncio.get_running_loop()
    pauses: list[float] = []

    async def sleep(seconds: float) -> None:
        """The client's pause before retrying: the queue drains meanwhile (on the server's loop)."""
        pauses.append(seconds)

        async def drain() -> None:
            gated.release.set()
            await gated.wait_started(2)  # the queued one has started: there is room

        await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(drain(), loop))

    api = connect(served.url, sleep=sleep)
    await fill_the_queue(connect(served.url), gated)
    submitted = await api.submit({"x": 1})
    assert submitted.status is Status.QUEUED
    assert pauses == [1.0]  # the server's Retry-After
    first, second = served.paths("POST", "/predict")[2:]
    assert (first.status, second.status) == (503, 202)
    assert first.idempotency_key == second.idempotency_key is not None
    assert await served.stored() == 3
    assert (await api.wait(submitted.prediction_id)).result == {"echo": {"x": 1}}


async def test_retries_stop_after_the_policy_total_with_the_server_error(serve: Serve, connect: Connect) -> None:
    gated = GatedModel()
    served = await serve(gated, workers=1, max_batch_size=1, max_queue=1)
    clock = ManualClock()
    pauses: list[float] = []

    async def sleep(seconds: float) -> None:
        pauses.append(seconds)
        clock.advance(seconds)

    api = connect(served.url, retry=RetryPolicy(total=2.5), clock=clock, sleep=sleep)
    await fill_the_queue(connect(served.url), gated)
    with pytest.raises(QueueFull) as full:
        await api.submit({"x": 1})
    assert (full.value.status, full.value.code, full.value.retry_after) == (503, "queue_full", 1.0)
    assert pauses == [1.0, 1.0]  # a third pause would end past 2.5 s
    assert [s.status for s in served.paths("POST", "/predict")[2:]] == [503, 503, 503]
    assert await served.stored() == 2
    gated.release.set()


@pytest.mark.parametrize("method", ["submit", "predict"])
async def test_a_dropped_connection_is_retried_with_the_same_key_and_runs_once(
    serve: Serve, connect: Connect, method: str
) -> None:
    """The server takes the request and the connection drops before the answer: the retry carries the
    same Idempotency-Key and gets the same prediction, which ran once."""
    created: list[str] = []

    async def drop_first_answer(request: web.Request, handler: Handler) -> web.StreamResponse:
        response = await handler(request)
        if request.method == "POST" and not created:
            created.append(_record_id(response))
            assert request.transport is not None
            request.transport.abort()  # the answer is lost on the way
        return response

    gated = GatedModel(gated=False)
    served = await serve(gated, drop_first_answer)
    api = connect(served.url, retry=RetryPolicy(initial=0.01))
    prediction = await getattr(api, method)({"x": 9})
    assert prediction.prediction_id == created[0]
    keys = [s.idempotency_key for s in served.paths("POST", "/predict")]
    assert len(keys) == 2 and keys[0] == keys[1] is not None
    assert await served.stored() == 1
    assert sum(len(batch) for batch in gated.batches) == 1  # the model ran it once
    assert (await api.wait(prediction.prediction_id)).result == {"echo": {"x": 9}}


def _record_id(response: web.StreamResponse) -> str:
    import json

    assert isinstance(response, web.Response) and response.body is not None
    return str(json.loads(bytes(response.body))["prediction_id"])  # type: ignore[arg-type]


async def test_an_unreachable_server_raises_connection_failed_after_the_retry_time(connect: Connect) -> None:
    from helpers import free_port

    clock = ManualClock()
    pauses: list[float] = []

    async def sleep(seconds: float) -> None:
        pauses.append(seconds)
        clock.advance(seconds)

    api = connect(f"http://127.0.0.1:{free_port()}", retry=RetryPolicy(total=1.0), clock=clock, sleep=sleep)
    with pytest.raises(ConnectionFailed):
        await api.get("0" * 32)
    with pytest.raises(ConnectionFailed):
        await api.wait("0" * 32)
    assert pauses and sum(pauses) <= 2.0


# -- the sync client itself -------------------------------------------------------------------------------


async def test_one_client_shared_by_threads(serve: Serve) -> None:
    served = await serve(GatedModel(gated=False))
    results: dict[int, Any] = {}

    def use(client: Client, n: int) -> None:
        results[n] = client.predict({"x": n}).result

    def run() -> None:
        with Client(served.url) as client:
            threads = [threading.Thread(target=use, args=(client, n)) for n in range(8)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(WAIT)

    await asyncio.to_thread(run)
    assert results == {n: {"echo": {"x": n}} for n in range(8)}


async def test_a_sync_watch_left_early_unsubscribes(serve: Serve) -> None:
    gated = GatedModel()
    served = await serve(gated)

    def run() -> tuple[Status, Status]:
        with Client(served.url) as client:
            pid = client.submit({"x": 1}).prediction_id
            for state in client.watch([pid]):
                first = state.status
                break  # closes the iterator: the watch ends
            gated.release.set()
            return first, client.wait(pid).status

    first, final = await asyncio.to_thread(run)
    assert first in (Status.QUEUED, Status.RUNNING) and final is Status.SUCCEEDED


# -- streams ------------------------------------------------------------------------------------------

WORDS = [f"w{i} " for i in range(8)]


class Counted:
    """The chunks a stream has yielded so far, to wait on."""

    def __init__(self) -> None:
        self.count = 0
        self._changed = asyncio.Event()

    def __call__(self, count: int) -> None:
        self.count = count
        self._changed.set()

    async def reach(self, count: int) -> None:
        async def _wait() -> None:
            while self.count < count:
                self._changed.clear()
                await self._changed.wait()

        await asyncio.wait_for(_wait(), WAIT)


def chunks_of(items: list[Any]) -> list[tuple[int, Any]]:
    return [(item.index, item.value) for item in items if isinstance(item, Chunk)]


async def test_stream_yields_states_chunks_and_progress_in_order_ending_with_the_terminal_state(
    serve: Serve, connect: Connect
) -> None:
    model = SteppedStream(WORDS, progress=True)
    served = await serve(model)
    api = connect(served.url)
    submitted = await api.submit({}, stream=True)
    assert submitted.raw["stream"] is True
    got = Counted()
    streaming = asyncio.ensure_future(api.stream(submitted.prediction_id, got))
    model.allow(1)
    await got.reach(1)  # subscribed, and live: what follows comes as it happens
    model.allow(len(WORDS) - 1)
    items = await asyncio.wait_for(streaming, WAIT)
    assert chunks_of(items) == list(enumerate(WORDS))
    last = items[-1]
    assert isinstance(last, Prediction) and last.status is Status.SUCCEEDED and last.result == WORDS
    assert last.progress is not None and last.progress.fraction == 1.0
    assert [i for i, item in enumerate(items) if isinstance(item, Prediction) and item.terminal] == [len(items) - 1]
    fractions = [item.fraction for item in items if isinstance(item, Progress)]
    assert fractions and fractions == sorted(fractions) and all(0 < f <= 1 for f in fractions)
    statuses = [item.status for item in items if isinstance(item, Prediction)]
    assert statuses == sorted(statuses, key=lambda s: s.rank)  # never backwards


async def test_a_stream_resumes_after_the_socket_drops_with_every_chunk_once(serve: Serve, connect: Connect) -> None:
    model = SteppedStream(WORDS)
    served = await serve(model)
    api = connect(served.url, retry=RetryPolicy(initial=0.01))
    pid = (await api.submit({}, stream=True)).prediction_id
    got = Counted()
    streaming = asyncio.ensure_future(api.stream(pid, got))
    model.allow(3)
    await got.reach(3)
    await live.close_live(served.app)  # every socket closed by the server, as at a shutdown
    model.allow(3)  # yielded while the client may be away
    await model.wait_yielded(6)
    model.allow(len(WORDS) - 6)
    items = await asyncio.wait_for(streaming, WAIT)
    assert chunks_of(items) == list(enumerate(WORDS))
    assert len(served.paths("GET", "/ws")) >= 2  # it did connect again
    assert isinstance(items[-1], Prediction) and items[-1].succeeded


async def test_a_stream_joined_mid_way_starts_with_the_chunks_so_far(serve: Serve, connect: Connect) -> None:
    model = SteppedStream(WORDS)
    served = await serve(model)
    api = connect(served.url)
    pid = (await api.submit({}, stream=True)).prediction_id
    model.allow(4)
    await model.wait_yielded(4)
    early, late = Counted(), Counted()
    first = asyncio.ensure_future(api.stream(pid, early))
    await early.reach(4)  # the snapshot carried those
    second = asyncio.ensure_future(api.stream(pid, late, from_index=1))  # shares the socket; starts at 2
    await late.reach(2)
    model.allow(len(WORDS) - 4)
    assert chunks_of(await asyncio.wait_for(first, WAIT)) == list(enumerate(WORDS))
    assert chunks_of(await asyncio.wait_for(second, WAIT)) == list(enumerate(WORDS))[2:]


async def test_a_stream_of_a_canceled_prediction_ends_with_the_chunks_so_far(serve: Serve, connect: Connect) -> None:
    model = SteppedStream(WORDS)
    served = await serve(model)
    api = connect(served.url)
    pid = (await api.submit({}, stream=True)).prediction_id
    got = Counted()
    streaming = asyncio.ensure_future(api.stream(pid, got))
    model.allow(2)
    await got.reach(2)
    await api.cancel(pid)
    model.allow(len(WORDS))  # the generator stops at its next yield
    items = await asyncio.wait_for(streaming, WAIT)
    last = items[-1]
    assert isinstance(last, Prediction) and last.status is Status.CANCELED
    chunks = chunks_of(items)
    assert len(chunks) >= 2 and chunks == list(enumerate(WORDS[: len(chunks)]))  # each once, in order
    assert items.index(last) == len(items) - 1  # the end, after every chunk


async def test_a_stream_or_watch_left_early_and_started_again_at_once_gets_everything(serve: Serve) -> None:
    """Leaving a stream (or a watch) unsubscribes its id; following the same id again straight after, in
    the same task, must not have that unsubscribe reach the server after the new subscribe (which the
    server, still watching, ignores): the new follower would hear nothing, for ever."""
    model = SteppedStream(WORDS)
    served = await serve(model)
    async with AsyncClient(served.url) as client:
        watched_id = (await client.submit({}, stream=True)).prediction_id
        async with aclosing(client.watch([watched_id])) as states:
            async for _ in states:
                break  # the snapshot: left at once
        model.allow(len(WORDS))
        async with asyncio.timeout(WAIT):
            watched = [state async for state in client.watch([watched_id])]
        streamed_id = (await client.submit({}, stream=True)).prediction_id
        async with aclosing(client.stream(streamed_id)) as items:
            async for _ in items:
                break
        model.allow(len(WORDS))
        async with asyncio.timeout(WAIT):
            streamed = [item async for item in client.stream(streamed_id)]
    assert watched[-1].succeeded
    assert chunks_of(streamed) == list(enumerate(WORDS))
    assert isinstance(streamed[-1], Prediction) and streamed[-1].succeeded


async def test_streams_of_unknown_ids_raise_not_found_and_leave_nothing_behind(serve: Serve) -> None:
    """The streams' socket keeps the chunks of each id it follows, until the stream ends: one that ends
    in an error (an unknown id, say) must take its list with it, or a long-lived client holds one per
    failed stream for ever."""
    served = await serve(SteppedStream(WORDS))
    async with AsyncClient(served.url) as client:
        for n in range(3):
            with pytest.raises(NotFound):
                async with asyncio.timeout(WAIT):
                    [item async for item in client.stream(f"{n}" * 32)]
        assert client._streams._chunks == {} and client._streams._watchers == {}


async def test_a_stream_from_an_index_before_the_first_is_refused(serve: Serve, connect: Connect) -> None:
    """`from_index` is the last chunk the caller has (-1: none): one below that would take no chunk at
    all (none has that index), so it is refused rather than silently yielding none."""
    model = SteppedStream(WORDS)
    served = await serve(model)
    api = connect(served.url)
    pid = (await api.submit({}, stream=True)).prediction_id
    model.allow(len(WORDS))
    assert (await api.wait(pid)).succeeded
    for bad in (-2, True, 1.5):
        with pytest.raises(ValueError, match="from_index"):
            await asyncio.wait_for(api.stream(pid, from_index=bad), WAIT)
    assert len(served.paths("GET", "/ws")) == 1  # the wait's: each was refused before a socket of streams
    assert chunks_of(await asyncio.wait_for(api.stream(pid, from_index=5), WAIT)) == list(enumerate(WORDS))[6:]


async def test_a_stream_polls_the_record_when_websocket_is_unavailable(serve: Serve, connect: Connect) -> None:
    model = SteppedStream(WORDS)
    served = await serve(model, refuse_upgrades, stream_commit_ms=0)
    api = connect(served.url, retry=RetryPolicy(initial=0.02, maximum=0.1))
    pid = (await api.submit({}, stream=True)).prediction_id
    streaming = asyncio.ensure_future(api.stream(pid))
    model.allow(len(WORDS))
    items = await asyncio.wait_for(streaming, WAIT)
    assert chunks_of(items) == list(enumerate(WORDS))
    assert isinstance(items[-1], Prediction) and items[-1].succeeded


async def test_a_polled_stream_polls_again_soon_while_its_chunks_come(serve: Serve, connect: Connect) -> None:
    """Polling backs off only while nothing is new: a poll that brings new chunks is news, as a new state
    is, so a stream whose chunks keep coming is polled at the first pause, not slower and slower."""
    model = SteppedStream(WORDS)
    served = await serve(model, refuse_upgrades, stream_commit_ms=0)
    loop = asyncio.get_running_loop()
    stored = {"chunks": 0, "ended": False}  # what a GET shows from now on
    changed = asyncio.Event()
    pauses: list[float] = []

    def note(**now: Any) -> None:
        stored.update(now)
        changed.set()

    async def step() -> None:
        """On the server's loop, at each pause of the client's polling: one more chunk in the store (the
        last one may come with the end), or the end."""
        n = model.yielded + 1
        if n <= len(WORDS):
            model.allow(1)
        while not (stored["ended"] or stored["chunks"] >= n):
            changed.clear()
            await asyncio.wait_for(changed.wait(), WAIT)

    async def sleep(seconds: float) -> None:
        pauses.append(seconds)
        await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(step(), loop))

    api = connect(served.url, retry=RetryPolicy(initial=0.02, maximum=1.0), sleep=sleep)
    pid = (await api.submit({}, stream=True)).prediction_id
    bus = served.app[SERVICE].bus
    bus.subscribe_stream(pid, lambda e: note(chunks=e.index) if e.kind == "committed" else None)
    bus.subscribe(pid, lambda p: note(ended=True) if p.status.terminal else None)
    items = await asyncio.wait_for(api.stream(pid), WAIT)
    assert chunks_of(items) == list(enumerate(WORDS))
    assert isinstance(items[-1], Prediction) and items[-1].succeeded
    assert len(pauses) >= len(WORDS) - 1 and all(p <= 0.02 for p in pauses)  # each after news: the first pause


async def test_a_queued_stream_yields_its_place_in_line_as_it_moves(serve: Serve, connect: Connect) -> None:
    model = SteppedStream(["done"])  # one word each: each prediction ends when the test allows one
    served = await serve(model, workers=1, max_batch_size=1)
    api = connect(served.url)
    ids = [(await api.submit({"n": n}, stream=True)).prediction_id for n in range(3)]
    places: list[int | None] = []
    moved = asyncio.Event()
    loop = asyncio.get_running_loop()

    def note(item: Any) -> Any:
        if isinstance(item, Prediction) and item.status is Status.QUEUED:
            places.append(item.queue_position)
            loop.call_soon_threadsafe(moved.set)
        return item

    async def follow() -> list[Any]:
        client = api.client
        if isinstance(client, AsyncClient):
            return [note(item) async for item in client.stream(ids[2])]
        return await asyncio.to_thread(lambda: [note(item) for item in client.stream(ids[2])])

    streaming = asyncio.ensure_future(follow())
    while 1 not in places:  # two ahead of it: one running, one waiting
        moved.clear()
        await asyncio.wait_for(moved.wait(), WAIT)
    model.allow(1)  # the first ends: it moves up
    while 0 not in places:
        moved.clear()
        await asyncio.wait_for(moved.wait(), WAIT)
    model.allow(2)
    items = await asyncio.wait_for(streaming, WAIT)
    assert [p for p in places if p is not None] == [1, 0]  # each place once, in order
    assert isinstance(items[-1], Prediction) and items[-1].succeeded
    assert chunks_of(items) == [(0, "done")]


# -- webhooks -------------------------------------------------------------------------------------------


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    async with Receiver() as r:
        yield r


def settlements(served: Served) -> asyncio.Queue[Settlement]:
    """Each webhook attempt of the served app, once its outcome is written to the store."""
    settled: asyncio.Queue[Settlement] = asyncio.Queue()
    served.app[WEBHOOKS].observers.append(settled.put_nowait)
    return settled


def verified(delivery: Delivered) -> Any:
    return Verifier(SECRET).verify(delivery.body, delivery.headers)


async def test_predict_with_a_webhook_and_its_delivery_state_on_the_record(
    serve: Serve, connect: Connect, receiver: Receiver
) -> None:
    served = await serve(GatedModel(gated=False), **HOOKS)
    settled = settlements(served)
    api = connect(served.url)
    url = receiver.url("/hook?token=abc")
    prediction = await api.predict({"x": 1}, webhook=url, webhook_events_filter=["start", "completed"])
    assert prediction.status is Status.SUCCEEDED
    hook = prediction.webhook
    assert hook is not None and (hook.url, hook.events) == (receiver.url("/hook"), ("start", "completed"))

    start, completed = await receiver.next(), await receiver.next()
    assert start.path_qs == completed.path_qs == "/hook?token=abc"  # the whole URL, query string included
    pid = prediction.prediction_id
    assert start.headers["webhook-id"] == f"msg_{pid}_start"
    assert (verified(start)["type"], verified(start)["data"]["status"]) == ("prediction.start", "running")
    payload = verified(completed)
    assert (payload["type"], payload["data"]["prediction_id"]) == ("prediction.completed", pid)
    assert payload["data"]["result"] == {"echo": {"x": 1}}

    while (await asyncio.wait_for(settled.get(), WAIT)).delivery.event != "completed":
        pass
    delivered = (await api.get(pid)).webhook
    assert delivered is not None and delivered.delivered
    assert (delivered.event, delivered.state, delivered.attempts, delivered.last_status) == (
        "completed", "delivered", 1, 200
    )  # fmt: skip
    assert delivered.last_error is None and delivered.next_attempt_at is None
    assert delivered.delivered_at is not None and delivered.delivered_at.utcoffset() is not None


async def test_submit_with_a_webhook_sends_completed_by_default(
    serve: Serve, connect: Connect, receiver: Receiver
) -> None:
    gated = GatedModel()
    served = await serve(gated, **HOOKS)
    api = connect(served.url)
    submitted = await api.submit({"x": 2}, webhook=receiver.url())
    hook = submitted.webhook
    assert hook is not None and hook.events == ("completed",)
    assert (hook.event, hook.state, hook.attempts, hook.delivered_at) == (None, None, 0, None)  # nothing sent yet
    gated.release.set()
    payload = verified(await receiver.next())
    assert (payload["type"], payload["data"]["status"]) == ("prediction.completed", "succeeded")
    assert payload["data"]["prediction_id"] == submitted.prediction_id
    assert receiver.got[0].headers["webhook-id"] == f"msg_{submitted.prediction_id}_completed"
    assert (await api.wait(submitted.prediction_id)).webhook is not None
    assert (await api.submit({"x": 3})).webhook is None  # none asked for


async def test_a_webhook_the_server_refuses_raises_invalid_webhook_and_stores_nothing(
    serve: Serve, connect: Connect
) -> None:
    served = await serve(GatedModel(gated=False), webhook_secrets=(SECRET,))  # private addresses refused
    api = connect(served.url)
    for url, events in (
        ("http://127.0.0.1:9/hook", None),
        ("ftp://example.com/hook", None),
        ("https://example.com/hook", ["finished"]),
    ):
        with pytest.raises(InvalidWebhook) as refused:
            await api.submit({"x": 1}, webhook=url, webhook_events_filter=events)
        assert (refused.value.code, refused.value.status) == ("invalid_webhook", 400)
    assert await served.stored() == 0
    with pytest.raises(ValueError, match="needs a webhook"):
        await api.predict({"x": 1}, webhook_events_filter=["start"])
    with pytest.raises(ValueError, match="list of event names"):
        await api.submit({"x": 1}, webhook="https://example.com/hook", webhook_events_filter="start")
    assert len(served.paths("POST", "/predict")) == 3  # neither of the last two was sent
