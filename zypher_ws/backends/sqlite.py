"""The durable default: prediction records in an embedded SQLite database.

One dedicated thread owns the connection, so the event loop never waits on disk. Writes issued in
the same loop turn share one transaction (group commit): each caller's await returns only after
that transaction committed, so a 202 is sent for a prediction that is already on disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sqlite3
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from .. import lifecycle
from ..errors import StorageFull
from ..json_codec import dumps_fields_str
from ..records import IdempotencyKey, Outcome, Prediction, Status
from ..webhooks.schedule import Delivery, Settlement, scheduled_by

log = logging.getLogger(__name__)
T = TypeVar("T")
Op = Callable[[sqlite3.Connection], Any]

SCHEMA = """
CREATE TABLE IF NOT EXISTS predictions (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,    -- acceptance order, for recovery
    id TEXT NOT NULL UNIQUE,
    status TEXT NOT NULL,
    expires_at REAL,
    record TEXT NOT NULL                      -- the whole Prediction as JSON, input included
);
CREATE INDEX IF NOT EXISTS predictions_unfinished ON predictions (status) WHERE status IN ('queued', 'running');
CREATE INDEX IF NOT EXISTS predictions_expiry ON predictions (expires_at) WHERE expires_at IS NOT NULL;
CREATE TABLE IF NOT EXISTS idempotency_keys (
    key TEXT PRIMARY KEY,
    fingerprint TEXT NOT NULL,
    prediction_id TEXT NOT NULL REFERENCES predictions (id) ON DELETE CASCADE
);
CREATE TABLE IF NOT EXISTS webhook_deliveries (  -- pending ones: written with the change that causes each
    id TEXT PRIMARY KEY,                      -- the webhook-id, one per prediction and event
    prediction_id TEXT NOT NULL,              -- no foreign key: a delivery outlives an expired record
    event TEXT NOT NULL,
    url TEXT NOT NULL,
    host TEXT NOT NULL,                       -- name:port, to hold back a host with enough in flight
    body BLOB NOT NULL,                       -- the payload, fixed when the event happened
    event_at REAL NOT NULL,
    due_at REAL NOT NULL,
    attempts INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS webhook_deliveries_due ON webhook_deliveries (due_at);
"""


SQLITE_FULL = 13
# The WAL is copied back into the database (a checkpoint) on the store's own thread, between group
# commits, instead of inside whichever commit crosses SQLite's threshold (wal_autocheckpoint), which
# made every request of that commit wait for the copy and its fsync. With no writer beside it the
# checkpoint copies the whole WAL, so the next write starts the WAL again from its beginning: its size
# stays bounded. (A checkpoint on another connection, beside a committing writer, never catches up,
# and the WAL then grows without end.)
# Commits before a checkpoint is due, taken at the next idle moment: requests that arrive during it wait
# for it, so each is kept small (on a loaded 2-core machine sync c=32 had a lower p99 at 50 than at 200).
CHECKPOINT_COMMITS = 50
CHECKPOINT_HARD_COMMITS = 2000  # past this many, or WAL_LIMIT, the checkpoint is taken without one
WAL_LIMIT = 64 * 1024 * 1024  # bytes of WAL
JOURNAL_SIZE_LIMIT = 8 * 1024 * 1024  # the WAL file is cut back to this when it starts again


def _checkpoint(conn: sqlite3.Connection, mode: str) -> tuple[int, int, int]:
    """One checkpoint: (busy, frames in the WAL, frames copied), SQLite's own result row."""
    row = conn.execute(f"PRAGMA wal_checkpoint({mode})").fetchone()
    return int(row[0]), int(row[1]), int(row[2])


def _is_full(exc: BaseException) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)  # Python 3.11+
    return isinstance(exc, sqlite3.OperationalError) and (code == SQLITE_FULL or "disk is full" in str(exc))


def _settle(future: asyncio.Future[T], value: T | None, exc: BaseException | None) -> None:
    if future.done():
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(value)  # type: ignore[arg-type]  # value is set when exc is not


