"""The live page in a real headless Chromium (Debian's), driven by Playwright's async API."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aiohttp import web
from aiohttp.typedefs import Handler
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression

from fakes import WAIT, GatedModel, SteppedStream, make_settings
from helpers import free_port, run_server
from model_files import save_joblib
from zypher_ws.http import live
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
    if isinstance(model, (GatedModel, SteppedStream)):
        model.bind(asyncio.get_running_loop())
    app = create_app(make_settings(**settings), model=model)
    return await serve_app(aiohttp_server, app)


async def serve_app(aiohttp_server: Any, app: web.Application) -> tuple[str, Answered]:
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
    await asyncio.wait_for(asyncio.gather(*(d.loaded.wait() for d in app[SERVICE].models)), WAIT)
    return f"http://127.0.0.1:{server.port}", answered


def assert_all_found(answered: Answered) -> None:
    """No request of the page answered 404 (a file it names, or one the browser asks for by itself)."""
    assert [path for path, status in answered if status == 404] == []
    assert {"/", "/static/app.js", "/static/style.css", "/models"} <= {path for path, _ in answered}


async def open_page(browser: Any, url: str, *, model_shown: bool = True) -> Any:
    """The page, connected, with the default model's input in place (unless it cannot be read yet)."""
    page = await browser.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.errors = errors
    await page.goto(url)
    await page.wait_for_selector('#connection[data-state="open"]')
    if model_shown:
        await page.wait_for_selector("body[data-model]")
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
        # The page retries with backoff up to 5 s, and after five failures (a slow restart) polls and
        # tries the socket again every 10 s: wait for as long as that schedule can take.
        await page.wait_for_selector('#connection[data-state="open"]', timeout=30_000)
        await page.fill("#input-json", '{"after": "restart"}')
        await page.click("#submit")
        await page.locator('.prediction[data-status="succeeded"]').wait_for()
    assert page.errors == []


async def test_page_takes_an_api_token_from_the_user(browser: Any, aiohttp_server: Any) -> None:
    token = "browser-token-0123456789"
    url, _ = await serve(aiohttp_server, MockModel(), api_tokens=(token,))
    page = await open_page(browser, url, model_shown=False)
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


async def test_pick_a_model_file_submit_its_features_and_see_the_class_probabilities(
    browser: Any, aiohttp_server: Any, tmp_path: Path
) -> None:
    X, y = load_iris(return_X_y=True)
    estimator = LogisticRegression(max_iter=1000).fit(X, y)
    save_joblib(tmp_path / "models" / "iris" / "1" / "model.joblib", estimator)
    settings = make_settings(model=("digits",), model_repository=str(tmp_path / "models"))
    url, answered = await serve_app(aiohttp_server, create_app(settings))
    page = await open_page(browser, url)
    assert not await page.locator("#digits-panel").is_hidden()  # digits, the default: the grid
    options = await page.locator("#model-picker option").all_text_contents()
    assert options == ["digits (version 1.0.0)", "iris (version 1)"]
    await page.select_option("#model-picker", "iris")
    await page.wait_for_selector('body[data-model="iris/1"]')
    assert await page.locator("#digits-panel").is_hidden()
    assert json.loads(await page.input_value("#input-json")) == [0, 0, 0, 0]  # prefilled from its schema
    await page.fill("#input-json", json.dumps(X[120].tolist()))
    await page.click("#submit")
    done = page.locator('.prediction[data-status="succeeded"]')
    await done.wait_for()
    assert (await done.locator(".label").text_content()) == str(estimator.predict(X[120:121])[0])
    bars = done.locator(".bars .bar")
    assert await bars.count() == 3
    expected = estimator.predict_proba(X[120:121])[0]
    titles = await bars.evaluate_all("bars => bars.map(b => b.title)")
    assert titles == [f"{c}: {p * 100:.1f}%" for c, p in enumerate(expected)]
    assert ("/models/iris/predict", 202) in answered  # the page submits asynchronously by default
    assert page.errors == []
    assert_all_found(answered)


# -- streams --------------------------------------------------------------------------------------------

WORDS = [f"word{i} " for i in range(10)]


async def submit_stream(page: Any) -> Any:
    """Submit `{}` asking for the stream; the new prediction's card."""
    await page.fill("#input-json", "{}")
    await page.check("#stream")
    await page.click("#submit")
    card = page.locator(".prediction")
    await card.wait_for()
    return card


async def shown_chunks(card: Any) -> list[tuple[int, str]]:
    spans = card.locator(".stream-text .chunk")
    pairs: list[tuple[str, str]] = await spans.evaluate_all("s => s.map(c => [c.dataset.index, c.textContent])")
    return [(int(i), text) for i, text in pairs]


