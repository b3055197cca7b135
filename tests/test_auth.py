"""The API key check shared by kaito-serve (both backends) and kaito-rag (presets/auth.py)."""

from __future__ import annotations

import pytest
from kaito.presets.auth import CHALLENGE, APIKey, bearer_token

KEY = "s3cret-KEY_42"


@pytest.mark.parametrize("header, token", [
    ("Bearer abc", "abc"),
    ("bearer abc", "abc"),  # RFC 7235: the scheme is case-insensitive
    ("BEARER abc", "abc"),
    ("  Bearer   abc  ", "abc"),
    (b"Bearer abc", "abc"),  # ASGI hands headers over as bytes
    ("Bearer a b", "a b"),
    ("Basic abc", None),
    ("Bearerabc", None),
    ("Bearer", None),
    ("Bearer   ", None),
    ("abc", None),
    ("", None),
    (None, None),
])
def test_bearer_token(header, token):
    assert bearer_token(header) == token


def test_the_key_is_accepted_only_as_a_bearer_token():
    key = APIKey(KEY)
    for ok in (f"Bearer {KEY}", f"bearer {KEY}", f"BeArEr  {KEY} ", f"Bearer {KEY}".encode()):
        assert key.accepts(ok), ok
    for bad in (None, "", KEY, f"Basic {KEY}", f"Bearer {KEY.lower()}", f"Bearer {KEY}x", f"Bearer {KEY[:-1]}",
                f"Bearer x{KEY}", "Bearer ", f"Token {KEY}"):
        assert not key.accepts(bad), bad


def test_non_ascii_keys_compare_as_utf8_bytes():
    key = APIKey("clé")
    assert key.accepts("Bearer clé".encode())  # what a client sends: UTF-8 bytes
    assert key.accepts("Bearer clé".encode().decode("latin-1"))  # what Starlette makes of them
    assert not key.accepts("Bearer cle")


def test_empty_key_is_refused():
    with pytest.raises(ValueError):
        APIKey("")


def test_challenge_header():
    assert CHALLENGE == {"WWW-Authenticate": "Bearer"}
