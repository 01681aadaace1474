"""Answering a long operation: 202 with its job, or (``wait=true``) the operation's result when the job
ends within the server's bound (Settings.request_wait_s)."""

from __future__ import annotations

import time

from fastapi import status
from fastapi.responses import JSONResponse

from wsync.jobs.store import Store
from wsync.schemas import JobInfo

POLL_S = 0.05


def finished(store: Store, job: JobInfo, bound: float) -> JobInfo | None:
    """The job once terminal, if that happens within ``bound`` seconds; else None."""
    deadline = time.monotonic() + bound
    while True:
        now = store.get_job(job.id)
        if now is not None and now.state.terminal:
            return now
        if time.monotonic() >= deadline:
            return None
        time.sleep(POLL_S)


def accepted(store: Store, job: JobInfo) -> JSONResponse:
    """202 with the job as stored now (Location: the job)."""
    now = store.get_job(job.id) or job
    return JSONResponse(now.model_dump(mode="json"), status_code=status.HTTP_202_ACCEPTED,
                        headers={"Location": f"/v1/jobs/{job.id}"})


ACCEPTED_DOC = {202: {"model": JobInfo, "description": "Accepted: the job doing it (wait=false, or it did not "
                      "finish within the server's wait bound). Follow it at /v1/jobs/{id} or its events."}}
