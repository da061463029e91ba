"""Fakes that implement the real interfaces, for tests of the core and of the HTTP layer.

Nothing here starts a process or sleeps: a model runs when the test lets it, an executor runs a call
when the test says so, and clocks move when the test moves them.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from typing import Any

from zypher_ws import Progress, lifecycle
from zypher_ws.backends.memory import LocalEventBus, MemoryQueue, MemoryStore
from zypher_ws.deployments import Deployment, Deployments
from zypher_ws.metrics import Metrics
from zypher_ws.models import spec_of
from zypher_ws.records import Job, Prediction, Status
from zypher_ws.runner import ModelRunner
from zypher_ws.service import PredictionService
from zypher_ws.settings import Settings
from zypher_ws.workers import WorkerPool

WAIT = 5.0  # seconds any awaited event may take before a test fails
TERMINAL = frozenset(s.value for s in Status if s.terminal)  # statuses as records carry them


def make_settings(**overrides: Any) -> Settings:
    defaults: dict[str, Any] = {"max_batch_delay_ms": 0.0, "shutdown_timeout": 1.0, "store": "memory://"}
    return Settings(**{**defaults, **overrides})


# -- models ---------------------------------------------------------------------------------------


class GatedModel:
    """A fake model that runs only when the test lets it.

    `started` is set (on the loop) each time a batch begins; the batch then waits for `release`.
    An input {"raise": "..."} makes predict_batch raise; otherwise the result echoes the input.
    """

    name = "gated"
    version = "0.0.1"
    input_schema: dict[str, Any] = {
        "type": "object",
        "properties": {"x": {"type": "integer"}, "raise": {"type": "string"}},
        "additionalProperties": False,
    }
    output_schema: dict[str, Any] = {"type": "object"}

    def __init__(self, *, gated: bool = True, load_gate: threading.Event | None = None) -> None:
        self.release = threading.Event()
        if not gated:
            self.release.set()
        self.load_gate = load_gate
        self.batches: list[list[Any]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._started = 0
        self._started_changed: asyncio.Event | None = None

    def load(self) -> None:
        if self.load_gate is not None:
            self.load_gate.wait(WAIT)

    def predict_batch(self, inputs: list[Any]) -> list[Any]:
        self.batches.append(list(inputs))
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._note_start)
        self.release.wait(WAIT)
        bad = [x["raise"] for x in inputs if "raise" in x]
        if bad:
            raise ValueError(bad[0])
        return [{"echo": x} for x in inputs]

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._started_changed = asyncio.Event()

    def _note_start(self) -> None:
        self._started += 1
        assert self._started_changed is not None
        self._started_changed.set()

    async def wait_started(self, count: int = 1) -> None:
        """Wait until `count` batches have begun in total."""
        assert self._started_changed is not None

        async def _wait() -> None:
            while self._started < count:
                self._started_changed.clear()  # type: ignore[union-attr]
                await self._started_changed.wait()  # type: ignore[union-attr]

        await asyncio.wait_for(_wait(), WAIT)


Step = list[Any] | Exception
"""One scripted model call: the outputs it returns, or the exception it raises."""


class ScriptedModel:
    """A model that replays a script, one step per call, and records the inputs of every call.

    A call past the end of the script fails the test: the runner made a call nobody expected.
    """

    name = "scripted"
    version = "0.1.0"
    input_schema: dict[str, Any] = {"type": "object", "properties": {"x": {"type": "integer"}}}
    output_schema: dict[str, Any] = {"type": "object"}

    def __init__(self, *steps: Step, load_error: Exception | None = None) -> None:
        self.script: deque[Step] = deque(steps)
        self.calls: list[list[Any]] = []
        self.load_error = load_error
        self.loads = 0

    def load(self) -> None:
        self.loads += 1
        if self.load_error is not None:
            raise self.load_error

    def predict_batch(self, inputs: list[Any]) -> list[Any]:
        self.calls.append(list(inputs))
        if not self.script:
            raise AssertionError(f"unexpected model call #{len(self.calls)} with {inputs!r}")
        step = self.script.popleft()
        if isinstance(step, Exception):
            raise step
        return step


# -- an executor the test drives ---------------------------------------------------------------------


@dataclass
class Call:
    """One function handed to the executor, not run yet."""

    fn: Callable[..., Any]
    args: tuple[Any, ...]
    future: Future[Any]

    def run(self) -> None:
        """Run it now, on the test's thread, and hand its result or exception to whoever awaits it."""
        try:
            result = self.fn(*self.args)
        except Exception as exc:
            self.future.set_exception(exc)
        else:
            self.future.set_result(result)


