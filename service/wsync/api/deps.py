"""Annotated dependencies shared by the routers."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Query, Request

from wsync.jobs.runner import JobRunner
from wsync.jobs.store import MAX_OFFSET, Store
from wsync.settings import Settings
from wsync.sync.registry import Fleet


def get_state(request: Request):
    return request.app.state.wsync


def _fleet(request: Request) -> Fleet:
    return get_state(request).fleet


def _store(request: Request) -> Store:
    return get_state(request).store


def _runner(request: Request) -> JobRunner:
    return get_state(request).runner


def _settings(request: Request) -> Settings:
    return get_state(request).settings


FleetDep = Annotated[Fleet, Depends(_fleet)]
StoreDep = Annotated[Store, Depends(_store)]
RunnerDep = Annotated[JobRunner, Depends(_runner)]
SettingsDep = Annotated[Settings, Depends(_settings)]
Limit = Annotated[int, Query(ge=1, le=200, description="Page size.")]
Offset = Annotated[int, Query(ge=0, le=MAX_OFFSET, description="Items to skip.")]
