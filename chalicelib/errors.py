"""Errors in the OpenAI envelope, so the official SDK raises its typed exceptions.

`{"error": {"message", "type", "param", "code"}}` with the matching HTTP status.
"""
from __future__ import annotations

from typing import Any

from chalicelib.domain import ids


class ApiError(Exception):
    status = 400
    type = "invalid_request_error"
    code: str | None = None
    # Sent as `x-should-retry`, which the openai SDK obeys before its own rules (it would
    # otherwise resend every 409 and 429 -- insufficient_quota included -- three times).
    should_retry: bool | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None, should_retry: bool | None = None):
        # Messages often repeat what the caller sent ("No eval with id '...'"); never a credential.
        message = ids.redact_keys(message)
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        if should_retry is not None:
            self.should_retry = should_retry
        self.headers = dict(headers or {})
        if self.should_retry is not None:
            self.headers.setdefault("x-should-retry", "true" if self.should_retry else "false")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type,
                          "param": self.param, "code": self.code}}


class InvalidRequest(ApiError):
    status = 400


class Unauthorized(ApiError):
    status = 401
    code = "invalid_api_key"


class NotFound(ApiError):
    status = 404
    code = "not_found"


class Forbidden(ApiError):
    status = 403
    code = "permission_denied"
    should_retry = False


class Conflict(ApiError):
    status = 409
    code = "conflict"
    should_retry = False


class PayloadTooLarge(ApiError):
    status = 413
    code = "payload_too_large"


class UnsupportedMediaType(ApiError):
    status = 415
    code = "unsupported_media_type"


class RateLimited(ApiError):
    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"


class UpstreamError(ApiError):
    """Bedrock (or another dependency) failed in a way the caller may retry."""
    status = 502
    type = "server_error"
    code = "upstream_error"


class ServiceUnavailable(ApiError):
    status = 503
    type = "server_error"
    code = "service_unavailable"
    should_retry = True


class GatewayTimeout(ApiError):
    """The call could not finish inside the time API Gateway gives a request."""
    status = 504
    type = "server_error"
    code = "upstream_timeout"
    should_retry = True


class InternalError(ApiError):
    status = 500
    type = "server_error"
    code = "internal_error"
