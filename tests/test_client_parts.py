"""The client's parts without a server: its exceptions against the server's error table, reading
records, the retry schedule (on a clock the test moves), and what watchers and a socket of streams take."""

from __future__ import annotations

import asyncio
import json
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime
from typing import Any

import pytest
from yarl import URL

from fakes import ManualClock
from zypher_ws import errors as table
from zypher_ws.client import errors
from zypher_ws.client.errors import ApiError, api_error, error_from_envelope
from zypher_ws.client.live import LiveSocket, StreamWatcher, Watcher
from zypher_ws.client.records import Chunk, ErrorDetail, ModelRef, Prediction, Status
from zypher_ws.client.retry import RetryPolicy, parse_retry_after
from zypher_ws.records import Prediction as ServerPrediction

# -- exceptions -------------------------------------------------------------------------------------------


def server_classes(cls: type[table.ZypherError] = table.ZypherError) -> list[type[table.ZypherError]]:
    found = []
    for sub in cls.__subclasses__():
        found += [sub, *server_classes(sub)]
    return found


def test_every_server_error_has_a_client_class_with_its_code_and_its_parent() -> None:
    server = server_classes()
    assert len(server) > 20  # the walk found the table
    for cls in server:
        mirror = getattr(errors, cls.__name__, None)
        assert isinstance(mirror, type) and issubclass(mirror, ApiError), f"no client class for {cls.__name__}"
        assert mirror.code == cls.code, cls.__name__
        parent = cls.__bases__[0]
        expected_parent = ApiError if parent is table.ZypherError else getattr(errors, parent.__name__)
        assert mirror.__bases__[0] is expected_parent, cls.__name__
        if "code" in vars(cls):  # a code of its own: raised as this class
            assert errors.BY_CODE[cls.code] is mirror


def test_each_code_of_the_server_names_one_class() -> None:
    """A code found on a record (an infer of a failed prediction answers with its class) gives back the
    class that has it; one inherited must not shadow it: `internal_error` is a 500, never a 503 whose
    `Retry-After` would have a client repeat a request that fails for good."""
    own = [cls for cls in server_classes() if "code" in vars(cls)]
    assert len({cls.code for cls in own}) == len(own)
    for cls in own:
        assert table.error_class_for_code(cls.code) is cls, cls.__name__
    internal = table.error_class_for_code("internal_error")
    assert issubclass(internal, table.InternalError) and internal.status == 500
    assert table.error_class_for_code("not_a_code") is table.ZypherError
    # Every class is raised with a code of its own, or is the root's own internal_error.
    assert {cls for cls in server_classes() if "code" not in vars(cls)} == {table.InternalError}


def test_every_code_is_exported_from_the_package() -> None:
    import zypher_ws.client as client

    missing = [cls.__name__ for cls in errors.BY_CODE.values() if getattr(client, cls.__name__, None) is not cls]
    # Codes only a server's log or another layer uses need not be at the top.
    assert set(missing) <= {"InvalidMessage", "UnknownOp", "RequestTimeout", "ClientClosedRequest", "HttpError"}


@pytest.mark.parametrize("cls", [c for c in server_classes() if "code" in vars(c)], ids=lambda c: c.__name__)
def test_a_server_error_envelope_raises_its_class(cls: type[table.ZypherError]) -> None:
    error = error_from_envelope({"error": {"code": cls.code, "message": "why"}}, cls.status, 2.0)
    assert type(error) is getattr(errors, cls.__name__)
    assert (error.code, error.message, error.status, error.retry_after) == (cls.code, "why", cls.status, 2.0)
    assert str(error) == f"{cls.code}: why"


def test_unknown_codes_and_bare_statuses() -> None:
    newer = api_error("model_overloaded", "try another", status=503)
    assert type(newer) is errors.RetryLater and newer.code == "model_overloaded"  # the status says what it is
    odd = api_error("teapot", "short and stout", status=418)
    assert type(odd) is ApiError and odd.code == "teapot"
    assert type(error_from_envelope(None, 404)) is errors.NotFound  # a proxy's page, not our envelope
    assert type(error_from_envelope("<html>", 502)) is errors.InternalError
    assert error_from_envelope({"error": "flat"}, 400).code == "bad_request"


# -- records ---------------------------------------------------------------------------------------------


