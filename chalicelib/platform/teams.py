"""Teams, their API keys, and authentication of both teams and the admin."""
from __future__ import annotations

import hmac
import threading
import time
from dataclasses import dataclass

from pynamodb.exceptions import DoesNotExist, PutError, UpdateError

from chalicelib.adapters import bedrock
from chalicelib.adapters.secrets import get_secret
from chalicelib.cache import TTLCache
from chalicelib.config import settings
from chalicelib.domain import ids, keys
from chalicelib.errors import ApiError, Conflict, NotFound, ServiceUnavailable, Unauthorized
from chalicelib.log import logger
from chalicelib.store import dynamo
from chalicelib.store.models import ApiKey, Team


@dataclass(frozen=True)
class Principal:
    team_id: str | None      # None for the admin
    key_id: str | None
    is_admin: bool = False


def team_view(team: Team) -> dict:
    return {"id": team.team_id, "object": "team", "name": team.name, "created_at": team.created_at,
            "mantle_project": team.mantle_project}


def key_view(key: ApiKey) -> dict:
    return {"id": key.key_id, "object": "api_key", "team_id": key.team_id, "prefix": key.prefix,
            "created_at": key.created_at, "revoked_at": key.revoked_at}


def create_team(name: str) -> dict:
    team = Team(ids.new_id("team", 8), name=name, created_at=ids.now())
    try:
        team.save(condition=Team.team_id.does_not_exist())
    except PutError as exc:  # a 64-bit id collision: surface it rather than overwrite
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


def issue_key(team_id: str) -> dict:
    get_team(team_id)
    key_id, full_key = keys.generate()
    record = ApiKey(key_id, team_id=team_id, key_hash=keys.hash_key(full_key),
                    prefix=keys.display_prefix(full_key), created_at=ids.now())
    record.save(condition=ApiKey.key_id.does_not_exist())
    # The full key is returned once and never stored.
    return {**key_view(record), "key": full_key}


def list_keys(team_id: str) -> list[dict]:
    get_team(team_id)
    return [key_view(k) for k in ApiKey.by_team.query(team_id)]


def revoke_key(key_id: str) -> dict:
    try:
        record = ApiKey.get(key_id, consistent_read=True)
    except DoesNotExist:
        raise NotFound(f"No API key with id '{key_id}'", param="key_id") from None
    if record.revoked_at is None:
        record.update(actions=[ApiKey.revoked_at.set(ids.now())],
                      condition=ApiKey.revoked_at.does_not_exist())
    _key_cache.invalidate(key_id)
    return key_view(record)


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


def authenticate_team(token: str | None) -> Principal:
    key_id = keys.parse_key_id(token or "")
    if key_id is None:
        raise Unauthorized(_INVALID)
    presented_hash = keys.hash_key(token)
    cached = _key_cache.get(key_id, presented_hash)
    if cached:
        return cached
    try:
        record = dynamo.call(lambda: ApiKey.get(key_id, consistent_read=True), idempotent=True, what="key lookup")
    except DoesNotExist:
        raise Unauthorized(_INVALID) from None
    if record.revoked_at is not None or not hmac.compare_digest(record.key_hash, presented_hash):
        raise Unauthorized(_INVALID)
    principal = Principal(team_id=record.team_id, key_id=key_id)
    _key_cache.put(key_id, presented_hash, principal)
    return principal


def authenticate_admin(token: str | None) -> Principal:
    expected = get_secret(settings().admin_key_secret_id)
    if not token or not token.isascii() or not hmac.compare_digest(token.encode(), expected.encode()):
        raise Unauthorized("Incorrect admin key.")
    return Principal(team_id=None, key_id=None, is_admin=True)
