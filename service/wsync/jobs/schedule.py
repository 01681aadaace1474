"""Per-resource FIFO scheduling of jobs.

Contract:
- Every resource (``trainer``, ``engine:<id>``) has a queue of job ids in submission order.
- A job is *runnable* when it is at the head of the queue of every resource it names and has not
  been started yet. A started job stays at the head of its queues until ``finish`` removes it, so
  two jobs that share a resource never run at the same time and run in submission order.
- No deadlock: queues are ordered by one global submission sequence, so the oldest unfinished job is
  at the head of all of its queues and is always runnable (or running).
- ``remove`` of a queued job (cancellation) takes it out of every queue; the jobs behind it may then
  become runnable and are returned to the caller to start.

The scheduler holds no threads and does no work itself: callers start what ``add``/``finish``/
``remove`` return. It is thread-safe.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field


@dataclass
class _Entry:
    job_id: str
    resources: tuple[str, ...]
    started: bool = False
    payload: object = None


@dataclass
class FifoScheduler:
    _queues: dict[str, deque[str]] = field(default_factory=dict)
    _entries: dict[str, _Entry] = field(default_factory=dict)
    _guard: threading.Lock = field(default_factory=threading.Lock)

    def add(self, job_id: str, resources: Iterable[str], payload: object = None) -> list[tuple[str, object]]:
        """Queue a job behind everything already queued on its resources; returns jobs now startable."""
        names = tuple(sorted(set(resources)))
        with self._guard:
            if job_id in self._entries:
                raise ValueError(f"job {job_id} already scheduled")
            self._entries[job_id] = _Entry(job_id, names, payload=payload)
            for name in names:
                self._queues.setdefault(name, deque()).append(job_id)
            return self._take_runnable([job_id])

    def finish(self, job_id: str) -> list[tuple[str, object]]:
        """A started job ended: free its resources; returns the jobs that may start now."""
        return self.remove(job_id)

    def remove(self, job_id: str) -> list[tuple[str, object]]:
        """Take a job (queued or started) out of every queue; returns the jobs that may start now."""
        with self._guard:
            return self._remove_locked(job_id)

    def withdraw(self, job_id: str) -> tuple[bool, list[tuple[str, object]]]:
        """Remove a job only if it has not started (cancellation); returns (removed, jobs now startable)."""
        with self._guard:
            entry = self._entries.get(job_id)
            if entry is None or entry.started:
                return False, []
            return True, self._remove_locked(job_id)

    def is_started(self, job_id: str) -> bool:
        with self._guard:
            entry = self._entries.get(job_id)
            return bool(entry and entry.started)

    def pending(self, resources: Iterable[str]) -> bool:
        """Whether any job (queued or running) names one of these resources."""
        with self._guard:
            return any(name in self._queues for name in resources)

    def queued_ids(self) -> list[str]:
        with self._guard:
            return list(self._entries)

    def _remove_locked(self, job_id: str) -> list[tuple[str, object]]:
        entry = self._entries.pop(job_id, None)
        if entry is None:
            return []
        behind = []
        for name in entry.resources:
            queue = self._queues[name]
            queue.remove(job_id)
            if queue:
                behind.append(queue[0])
            else:
                del self._queues[name]
        return self._take_runnable(behind)

    def _take_runnable(self, candidates: Iterable[str]) -> list[tuple[str, object]]:
        out = []
        for job_id in dict.fromkeys(candidates):
            entry = self._entries.get(job_id)
            if entry is None or entry.started:
                continue
            if all(self._queues[name][0] == job_id for name in entry.resources):
                entry.started = True
                out.append((job_id, entry.payload))
        return out
