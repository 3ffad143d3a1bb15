"""Teams, their API keys, and authentication of both teams and the admin.

Keys are scoped (issue #29; docs/controls.md): a name and an owner, an optional expiry, an
optional list of the models and aliases they may call (domain/scopes.model_allowed, checked where
a model is resolved: inference/targets.py), and a role (domain/scopes.allows, checked where routes
authenticate: api/http.py). Rotation issues a new key and sets the old one's expiry. A key's last
use is kept to the day: written at most once per key per day (per instance, and conditionally,
so instances racing write it once), never on every call. Creating, rotating and revoking a key,
and creating a team, each leave one audit entry in the same transaction (platform/audit.py).
"""
from __future__ import annotations

import hmac
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime

from pynamodb.exceptions import DoesNotExist, PynamoDBException, TransactWriteError, UpdateError

from chalicelib.adapters import bedrock
from chalicelib.adapters.secrets import get_secret
from chalicelib.cache import TTLCache
from chalicelib.config import settings
from chalicelib.domain import ids, keys, scopes
from chalicelib.errors import ApiError, Conflict, InvalidRequest, NotFound, ServiceUnavailable, Unauthorized
from chalicelib.log import logger
from chalicelib.platform import audit
from chalicelib.store import dynamo
from chalicelib.store.models import ApiKey, Team


@dataclass(frozen=True)
class Principal:
    team_id: str | None      # None for the admin
    key_id: str | None
    is_admin: bool = False
    role: str = scopes.FULL
    models: tuple[str, ...] | None = None    # the models and aliases it may call; None: any
    expires_at: int | None = None
    session_id: str | None = None            # a console session's id, when it came through one

    def expired(self, now: float | None = None) -> bool:
        return self.expires_at is not None and self.expires_at <= (time.time() if now is None else now)


def team_view(team: Team) -> dict:
    return {"id": team.team_id, "object": "team", "name": team.name, "created_at": team.created_at,
            "mantle_project": team.mantle_project}


def key_status(key: ApiKey, now: float | None = None) -> str:
    if key.revoked_at is not None:
        return "revoked"
    if key.expires_at is not None and key.expires_at <= (time.time() if now is None else now):
        return "expired"
    return "active"


def key_view(key: ApiKey) -> dict:
    return {"id": key.key_id, "object": "api_key", "team_id": key.team_id, "prefix": key.prefix,
            "name": key.name, "owner": key.owner, "role": key.role or scopes.FULL,
            "models": list(key.models) if key.models is not None else None,
            "created_at": key.created_at, "expires_at": key.expires_at, "revoked_at": key.revoked_at,
            "status": key_status(key), "last_used": key.last_used_day,
            "rotated_from": key.rotated_from, "replaced_by": key.replaced_by}


_AUDITED_KEY_FIELDS = ("name", "owner", "role", "models", "expires_at", "revoked_at", "replaced_by", "rotated_from")


def _key_snapshot(key: ApiKey) -> dict:
    """A key as its audit entries record it: never its hash."""
    out = audit.snapshot(key, ("team_id", "prefix") + _AUDITED_KEY_FIELDS) or {}
    if "models" in out:
        out["models"] = list(out["models"])
    return out


def _condition_failed(exc: Exception) -> bool:
    return isinstance(exc, PynamoDBException) and dynamo.is_condition(exc)


def create_team(name: str) -> dict:
    team = Team(ids.new_id("team", 8), name=name, created_at=ids.now())
    try:
        audit.commit(audit.Act("team.created", f"team:{team.team_id}", team.team_id, after={"name": name}),
                     lambda tx: tx.save(team, condition=Team.team_id.does_not_exist()), what="team create")
    except TransactWriteError as exc:  # a 64-bit id collision: surface it rather than overwrite
        if not _condition_failed(exc):
            raise
        raise Conflict("team id collision, retry the request") from exc
    if settings().mantle_projects:
        try:
            team.mantle_project = mantle_project(team.team_id, make=True)
        except ApiError as err:   # Bedrock unavailable: the team's first Bedrock call makes the project
            logger.warning("team project not created yet", extra={"team_id": team.team_id, "error": err.message})
    return team_view(team)


