"""Background job execution: 202 now, work later, one job at a time per locked resource."""

from __future__ import annotations

import logging
import threading
import traceback
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from wsync.schemas import JobInfo, JobKind, JobState

from .locks import ResourceLocks
from .store import Store

log = logging.getLogger("wsync.jobs")


class JobCancelled(Exception):
    """Raised inside a job at a safe point once cancellation was requested."""


@dataclass
class JobContext:
    job_id: str
    store: Store
    cancel_event: threading.Event = field(default_factory=threading.Event)

    def event(self, message: str, **data: Any) -> None:
        log.info("job %s: %s", self.job_id, message)
        self.store.add_event(self.job_id, message, **data)

    def check_cancelled(self) -> None:
        if self.cancel_event.is_set():
            raise JobCancelled("cancelled on request")


JobFn = Callable[[JobContext], dict]


class JobRunner:
    def __init__(self, store: Store, max_workers: int = 8):
        self.store = store
        self.locks = ResourceLocks()
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="wsync-job")
        self._cancel: dict[str, threading.Event] = {}
        self._futures: dict[str, Future] = {}
        self._pending: Counter[str] = Counter()
        self._guard = threading.Lock()

    def submit(self, kind: JobKind, request: dict, resources: list[str], fn: JobFn) -> JobInfo:
        job = self.store.create_job(kind, request)
        ctx = JobContext(job.id, self.store)
        with self._guard:
            self._pending.update(set(resources))
            self._cancel[job.id] = ctx.cancel_event
            self._futures[job.id] = self._pool.submit(self._run, ctx, kind, resources, fn)
        return job

    def pending(self, resources: Iterable[str]) -> bool:
        """Whether a queued or running job holds or waits for any of these resources."""
        with self._guard:
            return any(self._pending[r] > 0 for r in resources)

    def cancel(self, job_id: str) -> JobInfo | None:
        """Queued jobs end at once; running ones stop at their next safe point."""
        job = self.store.get_job(job_id)
        if job is None or job.state.terminal:
            return job
        with self._guard:
            ev = self._cancel.get(job_id)
        if ev is not None:
            ev.set()
        if job.state == JobState.queued:
            return self.store.update_job(job_id, state=JobState.cancelled, finished_at=_now(), error="cancelled before it started")
        self.store.add_event(job_id, "cancellation requested")
        return self.store.get_job(job_id)

    def wait(self, job_id: str, timeout: float | None = None) -> None:
        with self._guard:
            fut = self._futures.get(job_id)
        if fut is not None:
            fut.result(timeout=timeout)

    def shutdown(self, wait: bool = True) -> None:
        for ev in list(self._cancel.values()):
            ev.set()
        self._pool.shutdown(wait=wait, cancel_futures=True)

    def _run(self, ctx: JobContext, kind: JobKind, resources: list[str], fn: JobFn) -> None:
        held = self.locks.acquire(resources)
        try:
            if ctx.cancel_event.is_set():
                return  # cancelled while queued; already recorded
            self.store.update_job(ctx.job_id, state=JobState.running, started_at=_now())
            try:
                result = fn(ctx)
            except JobCancelled as exc:
                self.store.update_job(ctx.job_id, state=JobState.cancelled, finished_at=_now(), error=str(exc))
                return
            except Exception as exc:  # the job failed: record why, keep the service up
                log.warning("job %s failed: %s", ctx.job_id, exc)
                self.store.add_event(ctx.job_id, "failed", traceback=traceback.format_exc(limit=8))
                self.store.update_job(ctx.job_id, state=JobState.failed, finished_at=_now(), error=_error_text(exc))
                return
            res = self.store.add_result(ctx.job_id, kind, result)
            self.store.update_job(ctx.job_id, state=JobState.succeeded, finished_at=_now(), result=result, result_id=res.id)
        finally:
            for lock in reversed(held):
                lock.release()
            with self._guard:
                self._cancel.pop(ctx.job_id, None)
                self._pending.subtract(set(resources))


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _error_text(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    # Ray wraps remote errors; keep the last informative line first.
    lines = [ln for ln in text.splitlines() if ln.strip()]
    head = lines[-1] if lines else text
    return head if len(text) <= 2000 and head == text else f"{head}\n{text[:4000]}"