class StepExecutor(Executor):
    """An executor with no threads: each submitted call waits until the test runs it (`auto` runs it at once).

    The way cog tests its runner with a fake worker: the test takes the next call, looks at it and
    resolves it, so every state in between can be asserted.
    """

    def __init__(self, *, auto: bool = False) -> None:
        self.auto = auto
        self._pending: deque[Call] = deque()
        self._arrived: asyncio.Event | None = None

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        assert not kwargs
        call = Call(fn, args, Future())
        if self.auto:
            call.run()
        else:
            self._pending.append(call)
            self._event().set()
        return call.future

    async def next_call(self) -> Call:
        """The oldest call not yet taken, waiting (at most WAIT) for one to be submitted."""

        async def arrival() -> Call:
            while not self._pending:
                self._event().clear()
                await self._event().wait()
            return self._pending.popleft()

        return await asyncio.wait_for(arrival(), WAIT)

    @property
    def pending(self) -> int:
        return len(self._pending)

    def _event(self) -> asyncio.Event:
        if self._arrived is None:
            self._arrived = asyncio.Event()
        return self._arrived


# -- backends with something to show ------------------------------------------------------------------


class DurableMemoryStore(MemoryStore):
    """A MemoryStore that also recovers, as a durable store does after a restart."""

    async def recover(self, max_attempts: int) -> tuple[list[Prediction], list[Prediction]]:
        unfinished = [p for p in self._records.values() if not p.status.terminal]
        changed = self._apply(lifecycle.recover(p, max_attempts, self.ttl) for p in unfinished)
        return [p for p in changed if p.status is Status.QUEUED], [p for p in changed if p.status.terminal]


class ObservedQueue(MemoryQueue):
    """A MemoryQueue whose `waiting` is set while a getter waits for a job (a put clears it), so a test
    can put one just then."""

    def __init__(self, maxsize: int) -> None:
        super().__init__(maxsize)
        self.waiting = asyncio.Event()

    async def put(self, job: Job, *, force: bool = False) -> None:
        self.waiting.clear()
        await super().put(job, force=force)

    async def _wait(self, timeout: float | None) -> None:
        self.waiting.set()
        await super()._wait(timeout)


