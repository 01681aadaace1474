"""How the sync layer calls an actor: ``ref.call("method", *args)`` returns a pending call, and the
backend's ``wait`` gathers pending calls with one timeout.

Two backends implement the same small surface:
- ``RayActors`` (actors/ray_actors.py): each core is a ``ray.remote`` actor; a pending call is an
  ObjectRef. The product path.
- ``LocalActors`` (here): each core lives in this process behind a one-thread executor (one call at a
  time, like a Ray actor with max_concurrency=1); a pending call is a Future. Fast tests run the API
  and the sync layer on it with in-process cores, no Ray.

Failures surface as three errors whatever the backend: ``CallTimeout``, ``ActorGone`` (the actor died)
and ``RemoteError`` (the method raised; its message keeps the remote text).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, Protocol

#: teardown calls: they run on a separate lane of the actor (Ray: the "control" concurrency group;
#: LocalRef: a second thread), so they reach an actor whose main lane is stuck waiting on a peer
CONTROL_METHODS = frozenset({"close_group", "leave_group"})


class CallTimeout(TimeoutError):
    """A call did not answer within its timeout."""


class ActorGone(RuntimeError):
    """The actor process is gone (killed or crashed)."""


class RemoteError(RuntimeError):
    """The method raised inside the actor."""


class ActorRef(Protocol):
    """A handle on one actor (trainer or engine core)."""

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Start ``core.method(*args, **kwargs)``; returns a pending call for ``Actors.wait``."""

    def kill(self) -> None:
        """End the actor now (best effort, idempotent)."""

    def gone(self) -> str | None:
        """Why the actor is dead (killed, crashed), or None while it lives; asks the backend, not the actor."""

    def probe(self, method: str) -> Any:
        """Call a cheap read (``ready`` / ``info``) on the actor's control lane: a pending call that answers
        even while the main lane is stuck, and never answers when the process is hung or stopped."""


class Actors(Protocol):
    """Creates actors and gathers their pending calls; started once with the service."""

    device: str

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def alive(self) -> bool: ...

    def create_trainer(self, device: str, max_snapshots: int, bucket_bytes: int | None) -> ActorRef: ...

    def create_engine(self, kind: str, model: str, device: str, options: dict) -> ActorRef: ...

    def wait(self, pending: Sequence[Any], timeout: float) -> list[Any]:
        """Results in order; raises CallTimeout / ActorGone / RemoteError."""


# ---- in process --------------------------------------------------------------------------------
class LocalRef:
    """An in-process core behind a one-thread executor."""

    def __init__(self, core: Any, name: str = "actor"):
        self.core = core
        self._pool: ThreadPoolExecutor | None = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"local-{name}")
        self._control = ThreadPoolExecutor(max_workers=2, thread_name_prefix=f"local-{name}-control")
        self._lock = threading.Lock()
        self.cause: str | None = None

    def call(self, method: str, *args: Any, **kwargs: Any) -> Future:
        with self._lock:
            if self._pool is None:
                fut: Future = Future()
                fut.set_exception(ActorGone(f"the actor is gone ({self.cause})"))
                return fut
            pool = self._control if method in CONTROL_METHODS else self._pool
            # resolved on the actor's thread, after any construction queued before it
            return pool.submit(lambda: getattr(self.core, method)(*args, **kwargs))

    def kill(self, cause: str = "killed") -> None:
        with self._lock:
            pool, self._pool = self._pool, None
            self.cause = self.cause or cause
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
            self._control.shutdown(wait=False, cancel_futures=True)

    def probe(self, method: str) -> Future:
        with self._lock:
            if self._pool is None:
                fut: Future = Future()
                fut.set_exception(ActorGone(f"the actor is gone ({self.cause})"))
                return fut
            return self._control.submit(lambda: getattr(self.core, method)())

    def gone(self) -> str | None:
        return None if self._pool is not None else f"the actor is dead ({self.cause})"


CoreFactory = Callable[..., Any]


class LocalActors:
    """Actors as in-process cores. ``trainer_factory(device, max_snapshots, bucket_bytes)`` and
    ``engine_factory(kind, model, device, options)`` build the cores."""

    def __init__(self, trainer_factory: CoreFactory, engine_factory: CoreFactory, device: str = "cpu"):
        self.trainer_factory, self.engine_factory = trainer_factory, engine_factory
        self.device = device
        self._refs: list[LocalRef] = []
        self._started = False

    def start(self) -> None:
        self._started = True

    def stop(self) -> None:
        for ref in self._refs:
            ref.kill()
        self._refs.clear()
        self._started = False

    def alive(self) -> bool:
        return self._started

    def create_trainer(self, device: str, max_snapshots: int, bucket_bytes: int | None) -> LocalRef:
        return self._keep(LocalRef(self.trainer_factory(device, max_snapshots, bucket_bytes), "trainer"))

    def create_engine(self, kind: str, model: str, device: str, options: dict) -> LocalRef:
        """Construction runs in the actor's thread, like a Ray actor's __init__ (``ready`` waits for it)."""
        ref = self._keep(LocalRef(None, "engine"))
        ref.core = _Deferred(ref, lambda: self.engine_factory(kind, model, device, options))
        return ref

    def _keep(self, ref: LocalRef) -> LocalRef:
        self._refs.append(ref)
        return ref

    def wait(self, pending: Sequence[Future], timeout: float) -> list[Any]:
        out = []
        for fut in pending:
            try:
                out.append(fut.result(timeout=timeout))
            except FutureTimeout:
                raise CallTimeout("the call timed out") from None
            except (CallTimeout, ActorGone):
                raise
            except Exception as exc:  # the method raised: same shape as Ray's RayTaskError
                raise RemoteError(f"{type(exc).__name__}: {exc}") from exc
        return out


class _Deferred:
    """Builds the engine core on the actor's own thread at its first call (a constructor that raises
    makes every call raise, as a Ray actor whose __init__ failed)."""

    def __init__(self, ref: LocalRef, build: Callable[[], Any]):
        self._ref, self._build = ref, build
        self._core: Any = None
        self._error: BaseException | None = None
        if ref._pool is not None:
            ref._pool.submit(self._construct)

    def _construct(self) -> None:
        try:
            self._core = self._build()
        except BaseException as exc:  # noqa: BLE001 - reported on every later call
            self._error = exc

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        if self._error is not None:
            raise self._error
        return getattr(self._core, name)
