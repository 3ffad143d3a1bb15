"""API Gateway in front of the API Lambda, locally: Chalice's local server plus what API Gateway
does before a request reaches the Lambda, as strictly as AWS.

`chalice local` alone is kinder than AWS in one way and leaks in another:

* It takes a body of any size. API Gateway refuses a body over 10 MB (REST API payload quota),
  and Lambda refuses an event over 6 MB (synchronous invocation quota), where a body of a
  binary media type (rft-hub registers multipart/form-data) is base64-encoded: 4/3 of its size.
  Both are a 413 here, in the OpenAI envelope.
* An unknown route or method gets API Gateway's 403 "Missing Authentication Token", or, when an
  Authorization header is present, "Authorization header requires 'Credential' parameter ...
  Authorization=<the header>": the caller's key, reflected back. Here an unknown route is a 404
  and a method the route lacks a 405 with an `Allow` header, in the OpenAI envelope, repeating
  neither headers nor anything in the path that looks like a key. Deployed, the gateway
  responses in deploy/template.py answer both as 404 (API Gateway cannot tell them apart).

`current_request` is kept per thread, as `chalice local` does it (`create_local_server`): the
server handles requests concurrently. Used by `make run` (`python -m local.api_gateway`) and by
the tests and benchmarks (local/harness.py, `create_server`).

The data plane's routes (chalicelib/dataplane: POST /v1/chat/completions and /v1/responses)
go, as deployed, to their own function: here to the data plane's ASGI app, run by uvicorn in
this process on another loopback port (`serve_dataplane`), behind the same checks. Its answer is
relayed as it comes -- a stream chunk by chunk -- so callers see one service at one base URL.
A caller who goes away closes the connection to the data plane, as API Gateway would.
"""
from __future__ import annotations

import argparse
import base64
import fnmatch
import gc
import http.client
import json
import logging
import os
import re
import secrets
import sys
import threading
import time
import uuid
from urllib.parse import parse_qs, urlsplit

from chalice.local import (
    ChaliceRequestHandler,
    CustomLocalChalice,
    LocalChalice,
    LocalDevServer,
    LocalGatewayException,
    RouteMatcher,
    ThreadedHTTPServer,
)

MAX_BODY_BYTES = 10 * 1024 * 1024          # API Gateway REST API payload quota (10 MB, not adjustable)
MAX_EVENT_BYTES = 6 * 1024 * 1024          # Lambda synchronous invocation request quota (6,291,456 bytes)
# What a real API Gateway proxy event carries beyond what is built below (requestContext
# identity fields, CloudFront/X-Forwarded/X-Amzn-Trace-Id headers, both header maps): an allowance.
EVENT_OVERHEAD_BYTES = 2048
_DRAIN_CHUNK = 1024 * 1024
_DRAIN_LIMIT = 64 * 1024 * 1024            # beyond this an oversized body is not read: the connection is closed
_METHODS = ("GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS")
_KEYLIKE = re.compile(r"(?i)(rfth_|sk-|bedrock-api-key|%)")
DOCS_HINT = "Please check the URL for typos, or see GET /openapi.json for rft-hub's routes."
# Not forwarded to the data plane: hop-by-hop headers, and what Lambda Web Adapter sets itself.
_NOT_FORWARDED = {"connection", "keep-alive", "transfer-encoding", "te", "upgrade", "proxy-connection",
                  "content-length", "x-amzn-request-context", "x-amzn-lambda-context", "x-rft-adapter-token"}
# Proves to the data plane that the x-amzn-* headers come from here (the adapter's role), not a caller.
_ADAPTER_TOKEN = secrets.token_urlsafe(24)
_NOT_RELAYED = {"connection", "keep-alive", "transfer-encoding", "content-length", "date", "server"}


def envelope(message: str, code: str, type_: str = "invalid_request_error") -> bytes:
    return json.dumps({"error": {"message": message, "type": type_, "param": None, "code": code}}).encode()


