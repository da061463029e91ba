"""The work queue as a Redis Stream read through one consumer group, shared by every process.

An entry holds only the prediction id (the record holds the input). API processes add entries; each
worker process reads batches with XREADGROUP and acknowledges (XACK, then XDEL so the stream length
holds only work not yet done) only after the outcome is stored. Entries a dead worker held are taken
over by live workers after `claim_idle` seconds (XAUTOCLAIM); past `max_attempts` starts the
prediction fails with `worker_lost` and its entry goes to a capped dead-letter stream.

With priority levels (a model's priority_levels) the queue is one stream per level, read through the
same group; a script takes each batch across them by queue_policy's rule (the highest level first, none
starved), its passed-over counts kept in Redis, so every worker process keeps the one rule.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Iterable, Sequence
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions

from ...errors import QueueFull, WorkerLost
from ...queue_policy import STARVATION_LIMIT
from ...records import Job
from ..base import EventBus, Interrupted
from .keys import RedisKeys
from .store import UNAVAILABLE, RedisStore, translate_errors

log = logging.getLogger(__name__)

# Longest one XREADGROUP waits: reclaimed work is picked up, and an interrupt heard, within a second.
READ_BLOCK_MS = 1000
INTERRUPT_MARGIN = 1.0  # seconds, past one bounded read, for the commands around it (a levels script, a claim)
RETRY_DELAY = 0.5  # pause before reading again after Redis failed
DEAD_LETTER_MAX = 10_000

# The bound is checked and the entry added in one step, so many API processes cannot overshoot it.
# Like the in-process queue it bounds waiting entries: the streams' length minus those being run.
# KEYS are the model's streams (one per priority level; ARGV[1] the group).
_WAITING = """
local function waiting_in(stream)
  local waiting = redis.call('XLEN', stream)
  local ok, pending = pcall(redis.call, 'XPENDING', stream, ARGV[1])
  if ok then waiting = waiting - pending[1] end
  return waiting
end
local waiting = 0
for i = 1, #KEYS do waiting = waiting + waiting_in(KEYS[i]) end
"""
_DEPTH = _WAITING + "return waiting"
_BOUNDED_ADD = (
    _WAITING
    + """
if ARGV[4] == '0' and waiting >= tonumber(ARGV[2]) then
  return {0, waiting}
end
local stream = KEYS[tonumber(ARGV[5])]
redis.call('XADD', stream, '*', 'id', ARGV[3])
-- Its ticket for positions (TellsPositions): its level and its number among all entries ever added to
-- that stream, which the group's entries-read counter is compared with.
local info = redis.call('XINFO', 'STREAM', stream)
for i = 1, #info, 2 do
  if info[i] == 'entries-added' then redis.call('HSET', ARGV[6], ARGV[3], ARGV[5] .. ':' .. info[i + 1]) end
