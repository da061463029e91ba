"""The catalog of model versions in Redis: which workers serve each, and what each version is.

A worker announces every model version it serves, with its description, each --model-heartbeat; an
announcement holds for three of them (scored by Redis's own clock, so the machines' clocks do not
matter). API processes read the catalog as often (catalog.py has the rules built on it).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import redis.asyncio as aioredis

from ...catalog import CatalogState, Key
from .keys import RedisKeys
from .store import translate_errors

# Shared by the scripts: Redis's clock in ms, and dropping the announcements that expired by then
# (with what they published). ARGV[1] is the catalog's key start (keys.models_prefix).
_COMMON = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local prefix = ARGV[1]
local function prune(version)
  local servers = prefix .. version .. ':servers'
  local expired = redis.call('ZRANGEBYSCORE', servers, '-inf', now)
  if #expired > 0 then
    redis.call('HDEL', servers .. ':descriptions', unpack(expired))
    redis.call('ZREMRANGEBYSCORE', servers, '-inf', now)
  end
  return servers
end
"""

# ARGV: prefix, the catalog hash, the served-until hash, consumer, ttl (ms), then (version, description)
# pairs; an empty description announces a worker loading the version: it holds like any announcement, but
# neither describes the version nor disagrees with anyone. The catalog keeps a version's description as
# first published while another live worker still publishes it (two that disagree are a conflict for the
# readers to name, not a flapping description); with no such worker, the newest replaces it.
# Returns the other live workers that publish a different one.
_PUBLISH = (
    _COMMON
    + """
local catalog, served_until, consumer, ttl = ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5])
local disagree = {}
for i = 6, #ARGV, 2 do
  local version, description = ARGV[i], ARGV[i + 1]
  local servers = prune(version)
  if description ~= '' then
    local current = redis.call('HGET', catalog, version)
    local keep = false
    for _, other in ipairs(redis.call('ZRANGE', servers, 0, -1)) do
      if other ~= consumer then
        local theirs = redis.call('HGET', servers .. ':descriptions', other)
        if theirs ~= '' and theirs ~= description then table.insert(disagree, version .. ' ' .. other) end
        if current and theirs == current then keep = true end
      end
    end
    if not keep then redis.call('HSET', catalog, version, description) end
  end
  redis.call('ZADD', servers, now + ttl, consumer)
  redis.call('HSET', servers .. ':descriptions', consumer, description)
  local until_ms = tonumber(redis.call('HGET', served_until, version) or '0')
  if now + ttl > until_ms then redis.call('HSET', served_until, version, now + ttl) end
end
return disagree
"""
)

# ARGV: prefix, served-until hash, consumer, then versions. The grace of a version no one else serves
# starts now, not when this worker's announcement would have expired.
_WITHDRAW = (
    _COMMON
    + """
local served_until, consumer = ARGV[2], ARGV[3]
for i = 4, #ARGV do
  local version = ARGV[i]
  local servers = prune(version)
  redis.call('ZREM', servers, consumer)
  redis.call('HDEL', servers .. ':descriptions', consumer)
  local last = redis.call('ZRANGE', servers, -1, -1, 'WITHSCORES')
  redis.call('HSET', served_until, version, last[2] or now)
end
return 0
"""
)

# ARGV: prefix, catalog hash, served-until hash, first-seen hash, then the versions watched (the reader
# serves them; a worker may not have published them yet). Returns {now, catalog (flat), served-until
# (flat), live, first-seen (flat)} where live is flat (version, consumer, description) triples of the
# announcements that hold (an empty description: loading). A watched version never announced has its
# first-seen time set once, by Redis's clock, so every reader gives it the same grace.
_READ = (
    _COMMON
    + """
local catalog = redis.call('HGETALL', ARGV[2])
local versions, listed = {}, {}
for i = 1, #catalog, 2 do
  table.insert(versions, catalog[i])
  listed[catalog[i]] = true
end
for i = 5, #ARGV do
  local version = ARGV[i]
  if not listed[version] then
    table.insert(versions, version)
    listed[version] = true
  end
  if not redis.call('HGET', ARGV[3], version) then redis.call('HSETNX', ARGV[4], version, now) end
end
local live = {}
for _, version in ipairs(versions) do
  local servers = prune(version)
  local described = redis.call('HGETALL', servers .. ':descriptions')
  for j = 1, #described, 2 do
    table.insert(live, version)
    table.insert(live, described[j])
    table.insert(live, described[j + 1])
  end
end
return {now, catalog, redis.call('HGETALL', ARGV[3]), live, redis.call('HGETALL', ARGV[4])}
"""
)


