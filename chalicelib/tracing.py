"""X-Ray traces through Powertools' `Tracer`, made only where they are recorded.

Every Lambda handler runs in `handler(name)` (app.py's one middleware): a `## <function>`
subsegment annotated with the function's name and whether it was a cold start, and nothing else
-- never a key, a prompt, a webhook URL or a team's text (annotations are indexed and shown to
whoever reads traces). botocore is patched, so DynamoDB (PynamoDB), SQS, EventBridge, Secrets
Manager and the grader Lambda invocations are subsegments of their own; `subsegment(name)`
marks anything else worth seeing (an upstream model call, a judge).

Only httplib-free patching: X-Ray's httplib patch records each request's URL, and a Slack
webhook URL is a credential. The Tracer (aws_xray_sdk: about 0.25 s to import) is created on
first use and only inside Lambda with tracing on; locally and in tests it never loads.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

PATCHED = ("botocore",)
_tracer = None
_cold = True


def enabled() -> bool:
    """Inside Lambda (AWS_LAMBDA_FUNCTION_NAME), not switched off (POWERTOOLS_TRACE_DISABLED), and not
    the data plane: behind Lambda Web Adapter (AWS_LWA_PORT) the web app is a child process whose
    environment never carries an invocation's trace id, so the SDK would find no segment and log an
    error per call; Lambda's own segment (Tracing: Active) traces it there."""
    off = os.environ.get("POWERTOOLS_TRACE_DISABLED", "").lower() in ("1", "true", "yes", "on")
    return bool(os.environ.get("AWS_LAMBDA_FUNCTION_NAME")) and not off and not os.environ.get("AWS_LWA_PORT")


def tracer():
    """The process' Tracer, or None when traces are not recorded here."""
    global _tracer
    if _tracer is None and enabled():
        try:
            from aws_lambda_powertools import Tracer

            _tracer = Tracer(service=os.environ.get("POWERTOOLS_SERVICE_NAME", "rft-hub"), patch_modules=PATCHED)
        except Exception:  # noqa: BLE001 - untraced beats down: a missing SDK never fails a handler
            _tracer = False
    return _tracer or None


@contextlib.contextmanager
def subsegment(name: str) -> Iterator[object | None]:
    """A subsegment named `name` (a fixed label: never built from a request's content)."""
    t = tracer()
    if t is None:
        yield None
        return
    try:
        cm = t.provider.in_subsegment(name=name)
        segment = cm.__enter__()
    except Exception:  # noqa: BLE001 - no active segment (outside an invocation): run untraced
        yield None
        return
    try:
        yield segment
    except BaseException as exc:
        cm.__exit__(type(exc), exc, exc.__traceback__)
        raise
    cm.__exit__(None, None, None)


@contextlib.contextmanager
def handler(function_name: str) -> Iterator[None]:
    """One invocation of a Lambda handler: its subsegment and annotations."""
    global _cold
    cold, _cold = _cold, False
    with subsegment(f"## {function_name}") as segment:
        if segment is not None:
            with contextlib.suppress(Exception):
                segment.put_annotation(key="ColdStart", value=cold)
                segment.put_annotation(key="Function", value=function_name[:64])
        yield
