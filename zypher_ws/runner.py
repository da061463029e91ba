"""Runs the model off the event loop and turns each input into an Outcome."""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from typing import Any

from . import oip
from .errors import ModelError
from .models import Model, ModelSpec, TensorMetadata, tensor_metadata
from .records import Outcome, Prediction
from .settings import Settings
from .streaming import PROCESS_QUEUE_ITEMS, Item, ToLoop, ToQueue, iterate

log = logging.getLogger(__name__)


def _error(exc: BaseException) -> dict[str, str]:
    return ModelError(f"{type(exc).__name__}: {exc}").to_dict()


@dataclass(frozen=True)
class ModelDescription:
    """What a loaded model says about itself: its JSON Schemas and tensors (for routes and validation)."""

    input_schema: dict[str, Any]
    output_schema: dict[str, Any]
    tensors: TensorMetadata


def describe(model: Model) -> ModelDescription:
    """Read a model's schemas; in the executor, since a file model reads its file to know them."""
    return ModelDescription(model.input_schema, model.output_schema, tensor_metadata(model))


def make_executor(settings: Settings, spec: ModelSpec | None = None) -> Executor:
    """One thread or process per concurrent batch (--workers, or the model's own `workers`).

    Threads suit models that release the GIL (numpy, torch, remote calls). Processes suit pure-Python
    models that hold it; each process builds and loads its own copy of the model `spec` describes.
    Either way they run at a lower scheduling priority (--model-nice) than the event loop, so a model
    that saturates the CPU only gets the cycles the loop leaves: requests and health checks are still
    read and answered at once, and batches grow while the model waits.
    """
    workers = max(1, settings.workers)
    if settings.executor == "process":
        if spec is None:
            raise ValueError("--executor process builds the model in each process: it needs the model's spec")
        # spawn, not fork: forking a process that runs an event loop and threads is unsafe.
        return ProcessPoolExecutor(
            max_workers=workers, mp_context=get_context("spawn"), initializer=_load_here, initargs=(settings, spec)
        )
    return ThreadPoolExecutor(
        max_workers=workers, thread_name_prefix="zypher-model", initializer=_lower_priority, initargs=(settings,)
    )


def _lower_priority(settings: Settings) -> None:
    """Raise this thread's (or process's) niceness: on Linux every thread has its own."""
    if settings.model_nice > 0 and hasattr(os, "setpriority"):
        try:
            current = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), min(19, current + settings.model_nice))
        except OSError as exc:
            log.warning("could not lower the model's scheduling priority: %s", exc)


_process_model: Model | None = None  # the model, inside each worker process of --executor process


def _load_here(settings: Settings, spec: ModelSpec) -> None:
    global _process_model
    from .models import build

    _lower_priority(settings)
    model = build(spec)
    model.load()
    _process_model = model


def _ready_here() -> None:
    assert _process_model is not None


def _describe_here() -> ModelDescription:
    assert _process_model is not None
    return describe(_process_model)


def _predict_here(inputs: list[Any]) -> list[Any]:
    assert _process_model is not None
    return _process_model.predict_batch(inputs)


def _stream(model: Any, value: Any, emit: Callable[[Item], None], cancelled: Callable[[], bool], limits: Any) -> Any:
    """A model's stream of one input, in the executor: its items to `emit`; the error that ended it, or None."""
    skip, max_chunks, max_bytes = limits
    try:
        generator = model.predict_stream(value)
    except Exception as exc:
        return _error(exc)
    return iterate(generator, emit, cancelled, skip=skip, max_chunks=max_chunks, max_bytes=max_bytes)


def _stream_here(value: Any, items: Any, cancel: Any, limits: tuple[int, int, int]) -> Any:
    """A stream in a worker process: its items go through a manager's queue (`items`), then a None."""
    assert _process_model is not None
    to_parent = ToQueue(items)
    try:
        return _stream(_process_model, value, to_parent, cancel.is_set, limits)
    finally:
        to_parent.flush()
        items.put(None)


def _forward(items: Any, emit: Callable[[Item], None], call_done: threading.Event) -> None:
    """In a thread: a worker process's stream items, from the manager's queue to the loop, in order."""
    while True:
        try:
            item = items.get(timeout=0.2)
        except queue.Empty:
            if call_done.is_set():  # the process died before its None (abandoned at shutdown)
                return
            continue
        if item is None:
            return
        emit(item)


