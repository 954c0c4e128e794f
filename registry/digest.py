"""The version digest: one content identity shared by registry and engine.

Why this exact recipe: the engine keys every cache by digest and recomputes it after download, so config and
weights must both be covered, and the config must be hashed in a canonical form (key order and whitespace in
``adapter_config.json`` do not change what an adapter does). A fixed domain prefix keeps the hash from ever
colliding with a plain sha256 of some other byte string.
"""

from __future__ import annotations

import hashlib
import json

from loraplex.registry.errors import InvalidAdapter
from loraplex.registry.refs import validate_sha256_hex

DIGEST_DOMAIN = b"loraplex.adapter.v1\0"


def canonical_config(config_text: str | bytes) -> bytes:
    """``adapter_config.json`` re-serialized with sorted keys and no whitespace."""
    try:
        parsed = json.loads(config_text)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise InvalidAdapter(f"adapter_config.json is not valid JSON: {exc}") from None
    return json.dumps(parsed, sort_keys=True, separators=(",", ":")).encode()


def version_digest(config_text: str | bytes, weights_sha256_hex: str) -> str:
    """``sha256:<hex>`` over domain prefix + sha256(canonical config) + sha256(weights), raw digests."""
    weights = bytes.fromhex(validate_sha256_hex(weights_sha256_hex, "weights sha256"))
    h = hashlib.sha256(DIGEST_DOMAIN)
    h.update(hashlib.sha256(canonical_config(config_text)).digest())
    h.update(weights)
    return "sha256:" + h.hexdigest()