_projects = TTLCache(ttl_seconds=24 * 3600)   # a team's project never changes once made


def mantle_project(team_id: str, *, make: bool = False) -> str | None:
    """The team's own project on Bedrock's OpenAI-compatible endpoint (issue #15); None when
    RFT_MANTLE_PROJECTS is off (that the `OpenAI-Project` header selects a project on AWS is
    UNCONFIRMED), which means Bedrock's default project.

    `make`: made if the team has none yet (team creation, job submission, the reconciler: the
    functions allowed to); otherwise a team without one gets a 503 until the reconciler makes it.
    Made once: the project is found by its `rft-hub-team` tag before one is created (an answer
    lost in a retry), and recorded on the team with a condition, so two instances racing agree."""
    if not settings().mantle_projects:
        return None
    return _projects.get(team_id, lambda: _load_or_make_project(team_id, make))


def ensure_projects() -> int:
    """Makes the Mantle project of every team that has none yet (the reconciler: a team created
    while Bedrock was down). The functions that serve a team's calls then only read it."""
    if not settings().mantle_projects:
        return 0
    made = 0
    for team in Team.scan(filter_condition=Team.mantle_project.does_not_exist()):
        _projects.invalidate(team.team_id)
        mantle_project(team.team_id, make=True)
        made += 1
    return made


def _load_or_make_project(team_id: str, make: bool) -> str:

    team = dynamo.call(lambda: get_team(team_id), idempotent=True, what="team lookup")
    if team.mantle_project:
        return team.mantle_project
    if not make:
        raise ServiceUnavailable("The team's Amazon Bedrock project is not set up yet (Bedrock was unavailable "
                                 "when the team was created); rft-hub's reconciler makes it within minutes.")
    project = bedrock.find_or_create_project(f"rft-hub {settings().stage} {team.name}"[:100],
                                             {"rft-hub-team": team_id, "rft-hub-stage": settings().stage})
    try:
        team.update(actions=[Team.mantle_project.set(project)], condition=Team.mantle_project.does_not_exist())
    except UpdateError as exc:
        if not dynamo.is_condition(exc):
            raise
        return get_team(team_id).mantle_project      # another instance recorded it first
    return project


def get_team(team_id: str) -> Team:
    try:
        return Team.get(team_id, consistent_read=True)
    except DoesNotExist:
        raise NotFound(f"No team with id '{team_id}'", param="team_id") from None


def list_teams() -> list[dict]:
    return sorted((team_view(t) for t in Team.scan()), key=lambda t: t["created_at"])


@dataclass(frozen=True)
class KeySpec:
    """What an admin says about a new key (api/admin.py validates the body into this)."""
    name: str | None = None
    owner: str | None = None
    role: str = scopes.FULL
    models: tuple[str, ...] | None = None
    expires_at: int | None = None


def issue_key(team_id: str, spec: KeySpec | None = None) -> dict:
    spec = spec or KeySpec()
    get_team(team_id)
    if spec.expires_at is not None and spec.expires_at <= ids.now():
        raise InvalidRequest("expires_at must be in the future (unix seconds).", param="expires_at")
    key_id, full_key = keys.generate()
    record = ApiKey(key_id, team_id=team_id, key_hash=keys.hash_key(full_key),
                    prefix=keys.display_prefix(full_key), created_at=ids.now(), name=spec.name, owner=spec.owner,
                    role=spec.role, models=list(spec.models) if spec.models is not None else None,
                    expires_at=spec.expires_at)
    audit.commit(audit.Act("key.created", f"key:{key_id}", team_id, after=_key_snapshot(record)),
                 lambda tx: tx.save(record, condition=ApiKey.key_id.does_not_exist()), what="key create")
    # The full key is returned once and never stored.
    return {**key_view(record), "key": full_key}


def team_keys(team_id: str) -> list[ApiKey]:
    return dynamo.call(lambda: list(ApiKey.by_team.query(team_id)), idempotent=True, what="key list")


