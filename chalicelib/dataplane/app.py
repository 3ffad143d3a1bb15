"""The data plane's ASGI app: POST /v1/chat/completions and POST /v1/responses, streamed.

A request is handled in two steps. First, in a worker thread, exactly what a Chalice route does
(api/http.py: the team key, the JSON body rules, the OpenAI error envelope, a deadline) and the
gateway call itself (inference/gateway.py): a plain call comes back answered; a streamed call
comes back opened -- its worst case held against the budget and Bedrock's 200 in hand -- or as
an error (a 429 insufficient_quota, a 404, Bedrock's own error ...) before any byte is sent.
Second, a streamed call is relayed: one thread reads Bedrock's events and hands each to the
event loop, which sends it on at once. The call is metered when the upstream ends, and the
response ends only after that, so the function is never frozen with a hold open; a caller who
goes away stops the sending, never the reading (the usage is in the upstream's last event).
A plain call's answer is sent whole (with its Content-Length) and then, before the response ends,
the call is booked: its ledger entry written, its cost put on the instance's slice
(`AnsweredThenBooked`). The caller has every byte before the ledger write starts; the invocation
does not end before it: with Lambda Web Adapter in response-stream mode the invocation lasts as
long as the response, and Lambda freezes the environment only once it has ended ("Once you send
the response from the function, the Lambda service freezes the runtime environment", AWS
Compute blog; LWA's maintainer: background work after the handler returns does not run,
aws-lambda-web-adapter#404). So no booking is left to a frozen environment: the worst that can
happen is that a slice is not given back (the instance froze idle, or was killed), and then its
money stays set aside until the reconciler settles it from the ledger -- reserved, never unbilled.
"""
from __future__ import annotations

import asyncio
import contextvars
import hmac
import json
import os
import threading
import time
import uuid

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from chalicelib import deadline
from chalicelib.api import http
from chalicelib.dataplane import READY_PATH, ROUTES
from chalicelib.domain import ids, numbers
from chalicelib.errors import ApiError, NotFound
from chalicelib.inference import gateway
from chalicelib.inference.stream import Stream
from chalicelib.log import logger

# A streamed integration may run 15 minutes (API Gateway's and Lambda's limit); the function's
# own remaining time, when Lambda Web Adapter passes it, is used instead.
STREAM_SECONDS = 900.0
SERVICES = {"/v1/chat/completions": gateway.chat_completions, "/v1/responses": gateway.responses}


# Lambda Web Adapter passes API Gateway's request context and the Lambda deadline as these headers.
# A caller can send them too: they are read only from the adapter (`_adapter_headers`).
ADAPTER_HEADERS = ("x-amzn-request-context", "x-amzn-lambda-context")
# The local API Gateway (local/api_gateway.py) plays the adapter: it proves it with this header,
# carrying a secret made per process (`create_app(adapter_token=...)`); callers never know it.
ADAPTER_TOKEN_HEADER = "x-rft-adapter-token"


def behind_lambda_web_adapter() -> bool:
    """Deployed, the function runs behind Lambda Web Adapter (deploy/template.py sets its mode)."""
    return bool(os.environ.get("AWS_LWA_INVOKE_MODE"))


def _adapter_headers(pairs: list[tuple[str, str]], adapter_token: str | None) -> dict[str, str]:
    """The adapter's headers when they come from the adapter, else none (a fresh request id and
    the default deadline). Locally: only with the local API Gateway's token. Deployed behind LWA:
    UNCONFIRMED whether LWA overwrites a client's own copy of these headers or adds its own beside
    it, so a header sent more than once is not trusted at all (if LWA overwrites, one copy
    arrives: LWA's; if it appends, two arrive: neither is used)."""
    lowered = [(k.lower(), v) for k, v in pairs]
    if adapter_token is not None:
        sent = [v for k, v in lowered if k == ADAPTER_TOKEN_HEADER]
        if len(sent) != 1 or not hmac.compare_digest(sent[0].encode(), adapter_token.encode()):
            return {}
    elif not behind_lambda_web_adapter():
        return {}
    out = {}
    for name in ADAPTER_HEADERS:
        values = [v for k, v in lowered if k == name]
        if len(values) == 1:
            out[name] = values[0]
    return out


def _request_id(headers: dict[str, str]) -> str:
    """API Gateway's request id (Lambda Web Adapter passes the request context as a header),
    when it is one; a fresh one otherwise."""
    try:
        rid = str(json.loads(headers.get("x-amzn-request-context") or "{}").get("requestId") or "")
        return str(uuid.UUID(rid))
    except (ValueError, AttributeError, TypeError):
        return str(uuid.uuid4())


def _seconds(headers: dict[str, str]) -> float:
    """What this invocation may use: the Lambda deadline Lambda Web Adapter passes along
    (`x-amzn-lambda-context`), within a stream's 15 minutes."""
    class _Context:
        def __init__(self, ms: float) -> None:
            self.ms = ms

        def get_remaining_time_in_millis(self) -> float:
            return self.ms

    try:
        at_ms = numbers.to_float(json.loads(headers.get("x-amzn-lambda-context") or "{}")["deadline"])
        context = _Context(at_ms - time.time() * 1000) if at_ms is not None else None
    except (ValueError, KeyError, TypeError, AttributeError):
        context = None
    return deadline.budget_from_context(context, cap=STREAM_SECONDS)


def _envelope(response) -> Response:
    """A Chalice Response (api/http.py builds every error answer) as a Starlette one."""
    return Response(response.body, status_code=response.status_code, headers=response.headers)


