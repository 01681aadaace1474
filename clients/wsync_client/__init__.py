"""wsync SDK: `Client` / `AsyncClient` for the wsync weight-sync control plane.

    from wsync_client import Client
    with Client() as c:                      # $WSYNC_URL or http://127.0.0.1:8321
        job = c.comparisons.create()
        report = c.wait(job.id).result

Responses are the pydantic models of `wsync.schemas`; errors are the classes of `wsync_client.errors`.
"""

from wsync import __version__

from ._client import AsyncClient, Client
from ._core import DEFAULT_BASE_URL, DEFAULT_MAX_RETRIES, DEFAULT_TIMEOUT
from ._events import ServerEvent
from ._resources import report_of, typed_result
from .local import LocalServer, ServerStartError
from .errors import (
    APIConnectionError,
    AuthenticationError,
    PermissionDeniedError,
    APIResponseValidationError,
    APIStatusError,
    APITimeoutError,
    BadRequestError,
    ConflictError,
    InternalServerError,
    InvalidRequestError,
    JobFailedError,
    JobTimeoutError,
    NotFoundError,
    RateLimitError,
    UnprocessableEntityError,
    WsyncError,
)

__all__ = [
    "__version__", "Client", "AsyncClient", "DEFAULT_BASE_URL", "DEFAULT_MAX_RETRIES", "DEFAULT_TIMEOUT",
    "report_of", "typed_result", "ServerEvent", "LocalServer", "ServerStartError", "WsyncError", "APIConnectionError", "APITimeoutError", "APIStatusError", "BadRequestError",
    "NotFoundError", "AuthenticationError", "PermissionDeniedError", "ConflictError", "UnprocessableEntityError", "RateLimitError", "InternalServerError",
    "APIResponseValidationError", "InvalidRequestError", "JobFailedError", "JobTimeoutError",
]