def _nothing(conn: sqlite3.Connection) -> None:
    """An empty commit: it returns once everything queued before it has committed (and, synced, is durable)."""


def _touch_probe(conn: sqlite3.Connection) -> None:
    conn.execute("CREATE TABLE IF NOT EXISTS write_probe (id INTEGER PRIMARY KEY, at REAL)")
    conn.execute("INSERT OR REPLACE INTO write_probe (id, at) VALUES (1, julianday('now'))")


def path_from_url(url: str) -> Path:
    """`sqlite:///relative/path.db` or `sqlite:////absolute/path.db` (SQLAlchemy's convention)."""
    if not url.startswith("sqlite:///"):
        raise ValueError(f"not a sqlite URL: {url!r}")
    return Path(url[len("sqlite:///") :])


class SQLiteStore:
    def __init__(
        self,
        path: Path,
        *,
        ttl: float = 86400.0,
        synchronous: str = "ACCEPTED",
        checkpoint_commits: int = CHECKPOINT_COMMITS,
        checkpoint_hard_commits: int = CHECKPOINT_HARD_COMMITS,
        wal_limit: int = WAL_LIMIT,
    ) -> None:
        self.path = path
        self._wal = path.with_name(path.name + "-wal")
        self.ttl = ttl
        self.synchronous = synchronous
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="zypher-sqlite")
        self._conn: sqlite3.Connection | None = None
        self._pending: list[tuple[Op, asyncio.Future[Any]]] = []
        self._flusher: asyncio.Task[None] | None = None
        # Committed state of unfinished predictions, so starting and finishing one does not read it back
        # and parse it again. Touched only on the store's thread; any rollback empties it.
        self._live: dict[str, Prediction] = {}
        self._full = False  # the last commit failed for lack of space (read on the loop; a bool swap)
        self._sync_next = False  # an op queued for the next commit needs it fsynced
        self._synced = False  # the connection's synchronous pragma is FULL now
        # Predictions added with add_deferred (sync requests without a key) live only here, on the loop's
        # side, until they finish: then they are written once, finished, instead of added, started and
        # finished in three commits. Ids in _writing have a write queued; their next change goes through the
        # database, behind that write (group commits run in the order they were queued).
        self._unsaved: dict[str, Prediction] = {}
        self._writing: set[str] = set()
        self._scheduled = False  # a commit under way scheduled webhook deliveries (set on the thread)
        self._on_scheduled: Callable[[], None] | None = None
        self._leased: set[str] = set()  # webhook ids being attempted by this process
        self.checkpoint_commits = checkpoint_commits
        self.checkpoint_hard_commits = max(checkpoint_hard_commits, checkpoint_commits)
        self.wal_limit = wal_limit
        self._commits = 0  # since the last checkpoint (on the loop's side)
        self._wal_bytes = 0  # the WAL's size after the last commit, once a checkpoint is due (on the thread)
        self._checkpoint_failing = False  # the last checkpoint failed: logged once until one succeeds

    # -- plumbing ---------------------------------------------------------------------------------

    async def open(self) -> None:
        await self._run(self._open)

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        self._synced = self.synchronous != "ACCEPTED"  # one pragma for every commit
        conn.execute(f"PRAGMA synchronous={'NORMAL' if self.synchronous == 'ACCEPTED' else self.synchronous}")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.executescript(SCHEMA)
        conn.execute("PRAGMA wal_autocheckpoint=0")  # _flush checkpoints, between commits (see CHECKPOINT_COMMITS)
        conn.execute(f"PRAGMA journal_size_limit={min(JOURNAL_SIZE_LIMIT, self.wal_limit)}")
        self._conn = conn

    async def check(self) -> None:
        """Raise StorageFull while writes fail for lack of space; once they might succeed again, a tiny
        write says so, so /readyz recovers by itself as soon as space is freed."""
        if self._full:
            await self._write(_touch_probe)

    async def close(self) -> None:
        # What was never written (sync requests cut off by the shutdown) is kept for the next start.
        unsaved = [p for pid, p in self._unsaved.items() if pid not in self._writing]
        try:
            if unsaved and self._conn is not None:
                await self._write(lambda conn: [self._save(conn, p) for p in unsaved], sync=True)
                self._unsaved.clear()
        except Exception as exc:  # nobody was answered for these: they are lost, and the store still closes
            log.error("could not keep %d unanswered sync predictions at shutdown: %s", len(unsaved), exc)
        finally:
            if self._flusher is not None:
                await self._flusher
            if self._conn is not None:
                await self._run(self._conn.close)  # the last connection to close checkpoints the rest
                self._conn = None
            self._thread.shutdown(wait=True)

    async def _run(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn)

    async def _read(self, op: Callable[[sqlite3.Connection], T]) -> T:
        conn = self._conn
        assert conn is not None, "store not open"
        return await self._run(lambda: op(conn))

    async def _write(self, op: Callable[[sqlite3.Connection], T], *, sync: bool = False) -> T:
        """Queue `op` for the next group commit and wait until it has committed.

        With `--sqlite-synchronous ACCEPTED` (the default) a commit is fsynced (FULL) when one of its ops
        asks for it with `sync`: those that accept a prediction before its 202, or cancel one. The rest
        commit with NORMAL, which survives a crash of the process but not of the machine; a synced
        commit makes every earlier one durable too.
        """
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._pending.append((op, future))
        if sync:
            self._sync_next = True
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush())
        return await future

    async def _flush(self) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                sync, self._sync_next = self._sync_next, False
                ops = [op for op, _ in batch]
                try:
                    outcomes = await self._commit(ops, sync)
                except Exception as exc:  # a bug of ours: every waiter hears of it, none waits for ever
                    outcomes = [(False, exc)] * len(batch)
                for (_, future), (ok, value) in zip(batch, outcomes, strict=True):
                    if future.done():
                        continue
                    if ok:
                        future.set_result(value)
                    else:
                        future.set_exception(value)
                if self._scheduled:
                    self._scheduled = False
                    if self._on_scheduled is not None:
                        self._on_scheduled()
                self._commits += 1
                if self._commits >= self.checkpoint_commits:
                    try:
                        await self._maybe_checkpoint()
                    except Exception:  # a bug of ours: the writes queued meanwhile still commit
                        log.exception("the SQLite WAL checkpoint failed")
        finally:
            self._flusher = None

    async def _maybe_checkpoint(self) -> None:
        """Checkpoint once a checkpoint is due and nothing waits for a commit (every waiter of the last one
        has its answer already); under writes that leave no idle moment, once the WAL passes `wal_limit`
        or `checkpoint_hard_commits` commits have gone by, the requests queued meanwhile wait for it."""
        await asyncio.sleep(0)  # the answered waiters run first: what they queue next is no idle moment
        if self._pending and self._commits < self.checkpoint_hard_commits and self._wal_bytes < self.wal_limit:
            return
        self._commits = 0  # a failed one is retried once as many commits have gone by again
        mode = "TRUNCATE" if self._pending else "PASSIVE"
        await self._run(lambda: self._checkpoint(mode))

    def _checkpoint(self, mode: str) -> None:
        conn = self._conn
        if conn is None:
            return
        try:
            # PASSIVE at an idle moment: it copies everything (no writer runs beside it on this thread),
            # and never waits on another process's readers. Forced, TRUNCATE: it waits for them (up to the
            # connection's busy timeout) and cuts the file back to nothing.
            busy, frames, copied = _checkpoint(conn, mode)
            if busy or (frames >= 0 and copied < frames):
                raise sqlite3.OperationalError(f"{mode} checkpoint copied {copied} of {frames} WAL frames")
        except sqlite3.Error as exc:  # a full disk, say: the WAL keeps everything meanwhile
            if not self._checkpoint_failing:
                log.warning("could not checkpoint the SQLite WAL (it grows until one succeeds): %s", exc)
            self._checkpoint_failing = True
            return
        if self._checkpoint_failing:
            log.info("the SQLite WAL checkpoint succeeded again")
        self._checkpoint_failing = False

    def _commit(self, ops: list[Op], sync: bool) -> asyncio.Future[list[tuple[bool, Any]]]:
        """The transaction on the store's thread, its outcome set on the loop in one callback: cheaper
        than run_in_executor, which chains a second future to the executor's (one hop per commit)."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[list[tuple[bool, Any]]] = loop.create_future()

        def run() -> None:
            try:
                outcome = self._transaction(ops, sync)
            except BaseException as exc:  # handed to the loop, which raises it there
                settled: tuple[list[tuple[bool, Any]] | None, BaseException | None] = (None, exc)
            else:
                settled = (outcome, None)
            try:
                loop.call_soon_threadsafe(_settle, done, *settled)
            except RuntimeError:  # the loop closed meanwhile: nobody is left to tell
                pass

        self._thread.submit(run)
        return done

    def _transaction(self, ops: list[Op], sync: bool = False) -> list[tuple[bool, Any]]:
        """Run ops in one transaction. If one raises (a conflict), run them again, each in a savepoint,
        so its neighbours still commit; the common case pays for no savepoints."""
        conn = self._conn
        assert conn is not None, "store not open"
        try:
            if self.synchronous == "ACCEPTED" and sync != self._synced:
                conn.execute(f"PRAGMA synchronous={'FULL' if sync else 'NORMAL'}")  # outside a transaction
                self._synced = sync
            conn.execute("BEGIN IMMEDIATE")
            try:
                results: list[tuple[bool, Any]] = [(True, op(conn)) for op in ops]
            except Exception as exc:
                if _is_full(exc):
                    raise  # not one op's fault (SQLite may have rolled back already): the outer handler says so
                conn.execute("ROLLBACK")
                self._live.clear()
                conn.execute("BEGIN IMMEDIATE")
                results = [self._in_savepoint(conn, op) for op in ops]
            conn.execute("COMMIT")
            if self._commits + 1 >= self.checkpoint_commits:  # a checkpoint is due: is the WAL past its bound?
                with contextlib.suppress(OSError):  # committed all the same: no reason to report a failure
                    self._wal_bytes = self._wal.stat().st_size
        except Exception as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            self._live.clear()
            if _is_full(exc):
                self._full = True
                exc = StorageFull()
            return [(False, exc)] * len(ops)
        if any(op is not _nothing for op in ops):
            self._full = False  # something was written: there is room again (an empty commit proves nothing)
        return results

    def _in_savepoint(self, conn: sqlite3.Connection, op: Op) -> tuple[bool, Any]:
        conn.execute("SAVEPOINT op")
        try:
            result = op(conn)
        except Exception as exc:
            if _is_full(exc):
                raise  # not this op's fault: the whole transaction fails, and is reported as StorageFull
            conn.execute("ROLLBACK TO op")
            conn.execute("RELEASE op")
            self._live.clear()
            return False, exc
        conn.execute("RELEASE op")
        return True, result

    # -- rows -------------------------------------------------------------------------------------------

    def _load(self, conn: sqlite3.Connection, prediction_id: str) -> Prediction | None:
        return self._load_many(conn, [prediction_id])[0]

    def _load_many(self, conn: sqlite3.Connection, prediction_ids: Sequence[str]) -> list[Prediction | None]:
        found: dict[str, Prediction] = {pid: self._live[pid] for pid in prediction_ids if pid in self._live}
        missing = [pid for pid in prediction_ids if pid not in found]
        if missing:
            marks = ",".join("?" * len(missing))
            rows = conn.execute(f"SELECT id, record FROM predictions WHERE id IN ({marks})", missing)
            found.update((pid, Prediction.from_row(json.loads(record))) for pid, record in rows)
        return [found.get(pid) for pid in prediction_ids]

    def _save(self, conn: sqlite3.Connection, p: Prediction) -> Prediction:
        conn.execute(
            "INSERT INTO predictions (id, status, expires_at, record) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (id) DO UPDATE SET status = excluded.status, expires_at = excluded.expires_at, "
            "record = excluded.record",
            (p.prediction_id, p.status.text, p.expires_at, dumps_fields_str(p, p.to_row)),
        )
        self._remember(p)
        if p.webhook is not None:
            self._schedule(conn, [p])
        return p

    def _update(self, updates: list[Prediction | None], conn: sqlite3.Connection) -> list[Prediction]:
        changed = [p for p in updates if p is not None]
        conn.executemany(
            "UPDATE predictions SET status = ?, expires_at = ?, record = ? WHERE id = ?",
            [(p.status.text, p.expires_at, dumps_fields_str(p, p.to_row), p.prediction_id) for p in changed],
        )
        for p in changed:
            self._remember(p)
        self._schedule(conn, changed)
        return changed

    def _schedule(self, conn: sqlite3.Connection, written: list[Prediction]) -> None:
        """Pending deliveries of the events these writes cause, in the same transaction."""
        scheduled = [d for p in written if p.webhook is not None and (d := scheduled_by(p)) is not None]
        if scheduled:
            conn.executemany(
                "INSERT OR IGNORE INTO webhook_deliveries (id, prediction_id, event, url, host, body, event_at, "
                "due_at, attempts) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (d.webhook_id, d.prediction_id, d.event, d.url, d.host, d.body, d.event_at, d.due_at, d.attempts)
                    for d in scheduled
                ],
            )
            self._scheduled = True

    def _remember(self, p: Prediction) -> None:
        if p.status.terminal:
            self._live.pop(p.prediction_id, None)
        else:
            self._live[p.prediction_id] = p

    # -- the Store interface ----------------------------------------------------------------------

    async def add_deferred(self, prediction: Prediction) -> Prediction:
        if prediction.webhook is not None and "start" in prediction.webhook.events:
            # Its start sends a webhook, which must be written with the start: so must the record.
            return await self.add(prediction)
        self._unsaved[prediction.prediction_id] = prediction
        return prediction

    async def add(self, prediction: Prediction, idempotency: IdempotencyKey | None = None) -> Prediction:
        def op(conn: sqlite3.Connection) -> Prediction:
            if idempotency is not None:
                row = conn.execute(
                    "SELECT prediction_id, fingerprint FROM idempotency_keys WHERE key = ?", (idempotency.key,)
                ).fetchone()
                if row is not None:
                    existing = self._load(conn, row[0])
                    lifecycle.check_idempotency(existing, IdempotencyKey(idempotency.key, row[1]), idempotency)
                    if existing is not None:
                        return existing
                self._save(conn, prediction)
                conn.execute(
                    "INSERT OR REPLACE INTO idempotency_keys (key, fingerprint, prediction_id) VALUES (?, ?, ?)",
                    (idempotency.key, idempotency.fingerprint, prediction.prediction_id),
                )
                return prediction
            return self._save(conn, prediction)

        return await self._write(op, sync=True)  # a 202 may follow: on disk before it

    async def persist(self, prediction_id: str) -> None:
        while True:
            unsaved = self._unsaved.get(prediction_id)
            if unsaved is None:  # written already, maybe unsynced: a synced commit makes it durable too
                await self._write(_nothing, sync=True)
                return
            if prediction_id not in self._writing:
                await self._write_unsaved(unsaved)
                return
            if self._full:
                raise StorageFull()  # its write in flight is failing: a 202 must not claim it is on disk
            await self._write(_nothing, sync=True)  # after the write in flight, look again

    async def _write_unsaved(self, p: Prediction) -> Prediction:
        """Write an unsaved prediction (in its new state `p`); from then on it lives in the database."""
        pid = p.prediction_id
        self._writing.add(pid)
        try:
            await self._write(lambda conn: self._save(conn, p), sync=True)  # for a 202 or a cancel
            self._unsaved.pop(pid, None)
        finally:
            self._writing.discard(pid)
        return p

    def _in_memory(self, prediction_id: str) -> Prediction | None:
        """The unsaved prediction, if it is one and no write of it is queued."""
        return None if prediction_id in self._writing else self._unsaved.get(prediction_id)

    async def get(self, prediction_id: str) -> Prediction | None:
        unsaved = self._unsaved.get(prediction_id)
        if unsaved is not None:
            return unsaved
        return await self._read(lambda conn: self._load(conn, prediction_id))

    async def delete(self, prediction_id: str) -> None:
        if self._in_memory(prediction_id) is not None:
            del self._unsaved[prediction_id]
            return

        def op(conn: sqlite3.Connection) -> None:
            conn.execute("DELETE FROM predictions WHERE id = ?", (prediction_id,))
            self._live.pop(prediction_id, None)

        await self._write(op)

    async def start(self, prediction_ids: Sequence[str], *, now: float | None = None) -> list[Prediction]:
        n = len(prediction_ids)
        stored: list[str] = []
        in_memory: list[tuple[Prediction, Prediction]] = []  # (queued, running) of unsaved ones
        expired: list[Prediction] = []  # unsaved ones past their deadline: written now, failed, once
        for pid in prediction_ids:
            unsaved = self._in_memory(pid)
            if unsaved is None:
                stored.append(pid)
            elif (after := lifecycle.start(unsaved, n, now, self.ttl)) is not None:
                if after.status.terminal:
                    expired.append(after)
                else:
                    in_memory.append((unsaved, after))
        started: list[Prediction] = []
        if stored or expired:

            def op(conn: sqlite3.Connection) -> list[Prediction]:
                for p in expired:
                    self._save(conn, p)
                loaded = self._load_many(conn, stored) if stored else []
                return expired + self._update([lifecycle.start(p, n, now, self.ttl) for p in loaded], conn)

            ids = [p.prediction_id for p in expired]
            self._writing.update(ids)
            try:
                started += await self._write(op)
                for pid in ids:
                    self._unsaved.pop(pid, None)  # committed: read from the database from now on
            finally:
                self._writing.difference_update(ids)
        # Only now: if the write above failed, a retry of the whole batch finds these still queued. One
        # canceled (or written) meanwhile keeps its new state and is not started.
        for queued, running in in_memory:
            pid = running.prediction_id
            if self._unsaved.get(pid) is queued and pid not in self._writing:
                self._unsaved[pid] = running  # not written: if the process dies, no one was answered
                started.append(running)
        return started

    async def fail_queued(self, outcomes: Sequence[Outcome]) -> list[Prediction]:
        # Only recovery and the unserved sweep fail queued work, and what they fail was read from the
        # database: an unsaved one (a sync request of this process) is failed from memory all the same.
        return await self._end(outcomes, lifecycle.fail_queued)

    async def finish(self, outcomes: Sequence[Outcome]) -> list[Prediction]:
        return await self._end(outcomes, lifecycle.finish)

    async def _end(
        self, outcomes: Sequence[Outcome], rule: Callable[[Prediction | None, Outcome, float], Prediction | None]
    ) -> list[Prediction]:
        """Apply an ending rule (lifecycle.finish, lifecycle.fail_queued) to each outcome's record and
        write what changed; returns the records it ended."""
        once: list[Prediction] = []  # unsaved ones, written now for the first time, ended
        stored: list[Outcome] = []
        for o in outcomes:
            unsaved = self._in_memory(o.prediction_id)
            if unsaved is None:
                stored.append(o)
            elif (done := rule(unsaved, o, self.ttl)) is not None:
                once.append(done)

        def op(conn: sqlite3.Connection) -> list[Prediction]:
            for p in once:
                self._save(conn, p)
            if not stored:
                return once
            current = self._load_many(conn, [o.prediction_id for o in stored])
            return once + self._update([rule(p, o, self.ttl) for p, o in zip(current, stored, strict=True)], conn)

        ids = [p.prediction_id for p in once]
        self._writing.update(ids)
        try:
            ended = await self._write(op)
            for pid in ids:
                self._unsaved.pop(pid, None)  # committed: read from the database from now on
        finally:
            self._writing.difference_update(ids)
        return ended

    async def cancel(self, prediction_id: str) -> Prediction:
        unsaved = self._in_memory(prediction_id)
        if unsaved is not None:
            return await self._write_unsaved(lifecycle.cancel(unsaved, prediction_id, self.ttl))
        return await self._write(
            lambda conn: self._save(conn, lifecycle.cancel(self._load(conn, prediction_id), prediction_id, self.ttl)),
            sync=True,
        )

    async def commit_stream(
        self, prediction_id: str, start: int, chunks: list[Any], progress: dict[str, Any] | None
    ) -> Prediction | None:
        # A stream's record is never deferred (service.py stores it first): its chunks are committed as it runs.
        def op(conn: sqlite3.Connection) -> Prediction | None:
            changed = lifecycle.append_chunks(self._load(conn, prediction_id), start, chunks, progress)
            return self._update([changed], conn)[0] if changed is not None else None

        return await self._write(op)

    async def recover(self, max_attempts: int) -> tuple[list[Prediction], list[Prediction]]:
        def op(conn: sqlite3.Connection) -> tuple[list[Prediction], list[Prediction]]:
            rows = conn.execute(
                "SELECT record FROM predictions WHERE status IN ('queued', 'running') ORDER BY seq"
            ).fetchall()
            recovered = [lifecycle.recover(Prediction.from_row(json.loads(r[0])), max_attempts, self.ttl) for r in rows]
            self._update(list(recovered), conn)
            return (
                [p for p in recovered if p.status is Status.QUEUED],
                [p for p in recovered if p.status is Status.FAILED],
            )

        return await self._write(op)

    async def sweep(self, now: float) -> int:
        def op(conn: sqlite3.Connection) -> int:
            return conn.execute("DELETE FROM predictions WHERE expires_at <= ?", (now,)).rowcount

        return await self._write(op)

    # -- webhooks (KeepsWebhooks) ----------------------------------------------------------------------

    def on_webhooks_scheduled(self, callback: Callable[[], None]) -> None:
        self._on_scheduled = callback

    async def due_webhooks(
        self, now: float, limit: int, *, per_host: int | None = None, in_flight: Mapping[str, int] | None = None
    ) -> list[Delivery]:
        hosts = Counter(in_flight or {})
        leased = list(self._leased)
        busy = [host for host, n in hosts.items() if per_host is not None and n >= per_host]
        share = per_host if per_host is not None else limit

        def op(conn: sqlite3.Connection) -> list[Delivery]:
            where = "due_at <= ?"
            if leased:
                where += f" AND id NOT IN ({','.join('?' * len(leased))})"
            if busy:
                where += f" AND host NOT IN ({','.join('?' * len(busy))})"
            # The earliest few per host, so that one host's backlog cannot fill the page.
            rows = conn.execute(
                "SELECT id, prediction_id, event, url, body, event_at, due_at, attempts, host FROM ("
                "SELECT *, row_number() OVER (PARTITION BY host ORDER BY due_at) AS nth FROM webhook_deliveries "
                f"WHERE {where}) WHERE nth <= ? ORDER BY due_at LIMIT ?",
                (now, *leased, *busy, share, limit),
            )
            return [Delivery(*row[:8]) for row in rows]

        due = []
        for delivery in await self._read(op):
            if per_host is None or hosts[delivery.host] < per_host:
                hosts[delivery.host] += 1
                due.append(delivery)
        self._leased.update(d.webhook_id for d in due)
        return due

    async def settle_webhook(self, settlement: Settlement) -> None:
        delivery, retry = settlement.delivery, settlement.retry

        def op(conn: sqlite3.Connection) -> None:
            if retry is not None:
                conn.execute(
                    "UPDATE webhook_deliveries SET attempts = ?, due_at = ? WHERE id = ?",
                    (retry.attempts, retry.due_at, retry.webhook_id),
                )
            else:
                conn.execute("DELETE FROM webhook_deliveries WHERE id = ?", (delivery.webhook_id,))
            p = self._load(conn, delivery.prediction_id)
            if p is not None and p.webhook is not None and settlement.applies_to(p):
                self._update([p.with_webhook(settlement.apply(p.webhook))], conn)

        await self._write(op)
        self._leased.discard(delivery.webhook_id)  # only now: until it is settled no one takes it again

    async def pending_webhooks(self) -> int:
        row = await self._read(lambda conn: conn.execute("SELECT COUNT(*) FROM webhook_deliveries").fetchone())
        return int(row[0])
