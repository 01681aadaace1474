"""Bearer tokens: ``WSYNC_API_TOKEN`` guards every mutating route (POST/PUT/PATCH/DELETE) when set,
and every read too when ``WSYNC_API_TOKEN_READS=true``. Health probes (/livez, /readyz) stay open.
No ``Authorization: Bearer`` header -> 401 (``unauthorized``, field ``Authorization``);
a wrong token -> 403 (``forbidden``). Tokens are compared with ``hmac.compare_digest``.
Browsers' EventSource cannot send headers: with reads guarded, the dashboard's live stream needs a
proxy that adds the header (documented limitation).
"""

from __future__ import annotations

import hmac
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from wsync.errors import ServiceError

READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
OPEN_PATHS = frozenset({"/livez", "/readyz"})
_bearer = HTTPBearer(auto_error=False, description="WSYNC_API_TOKEN; required on mutating routes when set.")


class Unauthorized(ServiceError):
    status, type = 401, "unauthorized"


class Forbidden(ServiceError):
    status, type = 403, "forbidden"


# FastAPI dependency injection: Depends() in a parameter default is the framework's idiom.
def _token_check(request: Request, creds: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> None:  # noqa: B008
    settings = request.app.state.auth_settings
    token = settings.api_token
    if not token or request.url.path in OPEN_PATHS:
        return
    if request.method in READ_METHODS and not settings.api_token_reads:
        return
    if creds is None or not creds.credentials:
        raise Unauthorized("this route needs a bearer token: Authorization: Bearer $WSYNC_API_TOKEN",
                           field="Authorization")
    if not hmac.compare_digest(creds.credentials.encode(), token.encode()):
        raise Forbidden("the bearer token does not match WSYNC_API_TOKEN", field="Authorization")


def install(app: FastAPI, settings: Any) -> None:
    """Guard every route included after this call; document 401/403 in the OpenAPI spec."""
    app.state.auth_settings = settings
    app.router.dependencies.append(Depends(_token_check))
    base_openapi = app.openapi

    def openapi() -> dict:
        if app.openapi_schema:
            return app.openapi_schema
        schema = base_openapi()
        for path, ops in schema.get("paths", {}).items():
            for method, op in ops.items():
                if path in OPEN_PATHS or not isinstance(op, dict):
                    continue
                reads = method.upper() in READ_METHODS
                note = " (reads only when WSYNC_API_TOKEN_READS=true)" if reads else ""
                op.setdefault("responses", {}).update({
                    "401": {"description": f"No bearer token while WSYNC_API_TOKEN is set{note}.",
                            "content": {"application/json": {"schema": _ERROR}}},
                    "403": {"description": "The bearer token is wrong.",
                            "content": {"application/json": {"schema": _ERROR}}}})
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


_ERROR = {"type": "object", "properties": {"error": {"type": "object", "properties": {
    "type": {"type": "string"}, "message": {"type": "string"}, "field": {"type": "string", "nullable": True},
    "rule": {"type": "string", "nullable": True}, "request_id": {"type": "string"}}}}}


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` keeps the service on this machine."""
    import ipaddress

    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