def list_keys(team_id: str) -> list[dict]:
    get_team(team_id)
    return [key_view(k) for k in team_keys(team_id)]


def get_key(key_id: str) -> ApiKey:
    found = dynamo.get_or_none(ApiKey, key_id, what="key lookup", consistent_read=True)
    if found is None:
        raise NotFound(f"No API key with id '{key_id}'", param="key_id")
    return found


def key_owner(key_id: str) -> str | None:
    """Who a key says it belongs to (e.g. the Slack user id that may approve pipeline runs)."""
    found = dynamo.get_or_none(ApiKey, key_id, what="api key")
    return found.owner if found is not None else None


def revoke_key(key_id: str) -> dict:
    record = get_key(key_id)
    if record.revoked_at is None:
        before = _key_snapshot(record)
        at = ids.now()
        try:
            audit.commit(audit.Act("key.revoked", f"key:{key_id}", record.team_id, before=before,
                                   after={**before, "revoked_at": at}),
                         lambda tx: tx.update(record, actions=[ApiKey.revoked_at.set(at)],
                                              condition=ApiKey.revoked_at.does_not_exist()), what="key revoke")
            record.revoked_at = at
        except TransactWriteError as exc:
            if not _condition_failed(exc):
                raise
            record = get_key(key_id)          # revoked meanwhile by another call: one entry, theirs
    _key_cache.invalidate(key_id)
    return key_view(record)


def rotate_key(key_id: str, old_expires_at: int) -> dict:
    """A new key with the old one's name, owner, role, models and expiry; the old one keeps working
    until `old_expires_at` (unix s; now or later, never beyond its own expiry), then is refused."""
    old = get_key(key_id)
    now = ids.now()
    if key_status(old, now) != "active":
        raise Conflict(f"API key '{key_id}' is {key_status(old, now)}; only an active key can be rotated.",
                       param="key_id")
    if old.replaced_by is not None:
        raise Conflict(f"API key '{key_id}' was already rotated (replaced by '{old.replaced_by}').", param="key_id")
    if old_expires_at < now:
        raise InvalidRequest("old_key_expires_at must be now or later (unix seconds).", param="old_key_expires_at")
    until = min(old_expires_at, old.expires_at) if old.expires_at is not None else old_expires_at
    new_id, full_key = keys.generate()
    new = ApiKey(new_id, team_id=old.team_id, key_hash=keys.hash_key(full_key), prefix=keys.display_prefix(full_key),
                 created_at=now, name=old.name, owner=old.owner, role=old.role, models=old.models,
                 expires_at=old.expires_at, rotated_from=key_id)
    before = _key_snapshot(old)
    act = audit.Act("key.rotated", f"key:{key_id}", old.team_id, before=before,
                    after={**before, "expires_at": until, "replaced_by": new_id})

    def change(tx):
        tx.save(new, condition=ApiKey.key_id.does_not_exist())
        tx.update(old, actions=[ApiKey.expires_at.set(until), ApiKey.replaced_by.set(new_id)],
                  condition=ApiKey.revoked_at.does_not_exist() & ApiKey.replaced_by.does_not_exist())

    try:
        audit.commit(act, change, what="key rotate")
    except TransactWriteError as exc:
        if not _condition_failed(exc):
            raise
        raise Conflict(f"API key '{key_id}' was revoked or rotated meanwhile.", param="key_id") from None
    old.expires_at, old.replaced_by = until, new_id
    _key_cache.invalidate(key_id)
    return {**key_view(new), "key": full_key, "previous": key_view(old)}


# ---- last use, to the day ------------------------------------------------------------------------

_stamped: dict[str, str] = {}       # key id -> the day this instance last wrote (or saw) its use
_stamped_lock = threading.Lock()


def _today() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%d")


