"""Background job execution: 202 now, work later; jobs sharing a resource run one at a time, in submission order."""

from __future__ import annotations

import logging
import threading
import traceback
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from wsync.schemas import JobInfo, JobKind, JobState

from .locks import ResourceLocks
from .schedule import FifoScheduler
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
    """Runs jobs on a thread pool, in submission order per resource (see ``schedule.FifoScheduler``).

    A job is handed to the pool only once it heads the queue of every resource it names, so pool
    threads never wait on each other; it then takes the ``ResourceLocks`` too, which only excludes
    synchronous API requests (``Fleet.holding``) that use the same names.
    """

    def __init__(self, store: Store, max_workers: int = 8):
        self.store = store
        self.locks = ResourceLocks()
        self.schedule = FifoScheduler()
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="wsync-job")
        self._cancel: dict[str, threading.Event] = {}
        self._guard = threading.Lock()
        self._submit = threading.Lock()
        self._closed = False

    def submit(self, kind: JobKind, request: dict, resources: list[str], fn: JobFn) -> JobInfo:
        """Record the job as queued and schedule it behind earlier jobs on the same resources.

        Creating the row and queueing it happen under one lock, so queue order is ``created_at`` order.
        """
        with self._submit:
            job = self.store.create_job(kind, request)
            ctx = JobContext(job.id, self.store)
            with self._guard:
                self._cancel[job.id] = ctx.cancel_event
            runnable = self.schedule.add(job.id, resources, (ctx, kind, tuple(resources), fn))
        self._start(runnable)
        return job

    def pending(self, resources: Iterable[str]) -> bool:
        """Whether a queued or running job holds or waits for any of these resources."""
        return self.schedule.pending(resources)

    def get(self, job_id: str) -> JobInfo | None:
        return self.store.get_job(job_id)

    def cancel(self, job_id: str) -> JobInfo | None:
        """Queued jobs end at once (and leave their queues); running ones stop at their next safe point."""
        job = self.store.get_job(job_id)
        if job is None or job.state.terminal:
            return job
        with self._guard:
            ev = self._cancel.get(job_id)
        if ev is not None:
            ev.set()
        withdrawn, runnable = self.schedule.withdraw(job_id)
        if withdrawn or ev is None:
            done = self.store.transition(job_id, (JobState.queued,), JobState.cancelled, finished_at=_now(),
                                         error="cancelled before it started")
            with self._guard:
                self._cancel.pop(job_id, None)
            self._start(runnable)
            if done is not None:
                return done
        self.store.add_event(job_id, "cancellation requested")
        return self.store.get_job(job_id)

    def shutdown(self, wait: bool = True) -> None:
        """Ask running jobs to stop; queued ones stay queued in the store (the next start marks them interrupted)."""
        with self._guard:
            self._closed = True
            events = list(self._cancel.values())
        for ev in events:
            ev.set()
        self._pool.shutdown(wait=wait, cancel_futures=True)

    def _start(self, runnable: list[tuple[str, Any]]) -> None:
        with self._guard:
            if self._closed:
                return
            for _job_id, payload in runnable:
                self._pool.submit(self._run, *payload)

    def _run(self, ctx: JobContext, kind: JobKind, resources: tuple[str, ...], fn: JobFn) -> None:
        try:
            held = self.locks.acquire(resources)
            try:
                self._execute(ctx, kind, fn)
            finally:
                for lock in reversed(held):
                    lock.release()
        except Exception:  # the store itself failed: keep the queue moving
            log.exception("job %s: runner error", ctx.job_id)
        finally:
            with self._guard:
                self._cancel.pop(ctx.job_id, None)
            self._start(self.schedule.finish(ctx.job_id))

    def _execute(self, ctx: JobContext, kind: JobKind, fn: JobFn) -> None:
        if ctx.cancel_event.is_set():
            self.store.transition(ctx.job_id, (JobState.queued,), JobState.cancelled, finished_at=_now(),
                                  error="cancelled before it started")
            return
        if self.store.transition(ctx.job_id, (JobState.queued,), JobState.running, started_at=_now()) is None:
            return  # no longer queued (cancelled, or marked by another process): do not run it
        try:
            result = fn(ctx)
        except JobCancelled as exc:
            self.store.transition(ctx.job_id, (JobState.running,), JobState.cancelled, finished_at=_now(), error=str(exc))
            return
        except Exception as exc:  # the job failed: record why, keep the service up
            log.warning("job %s failed: %s", ctx.job_id, exc)
            self.store.add_event(ctx.job_id, "failed", traceback=traceback.format_exc(limit=8))
            self.store.transition(ctx.job_id, (JobState.running,), JobState.failed, finished_at=_now(),
                                  error=_error_text(exc))
            return
        res = self.store.add_result(ctx.job_id, kind, result)
        self.store.transition(ctx.job_id, (JobState.running,), JobState.succeeded, finished_at=_now(),
                              result=result, result_id=res.id)


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _error_text(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    # Ray wraps remote errors; keep the last informative line first.
    lines = [ln for ln in text.splitlines() if ln.strip()]
    head = lines[-1] if lines else text
    return head if len(text) <= 2000 and head == text else f"{head}\n{text[:4000]}"
