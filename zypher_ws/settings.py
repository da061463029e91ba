"""The one place that reads configuration: CLI flags over `ZYPHER_*` environment variables over defaults."""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

ENV_PREFIX = "ZYPHER_"
MiB = 1024 * 1024


def _opt(default: Any, help: str, *, secret: bool = False, **extra: Any) -> Any:
    return field(default=default, repr=not secret, metadata={"help": help, **extra})


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Everything the service can be told. Each field is a flag `--name-with-dashes` and `ZYPHER_NAME`."""

    host: str = _opt("127.0.0.1", "interface to listen on")
    port: int = _opt(8080, "TCP port to listen on")
    model: str = _opt("digits", "model to serve: digits, mock, or package.module:factory")
    workers: int = _opt(2, "concurrent model calls (batches in flight); 0 = no model here (redis backend)")
    executor: str = _opt("thread", "where the model runs: thread (numpy, GIL-releasing) or process (pure Python)")
    model_nice: int = _opt(
        10, "scheduling niceness of the model's threads or processes (0-19): the event loop, at 0, runs first"
    )
    max_queue: int = _opt(1024, "most predictions waiting in the queue; past it POST answers 503")
    max_batch_size: int = _opt(32, "most predictions handed to the model in one call")
    max_batch_delay_ms: float = _opt(2.0, "longest a worker waits to fill a batch while others are busy (idle: none)")
    sync_timeout: float = _opt(30.0, "seconds a synchronous POST waits before answering 202")
    max_body: int = _opt(MiB, "largest request body in bytes (413 past it)")
    mock_latency_ms: float = _opt(0.0, "latency of each mock model call, like a remote accelerator")
    log_level: str = _opt("INFO", "DEBUG, INFO, WARNING or ERROR")
    log_format: str = _opt("text", "text, or json for one JSON object per line")
    ws_max_subscriptions: int = _opt(1000, "most prediction ids one WebSocket may watch")
    ws_outbox: int = _opt(256, "messages buffered per WebSocket before a slow client is dropped")
    ws_outbox_bytes: int = _opt(256 * 1024, "bytes of messages buffered per WebSocket before a slow client is dropped")
    ws_max_message: int = _opt(64 * 1024, "largest WebSocket frame accepted, bytes (1009 past it)")
    ws_heartbeat: float = _opt(30.0, "seconds between WebSocket pings; a peer that misses one is dropped")
    shutdown_timeout: float = _opt(30.0, "seconds running predictions get to finish on SIGTERM")
    store: str = _opt(
        "sqlite:///zypher.db",
        "where records live: sqlite:///relative.db, sqlite:////abs.db, memory://, or redis://host:port/db "
        "(shared by many processes)",
    )
    memory_max_results: int = _opt(
        50_000, "memory:// only: most finished predictions kept; the oldest go first, before --result-ttl"
    )
    sqlite_synchronous: str = _opt("FULL", "SQLite synchronous pragma: FULL survives power loss, NORMAL a crash")
    max_attempts: int = _opt(3, "times a prediction may be started; past it a lost one ends failed (worker_lost)")
    result_ttl: float = _opt(86400.0, "seconds a finished prediction is kept before it is deleted")
    backend: str = _opt("embedded", "embedded (one process, --store) or redis (the same as --store $redis_url)")
    redis_url: str = _opt("redis://127.0.0.1:6379/0", "the Redis server of the redis backend")
    redis_prefix: str = _opt("zypher", "prefix of every Redis key, so several services can share one Redis")
    redis_connections: int = _opt(32, "Redis connections per process for requests (blocking reads get their own)")
    api_tokens: tuple[str, ...] = _opt(
        (), "bearer tokens accepted; with any set, every route but the page, health and metrics needs one",
        flag="--api-token",
        secret=True,
    )  # fmt: skip
    metrics_need_token: bool = _opt(False, "with --api-token set, /metrics needs a token too")
    ws_allowed_origins: tuple[str, ...] = _opt(
        (), "browser origins allowed to open a WebSocket besides the service's own; * allows any",
        flag="--ws-allowed-origin",
    )  # fmt: skip
    public_origins: tuple[str, ...] = _opt(
        (), "the service's own origins as browsers see them (https://api.example.com); when set, a WebSocket's "
        "Origin must be one of these or --ws-allowed-origin, and is never compared with Host",
        flag="--public-origin",
    )  # fmt: skip
    ws_max_per_client: int = _opt(
        256, "authenticated WebSockets and event streams open at once per client address (0: no limit)"
    )
    ws_max_authenticating: int = _opt(8, "WebSockets per client address still to send their auth message (0: no limit)")
    rate_limit: float = _opt(0.0, "POST /predict (and WebSocket predict) per second per client address; 0: off")
    rate_burst: int = _opt(0, "requests a client may send at once above --rate-limit (0: twice the rate)")
    metrics_port: int = _opt(0, "zypher-ws worker only: serve Prometheus /metrics on this port (0: off)")
    claim_idle: float = _opt(45.0, "seconds before live workers take over work a lost worker held (redis)")

    @property
    def backend_url(self) -> str:
        """Where records, the queue and events live; its scheme picks the backend (see backends/)."""
        if self.backend == "redis" and not self.store.startswith(("redis", "unix")):
            return self.redis_url
        return self.store

    @property
    def shared_backend(self) -> bool:
        """Many processes share the backend, so workers may run in other processes."""
        from .backends import is_shared

        return is_shared(self.backend_url)

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
        values = vars(ns)
        given: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name not in values:
                continue
            value = values[f.name]
            if isinstance(value, list) or (value is None and f.name + _ENV_DEFAULT in values):
                value = tuple(value) if value is not None else values[f.name + _ENV_DEFAULT]
            given[f.name] = value
        return cls(**given)

    def __post_init__(self) -> None:
        from .backends import kind_of

        shared = kind_of(self.backend_url).shared  # raises for a URL no backend takes
        if self.workers < (0 if shared else 1):
            raise ValueError("workers must be at least 1 (0, an API-only process, needs a redis:// store)")
        for name in (
            "redis_connections", "max_queue", "max_batch_size", "max_body", "ws_outbox", "max_attempts",
            "memory_max_results", "ws_outbox_bytes",
        ):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        for name in ("ws_max_per_client", "ws_max_authenticating", "rate_burst", "metrics_port"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")
        if not 0 <= self.model_nice <= 19:
            raise ValueError("model_nice must be between 0 and 19")
        if self.rate_limit < 0:
            raise ValueError("rate_limit must not be negative")
        if any(not token or len(token) < 16 for token in self.api_tokens):
            raise ValueError("each api token must be at least 16 characters")
        if any(not re.fullmatch(r"https?://[^/?#\s]+/?", origin) for origin in self.public_origins):
            raise ValueError("each public origin is scheme://host[:port], like https://api.example.com")
        if self.log_format not in ("text", "json"):
            raise ValueError(f"log_format must be text or json, not {self.log_format!r}")
        if self.executor not in ("thread", "process"):
            raise ValueError(f"executor must be thread or process, not {self.executor!r}")
        if self.backend not in ("embedded", "redis"):
            raise ValueError(f"backend must be embedded or redis, not {self.backend!r}")
        if self.claim_idle <= 0:
            raise ValueError("claim_idle must be positive")
        for name in ("sync_timeout", "max_batch_delay_ms", "mock_latency_ms", "shutdown_timeout", "result_ttl"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")
        if self.store.startswith("sqlite:") and not self.store.startswith("sqlite:///"):
            raise ValueError(f"a sqlite store is sqlite:///relative.db or sqlite:////absolute.db, not {self.store!r}")
        if self.sqlite_synchronous.upper() not in ("OFF", "NORMAL", "FULL", "EXTRA"):
            raise ValueError("sqlite_synchronous must be OFF, NORMAL, FULL or EXTRA")


def _env_name(name: str) -> str:
    return ENV_PREFIX + name.upper()


def _bool(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(value)


def _list(value: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in value.split(",") if item.strip())


_ENV_DEFAULT = "__env_default"


def add_settings_arguments(parser: argparse.ArgumentParser, environ: Mapping[str, str]) -> None:
    """Add one flag per settings field; its default comes from `ZYPHER_<NAME>` when set.

    List settings (`--api-token`) take one value per flag, repeated; their variable is comma-separated.
    """
    for f in dataclasses.fields(Settings):
        type_name = str(f.type)
        kind: Any = {"int": int, "float": float, "bool": _bool, "tuple[str, ...]": _list}.get(type_name, str)
        env = _env_name(f.name)
        default = f.default
        if env in environ:
            try:
                default = kind(environ[env])
            except ValueError:
                parser.error(f"{env}={environ[env]!r} is not a valid {type_name}")
        help = f"{f.metadata['help']} (env {env}"
        if type_name == "tuple[str, ...]":
            # argparse appends to a default list, so the environment's value is kept aside: flags replace it.
            parser.set_defaults(**{f.name + _ENV_DEFAULT: default})
            parser.add_argument(
                f.metadata["flag"], dest=f.name, action="append", default=None, metavar="TEXT",
                help=f"{help}, comma-separated; repeat the flag for more)",
            )  # fmt: skip
            continue
        parser.add_argument(
            "--" + f.name.replace("_", "-"),
            dest=f.name,
            type=kind,
            default=default,
            metavar={"int": "N", "float": "NUM", "bool": "BOOL"}.get(type_name, "TEXT"),
            help=f"{help}; default: %(default)s)",
        )


def build_parser(environ: Mapping[str, str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zypher-ws serve")
    add_settings_arguments(parser, environ)
    return parser
