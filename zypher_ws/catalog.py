"""Which model versions are served across processes, and what each is (a shared backend: Redis).

Workers publish each model version they serve once it has loaded: its description (schemas, tensors,
runtime, the queue settings an API process needs), renewed every --model-heartbeat and holding for three
of them; while it loads, an announcement with no description, which holds but describes nothing.
API processes read the catalog as often: a version they do not load themselves is served from
its description alone (`PublishedModel`: it is described, validated and documented, never run here),
so API processes need no model files. The catalog also says which versions nobody serves: past
--unserved-grace new predictions are refused, and one API process at a time (a lease) fails what no live
worker holds in their queues (`model_unavailable`); a running one only on the queue's own evidence that
its worker is gone. Past --catalog-retention more, with nothing queued, a version is forgotten.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from . import logs
from .errors import ModelUnavailable, RetryLater
from .models import ModelConfig, ModelSpec, TensorSpec
from .records import Outcome

if TYPE_CHECKING:
    from .backends import EventBus, Store
    from .deployments import Deployment, Deployments
    from .metrics import Metrics
    from .settings import Settings

log = logging.getLogger(__name__)

Key = tuple[str, str]
"""(model name, version)."""

SWEEP_BATCH = 500  # predictions of one unserved version failed per round (the next round takes more)
SWEEP_LEASE = 0.8  # of a heartbeat: one API process sweeps a round, and the next round's may be another


@dataclass(frozen=True)
class CatalogState:
    now: float
    """The catalog's clock (epoch seconds): every time here is by it."""
    known: Mapping[Key, str]
    """Every version ever published, with its description (JSON) as the catalog keeps it."""
    served_until: Mapping[Key, float]
    """Until when the last announcement of each version holds (the past: no one serves it since)."""
    servers: Mapping[Key, Mapping[str, str]]
    """The workers serving each version now, each with the description it publishes."""
    loading: Mapping[Key, frozenset[str]] = field(default_factory=dict)
    """The workers loading each version now: they hold off the sweep, but describe nothing yet."""
    first_seen: Mapping[Key, float] = field(default_factory=dict)
    """When some process first asked of each version no worker has announced (by the catalog's clock):
    its grace runs from then, the same for every process."""


class Catalog(Protocol):
    """Where workers announce what they serve (backends/redis/catalog.py)."""

    async def publish(self, descriptions: Mapping[Key, str | None], ttl: float) -> list[tuple[Key, str]]:
        """Announce this process serves these versions for `ttl` seconds (None: loads it, nothing to describe
        yet); returns (version, worker) of the other live workers that publish a different description of
        one of them."""
        ...

    async def withdraw(self, versions: Sequence[Key]) -> None:
        """This process serves these no more."""
        ...

    async def sweep_lease(self, ttl: float) -> bool:
        """Whether this process is the one to fail unserved versions' predictions for the next `ttl`
        seconds (one process sweeps a round; the others would only find the same entries)."""
        ...

    async def retire(self, version: Key) -> bool:
        """Forget a version no worker serves, with its (empty) queue: True if done, False if some worker
        announces it or something is queued for it."""
        ...

    async def read(self, watch: Sequence[Key] = ()) -> CatalogState:
        """The catalog now; of the `watch`ed versions never announced, when they were first asked of."""
        ...


def description_of(deployment: Deployment) -> str:
    """What a loaded deployment publishes: canonical JSON, so that equal descriptions are equal text."""
    described = deployment.description
    assert described is not None
    config = deployment.spec.config
    s = deployment.settings
    streams = {"streams": True} if deployment.streams else {}  # absent otherwise: the description as before
    return json.dumps(
        {
            **streams,
            "name": deployment.name,
            "version": deployment.version,
            "runtime": deployment.spec.runtime,
            "input_schema": described.input_schema,
            "output_schema": described.output_schema,
            "inputs": [_tensor(t) for t in described.tensors.inputs],
            "outputs": [_tensor(t) for t in described.tensors.outputs],
            # What an API process needs to queue and admit its predictions as the workers take them.
            "config": {
                "max_queue": s.max_queue,
                "max_batch_size": s.max_batch_size,
                "priority_levels": config.priority_levels,
                "default_priority_level": config.default_priority_level,
                "default_timeout_us": config.default_timeout_us,
                "allow_timeout_override": config.allow_timeout_override,
            },
        },
        sort_keys=True,
        separators=(",", ":"),
    )


def _tensor(t: TensorSpec) -> dict[str, Any]:
    return {**t.to_dict(), "json": t.json}


