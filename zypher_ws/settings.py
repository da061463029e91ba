"""The one place that reads configuration: CLI flags over `ZYPHER_*` environment variables over defaults.

Each option is declared once, as a field of `Settings`: its type (a `Literal` lists its choices), its default,
its help and its bounds. From that declaration come the command line (`add_settings_arguments`), the
validation (`Settings.__post_init__`) and the reference, docs/configuration.md
(`python -m zypher_ws.settings --markdown`).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

ENV_PREFIX = "ZYPHER_"
MiB = 1024 * 1024


def _opt(
    default: Any,
    help: str,
    *,
    flag: str | None = None,
    min: float | None = None,
    max: float | None = None,
    above: float | None = None,
    any_case: bool = False,
    secret: bool = False,
    switch: bool = False,
) -> Any:
    """A settings field. `min` and `max` are inclusive bounds, `above` an exclusive lower one; `any_case`
    accepts a choice in any case (it is kept upper case); a `secret` is never shown (repr, help, reference);
    a `switch` is a boolean flag that takes no value (its variable still takes true or false)."""
    metadata = {"help": help, "flag": flag, "min": min, "max": max, "above": above, "any_case": any_case}
    return field(default=default, repr=not secret, metadata={**metadata, "secret": secret, "switch": switch})


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Everything the service can be told. Each field is a flag `--name-with-dashes` and `ZYPHER_NAME`."""

    host: str = _opt("127.0.0.1", "interface to listen on")
    port: int = _opt(8080, "TCP port to listen on")
    model: tuple[str, ...] = _opt(
        (), "a model to serve, repeatable: digits, mock, NAME=onnx:PATH, NAME=sklearn:PATH, "
        "NAME=python:package.module:factory or package.module:factory; the first is the default model "
        "(with neither this nor --model-repository: digits)",
    )  # fmt: skip
    model_repository: str = _opt(
        "", "a folder of models to serve: DIR/NAME/VERSION/model.onnx (or model.joblib, model.pkl), with an "
        "optional DIR/NAME/config.json"
    )  # fmt: skip
    default_model: str = _opt(
        "", "the model a request that names none is given (default: the first --model, else the repository's "
        "first by name); its highest version"
    )  # fmt: skip
    workers: int = _opt(2, "concurrent model calls (batches in flight); 0 = no model here (redis backend)", min=0)
    executor: Literal["thread", "process"] = _opt(
        "thread", "where the model runs: thread (numpy, GIL-releasing) or process (pure Python)"
    )
    model_nice: int = _opt(
        10, "scheduling niceness of the model's threads or processes: the event loop, at 0, runs first", min=0, max=19
    )
    max_queue: int = _opt(1024, "most predictions waiting in the queue; past it POST answers 503", min=1)
    max_batch_size: int = _opt(32, "most predictions handed to the model in one call", min=1)
    max_batch_delay_ms: float = _opt(
        2.0, "longest a worker waits to fill a batch while others are busy (idle: none)", min=0
    )
    sync_timeout: float = _opt(30.0, "seconds a synchronous POST waits before answering 202", min=0)
    max_body: int = _opt(MiB, "largest request body in bytes (413 past it)", min=1)
    read_timeout: float = _opt(
        30.0,
        "seconds a client has to send a request's head (on a new connection) and its body (408 past it)",
        min=0,
    )
    max_connections_per_client: int = _opt(
        1024, "open connections per client address; more are refused (0: no cap, e.g. behind a proxy)", min=0
    )
    mock_latency_ms: float = _opt(0.0, "latency of each mock model call, like a remote accelerator", min=0)
    mock_stream_chunks: int = _opt(
        0, "mock streams this many chunks to a request with `stream: true`, one per --mock-latency-ms "
        "(0: mock does not stream)", min=0,
    )  # fmt: skip
    stream_commit_ms: float = _opt(
        250.0, "most milliseconds a streaming prediction's chunks wait before they are committed to the store "
        "(and always at its end)", min=0,
    )  # fmt: skip
    max_stream_chunks: int = _opt(
        10_000, "most chunks one streaming prediction may yield; past it it fails (stream_limit_exceeded)", min=1
    )
    max_stream_bytes: int = _opt(
        4 * MiB, "most bytes of JSON chunks one streaming prediction may yield; past it it fails "
        "(stream_limit_exceeded)", min=1,
    )  # fmt: skip
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = _opt(
        "INFO", "log lines below this level are dropped", any_case=True
    )
    log_format: Literal["text", "json"] = _opt("text", "text, or json for one JSON object per line")
    ws_max_subscriptions: int = _opt(1000, "most prediction ids one WebSocket may watch")
    ws_outbox: int = _opt(256, "messages buffered per WebSocket before a slow client is dropped", min=1)
    ws_outbox_bytes: int = _opt(
        256 * 1024, "bytes of messages buffered per WebSocket before a slow client is dropped", min=1
    )
    ws_max_message: int = _opt(64 * 1024, "largest WebSocket frame accepted, bytes (1009 past it)")
    ws_heartbeat: float = _opt(30.0, "seconds between WebSocket pings; a peer that misses one is dropped")
    shutdown_timeout: float = _opt(30.0, "seconds running predictions get to finish on SIGTERM", min=0)
    store: str = _opt(
        "sqlite:///zypher.db",
        "where records live: sqlite:///relative.db, sqlite:////abs.db, memory://, or redis://host:port/db "
        "(shared by many processes)",
    )
    memory_max_results: int = _opt(
        50_000, "memory:// only: most finished predictions kept; the oldest go first, before --result-ttl", min=1
    )
    sqlite_synchronous: Literal["ACCEPTED", "OFF", "NORMAL", "FULL", "EXTRA"] = _opt(
        "ACCEPTED",
        "SQLite's synchronous pragma: ACCEPTED fsyncs the commits that accept (before a 202) or cancel a "
        "prediction and commits the rest with NORMAL; FULL fsyncs every commit; NORMAL survives a crash of "
        "the process, not of the machine",
        any_case=True,
    )
    max_attempts: int = _opt(
        3, "times a prediction may be started; past it a lost one ends failed (worker_lost)", min=1
    )
    result_ttl: float = _opt(86400.0, "seconds a finished prediction is kept before it is deleted", min=0)
    backend: Literal["embedded", "redis"] = _opt(
        "embedded", "embedded (one process, --store) or redis (the same as --store $redis_url)"
    )
    redis_url: str = _opt("redis://127.0.0.1:6379/0", "the Redis server of the redis backend")
    redis_prefix: str = _opt("zypher", "prefix of every Redis key, so several services can share one Redis")
    redis_connections: int = _opt(
        32, "Redis connections per process for requests (blocking reads get their own)", min=1
    )
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
        256, "authenticated WebSockets and event streams open at once per client address (0: no limit)", min=0
    )
    ws_max_authenticating: int = _opt(
        8, "WebSockets per client address still to send their auth message (0: no limit)", min=0
    )
    rate_limit: float = _opt(0.0, "POST /predict (and WebSocket predict) per second per client address; 0: off", min=0)
    rate_burst: int = _opt(0, "requests a client may send at once above --rate-limit (0: twice the rate)", min=0)
    metrics_port: int = _opt(0, "zypher-ws worker only: serve Prometheus /metrics on this port (0: off)", min=0)
    claim_idle: float = _opt(45.0, "seconds before live workers take over work a lost worker held (redis)", above=0)
    model_heartbeat: float = _opt(
        5.0, "seconds between a worker's announcements in Redis of the model versions it serves (and an API "
        "process's reads of them); one not renewed for three of them is taken to be gone",
        above=0,
    )  # fmt: skip
    unserved_grace: float = _opt(
        300.0, "seconds a model version may go unserved by any worker (redis) before its queued predictions "
        "end failed (model_unavailable) and new ones are refused",
        min=0,
    )  # fmt: skip
    catalog_retention: float = _opt(
        86400.0, "seconds past --unserved-grace that API processes keep a model version no worker serves "
        "(redis); then, its streams empty, it is dropped from the catalog and no longer served",
        min=0,
    )  # fmt: skip
    webhook_secrets: tuple[str, ...] = _opt(
        (), "Standard Webhooks signing secrets (whsec_ and the base64 of 24 to 64 random bytes); every delivery "
        "carries one signature per secret, so repeat it while rotating; without one, a webhook is refused",
        flag="--webhook-secret",
        secret=True,
    )  # fmt: skip
    webhook_timeout: float = _opt(10.0, "seconds a webhook receiver has to answer one attempt", above=0)
    webhook_retry_delays: str = _opt(
        "5,300,1800,7200,18000,36000,86400",
        "seconds between a webhook event's attempts, comma-separated (each stretched or shrunk by up to a fifth, "
        "and at least the receiver's Retry-After); after the last attempt fails the event is dead-lettered",
    )
    webhook_concurrency: int = _opt(
        16, "webhook deliveries in flight at once in this process; a quarter of them (at least 1) to one host", min=1
    )
    webhook_allow_private: bool = _opt(
        False, "deliver webhooks to loopback, private, link-local and multicast addresses too", switch=True
    )
    webhook_allowed_hosts: tuple[str, ...] = _opt(
        (), "the only hosts webhooks may go to (example.com, or *.example.com for its subdomains); none: any",
        flag="--webhook-allowed-host",
    )  # fmt: skip

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

    @property
    def retry_delays(self) -> tuple[float, ...]:
        """--webhook-retry-delays as numbers: the seconds before the second attempt, the third, and so on."""
        return tuple(float(item) for item in self.webhook_retry_delays.split(",") if item.strip())

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
        if isinstance(self.model, str):  # Settings(model="mock") from Python: one model
            object.__setattr__(self, "model", (self.model,))
        for option in OPTIONS:  # what each field declares: its choices and bounds
            value = getattr(self, option.name)
            if option.any_case and isinstance(value, str):
                value = _any_case(value)
                object.__setattr__(self, option.name, value)
            problem = option.problem(value)
            if problem is not None:
                raise ValueError(f"{option.flag} {problem} (got {value!r})")

        # The rules that involve more than one field, or each item of a list.
        from .backends import kind_of

        shared = kind_of(self.backend_url).shared  # raises for a URL no backend takes
        if self.workers == 0 and not shared:
            raise ValueError("--workers 0 (an API-only process) needs a redis:// store or --backend redis")
        if any(len(token) < 16 for token in self.api_tokens):
            raise ValueError("each --api-token must be at least 16 characters")
        if any(not re.fullmatch(r"https?://[^/?#\s]+/?", origin) for origin in self.public_origins):
            raise ValueError(
                "each public origin (--public-origin) is scheme://host[:port], like https://api.example.com"
            )
        if self.store.startswith("sqlite:") and not self.store.startswith("sqlite:///"):
            raise ValueError(f"--store must be sqlite:///relative.db or sqlite:////absolute.db (got {self.store!r})")
        self._check_webhooks()

    def _check_webhooks(self) -> None:
        from .webhooks.signing import secret_key

        for secret in self.webhook_secrets:
            try:
                secret_key(secret)
            except ValueError as exc:
                raise ValueError(f"--webhook-secret: {exc}") from None  # the secret itself is not repeated
        try:
            delays = self.retry_delays
        except ValueError:
            delays = (-1.0,)
        if any(not 0 <= d < float("inf") for d in delays):
            given = self.webhook_retry_delays
            raise ValueError(f"--webhook-retry-delays is seconds, comma-separated, like 5,300,1800 (got {given!r})")
        if any(not re.fullmatch(r"(\*\.)?[^\s/@*?#]+", host) for host in self.webhook_allowed_hosts):
            raise ValueError("each --webhook-allowed-host is a host name (example.com) or *.example.com")


