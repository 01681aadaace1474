"""Long operations as jobs: an engine's start and the trainer's load. The API answers 202 with the job
(or waits a bounded time for it); these are the jobs' bodies. Progress goes to the job's events
(``phase``, ``elapsed_s``): a start that takes minutes (vLLM) says so every ``heartbeat_s``."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from wsync.jobs.runner import JobContext
from wsync.schemas import EngineState

from .records import EngineRecord
from .registry import Fleet

HEARTBEAT_S = 5.0


@contextmanager
def heartbeat(ctx: JobContext, what: str, phase: str, every: float = HEARTBEAT_S) -> Iterator[None]:
    """While the body runs, a ``<what>: <n>s elapsed`` progress event every ``every`` seconds."""
    done, t0 = threading.Event(), time.monotonic()

    def beat() -> None:
        while not done.wait(every):
            ctx.event(f"{what}: {time.monotonic() - t0:.0f}s elapsed", phase=phase,
                      elapsed_s=round(time.monotonic() - t0, 1))

    thread = threading.Thread(target=beat, name=f"wsync-heartbeat-{ctx.job_id}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()


def run_launch(fleet: Fleet, ctx: JobContext, rec: EngineRecord) -> dict:
    """Wait for a created engine (wsync.sync.registry.Fleet.create_engine) to be ready. The engine is
    listed from the start; it ends ``ready`` (the job succeeds with its EngineInfo) or ``failed`` (the
    job fails with the engine's error)."""
    info = rec.info
    ctx.event(f"starting a {info.kind.value} engine {info.id} on {info.model} ({info.dtype})", phase="starting",
              engine_id=info.id)
    with heartbeat(ctx, f"engine {info.id} starting", "starting"):
        fleet.await_ready(rec)
    if rec.info.state != EngineState.ready:
        raise RuntimeError(f"engine {info.id} failed to start: {rec.info.error}")
    ctx.event(f"engine {info.id} ready; transport {rec.transport.name if rec.transport else '?'}", phase="ready",
              engine_id=info.id)
    return rec.info.model_dump(mode="json")


def run_load(fleet: Fleet, ctx: JobContext, model: str, dtype: str, keep: Callable[[BaseException], Any]) -> dict:
    """Load ``model`` (already resolved) into the trainer; ``keep`` gets the exception of a failed load
    (the API re-raises it to a client still waiting)."""
    ctx.event(f"loading {model} ({dtype}) into the trainer", phase="loading")
    try:
        with heartbeat(ctx, "trainer loading", "loading"):
            info = fleet.trainer.load(model, dtype)
    except BaseException as exc:
        keep(exc)
        raise
    ctx.event(f"trainer loaded at version {info.version}", phase="ready")
    return info.model_dump(mode="json")
