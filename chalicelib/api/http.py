"""What every route shares: authentication, body parsing, the error envelope, logging.

Views are declared with `@route(bp, path, ...)`; they receive a `Request` and the
path parameters, and return a dict (200), a `(status, dict)` pair or a Chalice
`Response`. Any `ApiError` becomes the OpenAI error envelope; anything else
becomes a 500 with a request id and one log line, never a stack trace.

Ids are checked here, once for every route, so that none reaches DynamoDB over its key limits: a
path parameter over MAX_ID_CHARS characters or outside RFC 3986's path characters is a 404 (an id
that cannot exist does not exist), and a top-level `model` in a JSON body over MAX_ID_CHARS
characters is a 400 naming `model`. JSON bodies are parsed by `datasets.parse_json` (no NaN or
Infinity, at most 64 levels deep).
"""
from __future__ import annotations

import functools
import json
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from chalice import Blueprint, Response
from pynamodb.exceptions import PynamoDBException

from chalicelib import deadline
from chalicelib.config import settings
from chalicelib.domain import keys, numbers, scopes
from chalicelib.domain.datasets import JsonDepthError, parse_json
from chalicelib.domain.keys import bearer_token
from chalicelib.errors import (
    ApiError,
    Forbidden,
    InternalError,
    InvalidRequest,
    NotFound,
    PayloadTooLarge,
    Unauthorized,
)
from chalicelib.log import logger
from chalicelib.platform import audit, console_sessions, teams
from chalicelib.platform.teams import Principal
from chalicelib.store import dynamo

if TYPE_CHECKING:      # pydantic is for the Chalice routes' bodies: the data plane never imports it
    import pydantic

ANY_CONTENT = ["*/*"]
MAX_ID_CHARS = 256
_PATH_ID = re.compile(rf"[A-Za-z0-9._~:@!$&'()*+,;=%/-]{{1,{MAX_ID_CHARS}}}")   # RFC 3986 pchar, and '/'



@dataclass
class Request:
    principal: Principal | None
    headers: dict[str, str]
    query: dict[str, str]
    raw_body: bytes
    request_id: str
    body: Any = None

    @property
    def team_id(self) -> str:
        if not self.principal or not self.principal.team_id:
            raise InvalidRequest("This route needs a team key; the admin key has no team.")
        return self.principal.team_id

    def content_type(self) -> str:
        return self.headers.get("content-type", "")


def json_response(status: int, body: Any, request_id: str, headers: dict | None = None) -> Response:
    out_headers = {"Content-Type": "application/json", "x-request-id": request_id}
    out_headers.update(headers or {})
    return Response(body=json.dumps(body, separators=(",", ":"), default=str),
                    status_code=status, headers=out_headers)


def error_for(exc: Exception, path: str, request_id: str) -> ApiError:
    """The one mapping of a failure to its answer, for the control plane (Chalice) and the data
    plane (streaming) alike: an ApiError as it is; DynamoDB throttled or unreachable is a 503;
    anything else is a 500 with a request id and one log line, never a stack trace."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, PynamoDBException) and dynamo.classify(exc) in (dynamo.BUSY, dynamo.UNKNOWN):
        logger.warning("dynamodb busy", extra={"path": path, "code": dynamo.response_code(exc)})
        return dynamo.busy_error(path)
    logger.exception("unhandled error", extra={"path": path}, exc_info=exc)
    return InternalError(f"The server had an error while processing your request (request id {request_id}).")


def error_response(err: ApiError, request_id: str) -> Response:
    return json_response(err.status, err.body(), request_id, err.headers)


def _field_path(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def validation_error(exc: pydantic.ValidationError, prefix: str = "") -> InvalidRequest:
    first = exc.errors()[0]
    path = _field_path(tuple(first.get("loc", ())))
    if prefix:
        path = f"{prefix}.{path}" if path else prefix
    msg = first.get("msg", "invalid value")
    if first.get("type") == "extra_forbidden":
        msg = "unknown field"
    elif first.get("type") == "missing":
        msg = "field required"
    count = len(exc.errors())
    more = f" (and {count - 1} more error{'s' if count > 2 else ''})" if count > 1 else ""
    return InvalidRequest(f"Invalid '{path}': {msg}{more}.", param=path or None)


def check_path_params(params: dict[str, str]) -> None:
    """404 for a path parameter that cannot be an id (too long, or characters no id has)."""
    for name, value in params.items():
        if not isinstance(value, str) or not _PATH_ID.fullmatch(value):
            raise NotFound(f"No such {name.replace('_', ' ')}: ids are 1-{MAX_ID_CHARS} URL path characters.",
                           param=name)


def check_model_field(body: dict) -> None:
    """400 naming `model` when a body's top-level `model` is longer than any model id can be."""
    model = body.get("model")
    if isinstance(model, str) and len(model) > MAX_ID_CHARS:
        raise InvalidRequest(f"'model' is {len(model):,} characters; a model id is at most {MAX_ID_CHARS}.",
                             param="model")


def parse_json_body(raw: bytes, model: type[pydantic.BaseModel] | None) -> Any:
    if len(raw) > settings().max_json_body_bytes:
        raise PayloadTooLarge(f"Request body is {len(raw)} bytes; the limit is "
                              f"{settings().max_json_body_bytes} bytes.")
    if not raw.strip():
        raise InvalidRequest("Request body must be a JSON object.")
    try:
        data = parse_json(raw)
    except JsonDepthError as exc:
        raise InvalidRequest(f"Request body is {exc}.") from None
    except ValueError as exc:   # syntax, NaN/Infinity, undecodable bytes
        raise InvalidRequest(f"Request body is not valid JSON: {exc}.") from None
    if not isinstance(data, dict):
        raise InvalidRequest("Request body must be a JSON object.")
    check_model_field(data)
    if model is None:
        return data
    import pydantic
    try:
        return model.model_validate(data)
    except pydantic.ValidationError as exc:
        raise validation_error(exc) from None