def test_a_server_record_reads_back_typed() -> None:
    server = ServerPrediction.new({"x": 1}, model_name="digits", model_version="2")
    server = server.started(batch_size=3).finished(Status.FAILED, ttl=60, error={"code": "model_error", "message": "m"})
    record = Prediction.from_dict(server.to_dict())
    assert record.prediction_id == server.prediction_id and record.status is Status.FAILED and record.terminal
    assert record.model == ModelRef("digits", "2") and record.error == ErrorDetail("model_error", "m")
    assert record.attempts == 1 and record.batch_size == 3 and record.result is None
    for name in ("created_at", "started_at", "completed_at", "expires_at"):
        expected = getattr(server, name)
        got = getattr(record, name)
        assert isinstance(got, datetime) and got.tzinfo is not None
        assert abs(got.timestamp() - expected) < 0.001, name  # milliseconds on the wire
    assert record.raw == server.to_dict()


def test_records_are_read_tolerantly() -> None:
    minimal = Prediction.from_dict({"prediction_id": "a" * 32, "status": "queued"})
    assert minimal == Prediction("a" * 32, Status.QUEUED)
    newer: dict[str, Any] = {
        "prediction_id": "b" * 32,
        "status": "running",
        "priority": 7,  # a field this client does not know
        "model": {"name": "m", "version": None, "runtime": "onnx"},
        "created_at": "not a time",
        "metrics": {"batch_size": True, "queue_ms": 3},
        "attempts": "one",
    }
    record = Prediction.from_dict(newer)
    assert record.model == ModelRef("m") and record.created_at is None and record.batch_size is None
    assert record.attempts == 0 and record.raw["priority"] == 7
    for bad in ([], {"status": "queued"}, {"prediction_id": "c" * 32, "status": "paused"}):
        with pytest.raises(errors.ProtocolError):
            Prediction.from_dict(bad)


# -- retries ------------------------------------------------------------------------------------------------


def test_backoff_doubles_to_the_maximum_with_jitter_and_stops_at_the_total() -> None:
    clock = ManualClock()
    backoff = RetryPolicy(total=10, initial=0.5, maximum=2).backoff(clock)
    delays = []
    while (delay := backoff.delay()) is not None:
        delays.append(delay)
        clock.advance(delay)
    nominal = [0.5, 1, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2][: len(delays)]
    assert all(n / 2 <= d <= n for d, n in zip(delays, nominal, strict=True)), delays
    assert sum(delays) <= 10 < sum(delays) + 2  # stopped where the next could end past the total
    assert backoff.delay(retry_after=0) is not None  # what the server asks for is honoured as is


def test_retry_after_is_honoured_and_reset_restarts_the_total() -> None:
    clock = ManualClock()
    backoff = RetryPolicy(total=5).backoff(clock)
    assert backoff.delay(retry_after=3) == 3
    clock.advance(3)
    assert backoff.delay(retry_after=3) is None  # would end at 6 s
    backoff.reset()
    assert backoff.delay(retry_after=3) == 3
    assert RetryPolicy(total=0).backoff(clock).delay(retry_after=0) == 0
    assert RetryPolicy(total=0).backoff(clock).delay() is None
    with pytest.raises(ValueError):
        RetryPolicy(initial=0)


def test_parse_retry_after() -> None:
    now = datetime(2026, 12, 1, 10, 0, 0, tzinfo=timezone.utc)
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after(" 2 ") == 2.0
    assert parse_retry_after(format_datetime(now + timedelta(seconds=90), usegmt=True), lambda: now) == 90.0
    assert parse_retry_after(format_datetime(now - timedelta(seconds=5), usegmt=True), lambda: now) == 0.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    assert parse_retry_after("-1") is None


# -- a watcher's states --------------------------------------------------------------------------------


async def test_a_watcher_takes_only_states_past_the_last_one_of_each_id() -> None:
    """What a reconnect's snapshots and a recovered prediction's requeue look like to a watcher."""
    watcher = Watcher(["a" * 32, "b" * 32])
    a = [Prediction("a" * 32, status, attempts=n) for status, n in (
        (Status.QUEUED, 0), (Status.RUNNING, 1), (Status.RUNNING, 1),  # the snapshot after a reconnect
        (Status.QUEUED, 1), (Status.RUNNING, 2),  # requeued after a crash, started again
        (Status.SUCCEEDED, 2), (Status.SUCCEEDED, 2),
    )]  # fmt: skip
    b = [Prediction("b" * 32, Status.SUCCEEDED), Prediction("b" * 32, Status.FAILED)]
    taken = [watcher.offer(state) for state in a + b]
    assert taken == [True, True, False, False, False, True, False, True, False]
    assert not watcher.remaining
    assert not watcher.offer(Prediction("c" * 32, Status.QUEUED))  # not watched
    yielded = [watcher.queue.get_nowait() for _ in range(watcher.queue.qsize())]
    assert yielded == [a[0], a[1], a[5], b[0]]


