from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from zypher_ws.cli import build_parser
from zypher_ws.settings import OPTIONS, REFERENCE_COMMAND, Settings

ROOT = Path(__file__).resolve().parent.parent


def test_defaults() -> None:
    s = Settings.from_sources([], environ={})
    assert (s.host, s.port, s.model, s.max_queue, s.sync_timeout, s.max_body) == (
        "127.0.0.1",
        8080,
        (),  # digits is served when neither --model nor --model-repository is given
        1024,
        30.0,
        1024 * 1024,
    )


def test_environment_then_flags_win() -> None:
    env = {"ZYPHER_PORT": "9000", "ZYPHER_MODEL": "mock", "ZYPHER_SYNC_TIMEOUT": "2.5"}
    s = Settings.from_sources([], environ=env)
    assert (s.port, s.model, s.sync_timeout) == (9000, ("mock",), 2.5)
    s = Settings.from_sources(["--port", "9100"], environ=env)
    assert (s.port, s.model) == (9100, ("mock",))
    s = Settings.from_sources(["--model", "digits", "--model", "mock"], environ=env)  # flags replace the variable
    assert s.model == ("digits", "mock")


def test_bad_environment_value_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        Settings.from_sources([], environ={"ZYPHER_PORT": "eighty"})
    assert "ZYPHER_PORT" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"max_queue": 0}, "--max-queue must be at least 1 (got 0)"),
        ({"ws_outbox": 0}, "--ws-outbox must be at least 1 (got 0)"),
        ({"model_nice": 20}, "--model-nice must be between 0 and 19 (got 20)"),
        ({"model_nice": -1}, "--model-nice must be between 0 and 19 (got -1)"),
        ({"rate_limit": -0.5}, "--rate-limit must be at least 0 (got -0.5)"),
        ({"claim_idle": 0}, "--claim-idle must be more than 0 (got 0)"),
        ({"log_format": "xml"}, "--log-format must be text or json (got 'xml')"),
        ({"sqlite_synchronous": "on"}, "--sqlite-synchronous must be ACCEPTED, OFF, NORMAL, FULL or EXTRA (got 'ON')"),
    ],
)
def test_invalid_values_rejected_naming_the_flag(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError) as caught:
        Settings(**overrides)
    assert str(caught.value) == message


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"workers": 0}, "needs a redis:// store"),
        ({"backend": "mysql"}, "backend must be"),
        ({"executor": "fiber"}, "executor must be"),
        ({"api_tokens": ("short",)}, "each --api-token must be at least 16 characters"),
        ({"store": "postgres://x"}, "no backend for"),
    ],
)
def test_inconsistent_values_rejected(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Settings(**overrides)
    assert Settings(workers=0, backend="redis").workers == 0  # an API-only process


def test_settings_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        Settings().port = 1  # type: ignore[misc]


def test_serve_help_lists_every_option_with_env_and_default(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert [o.name for o in OPTIONS] == [f.name for f in dataclasses.fields(Settings)]
    for option in OPTIONS:
        assert option.flag in out
        assert "ZYPHER_" + option.name.upper() == option.env and option.env in out
    assert "default: 1048576" in out
    assert "--executor {thread,process}" in out and "--log-level {DEBUG,INFO,WARNING,ERROR}" in out
    assert "(between 0 and 19; env ZYPHER_MODEL_NICE; default: 10)" in out


def test_choices_come_from_the_literal_types(capsys: pytest.CaptureFixture[str]) -> None:
    assert {o.name: o.choices for o in OPTIONS if o.choices} == {
        "executor": ("thread", "process"),
        "log_level": ("DEBUG", "INFO", "WARNING", "ERROR"),
        "log_format": ("text", "json"),
        "sqlite_synchronous": ("ACCEPTED", "OFF", "NORMAL", "FULL", "EXTRA"),
        "backend": ("embedded", "redis"),
    }
    with pytest.raises(SystemExit):
        Settings.from_sources(["--executor", "fiber"], environ={})
    assert "argument --executor: invalid choice: 'fiber'" in capsys.readouterr().err


def test_levels_and_pragmas_take_any_case() -> None:
    s = Settings.from_sources(["--log-level", "debug"], environ={"ZYPHER_SQLITE_SYNCHRONOUS": "Normal"})
    assert (s.log_level, s.sqlite_synchronous) == ("DEBUG", "NORMAL")
    s = Settings(log_level="warning", sqlite_synchronous="off")
    assert (s.log_level, s.sqlite_synchronous) == ("WARNING", "OFF")
    with pytest.raises(ValueError, match="--executor must be thread or process"):
        Settings(executor="THREAD")  # type: ignore[arg-type]  # only the options that say so


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"ZYPHER_EXECUTOR": "fiber"}, "ZYPHER_EXECUTOR must be thread or process (got 'fiber')"),
        ({"ZYPHER_WS_OUTBOX": "0"}, "ZYPHER_WS_OUTBOX must be at least 1 (got '0')"),
        ({"ZYPHER_WS_OUTBOX": "many"}, "ZYPHER_WS_OUTBOX='many' is not a valid integer"),
    ],
)
def test_bad_environment_values_name_the_variable(
    environ: dict[str, str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # argparse checks the flags it is given, not its defaults, so the variables are checked when read.
    with pytest.raises(SystemExit):
        Settings.from_sources(["--ws-outbox", "5"], environ=environ)
    assert message in capsys.readouterr().err


def test_declarations_are_consistent() -> None:
    for option in OPTIONS:
        bounded = (option.min, option.max, option.above) != (None, None, None)
        assert not bounded or option.kind in ("int", "float"), f"{option.flag}: bounds on a {option.kind}"
        assert not option.any_case or all(c == c.upper() for c in option.choices), f"{option.flag}: any case"
        assert option.problem(option.default) is None, f"{option.flag}: its default is out of bounds"
    assert [o.name for o in OPTIONS if o.secret] == ["api_tokens", "webhook_secrets"]


def test_secrets_are_not_shown(capsys: pytest.CaptureFixture[str]) -> None:
    token = "t" * 20
    with pytest.raises(SystemExit):
        Settings.from_sources(["--help"], environ={"ZYPHER_API_TOKENS": token})
    assert token not in capsys.readouterr().out
    s = Settings(api_tokens=(token,))
    assert token not in repr(s)
    assert "| `--api-token` | `ZYPHER_API_TOKENS` | list of text |  |" in (ROOT / "docs/configuration.md").read_text()


def test_the_configuration_reference_is_current() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "zypher_ws.settings", "--markdown"], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert done.returncode == 0 and not done.stderr, done.stderr
    assert done.stdout == (ROOT / "docs/configuration.md").read_text(), (
        f"docs/configuration.md is out of date with zypher_ws/settings.py; regenerate it: {REFERENCE_COMMAND}"
    )
