"""Identifiers and clocks, in one place so their formats stay consistent."""
from __future__ import annotations

import hashlib
import re
import secrets
import time

# What a credential pasted where an id goes looks like: an rft-hub key (rfth_<id>_<secret>), an
# OpenAI-style key (sk-...), a Bedrock API key (bedrock-api-key-... / ABSK...). Error messages
# never repeat one (local/api_gateway.shown_path redacts the same shapes in unknown URLs).
KEYLIKE = re.compile(r"(?i)(rfth_|sk-|bedrock-api-key|absk)")
_KEY_TOKEN = re.compile(r"(?i)(?<![A-Za-z0-9])(rfth_[A-Za-z0-9_-]{12,}|sk-[A-Za-z0-9_-]{8,}"
                        r"|bedrock-api-key[A-Za-z0-9+/=_.-]*|ABSK[A-Za-z0-9+/=]{8,})")
REDACTED = "{redacted}"


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


def redact_keys(text: str) -> str:
    """`text` with every credential-shaped token replaced by {redacted} (for error messages that
    repeat an id, a path segment or a model name the caller sent)."""
    return _KEY_TOKEN.sub(REDACTED, text) if isinstance(text, str) else text