async def test_a_stream_watcher_takes_each_chunk_once_in_index_order_and_ends_with_the_terminal_state() -> None:
    pid = "a" * 32
    watcher = StreamWatcher(pid)
    running = Prediction(pid, Status.RUNNING, result=["w0 ", "w1 "])  # a snapshot with two chunks
    assert watcher.offer(running)
    assert [watcher.offer_chunk(i, c) for i, c in ((1, "w1 "), (3, "w3 "), (2, "w2 "), (2, "w2 "))] == [
        False, False, True, False  # a repeat, one past a gap, the next, a repeat
    ]  # fmt: skip
    assert not watcher.offer(Prediction(pid, Status.RUNNING, result=["w0 ", "w1 ", "w2 "]))  # the same again
    done = Prediction(pid, Status.SUCCEEDED, result=["w0 ", "w1 ", "w2 ", "w3 "])
    assert watcher.offer(done) and not watcher.remaining
    items = [watcher.queue.get_nowait() for _ in range(watcher.queue.qsize())]
    assert items == [
        running, Chunk(pid, 0, "w0 "), Chunk(pid, 1, "w1 "), Chunk(pid, 2, "w2 "), Chunk(pid, 3, "w3 "), done
    ]  # fmt: skip
    late = StreamWatcher(pid, from_index=2)  # has the first three
    late.offer(done)
    assert [late.queue.get_nowait() for _ in range(late.queue.qsize())] == [Chunk(pid, 3, "w3 "), done]
    queued = StreamWatcher(pid)
    places = [Prediction(pid, Status.QUEUED, queue_position=p) for p in (None, 2, 2, 1)]
    assert [queued.offer(p) for p in places] == [True, True, False, True]  # again only when it moves


def test_a_stream_watcher_does_not_take_a_place_in_line_it_is_not_told_as_a_move() -> None:
    """A snapshot after a reconnect carries no queue_position (the `queue` message that follows does): the
    same queued state, not a move, so the stream does not yield it, nor its old place again after it."""
    pid = "a" * 32
    watcher = StreamWatcher(pid)
    places = [Prediction(pid, Status.QUEUED, queue_position=p) for p in (None, 2, None, 2, 1)]
    assert [watcher.offer(p) for p in places] == [True, True, False, False, True]
    yielded = [watcher.queue.get_nowait() for _ in range(watcher.queue.qsize())]
    assert [p.queue_position for p in yielded] == [None, 2, 1]


class SentFrames:
    """A WebSocket that keeps what is sent on it."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []
        self.closed = False

    async def send_str(self, data: str) -> None:
        self.sent.append(json.loads(data))

    async def close(self) -> None:
        self.closed = True


async def test_a_streams_socket_mends_a_gap_by_resubscribing_from_its_last_chunk() -> None:
    pid = "a" * 32
    socket = LiveSocket(
        lambda: None, URL("http://x/ws"), None, RetryPolicy(), ManualClock(), asyncio.sleep, streaming=True
    )  # type: ignore[arg-type, return-value]
    socket._task = asyncio.get_running_loop().create_future()  # connected, as far as add() can tell
    ws = SentFrames()
    socket._ws = ws  # type: ignore[assignment]
    watcher = StreamWatcher(pid)
    await socket.add(watcher)
    await asyncio.gather(*socket._background)  # the subscribe sent, as before the server answers it
    socket._handle(
        json.dumps({"type": "subscribed", "prediction": {"prediction_id": pid, "status": "running", "result": ["w0 "]}})
    )
    for index in (1, 3):  # 2 went missing
        socket._handle(json.dumps({"type": "output", "prediction_id": pid, "index": index, "chunk": f"w{index} "}))
    await asyncio.gather(*socket._background)
    assert ws.sent == [
        {"op": "subscribe", "prediction_ids": [pid]},
        {"op": "unsubscribe", "prediction_id": pid},
        {"op": "subscribe", "prediction_id": pid, "from_index": 1},
    ]
    chunks = [i for i in (watcher.queue.get_nowait() for _ in range(watcher.queue.qsize())) if isinstance(i, Chunk)]
    assert [c.index for c in chunks] == [0, 1]  # nothing past the gap until it is mended
    socket._task.cancel()
    await socket.close()
