"""The upstream call itself: Bedrock's Mantle endpoint or, for Amazon Nova, Converse; deadlines that
fit the request (the first answer within the upstream's time, then an idle limit between events).
"""
from __future__ import annotations

import time

from chalicelib import deadline, tracing
from chalicelib.adapters import bedrock
from chalicelib.config import settings
from chalicelib.inference import converse as nova_converse
from chalicelib.inference.targets import Target
from chalicelib.platform import teams

# The longest a stream may wait for Bedrock's next event (API Gateway ends a stream idle for 5 minutes).
STREAM_IDLE_SECONDS = 60.0


def upstream_deadline() -> float:
    """Seconds the upstream call may take: what the request has left (API Gateway gives up at
    29 s), keeping time to write the bill afterwards."""
    return max(0.5, min(settings().bedrock_retry_deadline_seconds, deadline.remaining() - 1.0))


def open_upstream(team_id: str, endpoint: str, body: dict):
    """POSTs a streamed request; returns the upstream's open response once Bedrock answered
    200 (429/5xx before that are retried; a final error keeps Bedrock's status and type)."""
    import httpx2

    limit = upstream_deadline()
    until = time.monotonic() + limit

    def op(c):
        # Bedrock's first answer is waited for only as long as the call has left (then a 504,
        # retried within the deadline); from then on the wait between events is the stream's
        # idle limit. The SDK's stream wrapper is used only for its open response.
        first = max(0.5, min(STREAM_IDLE_SECONDS, until - time.monotonic()))
        opened = c.with_options(timeout=httpx2.Timeout(first, connect=min(5.0, first))).post(
            endpoint, body=body, cast_to=object, stream=True)
        _idle_limit(opened.response.request, STREAM_IDLE_SECONDS)
        return opened
    with tracing.subsegment("upstream stream open"):    # a fixed name: never the model, the body or the key
        stream = bedrock.call(op, what=f"POST {endpoint} (stream)", deadline_s=limit, passthrough=True,
                              project=teams.mantle_project(team_id))
    return stream.response


def _idle_limit(request, seconds: float) -> None:
    """The read timeout of an opened response's body: httpcore reads it from the request's
    `timeout` extension when the body is first read (after this). Without that extension the
    body keeps the first answer's timeout: shorter, so a stream never waits longer than said."""
    timeouts = getattr(request, "extensions", {}).get("timeout")
    if isinstance(timeouts, dict):
        timeouts["read"] = seconds


def send(team_id: str, target: Target, endpoint: str, body: dict,
         converse: nova_converse.ConverseCall | None = None) -> tuple[int, str, bytes]:
    """One plain upstream call for a team: Converse for a model Converse serves (Amazon Nova),
    otherwise Bedrock's OpenAI-compatible endpoint in the team's project. Returns (status,
    content type, raw body); an upstream error keeps Bedrock's status and type."""
    converse = converse or nova_converse.converse_call(team_id, target, endpoint, body)
    with tracing.subsegment("upstream"):                # a fixed name: never the model, the body or the key
        if converse:
            return converse.call(upstream_deadline())
        return bedrock.forward(endpoint, body, upstream_deadline(), project=teams.mantle_project(team_id))