def shown_path(raw_path: str) -> str:
    """The path as an error message may repeat it: no query string, and no segment that could
    be a credential (anything key-like, percent-encoded or longer than 40 characters)."""
    segments = urlsplit(raw_path).path.split("/")
    safe = ["{redacted}" if len(s) > 40 or _KEYLIKE.search(s) else s for s in segments]
    path = "/".join(safe)
    return path if len(path) <= 200 else path[:200] + "..."


def is_binary(content_type: str, binary_types: list[str]) -> bool:
    """API Gateway's test: the media type (parameters ignored) against binaryMediaTypes, wildcards allowed."""
    media = content_type.split(";")[0].strip().lower()
    return bool(media) and any(fnmatch.fnmatchcase(media, t.lower()) for t in binary_types)


def lambda_event_bytes(method: str, raw_path: str, route: str, captured: dict, headers: dict[str, str],
                       body: bytes | None, binary_types: list[str]) -> int:
    """The size of the proxy event API Gateway would send the API Lambda for this request."""
    split = urlsplit(raw_path)
    query = parse_qs(split.query, keep_blank_values=True)
    content_type = next((v for k, v in headers.items() if k.lower() == "content-type"), "")
    encoded = body is not None and is_binary(content_type, binary_types)
    if body is None:
        payload = None
    elif encoded:
        payload = base64.b64encode(body).decode("ascii")
    else:
        payload = body.decode("utf-8", errors="replace")
    event = {
        "resource": route, "path": split.path, "httpMethod": method,
        "headers": headers, "multiValueHeaders": {k: [v] for k, v in headers.items()},
        "queryStringParameters": {k: v[-1] for k, v in query.items()} or None,
        "multiValueQueryStringParameters": query or None,
        "pathParameters": captured or None, "stageVariables": None,
        "requestContext": {"resourcePath": route, "httpMethod": method, "path": f"/api{split.path}",
                           "stage": "api", "requestId": str(uuid.uuid4()), "protocol": "HTTP/1.1",
                           "identity": {"sourceIp": "127.0.0.1", "userAgent": headers.get("User-Agent")}},
        "body": payload, "isBase64Encoded": encoded,
    }
    return len(json.dumps(event, ensure_ascii=False).encode()) + EVENT_OVERHEAD_BYTES


