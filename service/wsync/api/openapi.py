"""The OpenAPI spec says what the API really answers.

- Operation ids are the route functions' names (``generate_unique_id_function``), stable across
  FastAPI versions and path changes: ``launch_engine``, ``list_jobs``, ...
- Every error status an operation can answer is documented with the real envelope, ``ErrorBody``
  (``{"error": {"type", "message", "field", "rule", "request_id"}}``); FastAPI's default 422 schema
  (HTTPValidationError) is replaced by it and dropped from the components.

Which statuses, per operation (the rules the code follows):
- 401/403 (token guard, wsync.api.auth): every operation but the health probes.
- 422: every operation with parameters or a body (request validation, a bad ``model``, a reused
  ``Idempotency-Key`` on any POST).
- 404: every path with an id in it.
- 409: every POST and DELETE (busy resource with Retry-After, a state conflict such as an engine not
  ready, a patch no longer held, a dtype mismatch, an ``Idempotency-Key`` still in flight).
- 413: every operation with a body (body-size limit).
- 400 and 503: operations that call the trainer or an engine (a remote error; a timed-out or dead actor).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.routing import APIRoute

from wsync.schemas.common import ErrorBody, ErrorDetail

ERROR_REF = {"$ref": "#/components/schemas/ErrorBody"}
OPEN_PATHS = ("/livez", "/readyz")
ACTOR_PREFIXES = ("/v1/engines", "/v1/trainer", "/v1/patches")
DESCRIPTIONS = {
    "400": "Bad request: the trainer or an engine refused the call (the error names why).",
    "401": "No bearer token while WSYNC_API_TOKEN is set.",
    "403": "The bearer token is wrong.",
    "404": "No such resource (the error's field names the id).",
    "409": "Conflict: a busy resource (Retry-After), a state that does not allow this, or an "
           "Idempotency-Key still in flight.",
    "413": "The request body is too large.",
    "422": "Invalid request: the error's field names the offending field (or the Idempotency-Key header).",
    "503": "Unavailable: an actor timed out or is gone.",
}


def route_id(route: APIRoute) -> str:
    """The operation id: the route function's name."""
    return route.name


def error_statuses(path: str, method: str, op: dict[str, Any]) -> list[str]:
    """The error statuses an operation answers (module doc)."""
    if path in OPEN_PATHS:
        return []
    method = method.upper()
    out = ["401", "403"]
    if op.get("parameters") or op.get("requestBody") or method == "POST":
        out.append("422")
    if "{" in path:
        out.append("404")
    if method in ("POST", "DELETE"):
        out.append("409")
    if op.get("requestBody"):
        out.append("413")
    if method in ("POST", "DELETE") and path.startswith(ACTOR_PREFIXES):
        out += ["400", "503"]
    return sorted(out)


def install(app: FastAPI) -> None:
    """Wrap ``app.openapi`` (after the other installers): envelope everywhere, our 422, no FastAPI
    validation schemas."""
    base = app.openapi

    def openapi() -> dict:
        if app.openapi_schema:
            return app.openapi_schema
        schema = base()
        comps = schema.setdefault("components", {}).setdefault("schemas", {})
        for model in (ErrorDetail, ErrorBody):
            comps[model.__name__] = model.model_json_schema(ref_template="#/components/schemas/{model}")
        comps["ErrorBody"].pop("$defs", None)
        comps.pop("HTTPValidationError", None)
        comps.pop("ValidationError", None)
        for path, ops in schema.get("paths", {}).items():
            for method, op in ops.items():
                if not isinstance(op, dict):
                    continue
                responses = op.setdefault("responses", {})
                for code in error_statuses(path, method, op):
                    responses[code] = {"description": DESCRIPTIONS[code],
                                       "content": {"application/json": {"schema": ERROR_REF}}}
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