async def test_a_streaming_prediction_shows_its_words_in_order_as_they_come(browser: Any, aiohttp_server: Any) -> None:
    model = SteppedStream(WORDS, progress=True)
    url, _ = await serve(aiohttp_server, model)
    page = await open_page(browser, url)
    card = await submit_stream(page)
    bar = card.locator(".progress")
    for n in (1, 2, 5):
        model.allow(n - model.yielded)
        await card.locator(f'.chunk[data-index="{n - 1}"]').wait_for()
        assert await shown_chunks(card) == list(enumerate(WORDS[:n]))  # nothing early, nothing twice
        await playwright_api.expect(bar).to_have_js_property("value", n / len(WORDS))  # the bar moves
    model.allow(len(WORDS) - model.yielded)
    done = page.locator('.prediction[data-status="succeeded"]')
    await done.wait_for()
    assert await shown_chunks(done) == list(enumerate(WORDS))
    assert (await done.locator(".stream-text").text_content()) == "".join(WORDS)
    assert await done.locator(".json").text_content() == ""  # the words, not the list of them
    assert (await done.locator(".progress-message").text_content()) == f"word {len(WORDS)} of {len(WORDS)}"
    assert page.errors == []


async def test_a_stream_resumes_after_the_connection_drops_with_every_word_once(
    browser: Any, aiohttp_server: Any
) -> None:
    model = SteppedStream(WORDS)
    model.bind(asyncio.get_running_loop())
    app = create_app(make_settings(), model=model)
    url, _ = await serve_app(aiohttp_server, app)
    context = await browser.new_context()
    page = await open_page(context, url)
    card = await submit_stream(page)
    model.allow(3)
    await card.locator('.chunk[data-index="2"]').wait_for()
    # The tab loses its network, and meanwhile its socket is gone (the server closes it: offline
    # emulation holds an open WebSocket's frames but does not end it).
    await context.set_offline(True)
    await live.close_live(app)
    model.allow(4)  # words said while the page cannot hear: they can reach it only over a new connection
    await model.wait_yielded(7)
    await context.set_offline(False)
    await card.locator('.chunk[data-index="6"]').wait_for()
    model.allow(len(WORDS) - 7)
    done = page.locator('.prediction[data-status="succeeded"]')
    await done.wait_for()
    assert await shown_chunks(done) == list(enumerate(WORDS))
    assert page.errors == []
    await context.close()


async def test_waiting_predictions_show_their_place_in_the_queue(browser: Any, aiohttp_server: Any) -> None:
    model = SteppedStream(["done"])  # one word each: each prediction ends when the test allows one
    url, _ = await serve(aiohttp_server, model, workers=1, max_batch_size=1)
    page = await open_page(browser, url)
    await page.check("#stream")
    for x in range(3):
        await page.fill("#input-json", json.dumps({"x": x}))
        await page.click("#submit")
        await page.locator(".prediction").nth(x).wait_for()
    cards = page.locator(".prediction")  # the newest first
    expect = playwright_api.expect
    await expect(cards.nth(2).locator(".status")).to_have_text("running")
    await expect(cards.nth(1).locator(".status")).to_have_text("queued, position 1")
    await expect(cards.nth(0).locator(".status")).to_have_text("queued, position 2")
    model.allow(1)  # the first ends, the second runs: the third moves up
    await expect(cards.nth(2).locator(".status")).to_have_text("succeeded")
    await expect(cards.nth(1).locator(".status")).to_have_text("running")
    await expect(cards.nth(0).locator(".status")).to_have_text("queued, position 1")
    model.allow(2)
    for i in range(3):
        await expect(cards.nth(i).locator(".status")).to_have_text("succeeded")
    assert page.errors == []


def docs_model(tmp_path: Path) -> str:
    """The ten-line token generator of docs/live.md's Streaming, saved as tokens.py in `tmp_path`; the
    page's "Try it" serves it."""
    page = (Path(__file__).resolve().parent.parent / "docs" / "live.md").read_text()
    section = page.split("\n## Streaming\n", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    (tmp_path / "tokens.py").write_text(code)
    return "tokens:Tokens"


async def test_the_documented_generator_streams_its_words_into_the_page_across_a_lost_network(
    browser: Any, aiohttp_server: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(tmp_path))
    app = create_app(make_settings(model=(docs_model(tmp_path),)))
    url, _ = await serve_app(aiohttp_server, app)
    context = await browser.new_context()
    page = await open_page(context, url)
    assert await page.is_checked("#stream")  # a model that streams: the page asks for its stream
    words = [f"word{i}" for i in range(40)]  # 2 s of words at the model's 50 ms each
    await page.fill("#input-json", json.dumps(" ".join(words)))
    await page.click("#submit")
    card = page.locator(".prediction")
    await card.locator('.chunk[data-index="1"]').wait_for()
    pid = await card.get_attribute("data-prediction-id")
    later = asyncio.Event()

    def on_stream(event: Any) -> None:
        if event.kind == "output" and event.index >= 8:
            later.set()

    watch = await app[SERVICE].watch(pid, lambda p, snapshot: None, on_stream=on_stream)
    await context.set_offline(True)  # the tab's network gone, mid-sentence
    await live.close_live(app)
    await asyncio.wait_for(later.wait(), WAIT)  # offline until the model has said words the page cannot hear
    watch.stop()
    await context.set_offline(False)
    done = page.locator('.prediction[data-status="succeeded"]')
    await done.wait_for()
    assert await shown_chunks(done) == [(i, w + " ") for i, w in enumerate(words)]
    assert await done.locator(".progress").evaluate("bar => bar.value") == 1
    assert page.errors == []
    await context.close()
