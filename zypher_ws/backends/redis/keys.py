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
