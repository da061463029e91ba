"""`zypher-ws` command line: `zypher-ws serve [options]`."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from aiohttp import web

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
    return parser


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        settings = Settings.from_namespace(args)
    except ValueError as exc:
        raise SystemExit(f"zypher-ws: {exc}") from None
    configure_logging(settings.log_level)
    if args.command == "serve":
        from .app import create_app

        web.run_app(
            create_app(settings),
            host=settings.host,
            port=settings.port,
            shutdown_timeout=settings.shutdown_timeout,
            print=lambda msg: logging.getLogger("zypher_ws").info(msg),
        )


if __name__ == "__main__":
    main()