def note_use(key_id: str, known_day: str | None = None) -> None:
    """Records that the key was used today: at most one conditional write per key per day per
    instance (none when its record already says today). Best effort: a failure is logged, never
    the caller's problem."""
    today = _today()
    with _stamped_lock:
        if known_day is not None and known_day >= today:
            _stamped[key_id] = today
        if _stamped.get(key_id) == today:
            return
        _stamped[key_id] = today
        while len(_stamped) > 10_000:
            del _stamped[next(iter(_stamped))]
    try:
        ApiKey(key_id).update(actions=[ApiKey.last_used_day.set(today)],
                              condition=ApiKey.key_id.exists() & (ApiKey.last_used_day.does_not_exist()
                                                                  | (ApiKey.last_used_day < today)))
    except UpdateError as exc:
        # The condition: another instance wrote today already. Anything else (throttled, silent) is
        # not repeated on the next call (that would be the hot write again): another instance, or
        # this one tomorrow, records the use; the day shown may then be a day behind.
        if not dynamo.is_condition(exc):
            logger.warning("key last-use not recorded", extra={"key_id": key_id, "code": dynamo.response_code(exc)})


def principal_for(record: ApiKey, session_id: str | None = None) -> Principal:
    return Principal(team_id=record.team_id, key_id=record.key_id, role=record.role or scopes.FULL,
                     models=tuple(record.models) if record.models is not None else None,
                     expires_at=int(record.expires_at) if record.expires_at is not None else None,
                     session_id=session_id)


class _KeyCache:
    """Keeps verified keys for a short time so warm requests skip DynamoDB.

    Bound: a key revoked through another Lambda instance is honoured within
    RFT_AUTH_CACHE_SECONDS (default 30 s); revocation through this instance at once.
    """

    def __init__(self) -> None:
        self._items: dict[str, tuple[float, str, Principal]] = {}
        self._lock = threading.Lock()

    def get(self, key_id: str, key_hash: str) -> Principal | None:
        with self._lock:
            hit = self._items.get(key_id)
        if not hit or time.monotonic() - hit[0] > settings().auth_cache_seconds:
            return None
        return hit[2] if hmac.compare_digest(hit[1], key_hash) else None

    def put(self, key_id: str, key_hash: str, principal: Principal) -> None:
        with self._lock:
            self._items.pop(key_id, None)
            self._items[key_id] = (time.monotonic(), key_hash, principal)
            while len(self._items) > 10_000:         # bounded: the oldest verified key goes first
                del self._items[next(iter(self._items))]

    def invalidate(self, key_id: str) -> None:
        with self._lock:
            self._items.pop(key_id, None)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


_key_cache = _KeyCache()
_INVALID = "Incorrect API key provided. Pass a valid rft-hub team key as 'Authorization: Bearer <key>'."
_EXPIRED = "This API key has expired (or was rotated and its time ran out); ask an admin for a current key."


def authenticate_team(token: str | None) -> Principal:
    key_id = keys.parse_key_id(token or "")
    if key_id is None:
        raise Unauthorized(_INVALID)
    presented_hash = keys.hash_key(token)
    cached = _key_cache.get(key_id, presented_hash)
    if cached:
        if cached.expired():           # the expiry is checked on every call, cached or not
            raise Unauthorized(_EXPIRED)
        note_use(key_id)
        return cached
    try:
        record = dynamo.call(lambda: ApiKey.get(key_id, consistent_read=True), idempotent=True, what="key lookup")
    except DoesNotExist:
        raise Unauthorized(_INVALID) from None
    if record.revoked_at is not None or not hmac.compare_digest(record.key_hash, presented_hash):
        raise Unauthorized(_INVALID)
    principal = principal_for(record)
    if principal.expired():
        raise Unauthorized(_EXPIRED)
    _key_cache.put(key_id, presented_hash, principal)
    note_use(key_id, record.last_used_day)
    return principal


def authenticate_admin(token: str | None) -> Principal:
    expected = get_secret(settings().admin_key_secret_id)
    if not token or not token.isascii() or not hmac.compare_digest(token.encode(), expected.encode()):
        raise Unauthorized("Incorrect admin key.")
    return Principal(team_id=None, key_id=None, is_admin=True)
