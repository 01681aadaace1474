from __future__ import annotations

from enum import StrEnum
from typing import Any

from pydantic import Field

from .common import ResponseModel, UtcDatetime


class JobState(StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"
    #: A previous service process stopped (crash, kill, restart) while the job was queued or running;
    #: set at the next start, with the time. What the job had done by then is unknown.
    interrupted = "interrupted"

    @property
    def terminal(self) -> bool:
        return self in (JobState.succeeded, JobState.failed, JobState.cancelled, JobState.interrupted)


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
    created_at: UtcDatetime
    started_at: UtcDatetime | None = None
    finished_at: UtcDatetime | None = None
    error: str | None = None
    request: dict[str, Any] = Field(default_factory=dict)
    result: dict[str, Any] | None = None
    result_id: str | None = None
    events: list[dict[str, Any]] = Field(default_factory=list, description="Progress messages, oldest first.")


class ResultInfo(ResponseModel):
    id: str
    job_id: str
    kind: JobKind
    created_at: UtcDatetime
    data: dict[str, Any]