def exit_past_stuck_model_calls(runners: Sequence[ModelRunner]) -> None:
    """The last step of a shutdown: if model calls outlived --shutdown-timeout, exit now rather than let
    the interpreter join their threads (a 60 s call would hold the exit for 60 s). Everything else has
    already stopped: the store is closed, and those predictions are recovered on the next start."""
    stuck = sum(runner.abandon() for runner in runners)
    if stuck:
        log.warning(
            "%d model call(s) still running after --shutdown-timeout: abandoned; "
            "their predictions run again on the next start",
            stuck,
        )
        logging.shutdown()
        os._exit(0)


class ModelRunner:
    def __init__(self, model: Model, executor: Executor, *, workers: int = 1) -> None:
        self.model = model
        self._executor = executor
        in_processes = isinstance(executor, ProcessPoolExecutor)
        self._workers = max(1, workers)
        # With processes, `model` only describes the model (name, schemas); each process loads its own.
        self._load: Callable[[], None] = _ready_here if in_processes else model.load
        self._describe: Callable[[], ModelDescription] = _describe_here if in_processes else (lambda: describe(model))
        self._predict: Callable[[list[Any]], list[Any]] = _predict_here if in_processes else model.predict_batch
        self.streams = callable(getattr(model, "predict_stream", None))
        """The model has predict_stream: a request may ask to stream (docs/models.md)."""
        self.stream_only = self.streams and bool(getattr(model, "stream_only", False))
        """It has nothing else: a request that does not ask to stream runs the stream too, collected."""
        self._in_processes = in_processes
        self._manager: Any = None  # the multiprocessing manager whose queues carry streams from processes
        # Threads of its own for the streams of processes, not the loop's default executor: each stream
        # holds a forwarding thread for its whole life (as many as its processes run at once), and the
        # calls to the manager (a queue made, a cancel set) must not wait behind them.
        self._forwarders: ThreadPoolExecutor | None = None
        self._control: ThreadPoolExecutor | None = None
        self.loaded = False
        self.description: ModelDescription | None = None
        self.load_error: str | None = None
        self.loaded_event = asyncio.Event()
        self._calls: set[Future[Any]] = set()  # model calls submitted and not yet returned

    def _submit(self, fn: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
        call = self._executor.submit(fn, *args)
        self._calls.add(call)
        call.add_done_callback(self._calls.discard)  # on the executor's thread: set.discard is atomic
        return asyncio.wrap_future(call)

    def abandon(self) -> int:
        """At exit, after the executor was shut down: how many model calls are still running. They are
        given up (processes are terminated; a thread cannot be, so the caller must exit without joining
        it) and their predictions stay `running` in the store, for recovery on the next start."""
        running = sum(1 for call in tuple(self._calls) if not call.done())
        if running and isinstance(self._executor, ProcessPoolExecutor):
            # No public way to stop a busy worker process; its call's result is not wanted any more.
            for process in list(getattr(self._executor, "_processes", {}).values()):
                process.terminate()
        return running

    def stop_streams(self) -> None:
        """Once the executor is shut down: stop the manager process that carried streams from its processes."""
        for pool in (self._forwarders, self._control):
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)
        self._forwarders = self._control = None
        manager, self._manager = self._manager, None
        if manager is not None:  # its shutdown joins a process: not on the loop
            threading.Thread(target=manager.shutdown, name="zypher-stream-manager-stop", daemon=True).start()

    async def load(self) -> ModelDescription:
        """Load in the executor and describe the model as loaded. A failure is kept and re-raised."""
        try:
            await self._submit(self._load)
            description: ModelDescription = await self._submit(self._describe)
        except Exception as exc:
            self.load_error = f"failed to load: {type(exc).__name__}: {exc}"
            raise
        self.description = description
        self.loaded = True
        self.loaded_event.set()
        return description

    async def start_stream(
        self, value: Any, emit: Callable[[Item], None], *, skip: int, max_chunks: int, max_bytes: int
    ) -> tuple[asyncio.Future[Any], Callable[[], None]]:
        """Start the model's stream of one input in the executor; `emit` gets its items on the loop, in
        order, all before the returned call ends (with the error that ended the stream, or None). The
        callable cancels it at its next yield."""
        loop = asyncio.get_running_loop()
        to_loop = ToLoop(loop, emit)

        limits = (skip, max_chunks, max_bytes)
        if not self._in_processes:
            cancel = threading.Event()
            return self._submit(_stream, self.model, value, to_loop, cancel.is_set, limits), cancel.set
        if self._control is None or self._forwarders is None:
            self._control = ThreadPoolExecutor(max_workers=2, thread_name_prefix="zypher-stream-control")
            # Sized to the processes: a stream queued behind them has its forwarding thread queued too. Both
            # pools run in submission order, so a process can start a stream before its forwarder has a
            # thread only while the forwarder before it drains a stream that has ended; the process waits
            # for room in the bounded queue meanwhile (PROCESS_QUEUE_ITEMS), never for the model.
            self._forwarders = ThreadPoolExecutor(max_workers=self._workers, thread_name_prefix="zypher-stream")
        control, forwarders = self._control, self._forwarders
        if self._manager is None:
            # A manager's queue can be handed to a pool's process (a plain multiprocessing queue cannot):
            # one manager process per model, started by its first stream.
            self._manager = await loop.run_in_executor(control, get_context("spawn").Manager)
        manager = self._manager
        items, cancel = await loop.run_in_executor(
            control, lambda: (manager.Queue(PROCESS_QUEUE_ITEMS), manager.Event())
        )
        call = self._submit(_stream_here, value, items, cancel, limits)
        call_done = threading.Event()
        call.add_done_callback(lambda _: call_done.set())
        forward = loop.run_in_executor(forwarders, _forward, items, to_loop, call_done)

        async def both() -> Any:
            error = await call
            await forward
            return error

        def cancel_it() -> None:
            try:
                control.submit(cancel.set)  # a call to the manager: off the loop
            except RuntimeError:  # stopped already: the processes are gone with their streams
                pass

        return asyncio.ensure_future(both()), cancel_it

    async def run_predictions(self, predictions: Sequence[Prediction], max_rows: int) -> list[Outcome]:
        """One outcome per prediction. A prediction of several rows (an OIP request) has all of them in
        the model calls, beside the other predictions' rows: the rows of the batch go to the model in
        calls of at most `max_rows`, and each prediction's outputs are put back together. A prediction
        fails if any of its rows does."""
        rows: list[Any] = []
        spans: list[tuple[int, int]] = []
        for prediction in predictions:
            own = oip.rows_of(prediction.input) if prediction.protocol == oip.PROTOCOL else [prediction.input]
            spans.append((len(rows), len(rows) + len(own)))
            rows.extend(own)
        if all(p.protocol is None for p in predictions) and len(rows) <= max_rows:
            return await self.run([p.prediction_id for p in predictions], rows)  # the common case, as it was
        outcomes: list[Outcome] = []
        for start in range(0, len(rows), max_rows):
            chunk = rows[start : start + max_rows]
            outcomes += await self.run([str(i) for i in range(start, start + len(chunk))], chunk)
        return [self._gather(p, outcomes[a:b]) for p, (a, b) in zip(predictions, spans, strict=True)]

    def _gather(self, prediction: Prediction, rows: list[Outcome]) -> Outcome:
        pid = prediction.prediction_id
        failed = next((o for o in rows if o.error is not None), None)
        if failed is not None:
            return Outcome(pid, error=failed.error)
        if prediction.protocol != oip.PROTOCOL:
            return Outcome(pid, result=rows[0].result)
        assert self.description is not None  # a model runs only once loaded
        try:
            result = oip.response(
                prediction.input,
                [o.result for o in rows],
                self.description.tensors,
                model=prediction.model_name,
                version=prediction.model_version,
            )
        except Exception as exc:  # outputs that do not form the model's tensors: this prediction fails
            return Outcome(pid, error=_error(exc))
        return Outcome(pid, result=result)

    async def run(self, ids: list[str], inputs: list[Any]) -> list[Outcome]:
        """One model call for the batch; if it raises, each item alone, so one bad input fails only itself."""
        try:
            results = await self._submit(self._predict, inputs)
            if len(results) != len(inputs):
                raise ValueError(f"model returned {len(results)} outputs for {len(inputs)} inputs")
            return [Outcome(pid, result=r) for pid, r in zip(ids, results, strict=True)]
        except Exception as exc:
            if len(inputs) == 1:
                log.info("model raised on prediction %s: %r", ids[0], exc)
                return [Outcome(ids[0], error=_error(exc))]
            log.info("model raised on a batch of %d; retrying one by one: %r", len(inputs), exc)
        return [outcome for pid, x in zip(ids, inputs, strict=True) for outcome in await self.run([pid], [x])]
