"""Where a webhook may go.

Two checks with one policy: at submit time the URL itself (scheme, no credentials, length, the host
allowed, no literal address that is not public), and at delivery time every address the host resolves
to and every address a socket connects to (transport.py), so a name that resolves elsewhere later
(DNS rebinding) is caught where it matters.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from ..errors import InvalidWebhook
from ..records import WEBHOOK_EVENTS, url_shown

MAX_URL_LENGTH = 2048
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")  # an IPv4 address behind a NAT64 gateway
DEFAULT_EVENTS = ("completed",)
_UNSAFE = re.compile(r"[\x00-\x20\x7f\\]")  # whitespace, controls and backslashes: parsers disagree on them


@dataclass(frozen=True)
class WebhookRequest:
    """What a request asked for: where to send, and which events."""

    url: str
    events: tuple[str, ...] = DEFAULT_EVENTS


def requested(body: Mapping[str, Any]) -> WebhookRequest | None:
    """The `webhook` and `webhook_events_filter` of a request body (or WebSocket message), checked for
    what needs no configuration. Raises InvalidWebhook."""
    url = body.get("webhook")
    events = body.get("webhook_events_filter")
    if url is None:
        if events is not None:
            raise InvalidWebhook("`webhook_events_filter` needs a `webhook` URL")
        return None
    if not isinstance(url, str):
        raise InvalidWebhook("`webhook` must be a URL (a string)")
    if len(url) > MAX_URL_LENGTH:
        raise InvalidWebhook(f"`webhook` is longer than {MAX_URL_LENGTH} characters")
    if _UNSAFE.search(url):
        raise InvalidWebhook("`webhook` must not contain spaces, control characters or backslashes")
    try:
        parts = urlsplit(url)
        port = parts.port  # raises for a port that is not a number from 0 to 65535
    except ValueError:
        raise InvalidWebhook("`webhook` is not a valid URL") from None
    if parts.scheme not in ("http", "https"):
        raise InvalidWebhook("`webhook` must be an http:// or https:// URL")
    if "@" in parts.netloc:
        raise InvalidWebhook("`webhook` must not carry credentials (user:password@)")
    if not parts.hostname or port == 0:
        raise InvalidWebhook("`webhook` needs a host (and a port from 1 to 65535, if any)")
    return WebhookRequest(url, _events(events))


def _events(events: Any) -> tuple[str, ...]:
    if events is None:
        return DEFAULT_EVENTS
    if not isinstance(events, list) or not events or not all(isinstance(e, str) for e in events):
        raise InvalidWebhook(f"`webhook_events_filter` is a list of one or more of {', '.join(WEBHOOK_EVENTS)}")
    unknown = sorted(set(events) - set(WEBHOOK_EVENTS))
    if unknown:
        raise InvalidWebhook(f"unknown webhook events {unknown}: use {', '.join(WEBHOOK_EVENTS)}")
    return tuple(e for e in WEBHOOK_EVENTS if e in events)  # in lifecycle order, each once


def host_of(url: str) -> str:
    """The host a URL names, lower case, without brackets or port."""
    return (urlsplit(url).hostname or "").lower()


shown = url_shown


class AddressPolicy:
    """Which hosts and addresses webhooks may reach (--webhook-allowed-host, --webhook-allow-private)."""

    def __init__(self, *, allow_private: bool = False, allowed_hosts: Sequence[str] = ()) -> None:
        self.allow_private = allow_private
        self._exact = {h.lower() for h in allowed_hosts if not h.startswith("*.")}
        self._suffixes = tuple(h[1:].lower() for h in allowed_hosts if h.startswith("*."))  # ".example.com"

    def host_allowed(self, host: str) -> bool:
        if not self._exact and not self._suffixes:
            return True
        host = host.lower().rstrip(".")
        return host in self._exact or host.endswith(self._suffixes)

    def address_allowed(self, address: str) -> bool:
        """Whether a connection may go to this IP address: a public unicast one, unless private ones are allowed."""
        if self.allow_private:
            return True
        try:
            ip = ipaddress.ip_address(address.split("%", 1)[0])  # an IPv6 zone (%eth0) is no part of the address
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address):
            embedded = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
            if embedded is None and ip in _NAT64:
                embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
            if embedded is not None:
                ip = embedded
        return ip.is_global and not ip.is_multicast

    def check(self, url: str) -> None:
        """At submit time: the host is allowed, and neither a literal address nor a name for this host
        (localhost) that could only be refused later. Raises InvalidWebhook."""
        host = host_of(url)
        if not self.host_allowed(host):
            raise InvalidWebhook(f"webhooks may not go to {host}: it is not among --webhook-allowed-host")
        if self.allow_private:
            return
        try:
            ipaddress.ip_address(host)
        except ValueError:
            if host.rstrip(".") == "localhost" or host.rstrip(".").endswith(".localhost"):
                raise InvalidWebhook(
                    "webhooks may not go to localhost (start the service with --webhook-allow-private)"
                ) from None
            return  # a name: its addresses are checked when it is resolved, at every delivery
        if not self.address_allowed(host):
            raise InvalidWebhook(
                f"webhooks may not go to {host}, a loopback, private, link-local or multicast address "
                "(start the service with --webhook-allow-private)"
            )
