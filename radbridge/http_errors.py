"""The one table from radbridge errors to HTTP answers (the center's Api and its reading room)."""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from radbridge.errors import (
    AuthError,
    ConfigError,
    DatasetError,
    ForbiddenError,
    ModelError,
    NotFoundError,
    OverloadedError,
    PolicyError,
    RadbridgeError,
    StorageError,
)

__all__ = ["http_exception_handler", "http_status_for", "radbridge_error_handler"]

_TABLE: tuple[tuple[type[RadbridgeError], int], ...] = (
    (AuthError, 401),
    (ForbiddenError, 403),
    (DatasetError, 400),
    (NotFoundError, 404),
    (PolicyError, 409),
    (StorageError, 507),
    (OverloadedError, 503),
    (ModelError, 503),
    (ConfigError, 500),
)


def http_status_for(exc: RadbridgeError) -> int:
    if isinstance(exc, DatasetError) and exc.reason == "unsupported_media_type":
        return 415
    if isinstance(exc, DatasetError) and exc.reason == "body_too_large":
        return 413
    for cls, code in _TABLE:
        if isinstance(exc, cls):
            return code
    return 500


async def radbridge_error_handler(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RadbridgeError)
    body: dict[str, str] = {"error": type(exc).__name__, "detail": str(exc)}
    if isinstance(exc, DatasetError):
        body["reason"] = exc.reason
    headers = {}
    if isinstance(exc, OverloadedError):
        headers["Retry-After"] = str(max(1, round(exc.retry_after_s)))
    if isinstance(exc, AuthError):
        headers["WWW-Authenticate"] = 'Bearer realm="radbridge-center"'
    return JSONResponse(body, status_code=http_status_for(exc), headers=headers)


async def http_exception_handler(_request: Request, exc: Exception) -> JSONResponse:
    """Starlette's own refusals (a JSON body that does not parse, an unknown path) in the same
    shape as ours: ``{"error", "detail"}``; 400 is a DatasetError like any unreadable body."""
    assert isinstance(exc, HTTPException)
    error = "DatasetError" if exc.status_code == 400 else "HTTPError"
    body = {"error": error, "detail": str(exc.detail)}
    return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)
