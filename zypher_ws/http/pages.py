"""The browser page (`/` and `/static/`), served with a strict Content-Security-Policy."""

from __future__ import annotations

from importlib.util import find_spec
from pathlib import Path

from aiohttp import web

from ..errors import NotFound

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
    return Path(__file__).resolve().parent.parent.parent / "static"


def add_page_routes(app: web.Application) -> None:
    """`/` and the page's files under `/static/`.

    The files are listed once here and looked up by name: nothing a request says is ever joined to a
    filesystem path, and a name not on the list is the API's JSON 404, not a bare one.
    """
    files = {path.name: path for path in static_dir().iterdir() if path.is_file()}

    async def index(request: web.Request) -> web.FileResponse:
        return web.FileResponse(files["index.html"], headers=SECURITY_HEADERS)

    async def page_file(request: web.Request) -> web.FileResponse:
        path = files.get(request.match_info["name"])
        if path is None:
            raise NotFound(f"no file {request.path}")
        return web.FileResponse(path, headers=SECURITY_HEADERS)

    app.router.add_get("/", index)
    app.router.add_get("/static/{name}", page_file)