# -- each field as the command line, the validation and the reference see it ----------------------------


def _bool(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(value)


def _list(value: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in value.split(",") if item.strip())


def _any_case(value: str) -> str:
    return value.strip().upper()


def _either(words: Sequence[str]) -> str:
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} or {words[-1]}"


def _number(value: float) -> str:
    return f"{value:g}"


# kind: how a value is read from the environment, and how the reference names it
_KINDS: dict[str, tuple[Callable[[str], Any], str]] = {
    "int": (int, "integer"),
    "float": (float, "number"),
    "bool": (_bool, "boolean"),
    "text": (str, "text"),
    "list": (_list, "list of text"),
    "choice": (str, "one of"),
}


@dataclass(frozen=True)
class Option:
    """One field of `Settings`: its flag, variable, kind, choices, bounds, default and help."""

    name: str
    flag: str
    kind: str  # a key of _KINDS
    choices: tuple[str, ...]
    default: Any
    help: str
    min: float | None
    max: float | None
    above: float | None
    any_case: bool
    secret: bool
    switch: bool

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()

    @property
    def bounds(self) -> str:
        """The bounds in words ("at least 1", "between 0 and 19"), or "" without any."""
        if self.above is not None:
            return f"more than {_number(self.above)}"
        if self.min is not None and self.max is not None:
            return f"between {_number(self.min)} and {_number(self.max)}"
        if self.min is not None:
            return f"at least {_number(self.min)}"
        if self.max is not None:
            return f"at most {_number(self.max)}"
        return ""

    def from_env(self, text: str) -> Any:
        """The value of the option's environment variable (a list's is comma-separated)."""
        return _any_case(text) if self.any_case else _KINDS[self.kind][0](text)

    def problem(self, value: Any) -> str | None:
        """What is wrong with this value by itself ("must be at least 1"), or None."""
        if self.choices and value not in self.choices:
            return f"must be {_either(self.choices)}"
        too_low = (self.min is not None and value < self.min) or (self.above is not None and value <= self.above)
        if too_low or (self.max is not None and value > self.max):
            return f"must be {self.bounds}"
        return None

    def shown(self, value: Any) -> str:
        """A value as one would type it (a secret shows as nothing)."""
        if self.secret:
            return ""
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, tuple):
            return ",".join(value)
        return str(value)


