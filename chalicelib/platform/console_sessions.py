"""The console's sessions (issue #18): a team key or the admin key, exchanged once for a
short-lived, server-signed token held in an HttpOnly cookie, so the key never stays in a browser.

Token: `v1.<payload>.<signature>`, both base64url; the payload is JSON `{"sid", "kind": "team" |
"admin", "team", "kid", "iat", "exp"}` and the signature HMAC-SHA256 over it with the secret in
Secrets Manager (`rfthub/<stage>/console-session`, `RFT_CONSOLE_SESSION_SECRET_ID`). `kid` is the
team key's id, or for the admin a fingerprint of the admin key (rotating the admin key ends every
admin session).

A request authenticated by the cookie (chalicelib/api/http.py `authenticate`, only when there is
no Authorization header) is accepted while:
* the signature holds and `exp` is in the future (RFT_CONSOLE_SESSION_SECONDS, default 8 hours);
* the session was not signed out: sign-out writes a revocation item (session id, TTL at the
  session's expiry) to the `console_sessions` table, read on every cookie request (consistent);
* the key is still valid: a team key's record is re-read at most every RFT_AUTH_CACHE_SECONDS per
  instance, so revoking the key ends its sessions at the next auth-cache expiry (30 s), as for
  bearer keys; the admin key is compared with the secret (cached 5 minutes, adapters/secrets.py).
Every non-GET request authenticated by the cookie must send `X-CSRF-Token`, derived from the
session (HMAC of its id), which the page gets from POST/GET /console/session: another site can
neither read it nor (SameSite=Strict) send the cookie. A bearer request needs no CSRF token.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
import threading
import time
from datetime import UTC, datetime

from pynamodb.exceptions import DoesNotExist, TransactWriteError

from chalicelib.adapters.secrets import get_secret
from chalicelib.config import settings
from chalicelib.domain import keys
from chalicelib.errors import Forbidden, Unauthorized
from chalicelib.platform import audit, teams
from chalicelib.platform.teams import Principal
from chalicelib.store import dynamo
from chalicelib.store.models import ApiKey, ConsoleSessionRevocation

COOKIE = "rfth_console"
CSRF_HEADER = "x-csrf-token"
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
VERSION = "v1"
MAX_TOKEN_CHARS = 1024


def secret_id() -> str:
    return os.environ.get("RFT_CONSOLE_SESSION_SECRET_ID", f"rfthub/{settings().stage}/console-session")


def session_seconds() -> int:
    return int(os.environ.get("RFT_CONSOLE_SESSION_SECONDS", str(8 * 3600)))


class CsrfInvalid(Forbidden):
    code = "csrf_token_invalid"
    should_retry = None        # as before Forbidden was shared: no x-should-retry header


class Session:
    __slots__ = ("sid", "kind", "team_id", "key_id", "issued_at", "expires_at")

    def __init__(self, payload: dict):
        self.sid: str = payload["sid"]
        self.kind: str = payload["kind"]
        self.team_id: str | None = payload.get("team")
        self.key_id: str = payload["kid"]
        self.issued_at: int = int(payload["iat"])
        self.expires_at: int = int(payload["exp"])

    def principal(self) -> Principal:
        """Who the session is, before its key's record is read (console_sessions._key_principal)."""
        if self.kind == "admin":
            return Principal(team_id=None, key_id=None, is_admin=True, session_id=self.sid)
        return Principal(team_id=self.team_id, key_id=self.key_id, session_id=self.sid)

    def view(self) -> dict:
        return {"object": "console.session", "principal": self.kind, "team_id": self.team_id,
                "key_id": self.key_id if self.kind == "team" else None, "expires_at": self.expires_at,
                "csrf_token": csrf_token(self.sid)}


# ---- signing ---------------------------------------------------------------------------------------

def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _secret() -> bytes:
    return get_secret(secret_id()).encode()


def _sign(message: bytes) -> str:
    return _b64(hmac.new(_secret(), message, hashlib.sha256).digest())


def csrf_token(sid: str) -> str:
    return _sign(b"csrf\x00" + sid.encode())


def admin_fingerprint() -> str:
    """Names the admin key a session was opened with, without being usable as it."""
    return "admin:" + hashlib.sha256(b"rft-hub console\x00" + get_secret(settings().admin_key_secret_id).encode()
                                     ).hexdigest()[:16]


def issue(principal: Principal, now: int | None = None) -> tuple[str, Session]:
    now = int(now if now is not None else time.time())
    payload = {"sid": secrets.token_urlsafe(18), "kind": "admin" if principal.is_admin else "team",
               "team": principal.team_id, "kid": admin_fingerprint() if principal.is_admin else principal.key_id,
               "iat": now, "exp": now + session_seconds()}
    body = _b64(json.dumps(payload, separators=(",", ":")).encode())
    signed = f"{VERSION}.{body}"
    return f"{signed}.{_sign(signed.encode())}", Session(payload)


def decode(token: str, now: float | None = None) -> Session | None:
    """The session a token names if its signature holds and it has not expired; None otherwise
    (revocation and the key are checked by `verify`)."""
    # A token is ASCII (url-safe base64); anything else is not ours. compare_digest raises
    # TypeError on a non-ASCII str, which made any such cookie a 500: compare bytes, after this.
    if not token or len(token) > MAX_TOKEN_CHARS or not token.isascii() or token.count(".") != 2:
        return None
    version, body, signature = token.split(".")
    expected = _sign(f"{version}.{body}".encode()).encode()
    if version != VERSION or not hmac.compare_digest(signature.encode(), expected):
        return None
    try:
        payload = json.loads(_unb64(body))
        session = Session(payload)
    except (ValueError, KeyError, TypeError):
        return None
    if session.kind not in ("team", "admin") or session.expires_at <= (now if now is not None else time.time()):
        return None
    return session


