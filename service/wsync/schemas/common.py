"""Shared wire types. No torch or ray imports here: the SDK reuses these models."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Generic, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, PlainSerializer

T = TypeVar("T")

#: The prompts of vLLM's RLHF sparse-NCCL example; the comparison's default.
REFERENCE_PROMPTS: list[str] = [
    "Hello, my name is",
    "The president of the United States is",
    "The capital of France is",
    "The future of AI is",
]


class WireModel(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class ResponseModel(BaseModel):
    """Responses ignore unknown fields so older SDKs keep working against newer servers."""

    model_config = ConfigDict(extra="ignore", protected_namespaces=())


class Page(ResponseModel, Generic[T]):
    items: list[T]
    total: int
    limit: int
    offset: int


class ErrorDetail(ResponseModel):
    type: str = Field(description="Machine-readable error class, e.g. `validation_error`, `conflict`.")
    message: str
    field: str | None = Field(default=None, description="Dotted path of the offending request field.")
    rule: str | None = Field(default=None, description="The validation rule that failed, if any.")
    request_id: str | None = None


class ErrorBody(ResponseModel):
    error: ErrorDetail


class Health(ResponseModel):
    status: str
    checks: dict[str, str] = Field(default_factory=dict)


def utcnow() -> datetime:
    """THE clock of wsync's records: now, timezone-aware UTC."""
    return datetime.now(UTC)


def as_utc(dt: datetime) -> datetime:
    """Aware UTC; a naive datetime (as SQLite returns them) is taken to be UTC already."""
    return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)


def iso_utc(dt: datetime) -> str:
    """THE timestamp format on the wire and in events: ISO 8601, UTC, microseconds, `Z` suffix,
    e.g. ``2026-12-01T10:00:00.000000Z``."""
    return as_utc(dt).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


#: Every timestamp field of the wire models: stored aware UTC, serialized by `iso_utc`.
UtcDatetime = Annotated[datetime, AfterValidator(as_utc),
                        PlainSerializer(iso_utc, return_type=str, when_used="json")]
