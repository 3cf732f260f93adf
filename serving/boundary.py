"""The center's trust boundary as ASGI middleware: every request proves who it is first.

The Api deployment installs its :class:`~radbridge.auth.Verifier` here when a replica starts
(:func:`install`); :func:`authenticate` runs before routing, body parsing and validation, so a
caller without a credential learns nothing — one 401 for every path, known or not. Handlers
then check the caller's role and agreements (``Api._caller``, ``Api._agreement``).

Why a module of its own: Serve ships the ingress class and its FastAPI app to each replica by
value (cloudpickle), so state kept in the class's module globals is not the state the
middleware sees; this module is imported by reference in both.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import Request, Response
from fastapi.responses import JSONResponse

from radbridge.auth import Role, Verifier
from radbridge.errors import AuthError, ForbiddenError
from radbridge.http_errors import radbridge_error_handler
from radbridge.metrics import CenterMetrics

__all__ = ["OPEN_PATHS", "authenticate", "install"]

log = logging.getLogger("ray.serve")

OPEN_PATHS = frozenset({"/healthz"})  # liveness for probes and start-up: no data, no credential
DOCS_PATHS = frozenset({"/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})
# Which role may use which routes, by path prefix (the handlers check it again, and the
# caller's agreements). A path outside the table is answered by routing (404) once the caller
# is authenticated.
ROLES_BY_PREFIX: tuple[tuple[str, Role], ...] = (
    ("/metrics", Role.OPERATOR),
    ("/v1/models/", Role.INTEGRATION),
    ("/v1/studies", Role.EDGE),
    ("/v1/agreements/", Role.EDGE),
    ("/v1/result-objects/", Role.EDGE),
)
_state: dict[str, Any] = {}


def install(verifier: Verifier, metrics: CenterMetrics, *, open_docs: bool) -> None:
    """This replica's verifier (one Api per replica process)."""
    _state.update(verifier=verifier, metrics=metrics, open_docs=open_docs)


async def authenticate(request: Request, call_next: Any) -> Response:
    path = request.url.path
    if path in DOCS_PATHS:  # the API explorer: local mode only, never in production
        if _state.get("open_docs"):
            return await call_next(request)  # type: ignore[no-any-return]
        return JSONResponse({"detail": "Not Found"}, status_code=404)
    if path in OPEN_PATHS:
        return await call_next(request)  # type: ignore[no-any-return]
    verifier: Verifier | None = _state.get("verifier")
    if verifier is None:  # no Api in this process yet: nothing is served unauthenticated
        return JSONResponse({"error": "starting"}, status_code=503, headers={"Retry-After": "5"})
    address = request.client.host if request.client else "?"
    try:
        caller = verifier.authenticate(
            request.headers.get("authorization"), request.method, path, address
        )
    except AuthError as exc:
        _state["metrics"].refused.labels("unauthenticated").inc()
        log.warning("center: refused a request from %s: %s", address, verifier.last_failure)
        return await radbridge_error_handler(request, exc)
    role = next((r for prefix, r in ROLES_BY_PREFIX if path.startswith(prefix)), None)
    if role is not None and caller.role != role:
        _state["metrics"].refused.labels("forbidden").inc()
        forbidden = ForbiddenError(f"a {caller.role.value} may not use this route")
        return await radbridge_error_handler(request, forbidden)
    request.state.caller = caller
    return await call_next(request)  # type: ignore[no-any-return]
