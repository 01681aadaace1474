"""The FastAPI application: ``uvicorn --factory wsync.api.app:create_app``."""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI

from wsync import __version__
from wsync.fleet import Fleet
from wsync.jobs.lease import InstanceLease, LeaseHeld
from wsync.jobs.runner import JobRunner
from wsync.jobs.store import Store
from wsync.settings import Settings, get_settings

from .limits import BodySizeLimit
from . import comparisons, engines, errors, health, jobs, patches, results, sync, trainer

log = logging.getLogger("wsync")


@dataclass
class ServiceState:
    settings: Settings
    store: Store
    runner: JobRunner
    fleet: Fleet


def create_app(settings: Settings | None = None, *, start_fleet: bool = True) -> FastAPI:
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
        runner = JobRunner(store)
        fleet = Fleet(settings, store, runner.locks)
        if start_fleet:
            fleet.start()
        app.state.wsync = ServiceState(settings, store, runner, fleet)
        try:
            yield
        finally:
            runner.shutdown(wait=False)
            fleet.stop()
            lease.release()
            store.close()

    app = FastAPI(title="wsync", version=__version__, lifespan=lifespan,
                  description="Weight-sync control plane: trainer -> inference engines, dense or sparse.")
    errors.install(app)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)  # outermost: refuses before parsing
    for module in (health, engines, trainer, patches, sync, comparisons, jobs, results):
        app.include_router(module.router)
    return app