def _handle(path: str, headers: dict[str, str], raw: bytes, request_id: str, seconds: float):
    """Worker thread: auth, body, the gateway call. Returns a Starlette Response (answered or
    refused) or an opened Stream."""
    try:
        # Authentication (a console cookie reads DynamoDB twice) answers within API Gateway's 29 s,
        # whatever a stream may be allowed afterwards.
        with deadline.running(min(seconds, deadline.budget_from_context(None))):
            principal = http.authenticate("team", headers, "POST", path)
        body = http.parse_json_body(raw, None)
        with deadline.running(seconds):
            result = SERVICES[path](principal, request_id, body, defer=True)
        if isinstance(result, Stream):
            return result
        return AnsweredThenBooked(result.body, result.status, result.content_type,
                                  {**result.headers, "x-request-id": request_id}, result.after, seconds)
    except Exception as exc:  # noqa: BLE001 - mapped as the Chalice routes map it (api/http.py)
        return _envelope(http.error_response(http.error_for(exc, path, request_id), request_id))


def _book(book, seconds: float) -> None:
    with deadline.running(seconds):
        book()


class AnsweredThenBooked(Response):
    """The whole answer first (a caller reading to its Content-Length is done), then the call's
    booking, then the end of the response -- and with it of the invocation."""

    def __init__(self, body: bytes, status: int, media_type: str, headers: dict, book, seconds: float) -> None:
        super().__init__(body, status_code=status, media_type=media_type, headers=headers)
        self.book, self.seconds = book, seconds

    async def __call__(self, scope, receive, send) -> None:
        sending = True
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            await send({"type": "http.response.body", "body": self.body, "more_body": self.book is not None})
        except OSError:             # the caller went away: the call was served all the same
            sending = False
        if self.book is None:
            return
        try:
            await run_in_threadpool(_book, self.book, self.seconds)
        finally:
            if sending:
                try:
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
                except OSError:
                    pass


class StreamedCall(Response):
    """Sends a Stream's events as they come. A thread iterates the stream (reading
    Bedrock, metering at the end); the event loop only forwards. The response completes when
    the stream is metered, even if the caller has gone (sending to a closed connection is a no-op)."""

    def __init__(self, stream: Stream, request_id: str, seconds: float) -> None:
        # No body and so no Content-Length (as starlette's StreamingResponse): the answer is chunked.
        self.status_code, self.media_type, self.background = stream.status, stream.content_type, None
        self.init_headers({**stream.headers, "x-request-id": request_id, "cache-control": "no-cache"})
        self.stream, self.request_id, self.seconds = stream, request_id, seconds

    def _pump(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue) -> None:
        def hand(item) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:            # the loop is gone (server stopping): keep reading, to meter
                pass
        try:
            with deadline.running(self.seconds):
                for chunk in self.stream:
                    hand(chunk)
        except BaseException:  # noqa: BLE001 - the stream meters itself; this is a bug if it happens
            logger.exception("stream relay failed", extra={"request_id": self.request_id})
        finally:
            hand(None)

    async def __call__(self, scope, receive, send) -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        context = contextvars.copy_context()
        threading.Thread(target=context.run, args=(self._pump, loop, queue), daemon=True,
                         name=f"stream-{self.request_id[:8]}").start()
        sending = True
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        except OSError:
            sending = False
        while (chunk := await queue.get()) is not None:
            if sending:
                try:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                except OSError:             # the caller went away: the relay goes on, unsent
                    sending = False
        if sending:
            try:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            except OSError:
                pass


async def _serve(request: Request) -> Response:
    started = time.perf_counter()
    pairs = request.headers.items()
    headers = {k.lower(): v for k, v in pairs if k.lower() not in ADAPTER_HEADERS + (ADAPTER_TOKEN_HEADER,)}
    adapter = _adapter_headers(pairs, request.app.state.adapter_token)
    request_id = _request_id(adapter)
    seconds = _seconds(adapter)
    raw = await request.body()
    outcome = await run_in_threadpool(_handle, request.url.path, headers, raw, request_id, seconds)
    streamed = isinstance(outcome, Stream)
    logger.info("request", extra={"method": request.method, "path": request.url.path, "request_id": request_id,
                                  "status": outcome.status if streamed else outcome.status_code, "stream": streamed,
                                  "latency_ms": round((time.perf_counter() - started) * 1000, 2)})
    if streamed:
        return StreamedCall(outcome, request_id, seconds - (time.perf_counter() - started))
    return outcome


async def _ready(request: Request) -> Response:
    return PlainTextResponse("ok")


async def _unknown(request: Request, exc: HTTPException) -> Response:
    """Unknown routes (404) and methods (405) on the data plane's own port: the OpenAI envelope,
    as the local API Gateway answers them, never Starlette's plain text."""
    shown = f"{request.method} {ids.redact_keys(request.url.path)[:200]}"
    allowed = (exc.headers or {}).get("Allow")
    err = (NotFound(f"Unknown request URL: {shown}.", code="unknown_url") if exc.status_code == 404 else
           ApiError(f"Unknown request URL: {shown} (this path allows {allowed}).", code="method_not_allowed",
                    headers={"Allow": allowed} if allowed else None))
    err.status = exc.status_code
    return _envelope(http.error_response(err, str(uuid.uuid4())))


def create_app(adapter_token: str | None = None) -> Starlette:
    """`adapter_token`: the local API Gateway's secret (see ADAPTER_TOKEN_HEADER); None deployed."""
    routes = [Route(path, _serve, methods=[method]) for method, path in ROUTES]
    routes.append(Route(READY_PATH, _ready, methods=["GET"]))
    app = Starlette(routes=routes, exception_handlers={404: _unknown, 405: _unknown})
    app.state.adapter_token = adapter_token
    return app


app = create_app()
