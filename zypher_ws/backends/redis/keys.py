"""Every Redis key, channel and group name the service uses, under one configurable prefix."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass


@dataclass(frozen=True)
class RedisKeys:
    prefix: str = "zypher"

    def record(self, prediction_id: str) -> str:
        """A string holding one prediction's JSON record; it expires `result_ttl` after it finishes."""
        return f"{self.prefix}:prediction:{prediction_id}"

    def idempotency(self, key: str) -> str:
        """Maps an Idempotency-Key (hashed: clients choose its length) to [prediction_id, body fingerprint]."""
        return f"{self.prefix}:idempotency:{hashlib.sha256(key.encode()).hexdigest()}"

    def queue(self, model: str, version: str) -> str:
        """One model version's work stream: an entry per prediction waiting or running, deleted once
        acknowledged. Model names and versions hold no `:` (models/spec.py), so streams never collide."""
        return f"{self.prefix}:queue:{model}:{version}"

    @property
    def legacy_queue(self) -> str:
        """The one work stream of every model before each model version had its own: read once at start,
        its entries moved to their models' streams (see queue.move_legacy_entries)."""
        return f"{self.prefix}:queue"

    @property
    def models(self) -> str:
        """A hash of every model version workers have served: `name:version` -> its description (JSON), as
        last published. Kept after its workers are gone, so that it stays known (catalog.py)."""
        return f"{self.prefix}:models"

    @property
    def models_served_until(self) -> str:
        """A hash `name:version` -> until when (ms, Redis's clock) some worker's announcement of it holds."""
        return f"{self.prefix}:models:served-until"

    @property
    def models_first_seen(self) -> str:
        """A hash `name:version` -> when (ms, Redis's clock) an API process first served a version that no
        worker had announced: its --unserved-grace runs from then, the same in every process."""
        return f"{self.prefix}:models:first-seen"

    @property
    def models_sweep_lease(self) -> str:
        """Held (SET NX PX, for most of a heartbeat) by the API process that fails the predictions of
        versions no worker serves this round."""
        return f"{self.prefix}:models:sweep-lease"

    def model_servers(self, model: str, version: str) -> str:
        """A sorted set of the workers serving one model version, scored by when their announcement
        expires (ms); the hash of what each publishes is this key + `:descriptions`. The catalog's
        scripts build these names themselves from `models_prefix`."""
        return f"{self.prefix}:models:{model}:{version}:servers"

    @property
    def models_prefix(self) -> str:
        return f"{self.prefix}:models:"

    @property
    def dead_letter(self) -> str:
        """Entries given up after --max-attempts deliveries, kept for inspection (capped)."""
        return f"{self.prefix}:dead-letter"

    @property
    def events(self) -> str:
        """Pub/sub channel carrying every status change, as a JSON array of records."""
        return f"{self.prefix}:events"

    @property
    def webhooks(self) -> str:
        """The stream of webhook deliveries due now, each taken by one process through `webhook_group`."""
        return f"{self.prefix}:webhooks"

    @property
    def webhooks_later(self) -> str:
        """A sorted set of deliveries waiting for a retry, scored by when they are due."""
        return f"{self.prefix}:webhooks:later"

    group: str = "workers"
    """The consumer group every worker reads the queue through."""

    webhook_group: str = "webhooks"
    """The consumer group every process reads the webhook stream through."""
