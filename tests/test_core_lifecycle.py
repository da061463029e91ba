"""The lifecycle rules every store applies, and the record's own transitions: pure functions, no I/O."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable
from dataclasses import FrozenInstanceError, fields

import pytest

from zypher_ws import lifecycle
from zypher_ws.errors import AlreadyFinished, IdempotencyConflict, NotFound
from zypher_ws.records import (
    IdempotencyKey,
    Job,
    Outcome,
    Prediction,
    Status,
    Webhook,
    _RandomIds,
    make_job,
    make_outcome,
)
from zypher_ws.validation import is_prediction_id

FIELDS = [f.name for f in fields(Prediction)]


def queued(value: object = {"x": 1}) -> Prediction:
    return Prediction.new(value, model_name="m", model_version="1")


def running(attempts: int = 1) -> Prediction:
    p = queued()
    for _ in range(attempts):
        p = p.started(batch_size=2)
    return p


# -- the record's transitions carry every field they do not change ---------------------------------------

Transition = Callable[[Prediction], Prediction]
OUTCOME = {"result", "error", "completed_at", "expires_at"}  # an unfinished record has none: both clear them
TRANSITIONS: dict[str, tuple[Transition, set[str]]] = {
    # name: (the transition, the fields it may change)
    "started": (lambda p: p.started(batch_size=3), {"status", "started_at", "batch_size", "attempts", *OUTCOME}),
    "requeued": (lambda p: p.requeued(), {"status", "started_at", "batch_size", *OUTCOME}),
    "finished": (
        lambda p: p.finished(Status.FAILED, ttl=5.0, result="r", error={"code": "c", "message": "m"}),
        {"status", *OUTCOME},
    ),
}


def every_field_distinct() -> Prediction:
    """A prediction whose every field holds a value of its own: no default, and no other field's value.

    Derived from dataclasses.fields, so a field added later is covered without touching this test.
    """
    values: dict[str, object] = {name: f"<{name}>" for name in FIELDS}
    values.update(status=Status.RUNNING, attempts=7)  # the two a transition computes with
    # A webhook that asks for no event these transitions send is carried as it is (tests/test_webhooks.py
    # checks the ones that do send).
    values.update(webhook=Webhook("https://example.com/hook", ("output",)))
    values.update(stream=False)  # a stream keeps its chunks through the transitions: tested below
    return Prediction(**values)  # type: ignore[arg-type]


def test_a_stream_keeps_its_chunks_through_start_requeue_cancel_and_a_lost_worker() -> None:
    p = Prediction.new("x", model_name="m", model_version="1", stream=True).started(batch_size=1)
    assert p.result == []
    p = lifecycle.append_chunks(p, 0, ["a", "b"], {"fraction": 0.5, "message": None})
    assert p is not None and p.result == ["a", "b"] and p.progress == {"fraction": 0.5, "message": None}
    assert lifecycle.append_chunks(p, 1, ["b", "c"], p.progress).result == ["a", "b", "c"]  # type: ignore[union-attr]
    assert lifecycle.append_chunks(p, 3, ["d"], None) is None  # a gap: nothing is stored past it
    assert lifecycle.append_chunks(p, 0, ["a"], p.progress) is None  # nothing new
    assert p.requeued().result == ["a", "b"] and p.requeued().started(batch_size=1).result == ["a", "b"]
    canceled = lifecycle.cancel(p, p.prediction_id, 60)
    assert canceled.status is Status.CANCELED and canceled.result == ["a", "b"]
    assert lifecycle.append_chunks(canceled, 2, ["c"], None).result == ["a", "b", "c"]  # type: ignore[union-attr]
    lost = lifecycle.recover(p.started(batch_size=1).started(batch_size=1), 3, 60)
    assert lost.status is Status.FAILED and lost.result == ["a", "b"]
    done = lifecycle.finish(p, Outcome(p.prediction_id, result=["a", "b", "c"], progress={"fraction": 1.0}), 60)
    assert done is not None and done.result == ["a", "b", "c"] and done.progress == {"fraction": 1.0}
    assert lifecycle.append_chunks(done, 3, ["d"], None) is None  # a finished stream takes no more


@pytest.mark.parametrize("name", list(TRANSITIONS))
def test_a_transition_keeps_every_field_it_does_not_change(name: str) -> None:
    transition, changes = TRANSITIONS[name]
    assert changes < set(FIELDS), changes - set(FIELDS)  # the table names real fields
    before = every_field_distinct()
    after = transition(before)
    kept = [f for f in FIELDS if f not in changes]
    assert {f: getattr(after, f) for f in kept} == {f: getattr(before, f) for f in kept}


def test_each_transition_sets_what_it_changes() -> None:
    before = every_field_distinct()
    t0 = time.time()
    started = TRANSITIONS["started"][0](before)
    assert (started.status, started.batch_size, started.attempts) == (Status.RUNNING, 3, 8)
    assert isinstance(started.started_at, float) and started.started_at >= t0
    requeued = TRANSITIONS["requeued"][0](before)
    assert (requeued.status, requeued.started_at, requeued.batch_size) == (Status.QUEUED, None, None)
    for unfinished in (started, requeued):
        assert {f: getattr(unfinished, f) for f in OUTCOME} == dict.fromkeys(OUTCOME)
    finished = TRANSITIONS["finished"][0](before)
    assert (finished.status, finished.result, finished.error) == (Status.FAILED, "r", {"code": "c", "message": "m"})
    assert finished.completed_at is not None and finished.completed_at >= t0
    assert finished.expires_at == finished.completed_at + 5.0


def test_a_row_round_trips_every_field() -> None:
    p = running().finished(Status.SUCCEEDED, ttl=60, result={"y": [1, 2]})
    row = p.to_row()
    assert list(row) == FIELDS
    assert Prediction.from_row(row) == p
    assert Prediction.from_row({**row, "status": "succeeded"}).status is Status.SUCCEEDED


def test_statuses_rank_the_lifecycle() -> None:
    assert [s.rank for s in Status] == [0, 1, 2, 2, 2]
    assert [s.value for s in Status if s.terminal] == ["succeeded", "failed", "canceled"]


# -- start -----------------------------------------------------------------------------------------------


def test_start_moves_a_queued_prediction_to_running() -> None:
    p = queued()
    started = lifecycle.start(p, batch_size=4)
    assert started is not None
    assert (started.status, started.batch_size, started.attempts) == (Status.RUNNING, 4, 1)
    assert started.started_at is not None and started.started_at >= p.created_at


@pytest.mark.parametrize(
    "current",
    [None, running(), running().finished(Status.SUCCEEDED, ttl=1), queued().finished(Status.CANCELED, ttl=1)],
    ids=["gone", "running", "succeeded", "canceled"],
)
def test_start_skips_anything_not_queued(current: Prediction | None) -> None:
    assert lifecycle.start(current, batch_size=1) is None


# -- finish ----------------------------------------------------------------------------------------------


def test_finish_with_a_result_succeeds_and_expires_after_the_ttl() -> None:
    p = running()
    done = lifecycle.finish(p, Outcome(p.prediction_id, result={"y": 2}), ttl=30.0)
    assert done is not None
    assert (done.status, done.result, done.error) == (Status.SUCCEEDED, {"y": 2}, None)
    assert done.completed_at is not None and done.expires_at == done.completed_at + 30.0
    assert (done.started_at, done.batch_size, done.attempts) == (p.started_at, p.batch_size, p.attempts)


def test_finish_with_an_error_fails_without_a_result() -> None:
    p = running()
    error = {"code": "model_error", "message": "ValueError: no"}
    done = lifecycle.finish(p, Outcome(p.prediction_id, result="ignored", error=error), ttl=1.0)
    assert done is not None
    assert (done.status, done.error) == (Status.FAILED, error)


@pytest.mark.parametrize(
    "current", [None, queued(), running().finished(Status.CANCELED, ttl=1)], ids=["gone", "queued", "canceled"]
)
def test_finish_leaves_anything_not_running_alone(current: Prediction | None) -> None:
    assert lifecycle.finish(current, Outcome("any", result=1), ttl=1.0) is None


# -- cancel ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("current", [queued(), running()], ids=["queued", "running"])
def test_cancel_ends_an_unfinished_prediction(current: Prediction) -> None:
    canceled = lifecycle.cancel(current, current.prediction_id, ttl=10.0)
    assert (canceled.status, canceled.result, canceled.error) == (Status.CANCELED, None, None)
    assert canceled.started_at == current.started_at
    assert canceled.completed_at is not None and canceled.expires_at == canceled.completed_at + 10.0


@pytest.mark.parametrize("status", [Status.SUCCEEDED, Status.FAILED, Status.CANCELED])
def test_cancel_refuses_a_finished_prediction(status: Status) -> None:
    done = running().finished(status, ttl=1)
    with pytest.raises(AlreadyFinished, match=f"already {status.value}"):
        lifecycle.cancel(done, done.prediction_id, ttl=1)


def test_cancel_of_an_unknown_id_is_not_found() -> None:
    with pytest.raises(NotFound, match="no prediction abc"):
        lifecycle.cancel(None, "abc", ttl=1)


# -- recover ---------------------------------------------------------------------------------------------


def test_recover_queues_a_running_prediction_again_keeping_its_attempts() -> None:
    again = lifecycle.recover(running(attempts=2), max_attempts=3, ttl=1)
    assert (again.status, again.attempts, again.started_at, again.batch_size) == (Status.QUEUED, 2, None, None)


def test_recover_fails_a_prediction_started_max_attempts_times() -> None:
    lost = lifecycle.recover(running(attempts=3), max_attempts=3, ttl=1)
    assert lost.status is Status.FAILED and lost.error is not None
    assert lost.error == {"code": "worker_lost", "message": "the worker running it stopped 3 times"}


def test_recover_leaves_a_queued_prediction_as_it_is() -> None:
    p = queued()
    assert lifecycle.recover(p, max_attempts=1, ttl=1) is p


# -- idempotency -----------------------------------------------------------------------------------------


def test_an_idempotency_key_may_be_reused_with_the_same_body_only() -> None:
    existing = queued()
    stored = IdempotencyKey("k", "fingerprint-a")
    lifecycle.check_idempotency(existing, stored, IdempotencyKey("k", "fingerprint-a"))
    with pytest.raises(IdempotencyConflict, match="'k'"):
        lifecycle.check_idempotency(existing, stored, IdempotencyKey("k", "fingerprint-b"))


def test_a_key_whose_prediction_is_gone_is_free_again() -> None:
    lifecycle.check_idempotency(None, IdempotencyKey("k", "a"), IdempotencyKey("k", "b"))
    lifecycle.check_idempotency(None, None, IdempotencyKey("k", "b"))


# -- prediction ids ---------------------------------------------------------------------------------------


def test_prediction_ids_are_uuid4s_as_uuid_makes_them(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ids come from a pool of random bytes: each must be the uuid4 that uuid would build of its 16 bytes,
    and a pool that runs out is refilled."""
    ids = _RandomIds()
    drawn: list[bytes] = []
    real = os.urandom

    def urandom(n: int) -> bytes:
        drawn.append(real(n))
        return drawn[-1]

    monkeypatch.setattr(os, "urandom", urandom)
    made = [ids() for _ in range(2 * _RandomIds.BATCH + 1)]
    assert len(drawn) == 3 and len(set(made)) == len(made)
    raw = b"".join(drawn)
    assert made == [uuid.UUID(bytes=raw[16 * i : 16 * i + 16], version=4).hex for i in range(len(made))]
    assert all(is_prediction_id(pid) for pid in made)


