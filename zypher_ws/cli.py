"""`zypher-ws` command line: `zypher-ws serve`, `zypher-ws worker`, and `zypher-ws predict` (the client's)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from . import logs
from .settings import Settings, add_settings_arguments


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zypher-ws", description="ML inference over HTTP and WebSocket.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = commands.add_parser(
        "serve",
        help="run the HTTP/WebSocket service with its model workers",
        description="Run the service. Every option is also an environment variable ZYPHER_<NAME>.",
    )
    add_settings_arguments(serve, os.environ)
    worker = commands.add_parser(
        "worker",
        help="run model workers only (no HTTP), taking work from Redis",
        description="Run model workers taking work from Redis (--redis-url, or --store redis://...). "
        "Every option is also an environment variable "
        "ZYPHER_<NAME>; HTTP options are ignored.",
    )
    add_settings_arguments(worker, {"ZYPHER_BACKEND": "redis", **os.environ})
    # Listed here; main() hands its arguments to the client's own parser (zypher_ws/client/cli.py).
    commands.add_parser("predict", help="send one prediction to a running service (see: predict --help)")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["predict"]:  # the client, over aiohttp: imported only for it
        from .client.cli import main as predict

        raise SystemExit(predict(argv[1:]))
    # Only past `predict`: the models package loads numpy, which `zypher-ws predict` does without.
    from .models.errors import ModelSetupError

    args = build_parser().parse_args(argv)
    try:
        settings = Settings.from_namespace(args)
    except ValueError as exc:
        raise SystemExit(f"zypher-ws: {exc}") from None
    logs.configure(settings.log_level, settings.log_format)
    try:
        _run(args.command, settings)
    except ModelSetupError as exc:  # a bad --model, an unreadable model file, a missing extra
        raise SystemExit(f"zypher-ws: {exc}") from None


def _run(command: str, settings: Settings) -> None:
    if command == "serve":
        from .http.app import serve

        serve(settings)
    elif command == "worker":
        import asyncio

        from .worker import run_worker

        if not settings.shared_backend or settings.workers < 1:
            raise SystemExit("zypher-ws worker: needs a shared backend (redis) and --workers of at least 1")
        asyncio.run(run_worker(settings))


if __name__ == "__main__":
    main()
