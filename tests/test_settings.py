from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from zypher_ws.cli import build_parser
from zypher_ws.settings import Settings


def test_defaults() -> None:
    s = Settings.from_sources([], environ={})
    assert (s.host, s.port, s.model, s.max_queue, s.sync_timeout, s.max_body) == (
        "127.0.0.1",
        8080,
        "digits",
        1024,
        30.0,
        1024 * 1024,
    )


def test_environment_then_flags_win() -> None:
    env = {"ZYPHER_PORT": "9000", "ZYPHER_MODEL": "mock", "ZYPHER_SYNC_TIMEOUT": "2.5"}
    s = Settings.from_sources([], environ=env)
    assert (s.port, s.model, s.sync_timeout) == (9000, "mock", 2.5)
    s = Settings.from_sources(["--port", "9100"], environ=env)
    assert (s.port, s.model) == (9100, "mock")


def test_bad_environment_value_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        Settings.from_sources([], environ={"ZYPHER_PORT": "eighty"})
    assert "ZYPHER_PORT" in capsys.readouterr().err


def test_invalid_values_rejected() -> None:
    with pytest.raises(ValueError, match="max_queue"):
        Settings(max_queue=0)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"workers": 0}, "needs a redis:// store"),
        ({"backend": "mysql"}, "backend must be"),
        ({"executor": "fiber"}, "executor must be"),
        ({"claim_idle": 0}, "claim_idle"),
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
    for f in dataclasses.fields(Settings):
        assert f.metadata.get("flag", "--" + f.name.replace("_", "-")) in out
        assert "ZYPHER_" + f.name.upper() in out
    assert "default: 1048576" in out
