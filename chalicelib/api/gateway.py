"""The inference gateway on the control plane: /v1/chat/completions and /v1/responses.

Deployed, API Gateway sends these two routes to the data plane (chalicelib/dataplane/, which
streams); these views answer them where the Chalice app is called directly (chalice.test, the
in-process benchmarks) and stay in /openapi.json. A streamed call is answered here with the
whole event stream as one body, through the same metered stream.
"""
from __future__ import annotations

from chalice import Blueprint, Response

from chalicelib.api.http import Request, route
from chalicelib.inference import gateway
from chalicelib.inference.stream import Stream

bp = Blueprint(__name__)


def _reply(reply: gateway.Reply | Stream) -> Response:
    body = reply.read_all() if isinstance(reply, Stream) else reply.body
    return Response(body=body.decode("utf-8"), status_code=reply.status,
                    headers={"Content-Type": reply.content_type, **reply.headers})


@route(bp, "/v1/chat/completions", ("POST",), json_body=True, produces="text/event-stream")
def chat_completions(req: Request):
    return _reply(gateway.chat_completions(req.principal, req.request_id, req.body))


# Streamed with stream: true, too; described as JSON only until chalicelib/data/openai-schemas.json
# (OpenAI's trimmed document) carries the Responses API's event-stream schema for it.
@route(bp, "/v1/responses", ("POST",), json_body=True)
def responses(req: Request):
    return _reply(gateway.responses(req.principal, req.request_id, req.body))
