"""Who may use the service and how much: bearer tokens, WebSocket origins, per-client limits."""

from __future__ import annotations

import hmac
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit

from aiohttp import web

from ..errors import Forbidden, RateLimited, TooManySockets
from ..settings import Settings

WS_PROTOCOL = "zypher"
TOKEN_PROTOCOL_PREFIX = "bearer."  # Sec-WebSocket-Protocol: zypher, bearer.<token>
MAX_TRACKED_CLIENTS = 10_000  # the limiter's memory is bounded too: least recently seen addresses go first


def client_address(request: web.Request) -> str:
    """The peer address that per-client limits count by (X-Forwarded-For is not trusted)."""
    return request.remote or "unknown"


def token_valid(token: str | None, tokens: Iterable[str]) -> bool:
    """Constant-time against each configured token (all are compared, so timing says nothing)."""
    if token is None:
        return False
    given = token.encode()
    found = False
    for expected in tokens:
        found |= hmac.compare_digest(given, expected.encode())
    return found


def bearer(header: str | None) -> str | None:
    if header is None:
        return None
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def is_public(request: web.Request, settings: Settings) -> bool:
    path = request.path
    if path in ("/", "/healthz", "/readyz", "/v2/health/live", "/v2/health/ready") or path.startswith("/static/"):
        return True
    return path == "/metrics" and not settings.metrics_need_token


def websocket_token(request: web.Request) -> str | None:
    for offered in request.headers.getall("Sec-WebSocket-Protocol", []):
        for protocol in offered.split(","):
            protocol = protocol.strip()
            if protocol.startswith(TOKEN_PROTOCOL_PREFIX):
                return protocol[len(TOKEN_PROTOCOL_PREFIX) :]
    return None


def check_origin(request: web.Request, settings: Settings) -> None:
    """Browsers send Origin with every WebSocket upgrade: only the service's own origin and the allowlist
    pass (a page elsewhere must not drive a user's socket). Clients that send none are not browsers.

    The service's own origin is `--public-origin` when set. Otherwise it is whatever the request's `Host`
    says, which a DNS-rebinding page controls: set `--public-origin` where browsers reach the service."""
    origin = request.headers.get("Origin")
    if origin is None or "*" in settings.ws_allowed_origins:
        return
    if normal_origin(origin) in {normal_origin(o) for o in (*settings.ws_allowed_origins, *settings.public_origins)}:
        return
    # Our own origin: same host and port; the scheme may differ behind a TLS-terminating proxy.
    if not settings.public_origins and origin != "null" and urlsplit(origin).netloc.lower() == request.host.lower():
        return
    raise Forbidden(f"WebSocket origin {origin!r} is not allowed (see --public-origin and --ws-allowed-origin)")


def normal_origin(origin: str) -> str:
    """`scheme://host[:port]` as browsers send it: lower case, no trailing slash, no default port."""
    origin = origin.strip().rstrip("/").lower()
    for scheme, port in (("https://", ":443"), ("http://", ":80")):
        if origin.startswith(scheme) and origin.endswith(port):
            return origin[: -len(port)]
    return origin


class RateLimiter:
    """A token bucket per client address: `rate` per second, bursts of `burst`."""

    def __init__(self, rate: float, burst: int, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.burst = float(burst or max(1, round(2 * rate)))
        self._clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # client -> (tokens, when)

    def check(self, client: str) -> None:
        """Take one token for `client`, or raise RateLimited saying when one will be there."""
        if self.rate <= 0:
            return
        now = self._clock()
        tokens, then = self._buckets.pop(client, (self.burst, now))
        tokens = min(self.burst, tokens + (now - then) * self.rate)
        if tokens < 1:
            self._buckets[client] = (tokens, now)
            raise RateLimited(
                f"more than {self.rate:g} predictions per second from {client}", retry_after=(1 - tokens) / self.rate
            )
        self._buckets[client] = (tokens - 1, now)
        while len(self._buckets) > MAX_TRACKED_CLIENTS:
            self._buckets.popitem(last=False)


class SocketCounter:
    """Open connections per client address, up to a limit (0: none)."""

    def __init__(self, limit: int, what: str = "WebSockets") -> None:
        self.limit = limit
        self.what = what
        self._open: dict[str, int] = {}

    def acquire(self, client: str) -> None:
        count = self._open.get(client, 0)
        if self.limit and count >= self.limit:
            raise TooManySockets(f"{client} already has {count} {self.what} open (the limit)")
        self._open[client] = count + 1

    def release(self, client: str) -> None:
        count = self._open.get(client, 0) - 1
        if count > 0:
            self._open[client] = count
        else:
            self._open.pop(client, None)

    @contextmanager
    def hold(self, client: str) -> Iterator[None]:
        """One place for `client` while the block runs (TooManySockets if there is none)."""
        self.acquire(client)
        try:
            yield
        finally:
            self.release(client)
