"""Amazon Bedrock's OpenAI-compatible ("Mantle") endpoint, through the openai SDK.

Thin on purpose: token handling, retries with backoff and jitter inside a
deadline, and error mapping. What to send is decided by the contexts and domain.

Endpoint: AWS_ENDPOINT_URL_BEDROCK_MANTLE when set (local stack), otherwise
https://bedrock-mantle.<region>.api.aws, the documented host; `/v1` is appended.
Auth: a short-term `bedrock-api-key-...` bearer token from aws-bedrock-token-generator,
cached and re-minted before expiry and on a 401/403.
Projects (issue #15): every team-scoped call takes `project`, sent as `OpenAI-Project` (the SDK's
`project=`). That this header selects the project on AWS is UNCONFIRMED, so callers pass None
unless RFT_MANTLE_PROJECTS is on (platform/teams.mantle_project), and None means Bedrock's default.
"""
from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from typing import TYPE_CHECKING, Any, TypeVar

from chalicelib.config import settings
from chalicelib.errors import ApiError, GatewayTimeout, NotFound, RateLimited, UpstreamError
from chalicelib.log import logger

if TYPE_CHECKING:   # the SDK costs ~0.4 s to import: only the calls that reach Bedrock pay for it
    import openai

T = TypeVar("T")
_TOKEN_LIFETIME = timedelta(hours=1)
_REMINT_MARGIN_SECONDS = 300
RETRYABLE_STATUS = {408, 409, 429, 500, 502, 503, 504}


class BedrockRejected(ApiError):
    """Bedrock refused the request as invalid (a 4xx other than 429/401/403)."""
    status = 400
    code = "bedrock_rejected"


def base_url() -> str:
    endpoint = os.environ.get("AWS_ENDPOINT_URL_BEDROCK_MANTLE") or \
        f"https://bedrock-mantle.{settings().region}.api.aws"
    return endpoint.rstrip("/") + "/v1"


class _Session:
    """One SDK client per process, rebuilt whenever the token is re-minted, and one copy of it
    per project (sharing its connection pool), bounded by the number of teams."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._client: openai.OpenAI | None = None
        self._projects: dict[str, openai.OpenAI] = {}
        self._minted_at = 0.0

    def client(self, force_new_token: bool = False, project: str | None = None) -> openai.OpenAI:
        import openai
        from aws_bedrock_token_generator import provide_token

        with self._lock:
            expired = time.time() - self._minted_at > _TOKEN_LIFETIME.total_seconds() - _REMINT_MARGIN_SECONDS
            if self._client is None or expired or force_new_token:
                token = provide_token(region=settings().region, expiry=_TOKEN_LIFETIME)
                # max_retries=0: retries are ours (deadline-bound, logged, mapped).
                self._client = openai.OpenAI(base_url=base_url(), api_key=token, max_retries=0,
                                             timeout=openai.Timeout(60.0, connect=5.0))
                self._projects = {}
                self._minted_at = time.time()
            if project is None:
                return self._client
            scoped = self._projects.get(project)
            if scoped is None:
                if len(self._projects) >= 1024:
                    self._projects.clear()
                scoped = self._projects[project] = self._client.with_options(project=project)
            return scoped


_session = _Session()


def _message(exc: openai.APIStatusError) -> str:
    body = exc.body if isinstance(exc.body, dict) else {}
    err = body.get("error") if isinstance(body.get("error"), dict) else body
    return str((err or {}).get("message") or exc.message)


class UpstreamStatus(ApiError):
    """An upstream error passed through with Bedrock's own status and type (the gateway)."""

    def __init__(self, status: int, message: str, type_: str | None, code: str | None):
        super().__init__(message, code=code)
        self.status = status
        self.type = type_ or ("server_error" if status >= 500 else "invalid_request_error")


