"""Named resource locks shared by the job runner and synchronous requests.

Names: ``trainer`` (the trainer actor) and ``engine:<id>`` (one engine). Jobs take theirs for their
whole run (JobRunner); a synchronous request takes them briefly with ``holding`` and answers 409 +
Retry-After when a running job holds one."""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from wsync.errors import Conflict


def trainer_lock() -> str:
    return "trainer"


def engine_lock(engine_id: str) -> str:
    return f"engine:{engine_id}"


def sync_locks(engine_ids: Iterable[str]) -> list[str]:
    """What a sync (or anything that moves weights between the trainer and these engines) holds."""
    return [trainer_lock(), *(engine_lock(e) for e in engine_ids)]


class ResourceLocks:
    """Named locks, always taken in sorted order so jobs never deadlock."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._locks: dict[str, threading.Lock] = {}

    def _get(self, name: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(name, threading.Lock())

    def acquire(self, names: Iterable[str]) -> list[threading.Lock]:
        taken = []
        for name in sorted(set(names)):
            lock = self._get(name)
            lock.acquire()
            taken.append(lock)
        return taken

    def try_acquire(self, names: Iterable[str], timeout: float) -> list[threading.Lock] | None:
        """Like acquire, but give up (releasing what was taken) after ``timeout`` seconds per lock."""
        taken = []
        for name in sorted(set(names)):
            lock = self._get(name)
            if not lock.acquire(timeout=timeout):
                for held in reversed(taken):
                    held.release()
                return None
            taken.append(lock)
        return taken

    @contextmanager
    def holding(self, *names: str, timeout: float = 2.0) -> Iterator[None]:
        """Hold these locks for a synchronous request; busy resources raise Conflict (409, Retry-After)."""
        held = self.try_acquire(names, timeout)
        if held is None:
            raise Conflict(f"{', '.join(names)} busy with a running job; retry shortly", retry_after=2)
        try:
            yield
        finally:
            for lock in reversed(held):
                lock.release()
