"""The console (issue #18): a browser UI served by rft-hub itself under /console.

Static files only (chalicelib/console: HTML, CSS, JS, no framework, nothing fetched from elsewhere);
every page's data comes from rft-hub's own API, called by the page with the console session. The
shell is served at each page's URL (so links and the evals' `report_url` open directly); the page
routes itself from the path. `<base href>` carries the API Gateway stage prefix when there is one,
so the same files work at https://<api>/<stage>/console and at http://127.0.0.1:8000/console.

Sign-in exchanges a team key or the admin key for a session cookie (platform/console_sessions.py);
the key is never stored in the browser.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from chalice import Blueprint, Response
from pydantic import Field

from chalicelib.api.bodies import StrictModel
from chalicelib.api.http import Request, authenticate, route
from chalicelib.errors import NotFound, UnsupportedMediaType
from chalicelib.platform import console_sessions

bp = Blueprint(__name__)

ROOT = Path(__file__).resolve().parents[1] / "console"
TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8",
         ".svg": "image/svg+xml", ".txt": "text/plain; charset=utf-8"}
PAGES = ("jobs", "models", "evals", "pipelines", "spend", "admin")
# The shell's policy: only this origin's scripts, styles and API; no inline script, no framing.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "base-uri 'self'; form-action 'self'; frame-ancestors 'none'")
SECURITY = {"X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer", "X-Frame-Options": "DENY"}


def _load() -> tuple[dict[str, tuple[str, str]], str, str]:
    """The static files by name (the only names served: no path is ever joined from a request),
    their version (a hash of them all, for cache-busting) and the shell."""
    assets = {}
    for path in sorted((ROOT / "static").iterdir()):
        if path.is_file() and path.suffix in TYPES:
            assets[path.name] = (path.read_text(encoding="utf-8"), TYPES[path.suffix])
    digest = hashlib.sha256()
    for name, (text, _) in assets.items():
        digest.update(name.encode() + b"\0" + text.encode())
    return assets, digest.hexdigest()[:12], (ROOT / "index.html").read_text(encoding="utf-8")


ASSETS, VERSION, SHELL = _load()


def _prefix() -> str:
    """The API Gateway stage in front of the path ("/api"), "" when there is none (custom domain, local)."""
    context = getattr(bp.current_request, "context", None) or {}
    stage, path = context.get("stage"), context.get("path") or ""
    return f"/{stage}" if stage and path.startswith(f"/{stage}/") else ""


def _shell() -> Response:
    html = SHELL.replace("{{BASE}}", f"{_prefix()}/console/").replace("{{VERSION}}", VERSION)
    return Response(body=html, status_code=200, headers={
        "Content-Type": "text/html; charset=utf-8", "Cache-Control": "no-store", "Content-Security-Policy": CSP,
        **SECURITY})


@route(bp, "/console", auth=None, produces="text/html")
def console_home(req: Request):
    """The console (sign-in, then the team's jobs)."""
    return _shell()


@route(bp, "/console/{page}", auth=None, produces="text/html")
def console_page(req: Request, page: str):
    """A console page: jobs, models, evals, spend, admin."""
    if page not in PAGES:
        raise NotFound("No such console page.", param="page")
    return _shell()


@route(bp, "/console/jobs/{job_id}", auth=None, produces="text/html")
def console_job(req: Request, job_id: str):
    """The console's page of a job (its data comes from the API with the session)."""
    return _shell()


@route(bp, "/console/evals/{eval_id}", auth=None, produces="text/html")
def console_eval(req: Request, eval_id: str):
    """The console's page of an eval and its runs."""
    return _shell()


@route(bp, "/console/evals/{eval_id}/runs/{run_id}", auth=None, produces="text/html")
def console_eval_run(req: Request, eval_id: str, run_id: str):
    """The console's page of an eval run (an eval run's report_url)."""
    return _shell()


@route(bp, "/console/pipelines/{pipeline_id}", auth=None, produces="text/html")
def console_pipeline(req: Request, pipeline_id: str):
    """The console's page of a pipeline and its runs."""
    return _shell()


@route(bp, "/console/pipelines/{pipeline_id}/runs/{run_id}", auth=None, produces="text/html")
def console_pipeline_run(req: Request, pipeline_id: str, run_id: str):
    """The console's page of a pipeline run (its steps, comparison, approval)."""
    return _shell()


@route(bp, "/console/static/{asset}", auth=None, produces="text/plain", query={"v": "string"})
def console_asset(req: Request, asset: str):
    """The console's static files (CSS, JS)."""
    found = ASSETS.get(asset)
    if found is None:
        raise NotFound("No such console file.", param="asset")
    text, content_type = found
    cache = "public, max-age=31536000, immutable" if req.query.get("v") == VERSION else "no-cache"
    return Response(body=text, status_code=200, headers={"Content-Type": content_type, "Cache-Control": cache,
                                                          **SECURITY})


# ---- the session ------------------------------------------------------------------------------------

class SignIn(StrictModel):
    key: str = Field(min_length=1, max_length=512)


def _session_response(status: int, body: dict, request_id: str, cookie: str) -> Response:
    return Response(body=json.dumps(body, separators=(",", ":")), status_code=status, headers={
        "Content-Type": "application/json", "Cache-Control": "no-store", "Set-Cookie": cookie,
        "x-request-id": request_id})


@route(bp, "/console/session", ("POST",), auth=None, body=SignIn)
def console_sign_in(req: Request):
    """Sign in with a team key or the admin key: a short-lived session cookie (HttpOnly, Secure,
    SameSite=Strict) and the CSRF token its non-GET requests must send as X-CSRF-Token."""
    # JSON only: a cross-site form (text/plain, no preflight) cannot sign a browser in to another key.
    if req.content_type().split(";")[0].strip().lower() != "application/json":
        raise UnsupportedMediaType("Send the key as JSON: Content-Type: application/json.", param="Content-Type")
    token, session = console_sessions.sign_in(req.body.key)
    return _session_response(200, {**session.view(), "signed_in": True}, req.request_id,
                             console_sessions.set_cookie(token, session.expires_at - session.issued_at))


SIGNED_OUT = {"object": "console.session", "signed_in": False, "principal": None, "team_id": None, "key_id": None,
              "expires_at": None, "csrf_token": None}


@route(bp, "/console/session", auth=None)
def console_session(req: Request):
    """Who the console is signed in as, and the session's CSRF token (null for a bearer key). Signed
    out (no cookie, or one that is expired, signed out or forged) is an answer, not an error: 200
    with `signed_in: false`, so the sign-in page's probe logs nothing in the browser. A bearer key
    is checked as on any route (a wrong one is a 401)."""
    if "authorization" in req.headers:
        p = authenticate("any", req.headers, "GET", "/console/session")
        return {"object": "console.session", "signed_in": True, "principal": "admin" if p.is_admin else "team",
                "team_id": p.team_id, "key_id": p.key_id, "expires_at": None, "csrf_token": None}
    session = console_sessions.current(req.headers)
    return SIGNED_OUT if session is None else {**session.view(), "signed_in": True}


@route(bp, "/console/session", ("DELETE",), auth=None)
def console_sign_out(req: Request):
    """Sign out: the session is revoked server-side and the cookie cleared (an expired or unknown
    session just has its cookie cleared)."""
    session = console_sessions.current(req.headers)
    if session is not None:
        # Authenticated by the cookie alone: the same CSRF rule as every other non-GET request.
        console_sessions.authenticate(req.headers, "any", "DELETE")
        console_sessions.sign_out(session)
    return _session_response(200, {"object": "console.session", "deleted": session is not None}, req.request_id,
                             console_sessions.clear_cookie())
