"""Typed errors raised by the wsync SDK.

Hierarchy::

    WsyncError
    ├── APIConnectionError          the server could not be reached / the connection broke
    │   └── APITimeoutError         the request timed out
    ├── APIStatusError              the server answered 4xx/5xx (carries the parsed ErrorBody)
    │   ├── BadRequestError             400
    │   ├── NotFoundError               404
    │   ├── ConflictError               409
    │   ├── UnprocessableEntityError    422
    │   ├── RateLimitError              429
    │   └── InternalServerError         >= 500
    ├── APIResponseValidationError  a 2xx answer did not match the expected wire model
    ├── InvalidRequestError         the SDK refused the arguments before sending (client-side validation)
    ├── JobFailedError              a waited-for job ended failed or cancelled
    └── JobTimeoutError             a waited-for job did not finish in time
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import httpx

if TYPE_CHECKING:  # pragma: no cover
    from wsync.schemas import JobInfo

__all__ = [
    "WsyncError", "APIConnectionError", "APITimeoutError", "APIStatusError", "BadRequestError",
    "NotFoundError", "ConflictError", "UnprocessableEntityError", "RateLimitError",
    "InternalServerError", "APIResponseValidationError", "InvalidRequestError", "JobFailedError", "JobTimeoutError",
    "status_error_from_response",
]


class WsyncError(Exception):
    """Base class of every error the SDK raises."""

    message: str

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class APIConnectionError(WsyncError):
    def __init__(self, message: str = "Connection error.", *, request: httpx.Request | None = None) -> None:
        super().__init__(message)
        self.request = request


class APITimeoutError(APIConnectionError):
    def __init__(self, message: str = "Request timed out.", *, request: httpx.Request | None = None) -> None:
        super().__init__(message, request=request)


class APIStatusError(WsyncError):
    """The server answered with an error status. Fields mirror `ErrorBody.error`."""

    def __init__(
        self,
        message: str,
        status_code: int,
        request_id: str | None = None,
        body: Any = None,
        type: str | None = None,  # noqa: A002 - mirrors the wire field
        field: str | None = None,
        rule: str | None = None,
        *,
        response: httpx.Response | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.request_id = request_id
        self.body = body
        self.type = type
        self.field = field
        self.rule = rule
        self.response = response

    def __str__(self) -> str:
        extras = [f"{k}={v}" for k, v in (("field", self.field), ("rule", self.rule),
                                          ("request_id", self.request_id)) if v]
        tail = f" ({', '.join(extras)})" if extras else ""
        return f"{self.status_code} {self.type or 'error'}: {self.message}{tail}"


class BadRequestError(APIStatusError):
    pass


class NotFoundError(APIStatusError):
    pass


class AuthenticationError(APIStatusError):
    """401: no bearer token (set WSYNC_API_TOKEN or pass api_token=)."""


class PermissionDeniedError(APIStatusError):
    """403: the bearer token is wrong."""


class ConflictError(APIStatusError):
    pass


class UnprocessableEntityError(APIStatusError):
    pass


class RateLimitError(APIStatusError):
    pass


class InternalServerError(APIStatusError):
    pass


class APIResponseValidationError(WsyncError):
    """A success response whose body is not the wire model the SDK expected."""

    def __init__(self, message: str, *, response: httpx.Response | None = None) -> None:
        super().__init__(message)
        self.response = response
        self.status_code = response.status_code if response is not None else None


class InvalidRequestError(WsyncError, ValueError):
    """Arguments rejected by the wire model before anything was sent."""

    def __init__(self, message: str, field: str | None = None, rule: str | None = None) -> None:
        super().__init__(message)
        self.field = field
        self.rule = rule


class JobFailedError(WsyncError):
    """A waited-for job ended `failed` or `cancelled`; `.job` is its final JobInfo."""

    def __init__(self, job: "JobInfo") -> None:
        state = getattr(job.state, "value", job.state)
        super().__init__(f"job {job.id} {state}: {job.error or 'no error text'}")
        self.job = job


class JobTimeoutError(WsyncError):
    """`wait()` gave up; `.job` is the last JobInfo seen (None if never fetched)."""

    def __init__(self, job_id: str, timeout: float, job: "JobInfo | None" = None) -> None:
        state = getattr(getattr(job, "state", None), "value", None)
        suffix = f" (last state: {state})" if state else ""
        super().__init__(f"job {job_id} did not finish within {timeout:g} s{suffix}")
        self.job_id = job_id
        self.timeout = timeout
        self.job = job


_STATUS_CLASSES: dict[int, type[APIStatusError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    409: ConflictError,
    422: UnprocessableEntityError,
    429: RateLimitError,
}


def status_error_from_response(response: httpx.Response) -> APIStatusError:
    """Build the typed error for an error response, parsing `ErrorBody` when present."""
    code = response.status_code
    cls = _STATUS_CLASSES.get(code) or (InternalServerError if code >= 500 else APIStatusError)
    body: Any
    try:
        body = response.json()
    except ValueError:
        body = response.text or None
    detail: dict[str, Any] = {}
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        detail = body["error"]
    elif isinstance(body, dict) and "detail" in body:  # plain FastAPI/Starlette error shape
        detail = {"message": body["detail"] if isinstance(body["detail"], str) else str(body["detail"])}
    elif isinstance(body, dict) and body:  # e.g. a Health body on 503
        detail = {"message": ", ".join(f"{k}={v}" for k, v in body.items())[:500]}
    message = detail.get("message") or (body if isinstance(body, str) and body else None) \
        or response.reason_phrase or "error"
    request_id = detail.get("request_id") or response.headers.get("x-request-id")
    return cls(
        str(message), code, request_id, body,
        type=detail.get("type"), field=detail.get("field"), rule=detail.get("rule"), response=response,
    )
