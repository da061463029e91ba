"""The model repository at runtime: which versions it holds, and loading or unloading a model while
the service runs (the Open Inference Protocol's repository extension; http/oip.py serves it).

Loading reads the model's folder in --model-repository now and serves each version not served yet;
one that fails to load is not served, and the load answers why. Unloading takes every version of the
model out of what requests can name at once; what they had accepted still runs, then their workers and
executor stop. The default model is neither unloaded nor replaced.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import Any

from .deployments import Deployment, Deployments, ModelState
from .errors import BadRequest, ModelNotFound
from .models import ModelSetupError, build, scan_model, scan_repository
from .settings import Settings

log = logging.getLogger(__name__)

STATES = {
    ModelState.READY: "READY",
    ModelState.LOADING: "LOADING",
    ModelState.FAILED: "UNAVAILABLE",
    ModelState.UNLOADING: "UNLOADING",
}


class ModelRepository:
    def __init__(self, *, settings: Settings, models: Deployments) -> None:
        self.settings = settings
        self.models = models
        self._unloading: dict[tuple[str, str], Deployment] = {}

    def index(self, *, ready_only: bool = False) -> list[dict[str, Any]]:
        """Every version served, being unloaded, or in the repository's folders and not loaded."""
        entries: dict[tuple[str, str], dict[str, Any]] = {}
        for d in [*self.models, *self._unloading.values()]:
            entries[(d.name, d.version)] = {
                "name": d.name,
                "version": d.version,
                "state": STATES[d.state],
                "reason": d.error or "",
            }
        if self.settings.model_repository:
            try:
                found = scan_repository(self.settings.model_repository)
            except ModelSetupError as exc:
                log.warning("the repository index lists only the models served: %s", exc)
                found = []
            for spec in found:
                key = (spec.name or "", spec.version or "")
                entries.setdefault(
                    key, {"name": key[0], "version": key[1], "state": "UNAVAILABLE", "reason": "unloaded"}
                )
        listed = sorted(entries.values(), key=lambda e: (e["name"], _number(e["version"])))
        return [e for e in listed if e["state"] == "READY"] if ready_only else listed

    async def load(self, name: str) -> list[Deployment]:
        """Serve the versions of `name` in the repository not served yet, once each has loaded. Raises
        BadRequest when there is no repository, the folder is not a model, or a version fails to load.

        Versions of `name` unloaded earlier are no longer held back from the catalog of a shared backend:
        with no files of it here, ones workers publish are served again within a heartbeat."""
        deployer = self.models.deployer
        forgotten = {key for key in self.models.unloaded if key[0] == name}
        self.models.unloaded -= forgotten
        if not self.settings.model_repository or deployer is None:
            if forgotten and deployer is not None:
                return []
            raise BadRequest("models are loaded from --model-repository, and this server has none")
        async with self.models.lock:  # one change at a time: each reads, then changes, the set
            try:
                specs = await asyncio.to_thread(scan_model, self.settings.model_repository, name)
            except ModelSetupError as exc:
                if forgotten:
                    return []
                raise BadRequest(f"cannot load model {name}: {exc}") from None
            if any((s.name, s.version) in self._unloading for s in specs):
                raise BadRequest(f"model {name} is still being unloaded; load it once it is gone")
            served = {d.version: d for d in self.models.versions(name)}
            # A version served and failed (at startup, say) is loaded anew, and replaced if it loads.
            new = [s for s in specs if s.version not in served or served[s.version].state is ModelState.FAILED]
            made = []
            for spec in new:
                try:
                    model = await asyncio.to_thread(build, spec)
                except ModelSetupError as exc:
                    raise BadRequest(f"cannot load model {name} version {spec.version}: {exc}") from None
                made.append(await deployer.make(spec, model))
            for deployment in made:
                await deployer.start_loading(deployment)  # it never raises: a failure is its state
            failed = [d for d in made if d.state is ModelState.FAILED]
            for deployment in failed:
                deployer.end(deployment)
            loaded = [d for d in made if d.state is ModelState.READY]
            for deployment in loaded:
                self.models.unloaded.discard((deployment.name, deployment.version))
                if deployment.version in served:
                    self.models.replace(served[deployment.version], deployment)
                else:
                    self.models.add(deployment)
                log.info("model %s version %s loaded at runtime", deployment.name, deployment.version)
            if failed:
                raise BadRequest("; ".join(d.error or "failed to load" for d in failed))
            return loaded

    async def unload(self, name: str, wait: float) -> list[Deployment]:
        """Serve no version of `name`: new requests for it are 404 at once; what it had accepted runs
        first, then its workers stop. Waits up to `wait` seconds for that (it goes on after)."""
        deployer = self.models.deployer
        if deployer is None:
            raise BadRequest("this server's models are fixed")
        async with self.models.lock:
            if not self.models.versions(name):
                raise ModelNotFound(f"no model {name!r} (models: {', '.join(self.models.names())})")
            if name == self.models.default.name:
                raise BadRequest(f"model {name} is the default model (--default-model), which is not unloaded")
            gone = self.models.remove(name)
            drains = []
            for deployment in gone:
                key = (deployment.name, deployment.version)
                self.models.unloaded.add(key)  # workers may publish it: it stays unloaded here all the same
                self._unloading[key] = deployment
                drain = deployer.unload(deployment)
                drain.add_done_callback(functools.partial(self._gone, key))
                drains.append(drain)
        await asyncio.wait(drains, timeout=wait)
        return gone

    def _gone(self, key: tuple[str, str], _: object) -> None:
        self._unloading.pop(key, None)


def _number(version: str) -> tuple[int, str]:
    return (int(version), "") if version.isdigit() else (0, version)
