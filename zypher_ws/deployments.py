"""The models this process serves: one Deployment per model version.

Each has its own settings (the service's, with its config.json overrides), its own bounded queue and,
where workers run here, its own executor, runner and worker pool: a slow model cannot fill a fast one's
queue or hold its workers. A model that fails to load is `failed` with the reason; the others serve.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator, Iterator, Sequence
from concurrent.futures import Executor
from contextlib import asynccontextmanager
from enum import Enum
from typing import Any

from .backends import Backend, WorkQueue
from .errors import ModelNotFound, ModelUnavailable, NotReady
from .metrics import Metrics
from .models import Model, ModelConfigError, ModelSetupError, ModelSpec
from .queue_policy import QueuePolicy
from .runner import ModelDescription, ModelRunner, describe, make_executor
from .settings import Settings
from .validation import InputValidator
from .workers import WorkerPool

log = logging.getLogger(__name__)


class ModelState(str, Enum):
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"
    UNLOADING = "unloading"
    """Unloaded: it takes nothing new, and runs what it had accepted before it goes."""


class Deployment:
    """One model version: what it is (spec, model), how it is served (settings), and its queue.

    `runner` and `pool` are None in a process that runs no workers for it (an API process of the redis
    backend): there the model is only described, for its routes and the validation of its inputs.
    """

    def __init__(
        self,
        *,
        spec: ModelSpec,
        model: Model,
        settings: Settings,
        queue: WorkQueue,
        runner: ModelRunner | None = None,
        pool: WorkerPool | None = None,
        policy: QueuePolicy | None = None,
    ) -> None:
        self.spec = spec
        self.policy = policy or QueuePolicy()
        """Priorities and timeouts in its queue (config.json's priority_levels, ...)."""
        self.model = model
        self.settings = settings
        self.queue = queue
        self.runner = runner
        self.pool = pool
        self.state = ModelState.LOADING
        self.is_default = spec.is_default
        """The model version a request naming none runs (Deployments settles it: exactly one is)."""
        self.error: str | None = None
        self.description: ModelDescription | None = None
        self.loaded = asyncio.Event()
        """Set once the model is ready or failed."""
        self._submitting = 0  # predictions being stored and queued right now (an unload waits for them)
        self._no_submits = asyncio.Event()
        self._no_submits.set()
        self._validate: InputValidator | None = None
        # What the catalog of a shared backend says of it (catalog.py); None where there is none.
        self.served_by: int | None = None
        """How many worker processes announce they serve it."""
        self.conflict: str | None = None
        """Workers that serve it disagree on what it is: which, and how."""
        self.unavailable: str | None = None
        """No worker has served it for longer than --unserved-grace: why new predictions are refused."""

    @property
    def name(self) -> str:
        return self.model.name

    @property
    def version(self) -> str:
        return self.model.version

    @property
    def streams(self) -> bool:
        """The model has predict_stream: a request may ask for `stream: true`."""
        return callable(getattr(self.model, "predict_stream", None))

    def __repr__(self) -> str:
        return f"<Deployment {self.name} version {self.version} {self.state.value}>"

    async def load(self) -> None:
        """Load the model (where it runs here) or only describe it, then take work. Never raises."""
        try:
            if self.runner is not None:
                description = await self.runner.load()
            else:
                description = await asyncio.to_thread(describe, self.model)
            self._validate = await asyncio.to_thread(InputValidator, description.input_schema)
        except Exception as exc:
            self.state = ModelState.FAILED
            self.error = f"model {self.name} version {self.version} failed to load: {type(exc).__name__}: {exc}"
            log.error("%s", self.error, exc_info=not isinstance(exc, ModelSetupError))  # ours: with a traceback
            self.loaded.set()
            return
        self.description = description
        self.state = ModelState.READY
        if self.pool is not None:
            self.pool.start()  # only now: a worker never hands a batch to a model still loading
            log.info("model %s version %s loaded and ready", self.name, self.version)
        else:
            log.info("model %s version %s ready (it runs in worker processes)", self.name, self.version)
        self.loaded.set()

    def submit_begins(self) -> None:
        self._submitting += 1
        self._no_submits.clear()

    def submit_ends(self) -> None:
        self._submitting -= 1
        if not self._submitting:
            self._no_submits.set()

    async def submits_done(self) -> None:
        """Until no prediction is between being stored and being queued."""
        await self._no_submits.wait()

    def unavailable_error(self, message: str | None = None) -> ModelUnavailable:
        """The answer while no worker serves it (redis), to a new prediction or of a failed one: back
        within a heartbeat at the soonest, when the catalog is read again."""
        return ModelUnavailable(message or self.unavailable, retry_after=self.settings.model_heartbeat)

    def check_served(self) -> None:
        """Raise ModelUnavailable while no worker has served it for longer than --unserved-grace (redis)."""
        if self.unavailable is not None:
            raise self.unavailable_error()

    def check_ready(self, *, public: bool = False) -> None:
        """Raise NotReady unless this model takes predictions now. `public` (for /readyz, which needs no
        token) names a failed model without the reason, which may hold paths: GET /models has it."""
        if self.state is ModelState.FAILED:
            if public:
                raise NotReady(f"model {self.name} version {self.version} failed to load (GET /models says why)")
            raise NotReady(self.error)
        if self.state is ModelState.LOADING:
            raise NotReady(f"model {self.name} version {self.version} is still loading")
        if self.state is ModelState.UNLOADING:
            raise NotReady(f"model {self.name} version {self.version} is being unloaded")

    def validate(self, value: Any) -> None:
        """Raise InvalidInput naming the offending field, per the model's JSON Schema (NotReady before it
        is known)."""
        if self._validate is None:
            self.check_ready()
        assert self._validate is not None
        self._validate(value)

    def to_dict(self) -> dict[str, Any]:
        """As `GET /models` lists it."""
        return {
            "name": self.name,
            "version": self.version,
            "runtime": self.spec.runtime,
            "state": self.state.value,
            "error": self.error,
            "default": self.is_default,
            "streams": self.streams,
            **({"served_by": self.served_by} if self.served_by is not None else {}),
            **({"conflict": self.conflict} if self.conflict else {}),
            **({"unavailable": self.unavailable} if self.unavailable else {}),
            "links": {
                "self": f"/models/{self.name}/versions/{self.version}",
                "predict": f"/models/{self.name}/versions/{self.version}/predict",
            },
        }

    def metadata(self) -> dict[str, Any]:
        """As `GET /models/{name}[/versions/{version}]` shows it: the listing plus both schemas."""
        description = self.description
        return {
            **self.to_dict(),
            "input_schema": description.input_schema if description else None,
            "output_schema": description.output_schema if description else None,
        }


class Deployments:
    """Every model version served here, found by name and version; exactly one is the default.

    The set changes at runtime (the repository extension's load and unload): each change replaces the
    lists rather than editing them, so a loop over the deployments that awaits meanwhile goes on over
    the set as it was when it began.
    """

    def __init__(self, deployments: Sequence[Deployment], deployer: Deployer | None = None) -> None:
        if not deployments:
            raise ModelConfigError("no model to serve")
        self.deployer = deployer
        """What makes and ends deployments (None: a fixed set, as tests build it)."""
        self.lock = asyncio.Lock()
        """Held by whatever reads the set, then changes it, at runtime (a repository load or unload, the
        catalog follower adding what workers publish), so that two never change it from one reading."""
        self.unloaded: set[tuple[str, str]] = set()
        """Versions an operator unloaded (the repository's unload): not served again from the catalog of
        a shared backend until loaded here again."""
        self._all: list[Deployment] = []
        self._by_key: dict[tuple[str, str], Deployment] = {}
        for d in deployments:
            self.add(d)
        defaults = [d for d in self._all if d.is_default] or self._all[:1]
        self.default = defaults[0]
        for d in self._all:
            d.is_default = d is self.default

    def add(self, deployment: Deployment) -> None:
        """Serve one more model version. Raises ModelConfigError if that version is served already."""
        key = (deployment.name, deployment.version)
        if key in self._by_key:
            earlier = self._by_key[key]
            raise ModelConfigError(
                f"model {deployment.name} version {deployment.version} is served twice: "
                f"{earlier.spec.source} and {deployment.spec.source}"
            )
        self._all = [*self._all, deployment]
        self._by_key = {**self._by_key, key: deployment}

    def remove(self, name: str) -> list[Deployment]:
        """Serve no version of `name` any more (the default model stays); returns those removed."""
        gone = [d for d in self._all if d.name == name and d is not self.default]
        self._all = [d for d in self._all if d not in gone]
        self._by_key = {(d.name, d.version): d for d in self._all}
        return gone

    def discard(self, deployment: Deployment) -> None:
        """Serve this one version no more (not the default)."""
        if deployment is not self.default:
            self._all = [d for d in self._all if d is not deployment]
            self._by_key = {(d.name, d.version): d for d in self._all}

    def replace(self, old: Deployment, new: Deployment) -> None:
        """Serve `new` in place of `old`, of the same version (a failed one, loaded again); the default
        stays the default."""
        self._all = [new if d is old else d for d in self._all]
        self._by_key = {(d.name, d.version): d for d in self._all}
        new.is_default = old.is_default
        if self.default is old:
            self.default = new

    def __iter__(self) -> Iterator[Deployment]:
        return iter(self._all)

    def __len__(self) -> int:
        return len(self._all)

    def names(self) -> list[str]:
        return list(dict.fromkeys(d.name for d in self._all))

    def versions(self, name: str) -> list[Deployment]:
        """One model's versions, lowest first (numbers by value)."""
        return sorted((d for d in self._all if d.name == name), key=lambda d: _version_key(d.version))

    def find(self, name: str | None = None, version: str | None = None) -> Deployment:
        """The deployment a request names: none is the default; a name alone its highest version (the
        default's own version, for the default model). Raises ModelNotFound."""
        if name is None:
            if version is None:
                return self.default
            name = self.default.name
        if version is not None:
            found = self._by_key.get((name, version))
            if found is None:
                if not any(d.name == name for d in self._all):
                    raise ModelNotFound(f"no model {name!r} (models: {', '.join(self.names())})")
                served = ", ".join(d.version for d in self.versions(name))
                raise ModelNotFound(f"model {name} has no version {version!r} (versions: {served})")
            return found
        if name == self.default.name:
            return self.default
        versions = self.versions(name)
        if not versions:
            raise ModelNotFound(f"no model {name!r} (models: {', '.join(self.names())})")
        return versions[-1]

    def get(self, name: str, version: str) -> Deployment | None:
        return self._by_key.get((name, version))

    async def stop(self, timeout: float) -> None:
        """Stop every worker pool at once, giving running batches `timeout` seconds to finish."""
        await asyncio.gather(*(d.pool.stop(timeout) for d in self._all if d.pool is not None))


class Deployer:
    """Gives a model version its queue and (with `run_here` and workers) its executor, runner and pool;
    loads it in the background; and, when it is unloaded, runs what it had accepted and ends it."""

    def __init__(self, *, settings: Settings, backend: Backend, metrics: Metrics, run_here: bool) -> None:
        self._settings = settings
        self._backend = backend
        self._metrics = metrics
        self._run_here = run_here
        self._executors: dict[Deployment, Executor] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._unloading: set[Deployment] = set()

    async def make(self, spec: ModelSpec, model: Model, *, describe_only: bool = False) -> Deployment:
        """`describe_only`: never run here, whatever --workers says (a model that worker processes publish)."""
        own = dataclasses.replace(self._settings, **spec.config.overrides())
        policy = spec.config.queue_policy()
        queue = await self._backend.open_queue(model.name, model.version, own.max_queue, policy.priority_levels)
        runner = pool = None
        executor = None
        if self._run_here and own.workers and not describe_only:
            executor = make_executor(own, spec)
            runner = ModelRunner(model, executor, workers=own.workers)
            pool = WorkerPool(
                settings=own,
                queue=queue,
                store=self._backend.store,
                bus=self._backend.bus,
                runner=runner,
                metrics=self._metrics,
            )
        deployment = Deployment(
            spec=spec, model=model, settings=own, queue=queue, runner=runner, pool=pool, policy=policy
        )
        if executor is not None:
            self._executors[deployment] = executor
        return deployment

    def start_loading(self, deployment: Deployment) -> asyncio.Task[None]:
        return self._track(deployment.load(), f"zypher-load-{deployment.name}-{deployment.version}")

    def unload(self, deployment: Deployment) -> asyncio.Task[None]:
        """Take nothing new (it is already out of the set served), run what it had accepted, then stop
        its workers and executor. The task ends once it is gone."""
        deployment.state = ModelState.UNLOADING
        self._unloading.add(deployment)
        return self._track(self._drain(deployment), f"zypher-unload-{deployment.name}-{deployment.version}")

    async def _drain(self, deployment: Deployment) -> None:
        await deployment.submits_done()  # one stored but not queued yet will be queued, and must be run
        if deployment.pool is not None and deployment.description is not None:  # it loaded: workers run
            await deployment.pool.drain()
        # Else (Redis) its claims loop would go on taking over other consumers' idle entries, to be held
        # here with no worker to run them; closing hands back what it took since the pool drained.
        await deployment.queue.close()
        self._unloading.discard(deployment)
        self.end(deployment)
        log.info("model %s version %s unloaded", deployment.name, deployment.version)

    def end(self, deployment: Deployment) -> None:
        executor = self._executors.pop(deployment, None)
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)
        if deployment.runner is not None:
            deployment.runner.stop_streams()

    def _track(self, work: Any, name: str) -> asyncio.Task[None]:
        task = asyncio.create_task(work, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def cancel(self) -> None:
        """Stop the loads and unloads under way (shutdown: the served pools stop next). The workers of
        a model still unloading stop as the served ones do: running batches get --shutdown-timeout, and
        what stays queued is recovered at the next start, like any model's."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        unloading, self._unloading = self._unloading, set()
        pools = [d.pool for d in unloading if d.pool is not None]
        await asyncio.gather(*(pool.stop(self._settings.shutdown_timeout) for pool in pools))

    async def close(self) -> None:
        """Once the pools have stopped: the executors too."""
        await self.cancel()
        for executor in self._executors.values():
            executor.shutdown(wait=False, cancel_futures=True)
        self._executors.clear()


@asynccontextmanager
async def deploy(
    models: Sequence[tuple[ModelSpec, Model]],
    *,
    settings: Settings,
    backend: Backend,
    metrics: Metrics,
    run_here: bool = True,
) -> AsyncIterator[Deployments]:
    """Give each model version its queue and (with `run_here` and workers) its executor, runner and pool,
    and start loading them all at once in the background; on exit, stop the pools and executors."""
    deployer = Deployer(settings=settings, backend=backend, metrics=metrics, run_here=run_here)
    try:
        made = [await deployer.make(spec, model) for spec, model in models]
        served = Deployments(made, deployer)
        for deployment in served:
            deployer.start_loading(deployment)
        try:
            yield served
        finally:
            await deployer.cancel()  # loads (and unloads) still under way
            await served.stop(settings.shutdown_timeout)
    finally:
        await deployer.close()


def total_workers(models: Sequence[tuple[ModelSpec, Model]], settings: Settings) -> int:
    """How many workers the models will have here in all (each waits on its queue: Redis sizes its pool)."""
    return sum(dataclasses.replace(settings, **spec.config.overrides()).workers for spec, _ in models)


def _version_key(version: str) -> tuple[int, int, str]:
    return (0, int(version), "") if version.isdigit() else (1, 0, version)
