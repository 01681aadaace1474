"""Shared wire types. No torch or ray imports here: the SDK reuses these models."""

from __future__ import annotations

from datetime import datetime
from enum import Enum
from typing import Generic, TypeVar

from pydantic import BaseModel, ConfigDict, Field

T = TypeVar("T")

#: The prompts of vLLM's rlhf_sparse_nccl.py example; the comparison's default.
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


class Generation(ResponseModel):
    prompt: str
    token_ids: list[int]
    text: str


def utcnow() -> datetime:
    from datetime import timezone

    return datetime.now(timezone.utc)


class StrEnum(str, Enum):
    def __str__(self) -> str:  # pragma: no cover - cosmetic
        return self.value
