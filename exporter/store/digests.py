"""Keyed digests of the other party's number: matched on, never stored as such."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from functools import lru_cache


def new_party_key() -> str:
    """A fresh key, in hex, created with a store and kept in its `meta`."""
    return secrets.token_hex(16)


def party_digest(key: bytes, number: str | None) -> str | None:
    """The first 16 hex digits of HMAC-SHA256(key, number); None for no number.

    The number only matters for matching legs without a call_id: keep a keyed digest of it,
    never the number itself.
    """
    if number is None:
        return None
    return _digest(key, number)


@lru_cache(maxsize=8192)  # a call's events carry its numbers again and again, under the write lock
def _digest(key: bytes, number: str) -> str:
    return hmac.new(key, number.encode(), hashlib.sha256).hexdigest()[:16]
