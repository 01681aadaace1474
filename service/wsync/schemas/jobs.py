from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import Field

from .common import ResponseModel, StrEnum


class JobState(StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (JobState.succeeded, JobState.failed, JobState.cancelled)


class JobKind(StrEnum):
    sync_dense = "sync_dense"
    sync_sparse = "sync_sparse"
    comparison = "comparison"
    engine_launch = "engine_launch"
    trainer_load = "trainer_load"


class JobInfo(ResponseModel):
    id: str
    kind: JobKind
    state: JobState
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    error: str | None = None
    request: dict[str, Any] = Field(default_factory=dict)
    result: dict[str, Any] | None = None
    result_id: str | None = None
    events: list[dict[str, Any]] = Field(default_factory=list, description="Progress messages, oldest first.")


class ResultInfo(ResponseModel):
    id: str
    job_id: str
    kind: JobKind
    created_at: datetime
    data: dict[str, Any]