class ApiGatewayHandler(ChaliceRequestHandler):
    """Chalice's request handler with API Gateway's limits and rft-hub's answers for unknown URLs."""

    dataplane: tuple[str, int] | None = None      # (host, port) of the data plane's ASGI server
    dataplane_routes: frozenset = frozenset()
    _connections = threading.local()              # one keep-alive connection to it per handler thread

    def __init__(self, request, client_address, server, app_object, config) -> None:
        self.app_object = app_object
        super().__init__(request, client_address, server, app_object=app_object, config=config)

    # API Gateway answers without Nagle's delay; the stdlib server writes headers and body in two
    # sends, which with Nagle and delayed ACKs costs ~40 ms an answer on loopback (and holds back
    # each small stream chunk).
    disable_nagle_algorithm = True

    def __getattr__(self, name: str):
        # Any other method token (PROPFIND, TRACE, ...) is answered like an unsupported method,
        # not with http.server's HTML 501 page.
        if name.startswith("do_"):
            return self._generic_handle
        raise AttributeError(name)

    def log_request(self, code="-", size="-") -> None:
        # The access log line without the query string or key-like path segments.
        code = getattr(code, "value", code)
        self.log_message('"%s %s" %s %s', self.command, shown_path(self.path), str(code), str(size))

    # ---- answers that never reach the app ----------------------------------------------------
    def _send_envelope(self, status: int, message: str, code: str, error_type: str,
                       extra: dict[str, str] | None = None) -> None:
        body = envelope(message, code)
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("x-amzn-RequestId", str(uuid.uuid4()))
        self.send_header("x-amzn-ErrorType", error_type)
        for name, value in (extra or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _too_large(self, message: str) -> None:
        self._send_envelope(413, message + " Upload large datasets through /v1/uploads in parts of at most "
                            "4 MiB (docs/api.md, Limits).", "payload_too_large", "RequestTooLargeException")

    def _drain(self, length: int) -> bool:
        """Reads and discards an oversized body so the client gets the answer; False if too big to."""
        if length > _DRAIN_LIMIT:
            self.close_connection = True
            return False
        while length > 0:
            chunk = self.rfile.read(min(_DRAIN_CHUNK, length))
            if not chunk:
                break
            length -= len(chunk)
        return True

    # ---- every request -------------------------------------------------------------------------
    def _generic_handle(self) -> None:
        method = self.command if self.command in _METHODS else None
        try:
            length = int(self.headers.get("content-length") or 0)
        except ValueError:
            length = -1
        if length < 0:
            self.close_connection = True
            self._send_envelope(400, "Invalid Content-Length header.", "invalid_request", "BadRequestException",
                                {"Connection": "close"})
            return
        if length > MAX_BODY_BYTES:
            drained = self._drain(length)
            self._too_large(f"Request body is {length} bytes; API Gateway accepts at most {MAX_BODY_BYTES}.")
            if not drained:
                self.wfile.flush()
            return

        headers, body = self._parse_payload()
        try:
            match = RouteMatcher(list(self.app_object.routes)).match_route(self.path)
        except ValueError:
            match = None
        shown = f"{method or 'an unsupported method'} {shown_path(self.path)}"
        if match is None:
            self._send_envelope(404, f"Unknown request URL: {shown}. {DOCS_HINT}", "unknown_url",
                                "MissingAuthenticationTokenException")
            return
        entries = self.app_object.routes[match.route]
        allowed = sorted(set(entries) | ({"OPTIONS"} if any(e.cors for e in entries.values()) else set()))
        if method not in allowed:
            self._send_envelope(405, f"Unknown request URL: {shown} (this path allows {', '.join(allowed)}). "
                                f"{DOCS_HINT}", "method_not_allowed", "MissingAuthenticationTokenException",
                                {"Allow": ", ".join(allowed)})
            return
        size = lambda_event_bytes(method, self.path, match.route, match.captured, headers, body,
                                  self.app_object.api.binary_types)
        if size > MAX_EVENT_BYTES:
            self._too_large(f"Request body of {len(body or b'')} bytes makes a Lambda event of {size} bytes "
                            f"(binary bodies are base64-encoded); a Lambda invocation takes at most "
                            f"{MAX_EVENT_BYTES}.")
            return
        if self.dataplane and (method, match.route) in self.dataplane_routes:
            self._relay_to_dataplane(method, headers, body)
            return
        try:
            response = self.local_gateway.handle_request(method=method, path=self.path, headers=headers, body=body)
        except LocalGatewayException:
            # Only raised for unmatched routes or authorizers (rft-hub has none): never repeat its
            # message, which can carry the Authorization header.
            self._send_envelope(404, f"Unknown request URL: {shown}. {DOCS_HINT}", "unknown_url",
                                "MissingAuthenticationTokenException")
            return
        out_headers = response["headers"].copy()
        out_headers.update(response["multiValueHeaders"])
        response = self._handle_binary(response)
        self._send_http_response(response["statusCode"], out_headers, response["body"])

    # ---- the data plane ----------------------------------------------------------------------
    def _dataplane_call(self, method: str, headers: dict[str, str], body: bytes) -> http.client.HTTPResponse:
        """Sends the request to the data plane on this thread's keep-alive connection (a fresh
        one if the data plane closed it while idle, before reading anything)."""
        for attempt in (1, 2):
            conn = getattr(self._connections, "conn", None)
            reused = conn is not None
            if conn is None:
                conn = http.client.HTTPConnection(*self.dataplane, timeout=900)
                self._connections.conn = conn
            try:
                conn.request(method, self.path, body=body, headers=headers)
                return conn.getresponse()
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                conn.close()
                self._connections.conn = None
                if not reused or attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _relay_to_dataplane(self, method: str, headers: dict[str, str], body: bytes | None) -> None:
        forwarded = {k: v for k, v in headers.items() if k.lower() not in _NOT_FORWARDED}
        # As Lambda Web Adapter passes API Gateway's request context (and its request id) along.
        forwarded["x-amzn-request-context"] = json.dumps({"requestId": str(uuid.uuid4()), "stage": "api",
                                                          "requestTimeEpoch": int(time.time() * 1000)})
        forwarded["x-rft-adapter-token"] = _ADAPTER_TOKEN
        forwarded["Content-Length"] = str(len(body or b""))
        try:
            resp = self._dataplane_call(method, forwarded, body or b"")
        except OSError:
            self._send_envelope(502, "rft-hub's data plane could not be reached.", "server_error",
                                "InternalServerErrorException")
            return
        self.send_response(resp.status)
        for name, value in resp.getheaders():
            if name.lower() not in _NOT_RELAYED:
                self.send_header(name, value)
        length = resp.getheader("content-length")
        if length is not None:
            data = resp.read()
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            while piece := resp.read1(65536):
                self.wfile.write(b"%x\r\n%b\r\n" % (len(piece), piece))
                self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except OSError:
            # The caller went away: close the data plane's connection, as API Gateway would.
            self.close_connection = True
            conn, self._connections.conn = self._connections.conn, None
            if conn is not None:
                conn.close()

    # The parent binds these names to its own _generic_handle: rebind them to this one.
    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = do_PATCH = do_OPTIONS = _generic_handle


class _Server(ThreadedHTTPServer):
    # The stdlib's listen backlog is 5; API Gateway takes bursts (the tests open 50 connections at once).
    request_queue_size = 256
    allow_reuse_address = True


def serve_dataplane(host: str = "127.0.0.1", port: int = 0):
    """The data plane's ASGI app under uvicorn, in a daemon thread of this process. Returns
    (uvicorn server, port)."""
    import uvicorn

    from chalicelib.dataplane.app import create_app

    server = uvicorn.Server(uvicorn.Config(create_app(adapter_token=_ADAPTER_TOKEN), host=host, port=port,
                                           log_level="warning",
                                           access_log=False, lifespan="off", timeout_keep_alive=60))
    threading.Thread(target=server.run, daemon=True, name="dataplane").start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline:
            raise TimeoutError("the data plane did not start")
        time.sleep(0.01)
    return server, server.servers[0].sockets[0].getsockname()[1]


def create_server(app, config, host: str, port: int, dataplane: tuple[str, int] | None = None) -> LocalDevServer:
    """Like chalice.local.create_local_server (current_request per thread), with ApiGatewayHandler;
    the data plane's routes go to `dataplane` (host, port) when given."""
    from chalicelib.dataplane import ROUTES

    if not isinstance(app, LocalChalice):
        CustomLocalChalice.__bases__ = (LocalChalice, app.__class__)
        app.__class__ = CustomLocalChalice
    handler = type("ApiGatewayHandler", (ApiGatewayHandler,),
                   {"dataplane": dataplane, "dataplane_routes": frozenset(ROUTES)})
    return LocalDevServer(app, config, host, port, handler_cls=handler, server_cls=_Server)


def main() -> None:
    """`chalice local --no-autoreload` with ApiGatewayHandler, and the data plane behind it:
    python -m local.api_gateway --port 8000."""
    from chalice.cli.factory import CLIFactory
    from chalice.deploy.validate import validate_routes

    from local.servers import ROOT

    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--stage", default="local")
    parser.add_argument("--dataplane-port", type=int, default=0, help="the data plane's own port (default: any free)")
    args = parser.parse_args()
    logging.basicConfig(stream=sys.stdout, level=logging.INFO, format="%(message)s")
    # As `chalice local`: the stage's environment variables go into os.environ before the app is imported.
    config = CLIFactory(project_dir=str(ROOT), environ=os.environ).create_config_obj(chalice_stage_name=args.stage)
    validate_routes(config.chalice_app.routes)
    from local import cloudwatch
    cloudwatch.Collector().install()          # this process' EMF lines into moto's CloudWatch
    _, dataplane_port = serve_dataplane(args.host, args.dataplane_port)
    server = create_server(config.chalice_app, config, args.host, args.port, (args.host, dataplane_port))
    gc.freeze()       # as the data plane does (chalicelib/dataplane/__main__.py)
    server.serve_forever()


if __name__ == "__main__":
    main()
