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
from contextlib import asynccontextmanager
from enum import Enum
from typing import Any

from .backends import Backend, WorkQueue
from .errors import ModelNotFound, NotReady
from .metrics import Metrics
from .models import Model, ModelConfigError, ModelSetupError, ModelSpec
from .runner import ModelDescription, ModelRunner, describe, make_executor
from .settings import Settings
from .validation import InputValidator
from .workers import WorkerPool

log = logging.getLogger(__name__)


class ModelState(str, Enum):
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"


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
    ) -> None:
        self.spec = spec
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
        self._validate: InputValidator | None = None

    @property
    def name(self) -> str:
        return self.model.name

    @property
    def version(self) -> str:
        return self.model.version

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

    def check_ready(self, *, public: bool = False) -> None:
        """Raise NotReady unless this model takes predictions now. `public` (for /readyz, which needs no
        token) names a failed model without the reason, which may hold paths: GET /models has it."""
        if self.state is ModelState.FAILED:
            if public:
                raise NotReady(f"model {self.name} version {self.version} failed to load (GET /models says why)")
            raise NotReady(self.error)
        if self.state is ModelState.LOADING:
            raise NotReady(f"model {self.name} version {self.version} is still loading")

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
    """Every model version served here, found by name and version; exactly one is the default."""

    def __init__(self, deployments: Sequence[Deployment]) -> None:
        if not deployments:
            raise ModelConfigError("no model to serve")
        self._all = list(deployments)
        self._by_key: dict[tuple[str, str], Deployment] = {}
        for d in self._all:
            if (d.name, d.version) in self._by_key:
                earlier = self._by_key[(d.name, d.version)]
                raise ModelConfigError(
                    f"model {d.name} version {d.version} is served twice: {earlier.spec.source} and {d.spec.source}"
                )
            self._by_key[(d.name, d.version)] = d
        defaults = [d for d in self._all if d.is_default] or self._all[:1]
        self.default = defaults[0]
        for d in self._all:
            d.is_default = d is self.default

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
    deployments: list[Deployment] = []
    executors = []
    try:
        for spec, model in models:
            own = dataclasses.replace(settings, **spec.config.overrides())
            queue = await backend.open_queue(model.name, model.version, own.max_queue)
            runner = pool = None
            if run_here and own.workers:
                executor = make_executor(own, spec)
                executors.append(executor)
                runner = ModelRunner(model, executor)
                pool = WorkerPool(
                    settings=own, queue=queue, store=backend.store, bus=backend.bus, runner=runner, metrics=metrics
                )
            deployments.append(Deployment(spec=spec, model=model, settings=own, queue=queue, runner=runner, pool=pool))
        served = Deployments(deployments)
        loads = [asyncio.create_task(d.load(), name=f"zypher-load-{d.name}-{d.version}") for d in served]
        try:
            yield served
        finally:
            for task in loads:
                task.cancel()
            await asyncio.gather(*loads, return_exceptions=True)
            await served.stop(settings.shutdown_timeout)
    finally:
        for executor in executors:
            executor.shutdown(wait=False, cancel_futures=True)


def total_workers(models: Sequence[tuple[ModelSpec, Model]], settings: Settings) -> int:
    """How many workers the models will have here in all (each waits on its queue: Redis sizes its pool)."""
    return sum(dataclasses.replace(settings, **spec.config.overrides()).workers for spec, _ in models)


def _version_key(version: str) -> tuple[int, int, str]:
    return (0, int(version), "") if version.isdigit() else (1, 0, version)
