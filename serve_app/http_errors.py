"""The one place where errors become HTTP responses."""

from __future__ import annotations

import logging
import math

from fastapi.responses import JSONResponse

from serve_app.errors import APIError, InternalError
from serve_app.protocol import ErrorBody, ErrorResponse

logger = logging.getLogger("ray.serve")

REQUEST_ID_HEADER = "x-request-id"
# A client's request id is used only if it is a short plain token: it goes into logs, the
# ledger and storage names (serve_app.ingress; serve_app.proxy_guard in Serve's proxy).
SAFE_REQUEST_ID = r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}"


def error_body(exc: BaseException, request_id: str) -> tuple[APIError, ErrorResponse]:
    """``exc`` as the client may see it, and its documented JSON body.

    An ``APIError`` is the client's to see; anything else is a bug, logged with the
    request id and shown as a bare 500 so no internals leak.
    """
    if not isinstance(exc, APIError):
        logger.error("request %s failed with an unexpected error", request_id, exc_info=exc)
        exc = InternalError("The server had an error while processing your request.")
    body = ErrorResponse(
        error=ErrorBody(message=exc.message, type=exc.error_type, code=exc.code, param=exc.param, request_id=request_id)
    )
    return exc, body


def error_response(exc: BaseException, request_id: str) -> JSONResponse:
    """Render any exception in the documented error shape (see ``error_body``)."""
    exc, body = error_body(exc, request_id)
    # x-request-id itself is added by Serve's proxy (the same id), not here.
    headers = dict(exc.headers)
    if exc.retry_after_s is not None:
        headers["retry-after"] = str(max(1, math.ceil(exc.retry_after_s)))
    return JSONResponse(body.model_dump(), status_code=exc.status_code, headers=headers)
