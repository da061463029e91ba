"""The one place that reads configuration: CLI flags over `ZYPHER_*` environment variables over defaults."""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

ENV_PREFIX = "ZYPHER_"
MiB = 1024 * 1024


def _opt(default: Any, help: str, **extra: Any) -> Any:
    return field(default=default, metadata={"help": help, **extra})


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Everything the service can be told. Each field is a flag `--name-with-dashes` and `ZYPHER_NAME`."""

    host: str = _opt("127.0.0.1", "interface to listen on")
    port: int = _opt(8080, "TCP port to listen on")
    model: str = _opt("digits", "model to serve: digits, mock, or package.module:factory")
    workers: int = _opt(2, "concurrent model calls (batches in flight); 0 = no model here (redis backend)")
    executor: str = _opt("thread", "where the model runs: thread (numpy, GIL-releasing) or process (pure Python)")
    max_queue: int = _opt(1024, "most predictions waiting in the queue; past it POST answers 503")
    max_batch_size: int = _opt(32, "most predictions handed to the model in one call")
    max_batch_delay_ms: float = _opt(2.0, "longest a worker waits to fill a batch while others are busy (idle: none)")
    sync_timeout: float = _opt(30.0, "seconds a synchronous POST waits before answering 202")
    max_body: int = _opt(MiB, "largest request body in bytes (413 past it)")
    mock_latency_ms: float = _opt(0.0, "latency of each mock model call, like a remote accelerator")
    log_level: str = _opt("INFO", "DEBUG, INFO, WARNING or ERROR")
    ws_max_subscriptions: int = _opt(1000, "most prediction ids one WebSocket may watch")
    ws_outbox: int = _opt(256, "messages buffered per WebSocket before a slow client is dropped")
    ws_max_message: int = _opt(64 * 1024, "largest WebSocket frame accepted, bytes (1009 past it)")
    ws_heartbeat: float = _opt(30.0, "seconds between WebSocket pings; a peer that misses one is dropped")
    shutdown_timeout: float = _opt(30.0, "seconds running predictions get to finish on SIGTERM")
    store: str = _opt("sqlite:///zypher.db", "where records live: sqlite:///relative.db, sqlite:////abs.db, memory://")
    sqlite_synchronous: str = _opt("FULL", "SQLite synchronous pragma: FULL survives power loss, NORMAL a crash")
    max_attempts: int = _opt(3, "times a prediction may be started; past it a lost one ends failed (worker_lost)")
    result_ttl: float = _opt(86400.0, "seconds a finished prediction is kept before it is deleted")
    backend: str = _opt("embedded", "embedded (one process, --store) or redis (many processes, --redis-url)")
    redis_url: str = _opt("redis://127.0.0.1:6379/0", "the Redis server of the redis backend")
    redis_prefix: str = _opt("zypher", "prefix of every Redis key, so several services can share one Redis")
    redis_connections: int = _opt(32, "Redis connections per process for requests (blocking reads get their own)")
    claim_idle: float = _opt(45.0, "seconds before live workers take over work a lost worker held (redis)")

    @property
    def max_batch_delay(self) -> float:
        return self.max_batch_delay_ms / 1000.0

    @classmethod
    def from_sources(cls, argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> Settings:
        """Build settings from argv (flags win) and the environment."""
        parser = build_parser(environ if environ is not None else os.environ)
        return cls.from_namespace(parser.parse_args(argv))

    @classmethod
    def from_namespace(cls, ns: argparse.Namespace) -> Settings:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in vars(ns).items() if k in names})

    def __post_init__(self) -> None:
        if self.workers < (0 if self.backend == "redis" else 1):
            raise ValueError("workers must be at least 1 (0, an API-only process, needs --backend redis)")
        for name in ("redis_connections", "max_queue", "max_batch_size", "max_body", "ws_outbox", "max_attempts"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.executor not in ("thread", "process"):
            raise ValueError(f"executor must be thread or process, not {self.executor!r}")
        if self.backend not in ("embedded", "redis"):
            raise ValueError(f"backend must be embedded or redis, not {self.backend!r}")
        if self.claim_idle <= 0:
            raise ValueError("claim_idle must be positive")
        for name in ("sync_timeout", "max_batch_delay_ms", "mock_latency_ms", "shutdown_timeout", "result_ttl"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")
        if not (self.store == "memory://" or self.store.startswith("sqlite:///")):
            raise ValueError(f"store must be memory:// or sqlite:///path, not {self.store!r}")
        if self.sqlite_synchronous.upper() not in ("OFF", "NORMAL", "FULL", "EXTRA"):
            raise ValueError("sqlite_synchronous must be OFF, NORMAL, FULL or EXTRA")


def _env_name(name: str) -> str:
    return ENV_PREFIX + name.upper()


def add_settings_arguments(parser: argparse.ArgumentParser, environ: Mapping[str, str]) -> None:
    """Add one flag per settings field; its default comes from `ZYPHER_<NAME>` when set."""
    for f in dataclasses.fields(Settings):
        kind = {"int": int, "float": float}.get(str(f.type), str)
        env = _env_name(f.name)
        default = f.default
        if env in environ:
            try:
                default = kind(environ[env])
            except ValueError:
                parser.error(f"{env}={environ[env]!r} is not a valid {kind.__name__}")
        parser.add_argument(
            "--" + f.name.replace("_", "-"),
            dest=f.name,
            type=kind,
            default=default,
            metavar={"int": "N", "float": "NUM"}.get(kind.__name__, "TEXT"),
            help=f"{f.metadata['help']} (env {env}; default: %(default)s)",
        )


def build_parser(environ: Mapping[str, str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zypher-ws serve")
    add_settings_arguments(parser, environ)
    return parser