# Taken when free, renewed by its holder (KEYS[1] the lease, ARGV the consumer and its time in ms).
_LEASE = """
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""


# ARGV: prefix, catalog hash, served-until hash, first-seen hash, the version's stream, the version.
# Forgets a version no one announces whose streams (the plain one, and one per priority level its
# description names) hold nothing; returns 1 if it did.
_RETIRE = (
    _COMMON
    + """
local catalog, stream, version = ARGV[2], ARGV[5], ARGV[6]
local servers = prune(version)
if redis.call('ZCARD', servers) > 0 then return 0 end
local streams = {stream}
local raw = redis.call('HGET', catalog, version)
if raw then
  local ok, described = pcall(cjson.decode, raw)
  local levels = ok and tonumber((described['config'] or {})['priority_levels']) or 0
  for level = 1, levels do table.insert(streams, stream .. ':p' .. level) end
end
for _, s in ipairs(streams) do
  if redis.call('EXISTS', s) == 1 and redis.call('XLEN', s) > 0 then return 0 end
end
for _, s in ipairs(streams) do redis.call('DEL', s) end
redis.call('DEL', stream .. ':passed-over', servers, servers .. ':descriptions')
redis.call('HDEL', catalog, version)
redis.call('HDEL', ARGV[3], version)
redis.call('HDEL', ARGV[4], version)
return 1
"""
)


def _field(key: Key) -> str:
    return f"{key[0]}:{key[1]}"


def _key(field: Any) -> Key:
    name, _, version = _text(field).partition(":")  # names and versions hold no ':' (models/spec.py)
    return name, version


class RedisCatalog:
    def __init__(self, client: aioredis.Redis, keys: RedisKeys, *, consumer: str) -> None:
        self.consumer = consumer
        self._keys = keys
        self._lease = client.register_script(_LEASE)
        self._retire = client.register_script(_RETIRE)
        self._publish = client.register_script(_PUBLISH)
        self._withdraw = client.register_script(_WITHDRAW)
        self._read = client.register_script(_READ)

    @translate_errors
    async def publish(self, descriptions: Mapping[Key, str | None], ttl: float) -> list[tuple[Key, str]]:
        k = self._keys
        pairs = [item for key, text in descriptions.items() for item in (_field(key), text or "")]
        args: list[str | int] = [
            k.models_prefix,
            k.models,
            k.models_served_until,
            self.consumer,
            int(ttl * 1000),
            *pairs,
        ]
        disagree: Any = await self._publish(args=args)
        found = []
        for entry in disagree or ():
            version, _, other = _text(entry).partition(" ")
            found.append((_key(version), other))
        return found

    @translate_errors
    async def withdraw(self, versions: Sequence[Key]) -> None:
        if versions:
            k = self._keys
            await self._withdraw(
                args=[k.models_prefix, k.models_served_until, self.consumer, *(_field(v) for v in versions)]
            )

    @translate_errors
    async def sweep_lease(self, ttl: float) -> bool:
        return bool(await self._lease(keys=[self._keys.models_sweep_lease], args=[self.consumer, int(ttl * 1000)]))

    @translate_errors
    async def retire(self, version: Key) -> bool:
        k = self._keys
        stream = k.queue(*version)
        args = [k.models_prefix, k.models, k.models_served_until, k.models_first_seen, stream, _field(version)]
        return bool(await self._retire(args=args))

    @translate_errors
    async def read(self, watch: Sequence[Key] = ()) -> CatalogState:
        k = self._keys
        args = [k.models_prefix, k.models, k.models_served_until, k.models_first_seen, *(_field(v) for v in watch)]
        now, catalog, served_until, live, first_seen = await self._read(args=args)
        servers: dict[Key, dict[str, str]] = {}
        loading: dict[Key, set[str]] = {}
        for i in range(0, len(live), 3):
            key, worker, text = _key(live[i]), _text(live[i + 1]), _text(live[i + 2])
            if text:
                servers.setdefault(key, {})[worker] = text
            else:
                loading.setdefault(key, set()).add(worker)
        return CatalogState(
            now=int(now) / 1000,
            known={_key(catalog[i]): _text(catalog[i + 1]) for i in range(0, len(catalog), 2)},
            served_until={_key(served_until[i]): _ms(served_until[i + 1]) for i in range(0, len(served_until), 2)},
            servers=servers,
            loading={key: frozenset(workers) for key, workers in loading.items()},
            first_seen={_key(first_seen[i]): _ms(first_seen[i + 1]) for i in range(0, len(first_seen), 2)},
        )


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _ms(value: Any) -> float:
    """Seconds, of a time in ms as the scripts keep it."""
    return int(float(value)) / 1000