def _lambda_context(bp: Blueprint):
    try:
        return bp.lambda_context
    except (AttributeError, RuntimeError):   # not registered on an app (a test's own blueprint)
        return None


def _request_id(current) -> str:
    context = getattr(current, "context", None) or {}
    return context.get("requestId") or str(uuid.uuid4())


def authenticate(auth: str | None, headers: dict[str, str], method: str | None = None,
                 path: str | None = None) -> Principal | None:
    """The request's principal for a route whose auth is `auth`, or an ApiError.

    The ONE place a scoped key's role is enforced (issue #29; domain/scopes.py): by the route's
    `method` and registered `path` pattern, so no route can be forgotten. A caller that names no
    route (method or path None) admits only `full` keys: a scoped key is refused, never guessed at."""
    principal = _principal(auth, headers, method)
    if principal is not None and not principal.is_admin and not scopes.allows(principal.role, method, path):
        route_name = f"{method.upper()} {path}" if method and path else "this route"
        raise Forbidden(f"This key's role is '{principal.role}' ({scopes.describe(principal.role)}); it cannot "
                        f"call {route_name}.", code="insufficient_permissions")
    return principal


def _principal(auth: str | None, headers: dict[str, str], method: str | None) -> Principal | None:
    if auth is None:
        return None
    token = bearer_token(headers.get("authorization"))
    if "authorization" not in headers:   # the console's session cookie (issue #18); CSRF-checked unless GET
        principal = console_sessions.authenticate(headers, auth, method)
        if principal is not None:
            return principal
    if token is None:
        raise Unauthorized("Missing API key. Send 'Authorization: Bearer <key>'.")
    if auth == "admin":
        return teams.authenticate_admin(token)
    if auth == "any" and keys.parse_key_id(token) is None:
        return teams.authenticate_admin(token)   # not a team key: only the admin key can pass
    return teams.authenticate_team(token)


def route(bp: Blueprint, path: str, methods: tuple[str, ...] = ("GET",), *,
          auth: str | None = "team", body: type[pydantic.BaseModel] | None = None,
          json_body: bool = False, consumes: str | None = None, produces: str = "application/json",
          query: dict[str, str] | None = None, schema: dict | None = None, body_optional: bool = False) -> Callable:
    """Registers `fn(request, **path_params)` on the blueprint with rft-hub's conventions.

    auth: "team", "admin", "any" (a team key or the admin key) or None.
    consumes/produces/query/schema only describe the route in the OpenAPI document. body: a pydantic
    model to validate a JSON body
    against (unknown fields rejected); json_body=True parses JSON without a model. body_optional: an
    empty body is the model's defaults (the model must have a default for every field).
    """
    def decorate(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def view(**path_params: str) -> Response:
            current = bp.current_request
            request_id = _request_id(current)
            started = time.perf_counter()
            headers = {k.lower(): v for k, v in (current.headers or {}).items()}
            logger.append_keys(request_id=request_id)
            status = 500
            team_id = None
            try:
                raw = current.raw_body or b""
                req = Request(principal=None, headers=headers,
                              query=dict(current.query_params or {}), raw_body=raw,
                              request_id=request_id)
                # Every wait inside (DynamoDB retries, Bedrock) fits in what API Gateway and Lambda allow,
                # authentication's reads included (a console cookie's two reads took 25 s each without).
                with deadline.running(deadline.budget_from_context(_lambda_context(bp))), \
                        audit.acting(None, request_id):
                    req.principal = authenticate(auth, headers, current.method, path)
                    audit.set_actor(req.principal)   # who the audit entries of this request name
                    team_id = req.principal.team_id if req.principal else None
                    check_path_params(path_params)
                    if body is not None and body_optional and not raw.strip():
                        req.body = body()
                    elif body is not None or json_body:
                        req.body = parse_json_body(raw, body)
                    result = fn(req, **path_params)
                if isinstance(result, Response):
                    result.headers.setdefault("x-request-id", request_id)
                    response = result
                elif isinstance(result, tuple):
                    response = json_response(result[0], result[1], request_id)
                else:
                    response = json_response(200, result, request_id)
            except Exception as exc:  # noqa: BLE001 - every failure becomes the envelope
                response = error_response(error_for(exc, current.path, request_id), request_id)
            status = response.status_code
            logger.info("request", extra={
                "method": current.method, "path": current.path, "status": status, "team_id": team_id,
                "latency_ms": round((time.perf_counter() - started) * 1000, 2)})
            return response

        # What the OpenAPI document says about this route (chalicelib/api/openapi.py).
        view.openapi = {"auth": auth, "body": body, "body_optional": body_optional, "json_body": json_body,
                        "consumes": consumes, "produces": produces, "query": query or {}, "schema": schema,
                        "name": fn.__name__,
                        "summary": (fn.__doc__ or fn.__name__.replace("_", " ")).strip().splitlines()[0]}
        bp.route(path, methods=list(methods), content_types=ANY_CONTENT)(view)
        return fn
    return decorate


def query_int(req: Request, name: str, default: int, lo: int, hi: int) -> int:
    raw = req.query.get(name)
    if raw is None or raw == "":
        return default
    if numbers.query_int(raw, -(10 ** 18), 10 ** 18) is None:   # ASCII digits: int() takes '٣', ' 1_0 '
        raise InvalidRequest(f"Query parameter '{name}' must be an integer.", param=name)
    value = numbers.query_int(raw, lo, hi)
    if value is None:
        raise InvalidRequest(f"Query parameter '{name}' must be between {lo} and {hi}.", param=name)
    return value

