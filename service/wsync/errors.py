"""Service errors that map to HTTP answers (the API turns them into ErrorBody JSON)."""

from __future__ import annotations


class ServiceError(Exception):
    status = 400
    type = "bad_request"

    def __init__(self, message: str, *, field: str | None = None, rule: str | None = None,
                 retry_after: float | None = None):
        super().__init__(message)
        self.message = message
        self.field = field
        self.rule = rule
        self.retry_after = retry_after


class NotFound(ServiceError):
    status, type = 404, "not_found"


class Conflict(ServiceError):
    status, type = 409, "conflict"


class InvalidInput(ServiceError):
    status, type = 422, "validation_error"


class Unavailable(ServiceError):
    status, type = 503, "unavailable"
