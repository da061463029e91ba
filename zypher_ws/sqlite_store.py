"""The durable default: prediction records in an embedded SQLite database.

One dedicated thread owns the connection, so the event loop never waits on disk. Writes issued in
the same loop turn share one transaction (group commit): each caller's await returns only after
that transaction committed, so a 202 is sent for a prediction that is already on disk.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from . import store as rules
from .records import Prediction, Status
from .store import IdempotencyKey, Outcome

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
"""


def path_from_url(url: str) -> Path:
    """`sqlite:///relative/path.db` or `sqlite:////absolute/path.db` (SQLAlchemy's convention)."""
    if not url.startswith("sqlite:///"):
        raise ValueError(f"not a sqlite URL: {url!r}")
    return Path(url[len("sqlite:///") :])


class SQLiteStore:
    def __init__(self, path: Path, *, ttl: float = 86400.0, synchronous: str = "FULL") -> None:
        self.path = path
        self.ttl = ttl
        self.synchronous = synchronous
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="zypher-sqlite")
        self._conn: sqlite3.Connection | None = None
        self._pending: list[tuple[Op, asyncio.Future[Any]]] = []
        self._flusher: asyncio.Task[None] | None = None

    # -- plumbing ---------------------------------------------------------------------------------

    async def open(self) -> None:
        await self._run(self._open)

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={self.synchronous}")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.executescript(SCHEMA)
        self._conn = conn

    async def check(self) -> None:
        pass  # a local file: if it fails, writes report it

    async def close(self) -> None:
        if self._flusher is not None:
            await self._flusher
        if self._conn is not None:
            await self._run(self._conn.close)
            self._conn = None
        self._thread.shutdown(wait=True)

    async def _run(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn)

    async def _read(self, op: Callable[[sqlite3.Connection], T]) -> T:
        conn = self._conn
        assert conn is not None, "store not open"
        return await self._run(lambda: op(conn))

    async def _write(self, op: Callable[[sqlite3.Connection], T]) -> T:
        """Queue `op` for the next group commit and wait until it is durable."""
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._pending.append((op, future))
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush())
        return await future

    async def _flush(self) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                ops = [op for op, _ in batch]
                outcomes = await asyncio.get_running_loop().run_in_executor(self._thread, self._transaction, ops)
                for (_, future), (ok, value) in zip(batch, outcomes, strict=True):
                    if future.done():
                        continue
                    if ok:
                        future.set_result(value)
                    else:
                        future.set_exception(value)
        finally:
            self._flusher = None

    def _transaction(self, ops: list[Op]) -> list[tuple[bool, Any]]:
        conn = self._conn
        assert conn is not None, "store not open"
        results: list[tuple[bool, Any]] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            for op in ops:
                conn.execute("SAVEPOINT op")  # one op's failure (a conflict) leaves the others in
                try:
                    results.append((True, op(conn)))
                    conn.execute("RELEASE op")
                except Exception as exc:
                    conn.execute("ROLLBACK TO op")
                    conn.execute("RELEASE op")
                    results.append((False, exc))
            conn.execute("COMMIT")
        except Exception as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            return [(False, exc)] * len(ops)
        return results

    # -- rows -------------------------------------------------------------------------------------------

    @staticmethod
    def _load(conn: sqlite3.Connection, prediction_id: str) -> Prediction | None:
        row = conn.execute("SELECT record FROM predictions WHERE id = ?", (prediction_id,)).fetchone()
        return Prediction.from_row(json.loads(row[0])) if row else None

    @staticmethod
    def _save(conn: sqlite3.Connection, p: Prediction) -> Prediction:
        conn.execute(
            "INSERT INTO predictions (id, status, expires_at, record) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (id) DO UPDATE SET status = excluded.status, expires_at = excluded.expires_at, "
            "record = excluded.record",
            (p.prediction_id, p.status.value, p.expires_at, json.dumps(p.to_row())),
        )
        return p

    def _update(self, updates: list[Prediction | None], conn: sqlite3.Connection) -> list[Prediction]:
        return [self._save(conn, p) for p in updates if p is not None]

    # -- the Store interface ----------------------------------------------------------------------

    async def add(self, prediction: Prediction, idempotency: IdempotencyKey | None = None) -> Prediction:
        def op(conn: sqlite3.Connection) -> Prediction:
            if idempotency is not None:
                row = conn.execute(
                    "SELECT prediction_id, fingerprint FROM idempotency_keys WHERE key = ?", (idempotency.key,)
                ).fetchone()
                if row is not None:
                    existing = self._load(conn, row[0])
                    rules.check_idempotency(existing, IdempotencyKey(idempotency.key, row[1]), idempotency)
                    if existing is not None:
                        return existing
                self._save(conn, prediction)
                conn.execute(
                    "INSERT OR REPLACE INTO idempotency_keys (key, fingerprint, prediction_id) VALUES (?, ?, ?)",
                    (idempotency.key, idempotency.fingerprint, prediction.prediction_id),
                )
                return prediction
            return self._save(conn, prediction)

        return await self._write(op)

    async def get(self, prediction_id: str) -> Prediction | None:
        return await self._read(lambda conn: self._load(conn, prediction_id))

    async def delete(self, prediction_id: str) -> None:
        await self._write(lambda conn: conn.execute("DELETE FROM predictions WHERE id = ?", (prediction_id,)))

    async def start(self, prediction_ids: Sequence[str]) -> list[Prediction]:
        n = len(prediction_ids)
        return await self._write(
            lambda conn: self._update([rules.start(self._load(conn, pid), n) for pid in prediction_ids], conn)
        )

    async def finish(self, outcomes: Sequence[Outcome]) -> list[Prediction]:
        return await self._write(
            lambda conn: self._update(
                [rules.finish(self._load(conn, o.prediction_id), o, self.ttl) for o in outcomes], conn
            )
        )

    async def cancel(self, prediction_id: str) -> Prediction:
        return await self._write(
            lambda conn: self._save(conn, rules.cancel(self._load(conn, prediction_id), prediction_id, self.ttl))
        )

    async def recover(self, max_attempts: int) -> tuple[list[Prediction], list[Prediction]]:
        def op(conn: sqlite3.Connection) -> tuple[list[Prediction], list[Prediction]]:
            rows = conn.execute(
                "SELECT record FROM predictions WHERE status IN ('queued', 'running') ORDER BY seq"
            ).fetchall()
            recovered = [rules.recover(Prediction.from_row(json.loads(r[0])), max_attempts, self.ttl) for r in rows]
            for p in recovered:
                self._save(conn, p)
            return (
                [p for p in recovered if p.status is Status.QUEUED],
                [p for p in recovered if p.status is Status.FAILED],
            )

        return await self._write(op)

    async def sweep(self, now: float) -> int:
        def op(conn: sqlite3.Connection) -> int:
            return conn.execute("DELETE FROM predictions WHERE expires_at <= ?", (now,)).rowcount

        return await self._write(op)
