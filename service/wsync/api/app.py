"""The FastAPI application: ``uvicorn --factory wsync.api.app:create_app``."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass

from fastapi import FastAPI

from wsync import __version__
from wsync.actors.ref import Actors
from wsync.jobs.lease import InstanceLease, LeaseHeld
from wsync.jobs.runner import JobRunner
from wsync.jobs.store import Store
from wsync.settings import Settings, get_settings
from wsync.sync.registry import Fleet

from . import (
    auth,
    comparisons,
    dashboard,
    engines,
    errors,
    events,
    health,
    idempotency,
    jobs,
    metrics,
    openapi,
    patches,
    results,
    rollouts,
    sync,
    trainer,
    trainers,
)
from .limits import BodySizeLimit

log = logging.getLogger("wsync")


@dataclass
class ServiceState:
    settings: Settings
    store: Store
    runner: JobRunner
    fleet: Fleet


def create_app(settings: Settings | None = None, *, start_fleet: bool = True,
               actors: Callable[[Settings], Actors] | None = None) -> FastAPI:
    """The app. ``actors`` builds the actor backend the fleet runs on (default: Ray,
    wsync.actors.engine.RayActors); fast tests pass in-process cores (wsync.actors.ref.LocalActors)."""
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        store = Store(settings.resolved_database_url())
        try:  # before touching any job: refuse to start while another live server holds this database
            lease = InstanceLease.take(store, f"{settings.host}:{settings.port}", settings.lease_ttl_s,
                                       settings.lease_heartbeat_s)
        except LeaseHeld:
            store.close()
            raise
        lost = store.interrupt_unfinished()
        if lost:
            log.warning("marked %d unfinished job(s) from a previous run as interrupted", lost)
        runner = JobRunner(events.observe(app, store))  # job writes publish on app.state.events
        fleet = Fleet(settings, store, runner.locks, (actors or _ray_actors)(settings),
                      observer=app.state.events)  # engine.state / trainer.version on the bus
        if start_fleet:
            with _keep_signal_handlers():  # Ray's init installs its own SIGTERM handler: keep uvicorn's
                fleet.start()
        app.state.wsync = ServiceState(settings, store, runner, fleet)
        try:
            yield
        finally:
            runner.shutdown(wait=False)
            fleet.stop()
            lease.release()
            store.close()

    app = FastAPI(title="wsync", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Weight-sync control plane: trainer -> inference engines, dense or sparse.",
                  generate_unique_id_function=openapi.route_id)
    idempotency.install(app)  # first: it runs inside the request id and the auth guard
    errors.install(app)
    auth.install(app, settings)  # before any router: guards every route
    metrics.install(app, events.install(app))
    dashboard.install(app)  # / and /docs from local assets
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)  # outermost: refuses before parsing
    for module in (health, engines, rollouts, trainer, trainers, patches, sync, comparisons, jobs, results):
        app.include_router(module.router)
    openapi.install(app)  # last: wraps the spec the others built
    return app


@contextmanager
def _keep_signal_handlers() -> Iterator[None]:
    """Restore SIGTERM/SIGINT handlers after the body (uvicorn's graceful shutdown, not a stack dump
    from whatever handler ray.init installed). Only the main thread may set handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            if handler is not None:
                signal.signal(sig, handler)


def _ray_actors(settings: Settings) -> Actors:
    from wsync.actors.engine import RayActors

    return RayActors(settings)
