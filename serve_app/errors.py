"""One error hierarchy for the whole service.

Every failure a client can see is an ``APIError`` subclass carrying its HTTP status, the
OpenAI error ``type`` and ``code``, and optionally the offending ``param``. The ingress maps
them to the wire in exactly one place (``serve_app.http_errors``); nothing else builds
error bodies. Messages are written for the client: never a traceback, an object repr or
key material.
"""

from __future__ import annotations


class APIError(Exception):
    status_code: int = 500
    error_type: str = "server_error"
    code: str = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        retry_after_s: float | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.retry_after_s = retry_after_s
        self.headers = dict(headers or {})


class InvalidRequest(APIError):
    status_code = 400
    error_type = "invalid_request_error"
    code = "invalid_request"


class MissingAPIKey(APIError):
    status_code = 401
    error_type = "authentication_error"
    code = "missing_api_key"


class InvalidAPIKey(APIError):
    status_code = 401
    error_type = "authentication_error"
    code = "invalid_api_key"


class InsufficientFunds(APIError):
    status_code = 402
    error_type = "insufficient_quota"
    code = "insufficient_funds"


class ModelNotPermitted(APIError):
    status_code = 403
    error_type = "permission_error"
    code = "model_not_permitted"


class NotFound(APIError):
    status_code = 404
    error_type = "invalid_request_error"
    code = "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"

    def __init__(self, model: str) -> None:
        super().__init__(f"The model '{model}' does not exist or is not available.", param="model")


class Forbidden(APIError):
    """A signed resource URL that is tampered with or expired."""

    status_code = 403
    error_type = "permission_error"
    code = "forbidden"


class PermissionDenied(APIError):
    """The key may not use a field it sent (``param`` names it)."""

    status_code = 403
    error_type = "permission_error"
    code = "permission_denied"


class ContentFlagged(APIError):
    """Every image of the request was flagged by the model's safety checker."""

    status_code = 400
    error_type = "invalid_request_error"
    code = "content_policy_violation"


class IdempotencyConflict(APIError):
    """409: an Idempotency-Key reused for a different request, or whose first attempt is
    still running past the wait."""

    status_code = 409
    error_type = "invalid_request_error"
    code = "idempotency_key_reused"


class RequestTimeout(APIError):
    """408: the request body did not arrive within the configured read deadline
    (``AppConfig.body_read_timeout_s``). Sent with ``connection: close``: the rest of a
    slow body is never read."""

    status_code = 408
    error_type = "invalid_request_error"
    code = "request_timeout"


class RequestTooLarge(APIError):
    status_code = 413
    error_type = "invalid_request_error"
    code = "request_too_large"


class UnsupportedMediaType(InvalidRequest):
    """A POST with no body, or a body not of the route's media type: a body that fails
    validation, so the documented 400 ``invalid_request`` (the qubrid document lists no 415);
    the message names what was sent and what is expected."""


class RateLimitExceeded(APIError):
    status_code = 429
    error_type = "rate_limit_error"
    code = "rate_limit_exceeded"


class InternalError(APIError):
    status_code = 500
    error_type = "server_error"
    code = "internal_error"


class UpstreamError(APIError):
    status_code = 502
    error_type = "server_error"
    code = "upstream_error"


class ModelUnavailable(APIError):
    status_code = 503
    error_type = "server_error"
    code = "model_unavailable"


class ServerOverloaded(APIError):
    status_code = 503
    error_type = "server_error"
    code = "server_overloaded"


class GenerationTimeout(APIError):
    status_code = 504
    error_type = "server_error"
    code = "timeout"
