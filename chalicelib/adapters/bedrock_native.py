"""Amazon Bedrock's native API through boto3, for Amazon Nova: the `bedrock` control plane
(model customization jobs, custom model deployments) and `bedrock-runtime` (Converse,
ConverseStream).

Thin on purpose: lazily created clients (endpoints from AWS_ENDPOINT_URL_BEDROCK and
AWS_ENDPOINT_URL_BEDROCK_RUNTIME when set, AWS's otherwise), botocore's own standard retries on
throttling and 5xx, and one error mapping onto rft-hub's errors. What to send is decided by
training/nova.py, inference/deployments.py, inference/converse.py and domain/{nova,converse}.py.
"""
from __future__ import annotations

import contextlib
import functools
import threading
from typing import Any

from chalicelib.adapters.bedrock import BedrockRejected  # the class jobs.submit treats as a rejection
from chalicelib.config import settings
from chalicelib.errors import ApiError, GatewayTimeout, NotFound, RateLimited, UpstreamError

_lock = threading.Lock()
# The runtime waits for the model: a read timeout per call, rounded to whole seconds (a few clients).
STREAM_READ_TIMEOUT = 60


class ModelNotReady(ApiError):
    status = 409
    code = "model_not_ready"
    should_retry = False


@functools.cache
def _client(service: str, read_timeout: int, attempts: int):
    import boto3
    from botocore.config import Config

    cfg = Config(retries={"mode": "standard", "max_attempts": attempts}, connect_timeout=3,
                 read_timeout=read_timeout, max_pool_connections=32)
    with _lock:   # boto3.client is not thread-safe while it builds the client; the reconciler uses threads
        return boto3.session.Session().client(service, region_name=settings().region, config=cfg)


def control():
    return _client("bedrock", 30, 4)


def runtime(read_timeout: float = STREAM_READ_TIMEOUT):
    return _client("bedrock-runtime", max(1, min(STREAM_READ_TIMEOUT, int(read_timeout + 0.999))), 2)


def map_error(exc: Exception, what: str) -> ApiError:
    """A botocore failure as rft-hub's error (the message keeps Bedrock's)."""
    from botocore.exceptions import (
        ClientError,
        ConnectTimeoutError,
        EndpointConnectionError,
        ParamValidationError,
        ReadTimeoutError,
    )

    if isinstance(exc, ParamValidationError):
        return BedrockRejected(f"Amazon Bedrock rejected the request ({what}): {exc}")
    if isinstance(exc, ReadTimeoutError):
        return GatewayTimeout(f"Amazon Bedrock did not answer in time ({what}).")
    if isinstance(exc, (EndpointConnectionError, ConnectTimeoutError)):
        return UpstreamError(f"Amazon Bedrock did not answer ({what}): {type(exc).__name__}.")
    if isinstance(exc, ClientError):
        error = exc.response.get("Error") or {}
        code, message = error.get("Code") or "", error.get("Message") or str(exc)
        status = int((exc.response.get("ResponseMetadata") or {}).get("HTTPStatusCode") or 0)
        text = f"Amazon Bedrock ({what}): {code}: {message}"
        if code in ("ThrottlingException", "TooManyRequestsException", "ServiceQuotaExceededException") \
                or status == 429 and code != "ModelNotReadyException":
            return RateLimited(text)
        if code == "ModelNotReadyException":
            return ModelNotReady(text)
        if code == "ResourceNotFoundException" or status == 404:
            return NotFound(text)
        if code in ("AccessDeniedException", "UnrecognizedClientException") or status in (401, 403):
            return UpstreamError(f"rft-hub is not authorised on Amazon Bedrock ({what}): {message}",
                                 code="bedrock_auth")
        if code == "ModelTimeoutException":
            return GatewayTimeout(text)
        if status >= 500 or code in ("InternalServerException", "ServiceUnavailableException", "ModelErrorException",
                                     "ModelStreamErrorException"):
            return UpstreamError(text)
        return BedrockRejected(text)
    return UpstreamError(f"Amazon Bedrock failed ({what}): {type(exc).__name__}.")


def _call(what: str, op):
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        return op()
    except (ClientError, BotoCoreError) as exc:
        raise map_error(exc, what) from None


def _plain(response: dict) -> dict:
    return {k: v for k, v in response.items() if k != "ResponseMetadata"}


# ---- the control plane -------------------------------------------------------------------------

def create_job(**kwargs: Any) -> str:
    """CreateModelCustomizationJob; returns the job ARN (the same one for a repeated clientRequestToken)."""
    return _call("CreateModelCustomizationJob", lambda: control().create_model_customization_job(**kwargs))["jobArn"]


def get_job(identifier: str) -> dict:
    return _plain(_call("GetModelCustomizationJob",
                        lambda: control().get_model_customization_job(jobIdentifier=identifier)))


def stop_job(identifier: str) -> None:
    _call("StopModelCustomizationJob", lambda: control().stop_model_customization_job(jobIdentifier=identifier))


def create_deployment(name: str, model_arn: str, token: str, description: str | None = None) -> str:
    kwargs = {"modelDeploymentName": name, "modelArn": model_arn, "clientRequestToken": token}
    if description:
        kwargs["description"] = description
    return _call("CreateCustomModelDeployment",
                 lambda: control().create_custom_model_deployment(**kwargs))["customModelDeploymentArn"]


def get_deployment(identifier: str) -> dict:
    return _plain(_call("GetCustomModelDeployment", lambda: control().get_custom_model_deployment(
        customModelDeploymentIdentifier=identifier)))


def delete_deployment(identifier: str) -> None:
    _call("DeleteCustomModelDeployment", lambda: control().delete_custom_model_deployment(
        customModelDeploymentIdentifier=identifier))


# ---- the runtime -------------------------------------------------------------------------------

def converse(model_id: str, request: dict, deadline_s: float) -> dict:
    return _plain(_call("Converse", lambda: runtime(deadline_s).converse(modelId=model_id, **request)))


def converse_stream(model_id: str, request: dict, deadline_s: float):
    """ConverseStream, opened (Bedrock answered 200): botocore's EventStream of one-key dicts.
    Errors in the stream itself raise botocore's EventStreamError while it is read."""
    # The first answer is waited for only as long as the call has left (one attempt: a retry
    # would wait again), then the events with the stream's idle limit.
    first = max(1, int(min(deadline_s, STREAM_READ_TIMEOUT)))
    started = _call("ConverseStream", lambda: _client("bedrock-runtime", first, 1).converse_stream(
        modelId=model_id, **request))
    _idle_limit(started["stream"], STREAM_READ_TIMEOUT)
    return started["stream"]


def _idle_limit(stream, seconds: float) -> None:
    """The socket timeout of an opened event stream's connection (urllib3 2's
    HTTPResponse.connection). Where that is not reachable the events keep the first answer's
    timeout: shorter, so a stream never waits longer than said."""
    sock = getattr(getattr(getattr(stream, "_raw_stream", None), "connection", None), "sock", None)
    if sock is not None:
        with contextlib.suppress(OSError):      # a closed socket: its reads fail at once anyway
            sock.settimeout(seconds)


# ---- Guardrails (issue #29) ----------------------------------------------------------------------

def apply_guardrail(identifier: str, version: str, source: str, texts: list[str], deadline_s: float) -> dict:
    """ApplyGuardrail on text blocks (source INPUT or OUTPUT): botocore's answer as plain data."""
    content = [{"text": {"text": t}} for t in texts]
    return _plain(_call("ApplyGuardrail", lambda: runtime(deadline_s).apply_guardrail(
        guardrailIdentifier=identifier, guardrailVersion=version, source=source, content=content)))
