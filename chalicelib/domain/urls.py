"""Whether a URL is under an allowed prefix (Slack webhooks, slash commands' response_url).

Compared as parsed URLs, never as strings: `"http://host:1@other/".startswith("http://host:1")` is
true, yet that URL goes to `other` (userinfo `host:1`). Scheme, host and port must be equal, the
path must be under the prefix's path at a segment boundary, and a URL with userinfo, a backslash,
whitespace or non-ASCII characters (which clients normalise differently) is refused. Pure.
"""
from __future__ import annotations

from urllib.parse import SplitResult, urlsplit

_DEFAULT_PORTS = {"http": 80, "https": 443}
ANY_PORT = -1


def _parts(url: str) -> tuple[str, str, int, str] | None:
    """(scheme, host, port, path) of an absolute http(s) URL without userinfo, else None."""
    if not isinstance(url, str) or not url.isascii() or len(url) > 2048 \
            or any(c in url for c in "\\ \t\r\n") or any(ord(c) < 32 or ord(c) == 127 for c in url):
        return None
    try:
        split: SplitResult = urlsplit(url)
        port = split.port
    except ValueError:          # a port that is not a number, or out of range
        return None
    scheme = split.scheme.lower()
    if scheme not in _DEFAULT_PORTS or "@" in split.netloc or not split.hostname:
        return None
    if port is None and split.netloc.endswith(":"):
        port = ANY_PORT       # "http://127.0.0.1:" (the local stack's prefix): any port of that host
    return scheme, split.hostname.lower(), port if port is not None else _DEFAULT_PORTS[scheme], split.path or "/"


def under_prefix(url: str, prefix: str) -> bool:
    """Whether `url` is at or below `prefix` (both absolute http(s) URLs)."""
    have, want = _parts(url), _parts(prefix)
    if have is None or want is None or have[:2] != want[:2] or have[2] == ANY_PORT \
            or want[2] not in (ANY_PORT, have[2]):
        return False
    base = want[3]
    return have[3] == base or have[3].startswith(base if base.endswith("/") else base + "/")


def allowed(url: str, prefixes: list[str]) -> bool:
    return any(under_prefix(url, p.strip()) for p in prefixes if p.strip())