class ManualClock:
    """A clock that moves only when told."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


# -- the core, assembled ---------------------------------------------------------------------------------


class Core:
    """The service over the memory backends, its model run by a StepExecutor, its worker driven by the test.

    No worker task runs: `take_batch` and `run_batch` are one worker's loop, taken a step at a time.
    """

    def __init__(self, model: ScriptedModel, *, records: MemoryStore | None = None, **settings: Any) -> None:
        self.model = model
        self.settings = make_settings(**settings)
        self.executor = StepExecutor()
        self.runner = ModelRunner(model, self.executor) if self.settings.workers else None
        self.store = records if records is not None else MemoryStore(ttl=self.settings.result_ttl)
        self.queue = MemoryQueue(self.settings.max_queue)
        self.bus = LocalEventBus()
        # No pool in the deployment: its workers would start once it loads; the test is the worker here.
        self.deployment = Deployment(
            spec=spec_of(model), model=model, settings=self.settings, queue=self.queue, runner=self.runner
        )
        self.service = PredictionService(
            settings=self.settings, models=Deployments([self.deployment]), store=self.store, bus=self.bus
        )
        if self.runner is not None:
            self.pool = WorkerPool(
                settings=self.settings, queue=self.queue, store=self.store, bus=self.bus, runner=self.runner,
                metrics=Metrics(),
            )  # fmt: skip

    async def load(self) -> None:
        """Load the model and read its schemas (two calls in the executor), as a deployment does."""
        loading = asyncio.create_task(self.deployment.load())
        for _ in range(2 if self.runner is not None else 0):  # without workers here it is only described
            (await self.executor.next_call()).run()
        await asyncio.wait_for(loading, WAIT)

    async def take_batch(self) -> list[Job]:
        """What a worker takes off the queue next (waiting for a job if there is none)."""
        return await asyncio.wait_for(self.queue.get_batch(self.settings.max_batch_size, 0.0), WAIT)

    def run_batch(self, jobs: list[Job]) -> asyncio.Task[None]:
        """Start the batch; its model call waits in `executor` until the test runs it."""
        return asyncio.create_task(self.pool.run_batch(jobs))

    async def work_once(self) -> list[Job]:
        """One turn of a worker with every model call run as it comes: take a batch, run, store, announce."""
        jobs = await self.take_batch()
        batch = self.run_batch(jobs)
        while True:
            call = asyncio.ensure_future(self.executor.next_call())
            done, _ = await asyncio.wait({batch, call}, timeout=WAIT, return_when=asyncio.FIRST_COMPLETED)
            if call not in done:
                call.cancel()
                break
            call.result().run()
        await asyncio.wait_for(batch, WAIT)
        return jobs


class GatedTensorModel(GatedModel):
    """The gated model, with an input of one tensor, `x` (INT64), as the Open Inference Protocol sees it;
    its output is any JSON (`output`, a BYTES tensor of JSON text)."""

    input_schema: dict[str, Any] = {
        "type": "object",
        "properties": {"x": {"type": "integer"}},
        "required": ["x"],
        "additionalProperties": False,
    }


class SteppedStream:
    """A streaming model that yields one chunk each time the test allows one (`allow(n)`); asked
    without `stream`, it batches.

    Each prediction yields `words` in order, with `Progress((i + 1) / len(words))` after each word when
    `progress` is set; `wait_yielded(n)` returns once n chunks have been yielded in total (counted on the
    loop, as the model hands each one over). A chunk not allowed within WAIT seconds fails the prediction.
    """

    name = "stepped"
    version = "0.0.1"
    input_schema: dict[str, Any] = {"type": "object"}
    output_schema: dict[str, Any] = {"type": "string"}

    def __init__(self, words: list[str], *, progress: bool = False) -> None:
        self.words = words
        self.progress = progress
        self._permits = threading.Semaphore(0)
        self._loop: asyncio.AbstractEventLoop | None = None
        self.yielded = 0
        self._yielded_changed: asyncio.Event | None = None

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._yielded_changed = asyncio.Event()

    def load(self) -> None:
        pass

    def allow(self, n: int = 1) -> None:
        self._permits.release(n)

    def predict_batch(self, inputs: list[Any]) -> list[Any]:
        """Not streamed (a request without `stream`): the words at once."""
        return ["".join(self.words) for _ in inputs]

    def predict_stream(self, input: Any) -> Iterator[Any]:
        for i, word in enumerate(self.words):
            if not self._permits.acquire(timeout=WAIT):
                raise TimeoutError(f"chunk {i} was never allowed")
            assert self._loop is not None
            self._loop.call_soon_threadsafe(self._note_yield)
            yield word
            if self.progress:
                yield Progress((i + 1) / len(self.words), f"word {i + 1} of {len(self.words)}")

    def _note_yield(self) -> None:
        self.yielded += 1
        assert self._yielded_changed is not None
        self._yielded_changed.set()

    async def wait_yielded(self, count: int) -> None:
        assert self._yielded_changed is not None
        changed = self._yielded_changed

        async def _wait() -> None:
            while self.yielded < count:
                changed.clear()
                await changed.wait()

        await asyncio.wait_for(_wait(), WAIT)