def call(op: Callable[[openai.OpenAI], T], *, what: str, deadline_s: float | None = None,
         passthrough: bool = False, project: str | None = None) -> T:
    """Runs `op(client)` with retries on throttling, 5xx and connection errors.

    passthrough: a final upstream error keeps Bedrock's status and type (for the gateway).
    project: the Mantle project the call belongs to (None: Bedrock's default)."""
    import openai

    deadline = time.monotonic() + (deadline_s or settings().bedrock_retry_deadline_seconds)
    attempt = 0
    reminted = False
    while True:
        attempt += 1
        left = deadline - time.monotonic()
        client = _session.client(project=project)
        if left < 60.0:   # each attempt's timeout fits in what is left of the caller's time
            client = client.with_options(timeout=openai.Timeout(max(0.5, left), connect=min(5.0, max(0.5, left))))
        try:
            return op(client)
        except openai.APIStatusError as exc:
            status = exc.status_code
            if status in (401, 403) and not reminted:
                reminted = True          # an expired or rotated token: mint once more
                _session.client(force_new_token=True)
                continue
            retryable = status in RETRYABLE_STATUS
            if retryable and time.monotonic() < deadline:
                _sleep(attempt, exc.response.headers.get("retry-after"), deadline)
                continue
            logger.warning("bedrock call failed", extra={"op": what, "status": status, "attempts": attempt})
            if passthrough and status not in (401, 403):
                body = exc.body if isinstance(exc.body, dict) else {}
                err = body.get("error") if isinstance(body.get("error"), dict) else body
                raise UpstreamStatus(status, f"Amazon Bedrock: {_message(exc)}", (err or {}).get("type"),
                                     (err or {}).get("code")) from None
            raise _map(status, _message(exc), what) from None
        except (openai.APIConnectionError, openai.APITimeoutError) as exc:
            if time.monotonic() < deadline:
                _sleep(attempt, None, deadline)
                continue
            logger.warning("bedrock unreachable", extra={"op": what, "attempts": attempt})
            if isinstance(exc, openai.APITimeoutError):
                raise GatewayTimeout(f"Amazon Bedrock did not answer in time ({what}); nothing was charged "
                                     "for this attempt.") from None
            raise UpstreamError(f"Amazon Bedrock did not answer ({what}): {type(exc).__name__}.") from None


def _sleep(attempt: int, retry_after: str | None, deadline: float) -> None:
    # Full jitter, capped; honour Retry-After when Bedrock sends one.
    delay = random.uniform(0, min(8.0, 0.2 * 2 ** attempt))
    if retry_after:
        try:
            delay = max(delay, float(retry_after))
        except ValueError:
            pass
    time.sleep(max(0.0, min(delay, deadline - time.monotonic())))


def _map(status: int, message: str, what: str) -> ApiError:
    if status == 429:
        return RateLimited(f"Amazon Bedrock is throttling ({what}); retry later. {message}")
    if status == 404:
        return NotFound(f"Amazon Bedrock: {message}")
    if status in (401, 403):
        return UpstreamError(f"rft-hub is not authorised on Amazon Bedrock ({what}).", code="bedrock_auth")
    if 400 <= status < 500:
        return BedrockRejected(f"Amazon Bedrock rejected the request ({what}): {message}")
    return UpstreamError(f"Amazon Bedrock failed ({what}, HTTP {status}): {message}")


# ---- operations used by rft-hub ------------------------------------------------------------

def _dump(obj: Any) -> dict:
    return obj.model_dump(mode="json") if hasattr(obj, "model_dump") else dict(obj)


def upload_file(fileobj, filename: str, project: str | None = None) -> dict:
    def op(c: openai.OpenAI):
        fileobj.seek(0)
        return c.files.create(file=(filename, fileobj, "application/jsonl"), purpose="fine-tune")
    # No blind retry beyond the deadline: an upload is idempotent for us (we record the id once).
    return _dump(call(op, what="files.create", project=project))


def create_job(*, model: str, training_file: str, validation_file: str | None,
               method: dict, project: str | None = None) -> dict:
    kwargs: dict[str, Any] = {"model": model, "training_file": training_file,
                              # The SDK's typed grader union has no "lambda": send the method raw.
                              "extra_body": {"method": method}}
    if validation_file:
        # UNCONFIRMED whether Mantle RFT uses validation_file; it is an OpenAI field, so forward it.
        kwargs["validation_file"] = validation_file
    # Never sent: `suffix` (Bedrock rejects it), `seed` and `metadata` (undocumented on Mantle).
    return _dump(call(lambda c: c.fine_tuning.jobs.create(**kwargs), what="fine_tuning.jobs.create",
                      deadline_s=min(8.0, settings().bedrock_retry_deadline_seconds), project=project))


