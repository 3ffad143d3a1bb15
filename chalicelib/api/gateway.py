"""The inference gateway: /v1/chat/completions and /v1/responses."""
from __future__ import annotations

from chalice import Blueprint, Response

from chalicelib.api.http import Request, route
from chalicelib.services import gateway

bp = Blueprint(__name__)


def _reply(reply: gateway.Reply) -> Response:
    return Response(body=reply.body.decode("utf-8"), status_code=reply.status,
                    headers={"Content-Type": reply.content_type, **reply.headers})


@route(bp, "/v1/chat/completions", ("POST",), json_body=True, produces="text/event-stream")
def chat_completions(req: Request):
    return _reply(gateway.chat_completions(req.principal, req.request_id, req.body))


@route(bp, "/v1/responses", ("POST",), json_body=True)
def responses(req: Request):
    return _reply(gateway.responses(req.principal, req.request_id, req.body))
