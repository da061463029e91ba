"""Every Python example of docs/client.md runs, as it is, against a real server with the digits model."""

from __future__ import annotations

import asyncio
import contextlib
import io
import re
from pathlib import Path
from typing import Any

from fakes import WAIT, make_settings
from zypher_ws.http.app import create_app
from zypher_ws.http.keys import SERVICE

PAGE = Path(__file__).resolve().parent.parent / "docs" / "client.md"
DOCUMENTED_URL = "http://127.0.0.1:8080"
PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```$", re.MULTILINE | re.DOTALL)  # not ```python example


def examples() -> list[str]:
    return PYTHON_BLOCK.findall(PAGE.read_text(encoding="utf-8"))


async def test_every_example_of_the_client_page_runs(aiohttp_server: Any) -> None:
    app = create_app(make_settings(model="digits"))
    server = await aiohttp_server(app)
    await asyncio.wait_for(asyncio.gather(*(d.loaded.wait() for d in app[SERVICE].models)), WAIT)
    url = f"http://127.0.0.1:{server.port}"
    blocks = examples()
    assert len(blocks) >= 6 and all(DOCUMENTED_URL in block for block in blocks)

    def run(block: str) -> str:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(block.replace(DOCUMENTED_URL, url), str(PAGE), "exec"), {"__name__": "__main__"})
        return out.getvalue()

    printed = [await asyncio.to_thread(run, block) for block in blocks]
    assert printed[0].splitlines()[0] == "Status.SUCCEEDED 0"  # what the first example says it prints
    assert all(printed), "each example prints what it shows"