class PublishedModel:
    """A model version that runs in worker processes, known here by what they publish of it."""

    def __init__(self, description: dict[str, Any]) -> None:
        self.name: str = description["name"]
        self.version: str = description["version"]
        self._description = description
        if description.get("streams"):
            self.predict_stream = self._elsewhere  # its workers stream: requests here may ask for it

    @property
    def input_schema(self) -> dict[str, Any]:
        return dict(self._description["input_schema"])

    @property
    def output_schema(self) -> dict[str, Any]:
        return dict(self._description["output_schema"])

    @property
    def inputs(self) -> Sequence[TensorSpec]:
        return [_tensor_spec(t) for t in self._description["inputs"]]

    @property
    def outputs(self) -> Sequence[TensorSpec]:
        return [_tensor_spec(t) for t in self._description["outputs"]]

    def load(self) -> None:
        pass  # nothing to load: it is only described here

    def predict_batch(self, inputs: list[Any]) -> list[Any]:
        raise RuntimeError(f"model {self.name} version {self.version} runs in worker processes, not here")

    def _elsewhere(self, input: Any) -> Any:
        raise RuntimeError(f"model {self.name} version {self.version} streams in worker processes, not here")


def _tensor_spec(t: dict[str, Any]) -> TensorSpec:
    return TensorSpec(t["name"], t["datatype"], tuple(t["shape"]), json=bool(t.get("json")))


def published_spec(text: str, source: str) -> tuple[ModelSpec, PublishedModel]:
    """The spec and model of a published description. Raises (ValueError, KeyError, ModelConfigError...)
    if it is not one (written by another version of zypher-ws, say)."""
    description = json.loads(text)
    config = dict(description["config"])
    spec = ModelSpec(
        name=description["name"],
        version=description["version"],
        runtime=description["runtime"],
        config=ModelConfig(
            max_queue=config["max_queue"],
            max_batch_size=config["max_batch_size"],
            priority_levels=config["priority_levels"],
            default_priority_level=config["default_priority_level"],
            default_timeout_us=config["default_timeout_us"],
            allow_timeout_override=config["allow_timeout_override"],
        ),
        source=source,
    )
    return spec, PublishedModel(description)


def _differences(texts: Sequence[str]) -> list[str]:
    """The top-level fields (and config keys) in which the descriptions differ."""
    parsed = [json.loads(t) for t in texts]
    fields = sorted({key for d in parsed for key in d})
    differ = [f for f in fields if f != "config" and len({json.dumps(d.get(f), sort_keys=True) for d in parsed}) > 1]
    configs = [d.get("config") or {} for d in parsed]
    differ += [
        f"config.{k}"
        for k in sorted({k for c in configs for k in c})
        if len({json.dumps(c.get(k)) for c in configs}) > 1
    ]
    return differ


# -- workers: announce what is served here ------------------------------------------------------------


@asynccontextmanager
async def publishing(catalog: Catalog | None, models: Deployments, settings: Settings) -> AsyncIterator[None]:
    """While the block runs, announce every model version this process runs (loaded, with workers) to the
    catalog; withdraw them at the end. No catalog (an embedded backend): nothing to do."""
    if catalog is None:
        yield
        return
    publisher = _Publisher(catalog, models, settings)
    task = asyncio.create_task(publisher.run(), name="zypher-publish-models")
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        with suppress(RetryLater):
            await catalog.withdraw(list(publisher.published))


class _Publisher:
    def __init__(self, catalog: Catalog, models: Deployments, settings: Settings) -> None:
        self.catalog = catalog
        self.models = models
        self.heartbeat = settings.model_heartbeat
        self.published: dict[Key, str | None] = {}
        self._disagreeing: set[tuple[Key, str]] = set()

    async def run(self) -> None:
        from .deployments import ModelState

        while True:
            # A version still loading is announced without a description: it is being served (its queue
            # must not be failed as nobody's), but API processes cannot describe it from that.
            serving: dict[Key, str | None] = {
                (d.name, d.version): None for d in self.models if d.pool is not None and d.state is ModelState.LOADING
            }
            serving.update(
                ((d.name, d.version), description_of(d))
                for d in self.models
                if d.pool is not None and d.state is ModelState.READY and d.description is not None
            )
            try:
                gone = [key for key in self.published if key not in serving]
                await self.catalog.withdraw(gone)
                disagree = await self.catalog.publish(serving, ttl=3 * self.heartbeat) if serving else []
                self.published = serving
                for key, other in set(disagree) - self._disagreeing:
                    log.warning(
                        "model %s version %s: worker %s publishes another description of it than this one "
                        "(another model file or config.json?); API processes keep the first published and "
                        "name the conflict in GET /models",
                        *key,
                        other,
                    )
                self._disagreeing = set(disagree)
            except RetryLater as exc:
                log.warning("cannot announce the models served here (%s); trying again", exc.message)
            except Exception:
                log.exception("announcing the models served here failed; trying again")
            # The next round at once when a model finishes loading, else after a heartbeat.
            loading = [asyncio.ensure_future(d.loaded.wait()) for d in self.models if not d.loaded.is_set()]
            try:
                if loading:
                    await asyncio.wait(loading, timeout=self.heartbeat, return_when=asyncio.FIRST_COMPLETED)
                else:
                    await asyncio.sleep(self.heartbeat)
            finally:
                for waiting in loading:
                    waiting.cancel()


