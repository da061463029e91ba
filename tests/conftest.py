"""Fixtures only: the fakes live in fakes.py, the helpers in helpers.py."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from fakes import WAIT, GatedModel, make_settings
from helpers import ClientFactory
from zypher_ws.http.app import create_app
from zypher_ws.http.keys import SERVICE
from zypher_ws.models import Model

REDIS_URL = os.environ.get("ZYPHER_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


@pytest.fixture(scope="session")
def redis_url() -> str:
    """The real Redis server tests use (ZYPHER_TEST_REDIS_URL); skips, or fails under CI, without one."""
    import redis

    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1).ping()
    except redis.exceptions.RedisError as exc:
        pytest.skip(f"no Redis at {REDIS_URL} ({exc}); start redis-server or set ZYPHER_TEST_REDIS_URL")
    return REDIS_URL


@pytest.fixture
async def redis_settings(redis_url: str) -> AsyncIterator[dict[str, Any]]:
    """Settings for the redis backend under a prefix of this test's own; its keys are deleted after."""
    import redis.asyncio as aioredis

    prefix = f"zypher-test-{uuid.uuid4().hex[:12]}"
    yield {"backend": "redis", "redis_url": redis_url, "redis_prefix": prefix}
    client = aioredis.Redis.from_url(redis_url)
    keys = [key async for key in client.scan_iter(match=f"{prefix}:*")]
    if keys:
        await client.delete(*keys)
    await client.aclose()


@pytest.fixture(params=["embedded", "redis"])
def backend(request: pytest.FixtureRequest) -> dict[str, Any]:
    """Runs a test once per backend: the API and WebSocket contract must not depend on it."""
    if request.param == "embedded":
        return {}
    settings: dict[str, Any] = request.getfixturevalue("redis_settings")
    return settings


@pytest.fixture
def make_client(aiohttp_client: Any, backend: dict[str, Any]) -> ClientFactory:
    """make_client(model=None, wait_loaded=True, **settings) -> a test client on a fresh app, per backend."""

    async def factory(model: Model | None = None, wait_loaded: bool = True, **overrides: Any) -> TestClient:
        if isinstance(model, GatedModel):
            model.bind(asyncio.get_running_loop())
        settings = make_settings(**{**backend, **overrides})
        client: TestClient = await aiohttp_client(create_app(settings, model=model))
        if wait_loaded:
            await asyncio.wait_for(client.app[SERVICE].models.default.loaded.wait(), WAIT)
        return client

    return factory


@pytest.fixture
def gated() -> GatedModel:
    return GatedModel()


# -- CI installs every real part (Chromium, Redis): there a skipped test is a failure ------------------

_skipped: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped:
        _skipped.append(report.nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if os.environ.get("CI") == "true" and _skipped and exitstatus == 0:
        print(f"\nCI=true: {len(_skipped)} test(s) skipped, which CI treats as failure: {_skipped}")
        session.exitstatus = 1
