"""The API key check of kaito-serve and kaito-rag: `Authorization: Bearer KEY` on every guarded route.

The scheme is matched in any case (RFC 7235: `bearer`, `BEARER`); the key is compared in constant
time (SHA-256 of both sides, then `hmac.compare_digest`, so neither the key's length nor the first
differing byte shows in the response time). A 401 answer carries `CHALLENGE` (RFC 6750).
"""

from __future__ import annotations

import hashlib
import hmac

CHALLENGE = {"WWW-Authenticate": "Bearer"}  # the header of a 401 answer


def bearer_token(authorization: str | bytes | None) -> str | None:
    """The credentials of an `Authorization: Bearer TOKEN` header value; None for another scheme or none."""
    if authorization is None:
        return None
    if isinstance(authorization, bytes):
        authorization = authorization.decode("latin-1")  # HTTP header bytes, as ASGI hands them over
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def _digest(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def _wire_bytes(text: str) -> bytes:
    """A header value as the bytes that came over the wire (ASGI servers decode headers as latin-1)."""
    try:
        return text.encode("latin-1")
    except UnicodeEncodeError:
        return text.encode()


class APIKey:
    """One API key. `accepts(header)` says whether an Authorization header value carries it."""

    __slots__ = ("_digest",)

    def __init__(self, key: str) -> None:
        if not key:
            raise ValueError("an API key must not be empty")
        self._digest = _digest(key.encode())  # the key's UTF-8 bytes against the header's bytes

    def accepts(self, authorization: str | bytes | None) -> bool:
        token = bearer_token(authorization)
        return token is not None and hmac.compare_digest(_digest(_wire_bytes(token)), self._digest)
