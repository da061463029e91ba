"""The live page in a real headless Chromium (Debian's), driven by Playwright's async API."""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aiohttp import web
from aiohttp.typedefs import Handler

from fakes import WAIT, GatedModel, make_settings
from helpers import free_port, run_server
from zypher_ws.http.app import create_app
from zypher_ws.http.keys import SERVICE
from zypher_ws.models import MockModel

CHROMIUM = os.environ.get("ZYPHER_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = Path(os.environ.get("ZYPHER_ARTIFACTS", Path(__file__).resolve().parent.parent / "artifacts"))
HOLDOUT = Path(__file__).parent / "data" / "digits_holdout.npz"
TIMEOUT_MS = WAIT * 1000

playwright_api = pytest.importorskip("playwright.async_api", reason="playwright is not installed")
pytestmark = [
    pytest.mark.slow,  # a real browser
    pytest.mark.skipif(
        shutil.which(CHROMIUM) is None, reason=f"Chromium not found at {CHROMIUM} (apt-get install chromium)"
    ),
]


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    async with playwright_api.async_playwright() as p:
        browser = await p.chromium.launch(
            executable_path=CHROMIUM,
            args=["--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1, EXCLUDE localhost"],
        )
        yield browser
        await browser.close()


Answered = list[tuple[str, int]]
"""(path, status) of every request the server answered, in order."""


async def serve(aiohttp_server: Any, model: Any = None, **settings: Any) -> tuple[str, Answered]:
    if isinstance(model, GatedModel):
        model.bind(asyncio.get_running_loop())
    app = create_app(make_settings(**settings), model=model)
    answered: Answered = []

    @web.middleware
    async def record(request: web.Request, handler: Handler) -> web.StreamResponse:
        # Outermost, so it sees each final status. On the server, not the page: Playwright does not
        # report the browser's own requests (the favicon) as the page's.
        response = await handler(request)
        answered.append((request.path, response.status))
        return response

    app.middlewares.insert(0, record)
    server = await aiohttp_server(app)
    await asyncio.wait_for(app[SERVICE].runner.loaded_event.wait(), WAIT)
    return f"http://127.0.0.1:{server.port}", answered


def assert_all_found(answered: Answered) -> None:
    """No request of the page answered 404 (a file it names, or one the browser asks for by itself)."""
    assert [path for path, status in answered if status == 404] == []
    assert {"/", "/static/app.js", "/static/style.css", "/model"} <= {path for path, _ in answered}


async def open_page(browser: Any, url: str) -> Any:
    page = await browser.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.errors = errors
    await page.goto(url)
    await page.wait_for_selector('#connection[data-state="open"]')
    return page


@pytest.fixture
def artifacts() -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS


async def test_draw_or_enter_a_digit_and_watch_it_succeed(browser: Any, aiohttp_server: Any, artifacts: Path) -> None:
    url, answered = await serve(aiohttp_server)  # the real digits model
    page = await open_page(browser, url)
    await page.wait_for_selector("#grid .cell")
    # Drawing paints cells and writes them into the input box.
    await page.click('#grid .cell[data-index="9"]')
    assert "16" in await page.input_value("#input-json")
    await page.click("#clear")
    # Enter a held-out digit and submit asynchronously.
    with np.load(HOLDOUT) as data:
        image, label = data["images"][5].reshape(8, 8).astype(int).tolist(), int(data["labels"][5])
    await page.fill("#input-json", str(image))
    await page.click("#submit")
    item = page.locator('.prediction[data-status="succeeded"]')
    await item.wait_for()
    assert (await item.locator(".label").text_content()) == str(label)
    assert await item.locator(".bars .bar").count() == 10
    assert await page.locator(".prediction").count() == 1
    shot = artifacts / "page.png"
    await page.screenshot(path=str(shot), full_page=True)
    print(f"\nscreenshot of the live page: {shot}")
    assert page.errors == []
    assert_all_found(answered)


async def test_second_page_watching_the_same_id_sees_it_live(browser: Any, aiohttp_server: Any) -> None:
    gated = GatedModel()
    url, _ = await serve(aiohttp_server, gated)
    first = await open_page(browser, url)
    await playwright_api.expect(first.locator("#input-json")).not_to_have_value("")
    await first.fill("#input-json", '{"x": 42}')
    await first.click("#submit")
    item = first.locator(".prediction")
    await item.wait_for()
    pid = await item.get_attribute("data-prediction-id")
    await gated.wait_started(1)
    second = await open_page(browser, f"{url}/?watch={pid}")
    await second.locator('.prediction[data-status="running"]').wait_for()
    gated.release.set()
    for page in (first, second):
        done = page.locator('.prediction[data-status="succeeded"]')
        await done.wait_for()
        assert '"x": 42' in (await done.locator(".json").text_content() or "")
        assert page.errors == []


class HtmlModel(MockModel):
    def predict_batch(self, inputs: list[Any]) -> list[Any]:
        return [{"html": "<img src=x onerror=window.pwned=1><b id=injected>bold</b>"} for _ in inputs]


async def test_model_output_with_html_shows_as_text(browser: Any, aiohttp_server: Any) -> None:
    url, _ = await serve(aiohttp_server, HtmlModel())
    page = await open_page(browser, url)
    await page.fill("#input-json", "1")
    await page.click("#submit")
    done = page.locator('.prediction[data-status="succeeded"]')
    await done.wait_for()
    assert "<b id=injected>bold</b>" in (await done.locator(".json").text_content() or "")
    assert await page.locator("#predictions img, #injected").count() == 0
    assert await page.evaluate("window.pwned") is None


async def test_page_reconnects_after_the_server_restarts(browser: Any) -> None:
    port = free_port()
    args = ("--model", "mock", "--store", "memory://")
    async with run_server(*args, port=port) as server:
        page = await open_page(browser, server.url)
    await page.wait_for_selector('#connection:not([data-state="open"])')  # the page noticed
    async with run_server(*args, port=port):
        await page.wait_for_selector('#connection[data-state="open"]')
        await page.fill("#input-json", '{"after": "restart"}')
        await page.click("#submit")
        await page.locator('.prediction[data-status="succeeded"]').wait_for()
    assert page.errors == []


async def test_page_takes_an_api_token_from_the_user(browser: Any, aiohttp_server: Any) -> None:
    token = "browser-token-0123456789"
    url, _ = await serve(aiohttp_server, MockModel(), api_tokens=(token,))
    page = await open_page(browser, url)
    # Selectors and expect, not wait_for_function: its polling evaluates strings, which the page's CSP forbids.
    await page.locator("#model-name", has_text="unavailable").wait_for()
    await page.fill("#token", token)
    await page.dispatch_event("#token", "change")
    await page.locator("#model-name", has_text="mock").wait_for()
    await page.wait_for_selector('#connection[data-state="open"]')
    await page.fill("#input-json", '{"a": 1}')
    await page.click("#submit")
    await page.locator('.prediction[data-status="succeeded"]').wait_for()
    assert await page.evaluate("sessionStorage.getItem('zypher-token')") == token
    assert page.errors == []