def _options() -> tuple[Option, ...]:
    hints = typing.get_type_hints(Settings)
    options = []
    for f in dataclasses.fields(Settings):
        hint = hints[f.name]
        choices: tuple[str, ...] = ()
        if typing.get_origin(hint) is Literal:
            kind, choices = "choice", typing.get_args(hint)
        elif typing.get_origin(hint) is tuple:
            kind = "list"
        else:
            kind = {int: "int", float: "float", bool: "bool", str: "text"}[hint]
        m = f.metadata
        options.append(
            Option(
                name=f.name,
                flag=m["flag"] or "--" + f.name.replace("_", "-"),
                kind=kind,
                choices=choices,
                default=f.default,
                help=m["help"],
                min=m["min"],
                max=m["max"],
                above=m["above"],
                any_case=m["any_case"],
                secret=m["secret"],
                switch=m["switch"],
            )
        )
    return tuple(options)


OPTIONS = _options()
_ENV_DEFAULT = "__env_default"


def add_settings_arguments(parser: argparse.ArgumentParser, environ: Mapping[str, str]) -> None:
    """Add one flag per settings field; its default comes from `ZYPHER_<NAME>` when set.

    List settings (`--api-token`) take one value per flag, repeated; their variable is comma-separated.
    """
    for option in OPTIONS:
        default = option.default
        if option.env in environ:
            raw = environ[option.env]
            try:
                default = option.from_env(raw)
            except ValueError:
                parser.error(f"{option.env}={raw!r} is not a valid {_KINDS[option.kind][1]}")
            # argparse checks neither choices nor bounds of a default, so the variable is checked here.
            problem = None if option.kind == "list" else option.problem(default)
            if problem is not None:
                parser.error(f"{option.env} {problem} (got {raw!r})")
        notes = [option.bounds] if option.bounds else []
        notes += ["any case"] if option.any_case else []
        notes.append(f"env {option.env}")
        if option.kind == "list":
            # argparse appends to a default list, so the environment's value is kept aside: flags replace it.
            parser.set_defaults(**{option.name + _ENV_DEFAULT: default})
            parser.add_argument(
                option.flag, dest=option.name, action="append", default=None, metavar="TEXT",
                help=f"{option.help} ({'; '.join(notes)}, comma-separated; repeat the flag for more)",
            )  # fmt: skip
            continue
        if not option.secret:
            notes.append("default: " + option.shown(default).replace("%", "%%"))
        if option.switch:
            parser.add_argument(
                option.flag, dest=option.name, action="store_const", const=True, default=default,
                help=f"{option.help} ({'; '.join(notes)})",
            )  # fmt: skip
            continue
        parser.add_argument(
            option.flag,
            dest=option.name,
            type=_any_case if option.any_case else _KINDS[option.kind][0],
            choices=option.choices or None,
            default=default,
            metavar={"int": "N", "float": "NUM", "bool": "BOOL", "text": "TEXT"}.get(option.kind),
            help=f"{option.help} ({'; '.join(notes)})",
        )


