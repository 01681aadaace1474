"""Error answers: every 4xx/5xx is ErrorBody JSON naming the field and carrying the request id."""

from __future__ import annotations

import logging
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from wsync.errors import ServiceError
from wsync.transfer.validate import PatchValidationError

log = logging.getLogger("wsync.api")


def request_id(request: Request) -> str:
    return getattr(request.state, "request_id", None) or "-"


def error_response(request: Request, status: int, type_: str, message: str, field: str | None = None,
                   rule: str | None = None, retry_after: float | None = None) -> JSONResponse:
    body = {"error": {"type": type_, "message": message, "field": field, "rule": rule,
                      "request_id": request_id(request)}}
    headers = {"X-Request-ID": request_id(request)}
    if retry_after is not None:
        headers["Retry-After"] = str(int(max(1, retry_after)))
    return JSONResponse(body, status_code=status, headers=headers)


def _loc(loc) -> str | None:
    parts = [str(p) for p in loc if p not in ("body", "query", "path")]
    return ".".join(parts) or None


def install(app: FastAPI) -> None:
    @app.middleware("http")
    async def _request_id(request: Request, call_next):
        rid = request.headers.get("X-Request-ID") or f"req-{uuid.uuid4().hex[:16]}"
        request.state.request_id = rid
        response = await call_next(request)
        response.headers["X-Request-ID"] = rid
        return response

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError):
        return error_response(request, exc.status, exc.type, exc.message, exc.field, exc.rule, exc.retry_after)

    @app.exception_handler(PatchValidationError)
    async def _patch_error(request: Request, exc: PatchValidationError):
        field = getattr(exc, "field", None) or f"patches[{exc.tensor}]"
        return error_response(request, 422, "validation_error", str(exc), field, exc.rule)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": "invalid"}
        field = _loc(first.get("loc", ()))
        msg = first.get("msg", "invalid request")
        message = f"{field}: {msg}" if field else msg
        if len(errors) > 1:
            message += f" (and {len(errors) - 1} more)"
        return error_response(request, 422, "validation_error", message, field, first.get("type"))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        type_ = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error_response(request, exc.status_code, type_, str(exc.detail))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unhandled error")
        return error_response(request, 500, "internal_error", f"{type(exc).__name__}: {exc}")