end
return {1, waiting + 1}
"""
)
# Up to ARGV[3] entries across the level streams (KEYS, highest level first; the last key is the hash of
# passed-over counts), by queue_policy.LevelPicker's rule. Returns {level, entry id, prediction id, ...}.
_TAKE_BY_LEVEL = """
local n = #KEYS - 1
local counts, group, consumer = KEYS[#KEYS], ARGV[1], ARGV[2]
local want, limit = tonumber(ARGV[3]), tonumber(ARGV[4])
local waiting, passed = {}, {}
for i = 1, n do
  waiting[i] = redis.call('XLEN', KEYS[i])
  local ok, pending = pcall(redis.call, 'XPENDING', KEYS[i], group)
  if ok then waiting[i] = waiting[i] - pending[1] end
  passed[i] = tonumber(redis.call('HGET', counts, tostring(i)) or '0')
end
local taken = {}
while #taken < 3 * want do
  local chosen, best = nil, -1
  for i = 1, n do
    if waiting[i] > 0 and passed[i] >= limit and passed[i] > best then chosen, best = i, passed[i] end
  end
  if chosen == nil then
    for i = 1, n do
      if waiting[i] > 0 then chosen = i break end
    end
  end
  if chosen == nil then break end
  local reply = redis.call('XREADGROUP', 'GROUP', group, consumer, 'COUNT', 1, 'STREAMS', KEYS[chosen], '>')
  if not reply then
    waiting[chosen] = 0
  else
    local entry = reply[1][2][1]
    local fields, id = entry[2], nil
    for j = 1, #fields, 2 do
      if fields[j] == 'id' then id = fields[j + 1] end
    end
    table.insert(taken, chosen)
    table.insert(taken, entry[1])
    table.insert(taken, id or '')
    waiting[chosen] = waiting[chosen] - 1
    for i = 1, n do
      if i == chosen or waiting[i] <= 0 then passed[i] = 0 else passed[i] = passed[i] + 1 end
    end
  end
end
for i = 1, n do redis.call('HSET', counts, tostring(i), passed[i]) end
return taken
"""


# Moves entries of one stream to others, by what each record names: the single stream of earlier versions
# to each model version's stream (ARGV[4] 'model', ARGV[5] the streams' key start), or a model's plain
# stream to its priority levels' streams (ARGV[4] 'levels', KEYS[2..] one per level, highest first: what
# waits there was queued before the model had levels, or moved from the single stream). ARGV[1] is the
# records' key start, ARGV[2] the group, ARGV[3] where to start (an id, '(' before it: after it). An entry
# in the group's pending list is left where it is: a worker of the earlier version may be running it, and
# acknowledges it there. A record gone drops its entry. Up to 100 entries a call, so two processes
# starting at once move each once; returns {moved, entries looked at, the last one's id}.
_MOVE = """
local levels = #KEYS - 1
local entries = redis.call('XRANGE', KEYS[1], ARGV[3], '+', 'COUNT', 100)
local moved, last = 0, ''
for _, entry in ipairs(entries) do
  last = entry[1]
  local ok, pending = pcall(redis.call, 'XPENDING', KEYS[1], ARGV[2], entry[1], entry[1], 1)
  if not (ok and #pending > 0) then
    local fields, pid = entry[2], nil
    for i = 1, #fields, 2 do if fields[i] == 'id' then pid = fields[i + 1] end end
    local raw = pid and redis.call('GET', ARGV[1] .. pid)
    if raw then
      local record = cjson.decode(raw)
      local target
      if ARGV[4] == 'model' then
        target = ARGV[5] .. record['model_name'] .. ':' .. record['model_version']
      else
        local level = tonumber(record['priority']) or 0
        if level < 1 or level > levels then level = levels end
        target = KEYS[1 + level]
      end
      redis.call('XADD', target, '*', 'id', pid)
    end
    redis.call('XDEL', KEYS[1], entry[1])
    moved = moved + 1
  end
end
return {moved, #entries, last}
"""


async def _move_all(move: Any, keys: list[str], args: list[str]) -> int:
    """Runs the move script page by page over the whole source stream; how many entries it moved."""
    moved, cursor = 0, "-"
    while True:
        count, seen, last = await move(keys=keys, args=[*args[:2], cursor, *args[2:]])
        moved += int(count)
        if int(seen) < 100:
            return moved
        cursor = f"({_text(last)}"


@translate_errors
async def move_legacy_entries(client: aioredis.Redis, keys: RedisKeys) -> int:
    """Move what waits in the single work stream of earlier versions to each model version's stream, so
    an upgrade strands nothing that was accepted; returns how many entries were moved. Entries a worker
    of an earlier version holds stay (it acknowledges them there); the stream goes once empty."""
    move = client.register_script(_MOVE)
    record_prefix, stream_prefix = keys.record(""), keys.queue("", "")[:-1]
    moved = await _move_all(move, [keys.legacy_queue], [record_prefix, keys.group, "model", stream_prefix])
    if moved:
        log.warning("moved %d predictions from %s to their models' own streams", moved, keys.legacy_queue)
    if moved and not await client.xlen(keys.legacy_queue):
        await client.delete(keys.legacy_queue)
    return moved


class RedisQueue:
    def __init__(
        self,
        client: aioredis.Redis,
        keys: RedisKeys,
        *,
        stream: str,
        store: RedisStore,
        bus: EventBus,
        maxsize: int,
        consumer: str,
        claim_idle: float,
        max_attempts: int,
        levels: int = 0,
    ) -> None:
        self.maxsize = maxsize
        self.consumer = consumer
        self._redis = client
        self._keys = keys
        self._stream = stream
        # One stream per priority level, the highest first; one stream, `stream`, without levels.
        self._streams = [f"{stream}:p{level}" for level in range(1, levels + 1)] if levels > 1 else [stream]
        self._counts = f"{stream}:passed-over"
        self._tickets = f"{stream}:tickets"  # prediction id -> "level:entry number", while it is in the stream
        self._store = store
        self._bus = bus
        self._claim_idle = claim_idle
        self._max_attempts = max_attempts
        self._bounded_add = client.register_script(_BOUNDED_ADD)
        self._depth = client.register_script(_DEPTH)
        self._take_by_level = client.register_script(_TAKE_BY_LEVEL)
        self._move = client.register_script(_MOVE)
        self._held: set[str] = set()  # receipts of entries this process read and has not acknowledged
        self._reclaimed: deque[Job] = deque()  # ours to run next: taken over, or put back by an interrupt
        self._maintenance: asyncio.Task[None] | None = None
        # Stops by flag as well as by cancel, since redis-py can lose the cancel of a command in flight
        # (redis/redis-py#2028): it writes each command under asyncio.wait_for, which before Python 3.12
        # returns instead of raising when the cancel lands as the write completes (python/cpython#86296),
        # and the command runs on as if no cancel had come. Here a cancel landing in the first commands of
        # a new connection was lost nearly every time, and a worker told to stop at once waited on Redis
        # until its --shutdown-timeout (30 s) ran out. So every blocking read is at most
        # READ_BLOCK_MS and a flag is checked between reads (other commands: bounded by the socket timeout).
        self._interrupts = 0  # get_batch calls begun before the latest interrupt() end at their next turn
        self._closing = asyncio.Event()

    # A receipt names the entry, and with levels its stream too: "<level index>/<entry id>".

    def _receipt(self, index: int, entry_id: str) -> str:
        return entry_id if len(self._streams) == 1 else f"{index}/{entry_id}"

    def _by_stream(self, receipts: Iterable[str]) -> dict[str, list[Any]]:
        """Entry ids by stream."""
        found: dict[str, list[Any]] = {}
        for receipt in receipts:
            index, _, entry_id = receipt.rpartition("/")
            found.setdefault(self._streams[int(index) if index else 0], []).append(entry_id)
        return found

    def _level(self, stream: Any) -> int:
        """The priority level of a stream's jobs (0: priorities off)."""
        return 0 if len(self._streams) == 1 else self._streams.index(_text(stream)) + 1

    @translate_errors
    async def depth(self) -> int:
        # The figure every process shares, as the bounded add counts it: what is taken over or put back
        # here is delivered to this consumer (pending), so it is in backlog() instead.
        return int(await self._depth(keys=self._streams, args=[self._keys.group]))

    def backlog(self) -> int:
        return len(self._reclaimed)

    @translate_errors
    async def positions(self, prediction_ids: Sequence[str]) -> tuple[dict[str, int], int]:
        """From each id's ticket and each level's consumer group (entries-read, lag; Redis 7): one HMGET and
        one XINFO GROUPS per level, whatever the queue's length. Unknown where Redis cannot count (an entry
        deleted before it was read, or a stream from before tickets): those ids are left out."""
        groups = []
        for stream in self._streams:
            found = [g for g in await self._redis.xinfo_groups(stream) if _text(g["name"]) == self._keys.group]
            groups.append(found[0] if found else {})
        read = [g.get("entries-read") for g in groups]
        lag = [g.get("lag") for g in groups]
        taken = sum(int(r) for r in read if r is not None)
        tickets = await self._redis.hmget(self._tickets, list(prediction_ids)) if prediction_ids else []
        positions = {}
        for pid, ticket in zip(prediction_ids, tickets, strict=True):
            if ticket is None:
                continue
            level, _, number = _text(ticket).partition(":")
            index = int(level) - 1
            done = read[index]
            higher = [int(n) for n in lag[:index] if n is not None]
            if done is None or len(higher) < index or int(number) <= int(done):
                continue  # taken already, or Redis cannot tell
            positions[pid] = int(number) - int(done) - 1 + sum(higher)
        return positions, taken

    @translate_errors
    async def ensure_group(self) -> None:
        for stream in self._streams:
            try:
                # From id 0: entries added before the group existed are work too.
                await self._redis.xgroup_create(stream, self._keys.group, id="0", mkstream=True)
            except redis.exceptions.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise
        await self._move_to_levels()

    async def _move_to_levels(self) -> None:
        """A model with priority levels reads one stream per level, never its plain stream: move what
        waits there (queued by an API process of an earlier version, say) to its level's stream."""
        if len(self._streams) > 1:
            keys = [self._stream, *self._streams]
            moved = await _move_all(self._move, keys, [self._keys.record(""), self._keys.group, "levels"])
            if moved:
                log.warning("moved %d predictions from %s to its priority levels' streams", moved, self._stream)

    @translate_errors
    async def put(self, job: Job, *, force: bool = False) -> None:
        # 0 (priorities off, or a record from before they were on) and levels since removed: the lowest.
        level = job.priority if 1 <= job.priority <= len(self._streams) else len(self._streams)
        added, _ = await self._bounded_add(
            keys=self._streams,
            args=[self._keys.group, self.maxsize, job.prediction_id, "1" if force else "0", level, self._tickets],
        )
        if not added:
            raise QueueFull()

    def interrupt(self) -> float:
        self._interrupts += 1
        return READ_BLOCK_MS / 1000 + INTERRUPT_MARGIN

    async def get_batch(self, max_size: int, max_delay: float) -> list[Job]:
        if self._maintenance is None:
            self._maintenance = asyncio.create_task(self._maintain(), name="zypher-redis-claims")
        begun = self._interrupts
        while True:
            if self._interrupts != begun:
                raise Interrupted()  # stopping
            if self._reclaimed:
                return [self._reclaimed.popleft() for _ in range(min(max_size, len(self._reclaimed)))]
            try:
                jobs = await self._read(max_size, READ_BLOCK_MS)
            except redis.exceptions.ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                await self.ensure_group()  # Redis lost the group (restarted without persistence)
                continue
            except UNAVAILABLE as exc:
                log.warning("cannot read the queue from Redis (%s); retrying", exc)
                await asyncio.sleep(RETRY_DELAY)
                continue
            if jobs and len(jobs) < max_size and max_delay > 0:
                # Dynamic batching as in one process: wait at most max_delay for company. The first read
                # has delivered its entries to us already: if this one fails they must still be run (they
                # look held, so nobody else would), so the batch goes with what it has.
                try:
                    jobs += await self._company(max_size - len(jobs), max_delay, begun)
                except (*UNAVAILABLE, redis.exceptions.ResponseError) as exc:
                    log.warning("cannot read more of the queue from Redis (%s); running %d taken", exc, len(jobs))
                except asyncio.CancelledError:
                    self._reclaimed.extendleft(reversed(jobs))  # delivered to us: run here next, or taken over
                    raise
            if jobs and self._interrupts != begun:
                self._reclaimed.extendleft(reversed(jobs))  # delivered to us: run here next, or handed back
                raise Interrupted()
            if jobs:
                return jobs

    async def _company(self, count: int, max_delay: float, begun: int) -> list[Job]:
        """Up to `count` more, waiting at most max_delay for the first: in reads of at most READ_BLOCK_MS,
        so that an interrupt is heard even with a long --max-batch-delay-ms."""
        block_ms = max(1, round(max_delay * 1000))
        while True:
            jobs = await self._read(count, min(block_ms, READ_BLOCK_MS))
            block_ms -= READ_BLOCK_MS
            if jobs or block_ms <= 0 or self._interrupts != begun:
                return jobs

    async def _read(self, count: int, block_ms: int) -> list[Job]:
        if len(self._streams) > 1:
            jobs = await self._take_levels(count)
            if jobs:
                return jobs
        # Nothing waiting (or one stream): wait for the next entry of any level, up to `count` of them.
        per_stream = count if len(self._streams) == 1 else 1
        reply: Any = await self._redis.xreadgroup(
            self._keys.group, self.consumer, dict.fromkeys(self._streams, ">"), count=per_stream, block=block_ms
        )
        index = {stream: i for i, stream in enumerate(self._streams)}
        jobs = [
            Job(fields["id"], receipt=self._receipt(index[_text(stream)], entry_id), priority=self._level(stream))
            for stream, entries in reply or ()
            for entry_id, fields in entries
        ]
        self._held.update(job.receipt for job in jobs if job.receipt)
        if len(jobs) > count:  # one per level came at once: delivered to us, so they are ours to run next
            self._reclaimed.extend(jobs[count:])
            jobs = jobs[:count]
        return jobs

    async def _take_levels(self, count: int) -> list[Job]:
        flat: Any = await self._take_by_level(
            keys=[*self._streams, self._counts], args=[self._keys.group, self.consumer, count, STARVATION_LIMIT]
        )
        jobs = [
            Job(_text(flat[i + 2]), receipt=self._receipt(int(flat[i]) - 1, _text(flat[i + 1])), priority=int(flat[i]))
            for i in range(0, len(flat), 3)
        ]
        self._held.update(job.receipt for job in jobs if job.receipt)
        return jobs

    @translate_errors
    async def entries(self, limit: int) -> list[Job]:
        jobs: list[Job] = []
        for index, stream in enumerate(self._streams):
            reply: Any = await self._redis.xrange(stream, "-", "+", count=limit - len(jobs))
            jobs += [
                Job(fields["id"], receipt=self._receipt(index, entry_id), priority=self._level(stream))
                for entry_id, fields in reply or ()
                if "id" in fields
            ]
            if len(jobs) >= limit:
                break
        return jobs

    @translate_errors
    async def unheld(self, jobs: Sequence[Job]) -> list[Job]:
        # The pending list, not a catalog, says whether a worker runs one: a live worker touches what it
        # holds every claim_idle / 4 (_touch), so an entry idle for claim_idle has no live holder.
        fresh: set[str] = set()
        index = {stream: i for i, stream in enumerate(self._streams)}
        for stream, entry_ids in self._by_stream(job.receipt for job in jobs if job.receipt).items():
            ordered = sorted(entry_ids, key=_entry_order)
            pending: Any = await self._redis.xpending_range(
                stream, self._keys.group, min=ordered[0], max=ordered[-1], count=len(ordered)
            )
            fresh.update(
                self._receipt(index[stream], _text(p["message_id"]))
                for p in pending
                if int(p["time_since_delivered"]) < self._claim_idle * 1000
            )
        return [job for job in jobs if job.receipt not in fresh]

    @translate_errors
    async def ack(self, jobs: Sequence[Job]) -> None:
        receipts = [job.receipt for job in jobs if job.receipt]
        if not receipts:
            return
        async with self._redis.pipeline(transaction=True) as pipe:
            for stream, entry_ids in self._by_stream(receipts).items():
                pipe.xack(stream, self._keys.group, *entry_ids)
                pipe.xdel(stream, *entry_ids)
            pipe.hdel(self._tickets, *{job.prediction_id for job in jobs})
            await pipe.execute()
        self._held.difference_update(receipts)

    async def release(self, jobs: Sequence[Job]) -> None:
        # No longer touched by _maintain, so they look idle and are claimed after --claim-idle.
        self._held.difference_update(job.receipt for job in jobs if job.receipt)

    async def close(self) -> None:
        """Stop the claims loop, then hand back what waits here to be run (taken over, or put back by an
        interrupt), so that a live worker takes it over at its next turn rather than after --claim-idle."""
        self._closing.set()
        if self._maintenance is not None:
            self._maintenance.cancel()
            await asyncio.gather(self._maintenance, return_exceptions=True)
        if self._reclaimed:
            await self._hand_back()

    async def _hand_back(self) -> None:
        jobs, self._reclaimed = list(self._reclaimed), deque()
        receipts = [job.receipt for job in jobs if job.receipt]
        # Untouched from now on, so they would look idle after --claim-idle anyway; IDLE says so at once.
        self._held.difference_update(receipts)
        idle_ms = int(self._claim_idle * 1000)
        try:
            for stream, entry_ids in self._by_stream(receipts).items():
                await self._redis.xclaim(
                    stream, self._keys.group, self.consumer, 0, entry_ids, idle=idle_ms, justid=True
                )
        except UNAVAILABLE as exc:
            log.warning("could not hand back %d predictions (%s); taken over after --claim-idle", len(jobs), exc)
            return
        log.info("handed back %d predictions for other workers to take over", len(jobs))

    async def _maintain(self) -> None:
        """Keep our own entries fresh while they run, and take over entries other workers left idle;
        until closed."""
        cursors = dict.fromkeys(range(len(self._streams)), "0-0")
        while not self._closing.is_set():
            try:
                await asyncio.wait_for(self._closing.wait(), self._claim_idle / 4)
                return
            except asyncio.TimeoutError:
                pass
            try:
                await self._touch()
                # In a rolling upgrade processes of the earlier version go on adding to the plain stream.
                await self._move_to_levels()
                for index in cursors:
                    cursors[index] = await self._claim(index, cursors[index])
            except UNAVAILABLE as exc:
                log.warning("cannot check for lost work in Redis (%s); trying again later", exc)
            except Exception:
                log.exception("reclaiming lost work failed; trying again later")

    async def _touch(self) -> None:
        # Resets the idle time of entries still running here, so a long batch is not taken over.
        for stream, entry_ids in self._by_stream(self._held).items():
            await self._redis.xclaim(stream, self._keys.group, self.consumer, 0, entry_ids, justid=True)

    async def _claim(self, index: int, cursor: str) -> str:
        cursor, entries, _deleted = await self._redis.xautoclaim(
            self._streams[index],
            self._keys.group,
            self.consumer,
            min_idle_time=int(self._claim_idle * 1000),
            start_id=cursor,
            count=100,
        )
        # Our own entries can look idle too (Redis was away while we ran them): those are not lost.
        entries = [(self._receipt(index, entry_id), fields) for entry_id, fields in entries]
        entries = [(receipt, fields) for receipt, fields in entries if receipt not in self._held]
        if not entries:
            return str(cursor)
        receipts = {fields["id"]: receipt for receipt, fields in entries}
        self._held.update(receipts.values())
        again, failed = await self._store.reclaim(list(receipts), self._max_attempts)
        log.warning(
            "took over %d predictions from a lost worker: %d to run again, %d failed after %d attempts",
            len(receipts),
            len(again),
            len(failed),
            self._max_attempts,
        )
        await self._bus.publish(failed)
        for prediction in failed:
            await self._redis.xadd(
                self._keys.dead_letter,
                {"id": prediction.prediction_id, "reason": WorkerLost.code},
                maxlen=DEAD_LETTER_MAX,
                approximate=True,
            )
        rerun = {p.prediction_id for p in again}
        self._reclaimed.extend(Job(p.prediction_id, receipt=receipts[p.prediction_id]) for p in again)
        # Finished, failed or vanished ones need no more work.
        await self.ack([Job(pid, receipt=r) for pid, r in receipts.items() if pid not in rerun])
        return str(cursor)


def _entry_order(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def _text(value: Any) -> str:
    """A reply's string, whether the client decodes responses or not."""
    return value.decode() if isinstance(value, bytes) else str(value)
