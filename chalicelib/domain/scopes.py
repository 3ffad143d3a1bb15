"""What a scoped key may do (issue #29): its role by route shape, its models by name. Pure.

A key's role decides which routes it may call, judged from the route's METHOD and its registered
PATH PATTERN (e.g. "/v1/models/{model_id}"), never from a list of view functions, so a route added
later is covered by the rule of its shape (api/http.py `authenticate` is the one caller):

* `full`: every team route (what every key could do before roles).
* `inference`: calling models (POST chat completions and responses) and reading what they cost
  and what there is (GET under /v1/models, /v1/usage, /v1/budget, /v1/me). Nothing that trains,
  uploads, grades, evaluates or changes an alias.
* `read`: GET (and HEAD) routes only, for dashboards and the console.

A caller that does not say which route it serves (method or pattern None) gets `full` keys only:
an unknown route is refused to a scoped key rather than guessed at.
"""
from __future__ import annotations

from collections.abc import Iterable

FULL, INFERENCE, READ = "full", "inference", "read"
ROLES = (FULL, INFERENCE, READ)

_SAFE = ("GET", "HEAD")
INFERENCE_CALLS = frozenset({("POST", "/v1/chat/completions"), ("POST", "/v1/responses")})
INFERENCE_READS = ("/v1/models", "/v1/usage", "/v1/budget", "/v1/me")

MAX_MODELS = 50           # entries of a key's model list
MAX_MODEL_CHARS = 256     # as api/http.py's MAX_ID_CHARS


def _under(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix + "/")


def allows(role: str | None, method: str | None, path: str | None) -> bool:
    """Whether a key of `role` may call the route `method path` (path: the registered pattern)."""
    role = role or FULL
    if role == FULL:
        return True
    if not method or not path or role not in ROLES:
        return False
    method = method.upper()
    if role == READ:
        return method in _SAFE
    if (method, path) in INFERENCE_CALLS:
        return True
    return method in _SAFE and any(_under(path, prefix) for prefix in INFERENCE_READS)


def describe(role: str | None) -> str:
    return {READ: "GET routes only", INFERENCE: "chat completions, responses, models, usage and budget only"
            }.get(role or FULL, "every team route")


def model_allowed(allowed: Iterable[str] | None, requested: str, *, alias: str | None = None,
                  upstream: str | None = None) -> bool:
    """Whether a key limited to `allowed` (None: no limit) may call the model string `requested`.

    Allowed: the name as requested; or the alias it resolves through (so `alias@3`, a version of an
    allowed alias, is allowed); or the model it resolves to (a key allowed a tuned model may call it
    through any alias pointing at it). Not the reverse: a key allowed an alias may not name the
    alias's current model directly, since the alias may move and the key is scoped to the name."""
    if allowed is None:
        return True
    names = set(allowed)
    return requested in names or (alias is not None and alias in names) or (upstream is not None and upstream in names)


def check_models(value) -> tuple[str, ...] | None:
    """A key's model list as given (None: any model), or ValueError saying what is wrong."""
    if value is None:
        return None
    if not isinstance(value, list) or not value or len(value) > MAX_MODELS:
        raise ValueError(f"must be a list of 1-{MAX_MODELS} model ids or aliases, or null for any model")
    out = []
    for item in value:
        if not isinstance(item, str) or not item.strip() or len(item) > MAX_MODEL_CHARS:
            raise ValueError(f"each entry must be a model id or alias of 1-{MAX_MODEL_CHARS} characters")
        if item not in out:
            out.append(item)
    return tuple(out)