# -- API processes: serve what workers publish, and end what no one serves -----------------------------


class CatalogFollower:
    """Keeps an API process's set of models in step with the catalog (every --model-heartbeat): a version
    published that is not served here is added, described by its workers; each version's workers are
    counted, conflicts named, and a version unserved past --unserved-grace is marked unavailable and its
    queued predictions failed."""

    def __init__(
        self,
        *,
        settings: Settings,
        models: Deployments,
        catalog: Catalog,
        store: Store,
        bus: EventBus,
        metrics: Metrics | None = None,
        on_change: Callable[[], None] = lambda: None,
    ) -> None:
        self.settings = settings
        self.models = models
        self.catalog = catalog
        self.store = store
        self.bus = bus
        self.metrics = metrics
        self.on_change = on_change
        """Called after the set of models (or a description) changed: the OpenAPI document follows."""
        self._published: dict[Deployment, str] = {}  # deployments made here from a description: which
        self._bad: set[str] = set()  # descriptions that could not be read (logged once)

    async def follow_forever(self, sleep: Callable[[float], Any] = asyncio.sleep) -> None:
        while True:
            try:
                await self.refresh()
            except RetryLater as exc:
                log.warning("cannot read the model catalog (%s); trying again", exc.message)
            except Exception:
                log.exception("following the model catalog failed; trying again")
            await sleep(self.settings.model_heartbeat)

    async def refresh(self) -> None:
        """One round: read the catalog, add and update models, fail what waits for a model no one serves."""
        state = await self.catalog.read([(d.name, d.version) for d in self.models])
        changed = False
        async with self.models.lock:  # not while a repository load or unload reads, then changes, the set
            self._published = {d: t for d, t in self._published.items() if self.models.get(d.name, d.version) is d}
            for retired in [d for d in self._published if (d.name, d.version) not in state.known]:
                self._forget(retired)  # another API process retired it from the catalog
                changed = True
            for key, text in state.known.items():
                if key not in self.models.unloaded:
                    changed |= await self._follow(key, text, state)
        sweeps: bool | None = None  # asked for the lease only when there is something to sweep
        for deployment in self.models:
            if self._check_served(deployment, state):
                if sweeps is None:
                    sweeps = await self.catalog.sweep_lease(SWEEP_LEASE * self.settings.model_heartbeat)
                if sweeps:
                    await self._fail_queued(deployment, deployment.unavailable or "")
                    changed |= await self._retire(deployment, state)
        if changed:
            self.on_change()

    async def _follow(self, key: Key, text: str, state: CatalogState) -> bool:
        """Serve a published version here, or its newer description; True if the set changed."""
        current = self.models.get(*key)
        if current is not None and (current not in self._published or self._published[current] == text):
            return False  # loaded here from a file, or already as published
        if text in self._bad:
            return False
        deployer = self.models.deployer
        if deployer is None:
            return False
        servers = ", ".join(sorted(state.servers.get(key, {}))) or "workers no longer running"
        try:
            spec, model = published_spec(text, source=f"published by {servers}")
        except Exception as exc:  # another version's format, or a config this one refuses: not ours to serve
            self._bad.add(text)
            log.error("model %s version %s: its published description cannot be read (%s); not served", *key, exc)
            return False
        made = await deployer.make(spec, model, describe_only=True)
        await deployer.start_loading(made)
        if made.description is None:
            self._bad.add(text)
            log.error("model %s version %s: its published description is unusable: %s", *key, made.error)
            deployer.end(made)
            return False
        self._published[made] = text
        # Counted now, not only after the round: the round awaits other versions' loading meanwhile, and
        # GET /models must not list a published version without its workers.
        made.served_by = len(state.servers.get(key, {}))
        if current is None:
            self.models.add(made)
            log.info("model %s version %s is served by worker processes (%s)", *key, servers)
        else:
            self._published.pop(current, None)
            self.models.replace(current, made)
            deployer.end(current)
            log.info("model %s version %s: its workers publish a new description; serving that", *key)
        return True

    def _check_served(self, deployment: Deployment, state: CatalogState) -> bool:
        """Count the version's workers and name conflicts; True if it is unavailable (to be swept)."""
        key = (deployment.name, deployment.version)
        live = state.servers.get(key, {})
        deployment.served_by = len(live)
        descriptions = sorted(set(live.values()))
        conflict = None
        if len(descriptions) > 1:
            by = [", ".join(sorted(w for w, t in live.items() if t == d)) for d in descriptions]
            conflict = (
                f"workers disagree on model {key[0]} version {key[1]}: "
                + "; ".join(f"{who} publish one description" for who in by)
                + f" (they differ in {', '.join(_differences(descriptions))})"
            )
        if conflict != deployment.conflict:
            if conflict:
                log.warning("%s; requests are checked against the one published first", conflict)
            deployment.conflict = conflict
        if _served(state, key) or deployment.pool is not None:  # workers serve it, or load it; or here
            deployment.unavailable = None
            return False
        since = state.served_until.get(key)
        if since is None:  # never announced: since some process first looked for it
            since = state.first_seen.get(key, state.now)
        unserved = state.now - since
        if unserved <= self.settings.unserved_grace:
            deployment.unavailable = None
            return False
        if deployment.unavailable is None:
            log.warning(
                "model %s version %s: no worker has served it for %.0f s (--unserved-grace %.0f s): its queued "
                "predictions end failed and new ones are refused until one does",
                *key,
                unserved,
                self.settings.unserved_grace,
            )
        deployment.unavailable = (
            f"no worker has served model {key[0]} version {key[1]} for {unserved:.0f} s "
            f"(--unserved-grace {self.settings.unserved_grace:g} s)"
        )
        return True

    async def _retire(self, deployment: Deployment, state: CatalogState) -> bool:
        """Forget a version only the catalog served here, unserved past the grace and --catalog-retention
        with nothing left in its queue: the catalog would otherwise keep every version ever announced."""
        key = (deployment.name, deployment.version)
        since = state.served_until.get(key)
        limit = self.settings.unserved_grace + self.settings.catalog_retention
        if deployment not in self._published or since is None or state.now - since <= limit:
            return False
        async with self.models.lock:
            if self.models.get(*key) is not deployment or not await self.catalog.retire(key):
                return False
            self._forget(deployment)
        return True

    def _forget(self, deployment: Deployment) -> None:
        self.models.discard(deployment)
        self._published.pop(deployment, None)
        if self.models.deployer is not None:
            self.models.deployer.end(deployment)
        log.info(
            "model %s version %s: unserved past --catalog-retention, with nothing queued: forgotten",
            deployment.name,
            deployment.version,
        )

    async def _fail_queued(self, deployment: Deployment, why: str) -> None:
        from .backends.base import ListsEntries

        queue = deployment.queue
        if not isinstance(queue, ListsEntries):
            return
        # Only entries no live worker holds: the catalog says no one announces the version, but a worker
        # may have taken an entry before its first announcement landed, or be cut off from announcing
        # while it runs; the queue's pending list (touched by a live holder) is the evidence _claim uses.
        jobs = await queue.unheld(await queue.entries(SWEEP_BATCH))
        if not jobs:
            return
        error = ModelUnavailable(f"{why}: not run").to_dict()
        failed = await self.store.fail_queued([Outcome(job.prediction_id, error=error) for job in jobs])
        ended = {p.prediction_id for p in failed}
        done = [job for job in jobs if job.prediction_id in ended]
        # One started (or finished, its entry not yet acknowledged) was held by a worker untouched for
        # --claim-idle: lost. Unless a worker has announced the version meanwhile, it ends as well.
        if rest := [job for job in jobs if job.prediction_id not in ended]:
            key = (deployment.name, deployment.version)
            if not _served(await self.catalog.read([key]), key):
                lost = ModelUnavailable(f"{why}: the worker running it is gone").to_dict()
                failed += await self.store.finish([Outcome(job.prediction_id, error=lost) for job in rest])
                done += rest
        # Those records are finished (or gone) now: their entries are work no more.
        await queue.ack(done)
        if failed:
            log.warning(
                "model %s version %s: %d predictions end failed (model_unavailable)",
                deployment.name,
                deployment.version,
                len(failed),
            )
            if self.metrics is not None:
                self.metrics.finished(failed)
            logs.state_changes(failed)
            await self.bus.publish(failed)


def _served(state: CatalogState, key: Key) -> bool:
    """Whether some worker announces the version: serving it, or loading it."""
    return bool(state.servers.get(key) or state.loading.get(key))
