"""API key format, hashing and parsing. Pure functions.

A key looks like `rfth_<key id>_<secret>`. The key id is public (it names the key
in listings and revocation) and lets auth fetch one item by primary key; only the
SHA-256 of the whole key is stored, so a database leak yields no usable key.
"""
from __future__ import annotations

import hashlib
import hmac
import re
import secrets

KEY_PREFIX = "rfth"
_KEY_RE = re.compile(r"^rfth_([0-9a-f]{16})_([A-Za-z0-9_-]{20,128})$")


def generate() -> tuple[str, str]:
    """Returns (key_id, full key)."""
    key_id = secrets.token_hex(8)
    return key_id, f"{KEY_PREFIX}_{key_id}_{secrets.token_urlsafe(32)}"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def parse_key_id(key: str) -> str | None:
    """The key id a presented key claims, or None when it is not an rft-hub key."""
    match = _KEY_RE.match(key or "")
    return match.group(1) if match else None


def display_prefix(key: str) -> str:
    return key[: len(KEY_PREFIX) + 1 + 16 + 5] + "..."


def matches(key: str, stored_hash: str) -> bool:
    return hmac.compare_digest(hash_key(key), stored_hash)


def bearer_token(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()
