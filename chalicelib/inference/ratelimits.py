"""Rate limits per team and per key: requests and tokens a minute, with OpenAI's headers.

Enforced as budgets are (spend/slices.py), with no item written per call: an instance carves a
slice of the current minute's requests and tokens out of the limit in one conditional write on
that minute's item, then admits calls against it in memory. Within a minute nothing passes the
limit, because slices are carved out of it; what a slice does not use is lost when its minute
ends, so a busy instance may refuse a little early, never late. Windows are whole UTC minutes:
across one minute's end a caller can get up to twice the limit in 60 s (the documented burst,
as any fixed window allows). A call's tokens are its prompt estimate plus its output limit (as
its budget hold); a plain call's real usage gives the difference back to the slice afterwards.
Over a limit: 429 `rate_limit_exceeded` with `Retry-After` (the minute's end); every answer of a
limited team carries OpenAI's `x-ratelimit-*` headers. One team at its limit never slows another:
each limit has its own items.
"""
from __future__ import annotations

import secrets
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime

from pynamodb.exceptions import UpdateError

from chalicelib.cache import TTLCache
from chalicelib.domain import ids
from chalicelib.errors import InvalidRequest, NotFound, RateLimited
from chalicelib.platform import audit, teams
from chalicelib.store import dynamo
from chalicelib.store.models import RateLimitRow as RateLimit
from chalicelib.store.models import RateWindow

MAX_LIMIT = 10**9
_NUMBER = {"type": ["integer", "null"], "minimum": 1, "maximum": MAX_LIMIT}
# The limits body, for the OpenAPI document (`schema=` of the PUT route in api/usage.py).
LIMITS_BODY_SCHEMA = {"type": "object", "additionalProperties": False, "properties": {
    "requests_per_minute": _NUMBER, "tokens_per_minute": _NUMBER, "concurrent_requests": _NUMBER,
    "key_id": {"type": ["string", "null"], "maxLength": 64},
    "model": {"type": ["string", "null"], "minLength": 1, "maxLength": 256}}}
_config = TTLCache(30)      # a changed limit is honoured within 30 s on other instances


# ---- settings ------------------------------------------------------------------------------------

def limits_for(team_id: str, key_id: str | None, model: str | None = None) -> list[RateLimit]:
    """The limits a call of this key to this model (as the caller named it: an alias, a tuned or
    a base model) counts against: the team's, the team's for the model, then the key's own."""
    scopes = ["team"] + ([f"model:{model}"] if model else []) + ([f"key:{key_id}"] if key_id else [])
    found = _config.get(team_id, lambda: list(RateLimit.query(team_id)))
    return [lim for scope in scopes for lim in found if lim.scope == scope and (lim.rpm or lim.tpm)]


def concurrency_limits_for(team_id: str, key_id: str | None, model: str | None = None) -> list[tuple[str, str, int]]:
    """(team, scope, limit) of each concurrent-requests limit such a call counts against."""
    scopes = ["team"] + ([f"model:{model}"] if model else []) + ([f"key:{key_id}"] if key_id else [])
    found = _config.get(team_id, lambda: list(RateLimit.query(team_id)))
    return [(team_id, lim.scope, int(lim.concurrent)) for scope in scopes for lim in found
            if lim.scope == scope and lim.concurrent]