def build_parser(environ: Mapping[str, str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zypher-ws serve")
    add_settings_arguments(parser, environ)
    return parser


# -- the reference: docs/configuration.md ---------------------------------------------------------------

REFERENCE_COMMAND = "python -m zypher_ws.settings --markdown > docs/configuration.md"
REFERENCE_INTRO = """\
Every option is a flag of `zypher-ws serve` and `zypher-ws worker` and an environment variable; a flag wins over
the variable, the variable over the default. `zypher-ws serve --help` lists them with their defaults.
`zypher-ws worker` takes the same options (HTTP ones are ignored) and defaults `--backend` to `redis`.
List options take the flag once per value; their variable is comma-separated. Booleans are `true` or `false`
(also `yes`/`no`, `on`/`off`, `1`/`0`). A value outside an option's choices or bounds is refused at start-up,
naming the option."""


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _code(text: str) -> str:
    return f"`{text}`" if text else ""


def _accepts(option: Option) -> str:
    if option.switch:
        return "the flag alone; the variable `true` or `false`"
    if option.choices:
        either = _either([_code(choice) for choice in option.choices])
        return either + (" (any case)" if option.any_case else "")
    kind = _KINDS[option.kind][1]
    return f"{kind}, {option.bounds}" if option.bounds else kind


def reference_markdown() -> str:
    """docs/configuration.md: every option with its flag, variable, accepted values, default and help."""
    lines = [
        "<!-- generated from zypher_ws/settings.py by `python -m zypher_ws.settings --markdown`; do not edit -->",
        "# Configuration",
        "",
        REFERENCE_INTRO,
        "",
        "| flag | environment | accepts | default | meaning |",
        "|---|---|---|---|---|",
    ]
    for o in OPTIONS:
        default = "none" if o.default == () and not o.secret else _code(o.shown(o.default))
        lines.append(f"| `{o.flag}` | `{o.env}` | {_accepts(o)} | {_cell(default)} | {_cell(o.help)} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m zypher_ws.settings", description="Print the reference of every option of Settings."
    )
    parser.add_argument(
        "--markdown",
        action="store_true",
        required=True,
        help=f"as Markdown, docs/configuration.md: {REFERENCE_COMMAND}",
    )
    parser.parse_args(argv)
    sys.stdout.write(reference_markdown())


if __name__ == "__main__":
    main()
