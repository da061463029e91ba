"""Standard Webhooks signatures (https://www.standardwebhooks.com): `webhook-id`, `webhook-timestamp`
and `webhook-signature`, a space-separated `v1,<base64 HMAC-SHA256 of "id.timestamp.body">` per secret."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from collections.abc import Sequence

SECRET_PREFIX = "whsec_"
MIN_KEY_BYTES = 24  # the specification's bounds for a symmetric key
MAX_KEY_BYTES = 64


def secret_key(secret: str) -> bytes:
    """The key inside `whsec_<base64>`. Raises ValueError (without repeating the secret) if it is not one."""
    if not secret.startswith(SECRET_PREFIX):
        raise ValueError(f"a secret starts with {SECRET_PREFIX} and goes on in base64")
    try:
        key = base64.b64decode(secret[len(SECRET_PREFIX) :], validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"the part after {SECRET_PREFIX} is not base64") from None
    if not MIN_KEY_BYTES <= len(key) <= MAX_KEY_BYTES:
        raise ValueError(f"a secret holds {MIN_KEY_BYTES} to {MAX_KEY_BYTES} bytes, not {len(key)}")
    return key


class Signer:
    """Signs with every configured secret, so receivers can move from an old secret to a new one."""

    def __init__(self, secrets: Sequence[str]) -> None:
        if not secrets:
            raise ValueError("webhooks need at least one secret to sign with")
        self._keys = [secret_key(secret) for secret in secrets]

    def signature(self, webhook_id: str, timestamp: int, body: bytes) -> str:
        signed = f"{webhook_id}.{timestamp}.".encode() + body
        return " ".join(
            "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode() for key in self._keys
        )

    def headers(self, webhook_id: str, timestamp: int, body: bytes) -> dict[str, str]:
        """The headers of one attempt: the same id on every attempt of an event, the attempt's own time."""
        return {
            "Content-Type": "application/json",
            "webhook-id": webhook_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": self.signature(webhook_id, timestamp, body),
        }
