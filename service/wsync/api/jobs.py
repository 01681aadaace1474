from __future__ import annotations

from fastapi import APIRouter

from wsync.errors import Conflict, NotFound
from wsync.schemas import JobInfo, JobKind, JobState, Page

from .deps import Limit, Offset, RunnerDep, StoreDep

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


@router.get("", response_model=Page[JobInfo], summary="Jobs, newest first")
def list_jobs(store: StoreDep, state: JobState | None = None, kind: JobKind | None = None,
              limit: Limit = 50, offset: Offset = 0) -> Page[JobInfo]:
    items, total = store.list_jobs(state=state, kind=kind, limit=limit, offset=offset)
    return Page[JobInfo](items=items, total=total, limit=limit, offset=offset)


@router.get("/{job_id}", response_model=JobInfo, summary="One job: state, timestamps, error, result")
def get_job(job_id: str, store: StoreDep) -> JobInfo:
    job = store.get_job(job_id)
    if job is None:
        raise NotFound(f"no job {job_id!r}", field="job_id")
    return job


@router.post("/{job_id}/cancel", response_model=JobInfo,
             summary="Cancel: a queued job ends now, a running one at its next safe point")
def cancel_job(job_id: str, runner: RunnerDep) -> JobInfo:
    job = runner.cancel(job_id)
    if job is None:
        raise NotFound(f"no job {job_id!r}", field="job_id")
    if job.state.terminal and job.state != JobState.cancelled:
        raise Conflict(f"job {job_id} already {job.state.value}", field="job_id")
    return job
