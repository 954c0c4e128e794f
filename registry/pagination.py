"""Opaque page tokens and page-size rules shared by every listing.

Why opaque + fingerprinted: clients must not build tokens by hand (the format may change), and a token obtained
under one filter must not silently be replayed under another, which would skip or repeat items.
"""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any

from loraplex.registry.errors import InvalidArgument

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
_MAX_TOKEN_LEN = 2048


def page_limit(page_size: int) -> int:
    """``0`` -> default; negative or above ``MAX_PAGE_SIZE`` -> ``InvalidArgument``."""
    if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size < 0 or page_size > MAX_PAGE_SIZE:
        raise InvalidArgument(
            f"page_size must be an integer in 0..{MAX_PAGE_SIZE}, got {page_size!r}", reason="INVALID_PAGE_SIZE"
        )
    return page_size or DEFAULT_PAGE_SIZE


def fingerprint(*parts: Any) -> str:
    """A short stable hash of the filter values a token was issued under."""
    text = json.dumps(parts, sort_keys=True, default=sorted, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def encode_token(kind: str, position: str | int, filters: str) -> str:
    raw = json.dumps({"k": kind, "p": position, "f": filters}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_token(token: str, kind: str, filters: str) -> str | int | None:
    """The position a token encodes (None for the empty token); any mismatch is ``InvalidArgument``."""
    if not token:
        return None
    try:
        if len(token) > _MAX_TOKEN_LEN:
            raise ValueError("too long")
        raw = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        if not isinstance(raw, dict) or raw.get("k") != kind:
            raise ValueError("wrong kind")
        position = raw.get("p")
        if not isinstance(position, str | int) or isinstance(position, bool):
            raise ValueError("bad position")
    except (ValueError, TypeError, UnicodeDecodeError):
        raise InvalidArgument("invalid page_token", reason="INVALID_PAGE_TOKEN") from None
    if raw.get("f") != filters:
        raise InvalidArgument("page_token was issued for different filters", reason="INVALID_PAGE_TOKEN")
    return position