def retrieve_job(bedrock_job_id: str, project: str | None = None) -> dict:
    return _dump(call(lambda c: c.fine_tuning.jobs.retrieve(bedrock_job_id), what="fine_tuning.jobs.retrieve",
                      project=project))


def cancel_job(bedrock_job_id: str, project: str | None = None) -> dict:
    return _dump(call(lambda c: c.fine_tuning.jobs.cancel(bedrock_job_id), what="fine_tuning.jobs.cancel",
                      project=project))


def list_jobs(limit: int = 100, after: str | None = None, project: str | None = None) -> list[dict]:
    def op(c: openai.OpenAI):
        kw = {"limit": limit}
        if after:
            kw["after"] = after
        return c.fine_tuning.jobs.list(**kw)
    page = call(op, what="fine_tuning.jobs.list", project=project)
    return [_dump(j) for j in page.data]


def list_events(bedrock_job_id: str, limit: int = 100, after: str | None = None,
                project: str | None = None) -> list[dict]:
    """One page, newest first, as the OpenAI API returns them; `after` pages to older events."""
    kwargs = {"limit": limit, **({"after": after} if after else {})}
    page = call(lambda c: c.fine_tuning.jobs.list_events(bedrock_job_id, **kwargs),
                what="fine_tuning.jobs.list_events", project=project)
    return [_dump(e) for e in page.data]


def list_checkpoints(bedrock_job_id: str, limit: int = 100, project: str | None = None) -> list[dict]:
    page = call(lambda c: c.fine_tuning.jobs.checkpoints.list(bedrock_job_id, limit=limit),
                what="fine_tuning.jobs.checkpoints.list", project=project)
    return [_dump(c) for c in page.data]


class ProjectJobs:
    """The job operations of one project, for code that holds a job (`jobs.upstream`): the same
    names as training/nova's, so a job's Bedrock API is picked once."""

    def __init__(self, project: str | None) -> None:
        self.project = project

    def retrieve_job(self, bedrock_job_id: str) -> dict:
        return retrieve_job(bedrock_job_id, project=self.project)

    def cancel_job(self, bedrock_job_id: str) -> dict:
        return cancel_job(bedrock_job_id, project=self.project)

    def list_events(self, bedrock_job_id: str, limit: int = 100, after: str | None = None) -> list[dict]:
        return list_events(bedrock_job_id, limit, after, project=self.project)

    def list_checkpoints(self, bedrock_job_id: str, limit: int = 100) -> list[dict]:
        return list_checkpoints(bedrock_job_id, limit, project=self.project)


def find_or_create_project(name: str, tags: dict[str, str]) -> str:
    """The id of the active project carrying `tags`, created if there is none: a retry after an
    answer that was lost finds the project the first attempt made instead of making another."""
    def find(c: openai.OpenAI) -> str | None:
        after = None
        while True:
            page = c.get("/organization/projects", cast_to=object,
                         options={"params": {"limit": 100, **({"after": after} if after else {})}})
            for project in page.get("data") or []:
                if project.get("status", "active") == "active" and \
                        all((project.get("tags") or {}).get(k) == v for k, v in tags.items()):
                    return project["id"]
            if not page.get("has_more") or not page.get("data"):
                return None
            after = page["data"][-1]["id"]

    found = call(find, what="organization.projects.list")
    if found:
        return found
    created = call(lambda c: c.post("/organization/projects", body={"name": name, "tags": tags}, cast_to=object),
                   what="organization.projects.create")
    return created["id"]


def ping() -> None:
    call(lambda c: c.with_options(timeout=3.0).models.list(), what="models.list", deadline_s=1.0)


def forward(path: str, body: dict, deadline_s: float, project: str | None = None) -> tuple[int, str, bytes]:
    """POSTs an OpenAI-compatible request as given; returns (status, content type, raw body).
    A final upstream error keeps Bedrock's status and type."""
    import httpx2

    resp = call(lambda c: c.post(path, body=body, cast_to=httpx2.Response), what=f"POST {path}",
                deadline_s=deadline_s, passthrough=True, project=project)
    return resp.status_code, resp.headers.get("content-type", "application/json"), resp.content