def _bound(body: dict, name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_LIMIT:
        raise InvalidRequest(f"'{name}' must be a whole number from 1 to {MAX_LIMIT:,}, or null.", param=name)
    return value


def view(lim: RateLimit) -> dict:
    return {"object": "rate_limit", "scope": lim.scope, "requests_per_minute": lim.rpm,
            "tokens_per_minute": lim.tpm, "concurrent_requests": lim.concurrent}


def set_limits(team_id: str, body: dict) -> dict:
    """`{"requests_per_minute": N, "tokens_per_minute": M, "key_id" or "model": optional}`; null lifts
    one. `model`: the team's limit for calls naming that model (an alias, a tuned or a base model)."""
    teams.get_team(team_id)
    unknown = set(body) - {"requests_per_minute", "tokens_per_minute", "concurrent_requests", "key_id", "model"}
    if unknown:
        name = sorted(unknown)[0]
        raise InvalidRequest(f"Unknown field '{name}'.", param=name)
    scope = "team"
    if body.get("key_id") is not None and body.get("model") is not None:
        raise InvalidRequest("Set a key's limit or a model's, not both at once.", param="model")
    if body.get("model") is not None:
        model = body["model"]
        if not isinstance(model, str) or not 1 <= len(model) <= 256 or not model.isprintable():
            raise InvalidRequest("'model' must be a model or alias name.", param="model")
        scope = f"model:{model}"
    if body.get("key_id") is not None:
        key_id = body["key_id"]
        # A key id is short printable ASCII; anything else (an empty string is DynamoDB's
        # ValidationException, a lone surrogate cannot be encoded) is no key of this team.
        plausible = isinstance(key_id, str) and 1 <= len(key_id) <= 64 and key_id.isascii() and key_id.isprintable()
        key = teams.get_key(key_id) if plausible else None
        if key is None or key.team_id != team_id:
            raise NotFound("No such key in this team.", param="key_id")
        scope = f"key:{key_id}"
    before = dynamo.get_or_none(RateLimit, team_id, scope, what="rate limit read")
    item = RateLimit(team_id, scope, rpm=_bound(body, "requests_per_minute"), tpm=_bound(body, "tokens_per_minute"),
                     concurrent=_bound(body, "concurrent_requests"), updated_at=ids.now())
    audit.save(item, action="limit.set", target=f"team:{team_id}", team_id=team_id,
               fields=("scope", "rpm", "tpm", "concurrent"), before_item=before, what="rate limit change")
    _config.invalidate(team_id)
    return view(item)


def list_limits(team_id: str) -> dict:
    teams.get_team(team_id)
    return {"object": "list", "data": [view(lim) for lim in RateLimit.query(team_id, consistent_read=True)]}


# ---- admission -----------------------------------------------------------------------------------

@dataclass(eq=False)
class _Slice:
    window: str
    requests: int = 0          # free in this instance's slices
    tokens: int = 0
    seen_requests: int = 0     # the window's totals at this instance's last carve
    seen_tokens: int = 0


@dataclass
class Ticket:
    """What a call took; `headers` for its answer; `finish(tokens)` gives unused tokens back."""
    taken: list[tuple[_Slice, int]] = field(default_factory=list)
    headers: dict = field(default_factory=dict)

    minute: int = 0

    def finish(self, actual_tokens: int | None) -> None:
        """A plain call's real usage: the tokens it did not use go back to its minute's slices."""
        if actual_tokens is None:
            return
        for s, estimated in self.taken:
            if estimated > actual_tokens and s.window.endswith(f"#{self.minute}"):
                s.tokens += estimated - actual_tokens


def _reset(now: float) -> str:
    return f"{max(1, int(60 - now % 60 + 0.999))}s"


class Limiter:
    """This process's slices of the current minutes. Thread-safe."""

    def __init__(self, clock=time.time) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._slices: dict[str, _Slice] = {}
        self._taking: defaultdict = defaultdict(threading.Lock)
        self._demand: dict[str, int] = defaultdict(int)       # requests admitted this minute, per window

    def admit(self, team_id: str, key_id: str | None, tokens: int, model: str | None = None) -> Ticket:
        limits = limits_for(team_id, key_id, model)
        if not limits:
            return Ticket()
        minute = int(self._clock() // 60)
        ticket = Ticket(minute=minute)
        try:
            for lim in limits:
                s = self._admit_one(f"{team_id}#{lim.scope}#{minute}", lim, tokens if lim.tpm else 0)
                ticket.taken.append((s, tokens if lim.tpm else 0))
        except RateLimited:
            self._give_back(ticket)
            raise
        ticket.headers = self._headers(ticket, limits)
        return ticket

    def _admit_one(self, window: str, lim: RateLimit, tokens: int) -> _Slice:
        if self._take_local(window, lim, tokens):
            return self._slices[window]
        with self._taking[window]:
            if not self._take_local(window, lim, tokens):
                self._carve(window, lim, tokens)
                if not self._take_local(window, lim, tokens):
                    raise self._refusal(lim)
            return self._slices[window]

    def _take_local(self, window: str, lim: RateLimit, tokens: int) -> bool:
        with self._lock:
            s = self._slices.get(window)
            if s is None or (lim.rpm and s.requests < 1) or (lim.tpm and s.tokens < tokens):
                return False
            s.requests -= 1 if lim.rpm else 0
            s.tokens -= tokens if lim.tpm else 0
            self._demand[window] += 1
            return True

    def _carve(self, window: str, lim: RateLimit, tokens: int) -> None:
        """One conditional write: a slice of the window's requests and tokens; on no room, one
        call's worth; on none, nothing (the caller is refused)."""
        with self._lock:
            s = self._slices.setdefault(window, _Slice(window))
            for old in [w for w in self._slices if w.rsplit("#", 1)[0] == window.rsplit("#", 1)[0] and w != window]:
                del self._slices[old]           # earlier minutes: over
                self._demand.pop(old, None)
            demand = self._demand.get(window, 0)
        # What this call lacks beyond the slice's free part, or more for the calls to come.
        need_r = 1 if lim.rpm and s.requests < 1 else 0
        need_t = max(0, tokens - s.tokens) if lim.tpm else 0
        want_r = max(need_r, min(max(4, demand), (lim.rpm - s.seen_requests) // 4)) if need_r else 0
        want_t = max(need_t, min(4 * tokens, (lim.tpm - s.seen_tokens) // 4)) if need_t else 0
        sizes = [(want_r, want_t), (need_r, need_t)]
        for n, t in dict.fromkeys(sizes):
            if self._write(window, lim, n, t, s):
                return

    def _write(self, window: str, lim: RateLimit, n: int, t: int, s: _Slice) -> bool:
        slice_id = secrets.token_hex(4)
        item = RateWindow(window)
        condition = RateWindow.slices[slice_id].does_not_exist()
        if lim.rpm:
            condition &= RateWindow.requests.does_not_exist() | (RateWindow.requests <= lim.rpm - n)
        if lim.tpm:
            condition &= RateWindow.tokens.does_not_exist() | (RateWindow.tokens <= lim.tpm - t)
        actions = [RateWindow.requests.add(n), RateWindow.tokens.add(t), RateWindow.slices[slice_id].set(n),
                   RateWindow.expires_at.set(datetime.fromtimestamp(int(window.rsplit("#", 1)[1]) * 60 + 3600, UTC))]

        def attempt():
            item.update(actions=actions, condition=condition)
        for _ in range(2):
            try:
                dynamo.call(attempt, idempotent=False, what="rate limit")
                with self._lock:
                    s.requests, s.tokens = s.requests + n, s.tokens + t
                    s.seen_requests, s.seen_tokens = int(item.requests or 0), int(item.tokens or 0)
                return True
            except UpdateError as exc:
                if dynamo.response_code(exc) == "ValidationException":     # a new window: no map yet
                    dynamo.put_once(RateWindow(window, requests=0, tokens=0, slices={}), RateWindow.window,
                                    "rate window create")
                    continue
                if not dynamo.is_condition(exc):
                    raise
                current = dynamo.get_or_none(RateWindow, window, what="rate limit read", consistent_read=True)
                applied = current is not None and slice_id in (current.slices.as_dict() if current.slices else {})
                with self._lock:
                    if applied:                 # an earlier attempt landed after all
                        s.requests, s.tokens = s.requests + n, s.tokens + t
                    if current is not None:
                        s.seen_requests, s.seen_tokens = int(current.requests or 0), int(current.tokens or 0)
                return applied
        return False

    def give_back(self, ticket: Ticket) -> None:
        """A call admitted here but refused by its concurrency limit: not counted in the minute."""
        self._give_back(ticket)

    def _give_back(self, ticket: Ticket) -> None:
        """A call refused by a later limit gives back what the earlier ones admitted (in memory)."""
        with self._lock:
            for s, tokens in ticket.taken:
                s.requests += 1
                s.tokens += tokens

    def _refusal(self, lim: RateLimit) -> RateLimited:
        now = self._clock()
        wait = _reset(now)
        what = "requests" if lim.rpm else "tokens"
        who = {"team": "the team"}.get(lim.scope) or (
            f"the team's calls to {lim.scope[6:]}" if lim.scope.startswith("model:") else "this key")
        return RateLimited(f"Rate limit reached for {who}: {lim.rpm or lim.tpm} {what} a minute. Retry after {wait}.",
                           headers={"Retry-After": wait[:-1], **self._lim_headers(lim, None, now)}, should_retry=True)

    def _headers(self, ticket: Ticket, limits: list[RateLimit]) -> dict:
        now, out = self._clock(), {}
        for (s, _), lim in zip(ticket.taken, limits):
            out.update(self._lim_headers(lim, s, now))     # the key's own limit, when it has one, wins
        return out

    @staticmethod
    def _lim_headers(lim: RateLimit, s: _Slice | None, now: float) -> dict:
        """OpenAI's headers. `remaining`: the limit less what this instance knows was taken (the
        window's total at its last carve, less its own slices' unused part) -- other instances'
        calls since then are not known here."""
        out = {}
        for name, limit, seen, free in (("requests", lim.rpm, s.seen_requests if s else None, s.requests if s else 0),
                                        ("tokens", lim.tpm, s.seen_tokens if s else None, s.tokens if s else 0)):
            if limit:
                used = limit if seen is None else max(0, seen - free)
                out[f"x-ratelimit-limit-{name}"] = str(limit)
                out[f"x-ratelimit-remaining-{name}"] = str(max(0, limit - used))
                out[f"x-ratelimit-reset-{name}"] = _reset(now)
        return out


_limiter = Limiter()


def limiter() -> Limiter:
    return _limiter
