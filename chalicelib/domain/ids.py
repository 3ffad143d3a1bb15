"""Identifiers and clocks, in one place so their formats stay consistent."""
from __future__ import annotations

import hashlib
import secrets
import time


def now() -> int:
    return int(time.time())


def now_ms() -> int:
    return int(time.time() * 1000)


def new_id(prefix: str, nbytes: int = 12) -> str:
    return f"{prefix}-{secrets.token_hex(nbytes)}"


def stable_id(prefix: str, *parts: str) -> str:
    """A deterministic id (for idempotent creates keyed by a client token)."""
    digest = hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:24]
    return f"{prefix}-{digest}"
