"""The webhook HTTP client: aiohttp's, with the address policy applied twice on every connection.

1. The resolver drops every address of a name that webhooks may not reach, and fails the lookup when
   none is left: the connection never starts.
2. Every socket is made by `_socket`, which refuses an address the policy forbids, whatever produced it
   (a literal host, a cached lookup, a resolver that changed its mind): what is checked is what is
   connected to, so DNS rebinding cannot slip a private address past the first check.

Redirects are not followed, proxies from the environment are not used, and answers are not read past
their status and headers. Nothing here logs: callers log the URL without its query string.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Mapping
from types import TracebackType
from typing import Any

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

from .. import __version__
from .schedule import ADDRESS_NOT_ALLOWED, CONNECTION_ERROR, TIMEOUT, Attempt, retry_after
from .target import AddressPolicy, host_of


class AddressNotAllowed(OSError):
    """A webhook would reach an address the policy forbids."""


class GuardedResolver(AbstractResolver):
    """Resolves with `inner`, keeping only the addresses the policy allows."""

    def __init__(self, policy: AddressPolicy, inner: AbstractResolver | None = None) -> None:
        self._policy = policy
        self._inner = inner if inner is not None else DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        found = await self._inner.resolve(host, port, family)
        allowed = [r for r in found if self._policy.address_allowed(r["host"])]
        if not allowed:
            raise AddressNotAllowed(f"{host} resolves only to addresses webhooks may not reach")
        return allowed

    async def close(self) -> None:
        await self._inner.close()


def guarded_socket_factory(policy: AddressPolicy) -> Any:
    """aiohttp's socket_factory: a socket for an address the policy allows, else AddressNotAllowed."""

    def make(addr_info: Any) -> socket.socket:
        family, type_, proto, _, address = addr_info
        if not policy.address_allowed(str(address[0])):
            raise AddressNotAllowed(f"{address[0]} is not an address webhooks may reach")
        return socket.socket(family=family, type=type_, proto=proto)

    return make


def _refused(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, AddressNotAllowed):
            return True
        os_error = getattr(seen, "os_error", None)
        if isinstance(os_error, AddressNotAllowed):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


class HttpTransport:
    """`post` one attempt; an async context manager that owns the client session."""

    def __init__(
        self,
        policy: AddressPolicy,
        *,
        timeout: float,
        connections: int,
        resolver: AbstractResolver | None = None,
    ) -> None:
        self.policy = policy
        self.timeout = timeout
        self._connections = connections
        self._inner_resolver = resolver
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> HttpTransport:
        connector = aiohttp.TCPConnector(
            resolver=GuardedResolver(self.policy, self._inner_resolver),
            socket_factory=guarded_socket_factory(self.policy),
            limit=self._connections,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            trust_env=False,  # no proxy from the environment: it would connect where the guard cannot see
            headers={"User-Agent": f"zypher-ws/{__version__} (webhooks)"},
            cookie_jar=aiohttp.DummyCookieJar(),
        )
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def post(self, url: str, body: bytes, headers: Mapping[str, str]) -> Attempt:
        assert self._session is not None, "use `async with HttpTransport(...)`"
        if not self.policy.host_allowed(host_of(url)):
            return Attempt(error=ADDRESS_NOT_ALLOWED)
        try:
            async with self._session.post(
                url,
                data=body,
                headers=dict(headers),
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=self.timeout),
            ) as response:
                return Attempt(response.status, retry_after=retry_after(response.headers.get("Retry-After")))
        except asyncio.TimeoutError:
            return Attempt(error=TIMEOUT)
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            return Attempt(error=ADDRESS_NOT_ALLOWED if _refused(exc) else CONNECTION_ERROR)
