"""The browser page (`/` and `/static/`), served with a strict Content-Security-Policy."""

from __future__ import annotations

from importlib.util import find_spec
from pathlib import Path

from aiohttp import web
from aiohttp.typedefs import Handler

# Only this service's own origin: no inline script, nothing fetched from elsewhere.
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def static_dir() -> Path:
    """The page's files: inside the installed package, or the checkout's `static/` (editable installs)."""
    # `zypher_ws.static` is a namespace package (no __init__.py), so ask for its directory, not files().
    spec = find_spec("zypher_ws.static")
    for location in (spec.submodule_search_locations or []) if spec else []:
        if (Path(location) / "index.html").is_file():
            return Path(location)
    return Path(__file__).resolve().parent.parent / "static"


async def index(request: web.Request) -> web.FileResponse:
    return web.FileResponse(static_dir() / "index.html", headers=SECURITY_HEADERS)


@web.middleware
async def security_headers(request: web.Request, handler: Handler) -> web.StreamResponse:
    response = await handler(request)
    response.headers.update(SECURITY_HEADERS)
    return response


def add_page_routes(app: web.Application) -> None:
    """`/` and the files under `/static/`, the latter in an app of their own, so the headers middleware
    runs for page files only, not for every API request."""
    app.router.add_get("/", index)
    files = web.Application(middlewares=[security_headers])
    files.router.add_static("/", static_dir(), follow_symlinks=False)
    app.add_subapp("/static/", files)
