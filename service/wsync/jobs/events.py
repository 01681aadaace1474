"""The in-process event bus: what happened, in order, for the SSE stream, metrics and the dashboard.

Contract:
- ``EventBus.publish(kind, data, job_id=None)`` is thread-safe and never blocks on subscribers.
- Event ids are strictly increasing integers. They start at the boot time in microseconds, so ids of a
  restarted service are larger than those of the previous run (a client resuming with an old
  ``Last-Event-ID`` simply gets everything still buffered).
- The last ``capacity`` events stay in a ring buffer for replay (``since``); older ones are gone, and
  ``since`` says so (``gap=True``) when a resuming client asked for events that were dropped.
- Listeners (``subscribe``) are called synchronously in the publishing thread; one that raises is
  logged and kept. Async waiters (``wait``) are woken through their own event loop.

Kinds published today:
- ``job.state``      a job was created or changed state (data: JobInfo minus events; ``result`` only
                     when terminal). Published by ``ObservedStore`` on every job write.
- ``job.event``      a progress message from ``JobContext.event`` (data: ``message`` plus the fields the
                     job gave; progress fields by convention: ``phase``, ``bytes_done``, ``bytes_total``,
                     ``tensors_done``, ``tensors_total``).
- ``sync.finished``  a sync job succeeded (data: the SyncReport dict plus ``job_id``).
- ``comparison.finished`` a comparison job succeeded (data: ComparisonReport dict plus ``job_id``).
- ``engine.state``, ``trainer.version``: published by the sync layer through ``publish`` (data:
  EngineInfo dict / ``{"version": ...}``).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from wsync.schemas import JobInfo, JobKind, JobState

log = logging.getLogger("wsync.events")

DEFAULT_CAPACITY = 4096
SYNC_KINDS = (JobKind.sync_dense, JobKind.sync_sparse)
#: The report event a succeeded job publishes before its terminal job.state (launch/load jobs: none).
FINISHED = {JobKind.sync_dense: "sync.finished", JobKind.sync_sparse: "sync.finished",
            JobKind.comparison: "comparison.finished"}


@dataclass(frozen=True)
class Event:
    id: int
    kind: str
    at: str
    data: dict[str, Any] = field(default_factory=dict)
    job_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "kind": self.kind, "at": self.at, "job_id": self.job_id, "data": self.data}


Listener = Callable[[Event], None]


class EventBus:
    """Monotonic ids, bounded replay buffer, sync listeners and async waiters (see module doc)."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self.capacity = capacity
        self._buf: deque[Event] = deque(maxlen=capacity)
        self.first_id = time.time_ns() // 1000
        self._ids = itertools.count(self.first_id)
        self._guard = threading.Lock()
        self._listeners: list[Listener] = []
        self._waiters: set[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = set()

    # -- writing ------------------------------------------------------------------------------
    def publish(self, kind: str, data: dict[str, Any] | None = None, job_id: str | None = None) -> Event:
        with self._guard:
            ev = Event(next(self._ids), kind, datetime.now(UTC).isoformat(), dict(data or {}), job_id)
            self._buf.append(ev)
            listeners, waiters = list(self._listeners), list(self._waiters)
        for fn in listeners:
            try:
                fn(ev)
            except Exception:  # a broken listener must not break the publisher
                log.exception("event listener %r failed on %s", fn, kind)
        for loop, flag in waiters:
            try:
                loop.call_soon_threadsafe(flag.set)
            except RuntimeError:  # the waiter's loop is closed
                pass
        return ev

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """Call ``listener(event)`` for every future event; returns the unsubscribe function."""
        with self._guard:
            self._listeners.append(listener)

        def unsubscribe() -> None:
            with self._guard:
                if listener in self._listeners:
                    self._listeners.remove(listener)
        return unsubscribe

    # -- reading ------------------------------------------------------------------------------
    @property
    def last_id(self) -> int:
        with self._guard:
            return self._buf[-1].id if self._buf else 0

    def since(self, last_id: int | None, job_id: str | None = None) -> tuple[list[Event], bool]:
        """Buffered events with id > ``last_id`` (all when None), optionally one job's.
        ``gap`` is True when events after ``last_id`` were already dropped from the buffer."""
        with self._guard:
            events = list(self._buf)
        # Ids are consecutive within one run: an id of this run older than the oldest kept means drops.
        gap = bool(last_id is not None and events and self.first_id <= last_id < events[0].id - 1)
        out = [e for e in events if (last_id is None or e.id > last_id) and (job_id is None or e.job_id == job_id)]
        return out, gap

    async def wait(self, last_id: int, timeout: float) -> bool:
        """Wait (asyncio) until an event newer than ``last_id`` exists or ``timeout`` passes."""
        loop = asyncio.get_running_loop()
        flag = asyncio.Event()
        entry = (loop, flag)
        with self._guard:
            if self._buf and self._buf[-1].id > last_id:
                return True
            self._waiters.add(entry)
        try:
            await asyncio.wait_for(flag.wait(), timeout)
            return True
        except TimeoutError:
            return False
        finally:
            with self._guard:
                self._waiters.discard(entry)


def job_state_data(job: JobInfo) -> dict[str, Any]:
    """The data of a ``job.state`` event: the job without its event log (and result until terminal)."""
    data = job.model_dump(mode="json", exclude={"events", "request"})
    if not job.state.terminal:
        data.pop("result", None)
    return data


class ObservedStore:
    """Wraps the job store: every job write also publishes on the bus (``job.state`` / ``job.event`` /
    ``sync.finished`` / ``comparison.finished``). Everything else passes through unchanged, so the
    runner and routers use it exactly like the Store it wraps."""

    def __init__(self, store: Any, bus: EventBus) -> None:
        self._store, self.bus = store, bus

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    def create_job(self, kind: JobKind, request: dict) -> JobInfo:
        job = self._store.create_job(kind, request)
        self.bus.publish("job.state", job_state_data(job), job_id=job.id)
        return job

    def update_job(self, job_id: str, **fields: Any) -> JobInfo:
        job = self._store.update_job(job_id, **fields)
        if "state" in fields:
            self._published(job)
        return job

    def transition(self, job_id: str, from_states: Any, to: JobState, **fields: Any) -> JobInfo | None:
        job = self._store.transition(job_id, from_states, to, **fields)
        if job is not None:  # None: someone else moved the job; nothing changed here
            self._published(job)
        return job

    def _published(self, job: JobInfo) -> None:
        # The report first: a job stream ends at the terminal job.state.
        kind = FINISHED.get(job.kind)
        if job.state == JobState.succeeded and isinstance(job.result, dict) and kind:
            self.bus.publish(kind, {**job.result, "job_id": job.id, "job_kind": job.kind.value}, job_id=job.id)
        self.bus.publish("job.state", job_state_data(job), job_id=job.id)

    def add_event(self, job_id: str, message: str, **data: Any) -> None:
        self._store.add_event(job_id, message, **data)
        self.bus.publish("job.event", {"message": message, **_plain(data)}, job_id=job_id)


def _plain(data: dict[str, Any]) -> dict[str, Any]:
    import json

    return json.loads(json.dumps(data, default=str))