def sign_in(key: str) -> tuple[str, Session]:
    """A team key or the admin key, checked exactly as a bearer key is, for a new session. The
    sign-in is audited (its entry is the only write: a session is a signed token, not a row)."""
    principal = teams.authenticate_team(key) if keys.parse_key_id(key) else teams.authenticate_admin(key)
    token, session = issue(principal)
    audit.commit(audit.Act("console.signed_in", f"console:{session.sid}", session.team_id,
                           after={"expires_at": session.expires_at}, actor=audit.actor_of(session.principal())),
                 what="console sign-in")
    return token, session


# ---- revocation --------------------------------------------------------------------------------------

_revoked_here: dict[str, int] = {}       # sid -> expiry: signed out through this instance
_keys: dict[str, tuple[float, bool, ApiKey | None]] = {}   # key id -> (checked at, not revoked, record)
_lock = threading.Lock()


def sign_out(session: Session) -> None:
    expires = datetime.fromtimestamp(session.expires_at + 60, tz=UTC)
    record = ConsoleSessionRevocation(session.sid, revoked_at=int(time.time()), expires_at=expires)
    try:
        audit.commit(audit.Act("console.signed_out", f"console:{session.sid}", session.team_id,
                               actor=audit.actor_of(session.principal())),
                     lambda tx: tx.save(record, condition=ConsoleSessionRevocation.session_id.does_not_exist()),
                     what="console sign-out")
    except TransactWriteError as exc:
        if not dynamo.is_condition(exc):
            raise       # (a condition: signed out already by another request; that one left the entry)
    with _lock:
        now = time.time()
        for sid in [s for s, exp in _revoked_here.items() if exp < now]:
            del _revoked_here[sid]
        _revoked_here[session.sid] = session.expires_at


def _signed_out(session: Session) -> bool:
    with _lock:
        if session.sid in _revoked_here:
            return True
    try:
        dynamo.call(lambda: ConsoleSessionRevocation.get(session.sid, consistent_read=True),
                    idempotent=True, what="console session")
    except DoesNotExist:
        return False
    return True


def _key_principal(session: Session) -> Principal | None:
    """The session's principal while its key is valid (None otherwise): a team key's role, models
    and expiry as its record says now, so a console session can do no more than its key."""
    if session.kind == "admin":
        return session.principal() if hmac.compare_digest(session.key_id, admin_fingerprint()) else None
    now = time.monotonic()
    with _lock:
        hit = _keys.get(session.key_id)
    if hit is None or now - hit[0] > settings().auth_cache_seconds:
        try:
            record = dynamo.call(lambda: ApiKey.get(session.key_id, consistent_read=True),
                                 idempotent=True, what="key lookup")
            hit = (now, record.revoked_at is None, record)
        except DoesNotExist:
            hit = (now, False, None)
        with _lock:
            _keys[session.key_id] = hit
    record = hit[2]
    if not hit[1] or record is None or record.team_id != session.team_id:
        return None
    principal = teams.principal_for(record, session_id=session.sid)
    return None if principal.expired() else principal


def clear_cache() -> None:
    """Forget cached key checks (what an auth-cache expiry does); tests use it."""
    with _lock:
        _keys.clear()


# ---- the request path ---------------------------------------------------------------------------------

def cookie_token(headers: dict[str, str]) -> str | None:
    """The console cookie's value from a (lower-cased) Cookie header, if any."""
    for part in (headers.get("cookie") or "").split(";"):
        name, sep, value = part.strip().partition("=")
        if sep and name == COOKIE and value:
            return value.strip('"')
    return None


_EXPIRED = "Console session expired or signed out; sign in again at /console."


def current(headers: dict[str, str]) -> Session | None:
    """The valid session the request's cookie holds, or None (no cookie, bad, expired, signed out,
    or its key revoked)."""
    token = cookie_token(headers)
    session = decode(token) if token else None
    if session is None or _signed_out(session) or _key_principal(session) is None:
        return None
    return session


def authenticate(headers: dict[str, str], auth: str, method: str | None) -> Principal | None:
    """The principal of a request carrying the console cookie (and no Authorization header), for
    a route whose auth is `auth` ("team", "admin", "any"); None when there is no console cookie.
    `method` None (a caller that does not say) is treated as unsafe: the CSRF token is required."""
    token = cookie_token(headers)
    if token is None:
        return None
    session = current(headers)
    principal = _key_principal(session) if session is not None else None
    if session is None or principal is None:
        raise Unauthorized(_EXPIRED)
    if auth == "team" and session.kind != "team":
        raise Unauthorized("This route needs a team key; the console is signed in with the admin key.")
    if auth == "admin" and session.kind != "admin":
        raise Unauthorized("Incorrect admin key.")
    if (method or "POST").upper() not in SAFE_METHODS:
        sent = headers.get(CSRF_HEADER) or ""
        if not sent.isascii() or not hmac.compare_digest(sent.encode(), csrf_token(session.sid).encode()):
            raise CsrfInvalid("Missing or wrong X-CSRF-Token header: a request authenticated by the console's "
                            "session cookie must send the token GET /console/session returns.",
                            param="X-CSRF-Token")
    return principal


def set_cookie(token: str, max_age: int) -> str:
    """Secure is always set: browsers accept Secure cookies from http://localhost and 127.0.0.1 (a
    potentially trustworthy origin), which is what the local stack serves."""
    return f"{COOKIE}={token}; Path=/; Max-Age={max_age}; HttpOnly; Secure; SameSite=Strict"


def clear_cookie() -> str:
    return f"{COOKIE}=; Path=/; Max-Age=0; HttpOnly; Secure; SameSite=Strict"