def test_a_forked_child_draws_ids_of_its_own() -> None:
    ids = _RandomIds()
    ids()  # the pool is full: a child that kept it would hand out the parent's next ids
    reader, writer = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover (the child)
        os.write(writer, ids().encode())
        os._exit(0)
    os.close(writer)
    _, status = os.waitpid(child, 0)
    theirs = os.read(reader, 64).decode()
    os.close(reader)
    assert status == 0 and len(theirs) == 32
    assert theirs != ids()


# -- records made on the hot paths are records like any other ------------------------------------------


def test_records_made_at_a_plain_dataclass_cost_are_frozen_predictions() -> None:
    made = running()  # Prediction.new, then started: both through records.thawed
    assert type(made) is Prediction
    assert made == Prediction(**{name: getattr(made, name) for name in FIELDS})
    assert hash(Prediction.new(("x",), model_name="m", model_version="1")) is not None
    with pytest.raises(FrozenInstanceError):
        made.status = Status.QUEUED  # type: ignore[misc]
    job, outcome = make_job("p", priority=2), make_outcome("p", result=1)
    assert (type(job), job) == (Job, Job("p", priority=2))
    assert (type(outcome), outcome) == (Outcome, Outcome("p", result=1))
    with pytest.raises(FrozenInstanceError):
        job.priority = 1  # type: ignore[misc]
