"""`zypher-ws predict`: one prediction from the command line, through the Client."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from .errors import ZypherClientError
from .records import Prediction
from .retry import RetryPolicy
from .sync import Client

TOKEN_ENV = "ZYPHER_API_TOKEN"

# Exit statuses: what a script calling it can tell apart.
SUCCEEDED = 0
PREDICTION_FAILED = 1  # the prediction ended failed or canceled
USAGE = 2  # as argparse's own: bad arguments, or an input that is not JSON
REFUSED = 3  # the server refused the request, or could not be reached

DESCRIPTION = f"""Send one prediction to a running service and print its record as one line of JSON.
The input is the model's input itself (for digits, a list of 64 numbers), as JSON. The token, if the
service needs one, comes from ${TOKEN_ENV}. Exit status: {SUCCEEDED} succeeded (or accepted, with --async),
{PREDICTION_FAILED} the prediction failed or was canceled, {USAGE} bad arguments or input,
{REFUSED} the server refused the request or could not be reached."""


def main(argv: Sequence[str], stdin: TextIO | None = None, stdout: TextIO | None = None) -> int:
    """`zypher-ws predict ARGS`; the exit status."""
    return run_predict(build_parser().parse_args(argv), stdin, stdout)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zypher-ws predict", description=DESCRIPTION)
    parser.add_argument("--url", required=True, help="the service, e.g. http://127.0.0.1:8080")
    parser.add_argument("--model", help="the model to run (default: the service's default model)")
    parser.add_argument("--version", help="the model's version (with --model)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", metavar="JSON", help="the input, as JSON text")
    source.add_argument("--input-file", metavar="PATH", type=Path, help="a file holding the input as JSON")
    source.add_argument("stdin", nargs="?", choices=["-"], metavar="-", help="read the input from standard input")
    parser.add_argument(
        "--async", dest="run_async", action="store_true", help="submit and print the accepted record at once"
    )
    parser.add_argument(
        "--watch", action="store_true", help="submit, then print each new state as it happens, one JSON line each"
    )
    parser.add_argument(
        "--webhook", metavar="URL", help="a URL the service POSTs the prediction's events to, signed (docs/webhooks.md)"
    )
    parser.add_argument(
        "--webhook-events-filter",
        metavar="EVENTS",
        type=_event_names,
        help="the events sent to --webhook, comma-separated: start, output, completed (default: completed)",
    )
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds each HTTP request may take (60)")
    parser.add_argument(
        "--retry-for",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="how long to retry a refused connection, a 503 or a 429 (10; 0: never)",
    )
    return parser


def run_predict(args: argparse.Namespace, stdin: TextIO | None = None, stdout: TextIO | None = None) -> int:
    """Run `zypher-ws predict`; the exit status."""
    out = stdout or sys.stdout
    try:
        value = _read_input(args, stdin or sys.stdin)
    except (OSError, ValueError) as exc:
        print(f"zypher-ws predict: cannot read the input: {exc}", file=sys.stderr)
        return USAGE
    if args.version is not None and args.model is None:
        print("zypher-ws predict: --version needs --model", file=sys.stderr)
        return USAGE
    if args.webhook_events_filter is not None and args.webhook is None:
        print("zypher-ws predict: --webhook-events-filter needs --webhook", file=sys.stderr)
        return USAGE
    token = os.environ.get(TOKEN_ENV) or None
    hook = {"webhook": args.webhook, "webhook_events_filter": args.webhook_events_filter}
    try:
        with Client(args.url, token, timeout=args.timeout, retry=RetryPolicy(total=args.retry_for)) as client:
            if args.watch:
                submitted = client.submit(value, args.model, args.version, **hook)
                final = submitted
                for state in client.watch([submitted.prediction_id]):
                    _print(state, out)
                    final = state
                return _status(final)
            if args.run_async:
                _print(client.submit(value, args.model, args.version, **hook), out)
                return SUCCEEDED
            prediction = client.predict(value, args.model, args.version, **hook)
            _print(prediction, out)
            return _status(prediction)
    except ZypherClientError as exc:
        print(f"zypher-ws predict: {exc}", file=sys.stderr)
        return REFUSED


def _event_names(text: str) -> list[str]:
    """`start,completed` as a list; the service checks the names (an unknown one is invalid_webhook)."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise argparse.ArgumentTypeError("name at least one event: start, output, completed")
    return names


def _read_input(args: argparse.Namespace, stdin: TextIO) -> Any:
    if args.input is not None:
        text = args.input
    elif args.input_file is not None:
        text = args.input_file.read_text(encoding="utf-8")
    else:
        text = stdin.read()
    return json.loads(text)


def _print(prediction: Prediction, out: TextIO) -> None:
    out.write(json.dumps(prediction.raw, separators=(",", ":")) + "\n")
    out.flush()


def _status(prediction: Prediction) -> int:
    return SUCCEEDED if prediction.succeeded else PREDICTION_FAILED
