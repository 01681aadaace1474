"""An in-process stand-in for a process group: ranks meet at a barrier (open), the trainer (rank 0)
puts one message per receiving rank, each engine takes its own. Failure injection by method name."""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field
from typing import Any


class WireError(RuntimeError):
    pass


@dataclass
class _Group:
    world: int
    barrier: threading.Barrier
    inbox: dict[int, queue.Queue] = field(default_factory=dict)
    closed: bool = False


class Hub:
    """Shared by a fake trainer and its fake engines (one per test). ``calls`` logs (actor, method,
    group or None) in call order; ``fail`` maps a method name to an error message raised at its next
    call (``fail_once`` drops it after)."""

    def __init__(self, timeout_s: float = 10.0):
        self.timeout_s = timeout_s
        self.groups: dict[str, _Group] = {}
        self.calls: list[tuple[str, str, Any]] = []
        self.fail: dict[str, str] = {}
        self.timeouts_seen: list[float] = []
        self.transports: list[str] = ["gloo"]  # what fake engines list in EngineDetails.transports
        # fake CUDA IPC: the GPU each side reports (None: no GPU) and the "shared memory" (export or
        # staging id -> the trainer's live tensors / staged patches), read by engines in place
        self.trainer_gpu: str | None = None
        self.engine_gpu: str | None = None
        self.shared: dict[str, Any] = {}
        self._guard = threading.Lock()

    def log(self, who: str, method: str, arg: Any = None) -> None:
        with self._guard:
            self.calls.append((who, method, arg))
        msg = self.fail.pop(method, None)
        if msg is not None:
            raise WireError(msg)

    def join(self, name: str, rank: int, world: int, timeout_s: float) -> None:
        self.timeouts_seen.append(timeout_s)
        with self._guard:
            g = self.groups.get(name)
            if g is None or g.closed:
                g = self.groups[name] = _Group(world, threading.Barrier(world))
            g.inbox.setdefault(rank, queue.Queue())
        try:
            g.barrier.wait(timeout=min(timeout_s, self.timeout_s))
        except threading.BrokenBarrierError:
            raise WireError(f"group {name}: not every rank joined") from None

    def send(self, name: str, message: Any) -> None:
        g = self._live(name)
        for rank in range(1, g.world):
            g.inbox.setdefault(rank, queue.Queue()).put(message)

    def recv(self, name: str, rank: int) -> Any:
        g = self._live(name)
        try:
            return g.inbox.setdefault(rank, queue.Queue()).get(timeout=self.timeout_s)
        except queue.Empty:
            raise WireError(f"group {name}: rank {rank} got nothing") from None

    def close(self, name: str) -> None:
        with self._guard:
            g = self.groups.get(name)
            if g is not None:
                g.closed = True
                g.barrier.abort()

    def open_groups(self) -> list[str]:
        return [n for n, g in self.groups.items() if not g.closed]

    def _live(self, name: str) -> _Group:
        g = self.groups.get(name)
        if g is None or g.closed:
            raise WireError(f"group {name} is not open")
        return g
