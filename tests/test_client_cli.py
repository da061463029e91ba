"""`zypher-ws predict`, against the real app on a TCP port: as a process once, then in a thread."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest
from standardwebhooks import Webhook as Verifier

from fakes import WAIT, GatedModel, make_settings
from helpers import Receiver, free_port
from zypher_ws.client.cli import PREDICTION_FAILED, REFUSED, SUCCEEDED, USAGE, main
from zypher_ws.http.app import create_app
from zypher_ws.http.keys import SERVICE
from zypher_ws.models import MockModel, ModelSpec, spec_of

TOKEN = "cli-token-0123456789"


async def start(aiohttp_server: Any, model: Any, **settings: Any) -> str:
    """`model`: one model object, or a list of (ModelSpec, model) for several."""
    models = model if isinstance(model, list) else None
    for each in [m for _, m in models] if models is not None else [model]:
        if isinstance(each, GatedModel):
            each.bind(asyncio.get_running_loop())
    app = create_app(make_settings(**settings), model=None if models else model, models=models)
    server = await aiohttp_server(app)
    await asyncio.wait_for(asyncio.gather(*(d.loaded.wait() for d in app[SERVICE].models)), WAIT)
    return f"http://127.0.0.1:{server.port}"


async def predict(*argv: str, stdin: str = "") -> tuple[int, list[dict[str, Any]]]:
    """Run `zypher-ws predict ARGV` in a thread: its exit status and the JSON lines it printed."""
    out = io.StringIO()
    status = await asyncio.to_thread(main, list(argv), io.StringIO(stdin), out)
    return status, [json.loads(line) for line in out.getvalue().splitlines()]


async def test_the_command_predicts_with_the_token_from_the_environment(aiohttp_server: Any) -> None:
    url = await start(aiohttp_server, GatedModel(gated=False), api_tokens=(TOKEN,))
    command = [sys.executable, "-m", "zypher_ws", "predict", "--url", url, "--input", '{"x": 3}']
    env = {name: value for name, value in os.environ.items() if name != "ZYPHER_API_TOKEN"}
    proc = await asyncio.create_subprocess_exec(
        *command, env={**env, "ZYPHER_API_TOKEN": TOKEN}, stdout=asyncio.subprocess.PIPE
    )
    stdout, _ = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == SUCCEEDED
    record = json.loads(stdout)
    assert record["status"] == "succeeded" and record["result"] == {"echo": {"x": 3}}

    proc = await asyncio.create_subprocess_exec(*command, env=env, stderr=asyncio.subprocess.PIPE)
    _, stderr = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == REFUSED and b"unauthorized" in stderr


async def test_input_from_an_argument_a_file_or_standard_input(aiohttp_server: Any, tmp_path: Path) -> None:
    url = await start(aiohttp_server, GatedModel(gated=False))
    given = tmp_path / "input.json"
    given.write_text('{"x": 2}')
    for argv, stdin, x in (
        (["--input", '{"x": 1}'], "", 1),
        (["--input-file", str(given)], "", 2),
        (["-"], '{"x": 3}', 3),
    ):
        status, lines = await predict("--url", url, *argv, stdin=stdin)
        assert status == SUCCEEDED and [line["result"] for line in lines] == [{"echo": {"x": x}}]


async def test_a_failed_prediction_exits_non_zero_and_prints_its_record(aiohttp_server: Any) -> None:
    url = await start(aiohttp_server, GatedModel(gated=False))
    status, (record,) = await predict("--url", url, "--input", '{"raise": "bad pixel"}')
    assert status == PREDICTION_FAILED and record["status"] == "failed" and "bad pixel" in record["error"]["message"]


async def test_async_prints_the_accepted_record_and_watch_each_state(aiohttp_server: Any) -> None:
    gated = GatedModel()
    url = await start(aiohttp_server, gated)
    status, (accepted,) = await predict("--url", url, "--async", "--input", '{"x": 4}')
    assert status == SUCCEEDED and accepted["status"] == "queued"

    watching = asyncio.ensure_future(predict("--url", url, "--watch", "--input", '{"x": 5}'))
    await gated.wait_started(2)  # the first one, then this one, is running
    gated.release.set()
    status, lines = await asyncio.wait_for(watching, WAIT)
    assert status == SUCCEEDED
    assert len({line["prediction_id"] for line in lines}) == 1
    statuses = [line["status"] for line in lines]
    assert statuses[-1] == "succeeded" and len(statuses) == len(set(statuses))
    assert lines[-1]["result"] == {"echo": {"x": 5}}


async def test_usage_errors_and_an_unreachable_server(aiohttp_server: Any, capsys: pytest.CaptureFixture[str]) -> None:
    url = await start(aiohttp_server, GatedModel(gated=False))
    assert (await predict("--url", url, "--input", "{not json"))[0] == USAGE
    assert (await predict("--url", url, "--version", "2", "--input", "1"))[0] == USAGE
    assert (await predict("--url", url, "--input", '{"x": "seven"}'))[0] == REFUSED
    assert "invalid_input" in capsys.readouterr().err
    unreachable = f"http://127.0.0.1:{free_port()}"
    assert (await predict("--url", unreachable, "--retry-for", "0", "--input", "1"))[0] == REFUSED
    with pytest.raises(SystemExit) as exited:
        main(["--url", url])  # no input named
    assert exited.value.code == USAGE


async def test_model_and_version(aiohttp_server: Any) -> None:
    models = []
    for version in ("1", "2"):
        model = GatedModel(gated=False)
        model.name, model.version = "echo", version
        models.append((ModelSpec(name="echo", version=version, runtime="python"), model))
    mock = MockModel()
    url = await start(aiohttp_server, [(spec_of(mock), mock), *models])
    status, (record,) = await predict("--url", url, "--model", "echo", "--version", "1", "--input", '{"x": 1}')
    assert status == SUCCEEDED and record["model"] == {"name": "echo", "version": "1"}
    status, (record,) = await predict("--url", url, "--input", "[1]")
    assert status == SUCCEEDED and record["model"]["name"] == "mock"
    assert (await predict("--url", url, "--model", "nope", "--input", "1"))[0] == REFUSED


async def test_a_webhook_and_its_events(aiohttp_server: Any, capsys: pytest.CaptureFixture[str]) -> None:
    secret = "whsec_" + base64.b64encode(b"c" * 32).decode()
    url = await start(aiohttp_server, GatedModel(gated=False), webhook_secrets=(secret,), webhook_allow_private=True)
    async with Receiver() as receiver:
        hook = ("--webhook", receiver.url(), "--webhook-events-filter", "start, completed")
        status, (record,) = await predict("--url", url, *hook, "--input", '{"x": 6}')
        assert status == SUCCEEDED and record["webhook"]["events"] == ["start", "completed"]
        events = [Verifier(secret).verify(d.body, d.headers) for d in (await receiver.next(), await receiver.next())]
        assert [(e["type"], e["data"]["prediction_id"]) for e in events] == [
            ("prediction.start", record["prediction_id"]),
            ("prediction.completed", record["prediction_id"]),
        ]
        status, (accepted,) = await predict("--url", url, "--async", "--webhook", receiver.url(), "--input", "{}")
        assert status == SUCCEEDED and accepted["webhook"]["events"] == ["completed"]  # the default
        only = Verifier(secret).verify((delivery := await receiver.next()).body, delivery.headers)
        assert (only["type"], only["data"]["prediction_id"]) == ("prediction.completed", accepted["prediction_id"])
    unknown = await predict(
        "--url", url, "--webhook", "http://127.0.0.1:9/h", "--webhook-events-filter", "end", "--input", "1"
    )
    assert unknown[0] == REFUSED and "invalid_webhook" in capsys.readouterr().err
    assert (await predict("--url", url, "--webhook-events-filter", "start", "--input", "1"))[0] == USAGE
    assert "--webhook-events-filter needs --webhook" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:
        main(["--url", url, "--webhook", receiver.url(), "--webhook-events-filter", " , ", "--input", "1"])
    assert exited.value.code == USAGE
