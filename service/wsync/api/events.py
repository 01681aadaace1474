"""Server-Sent Events: ``GET /v1/events`` (everything) and ``GET /v1/jobs/{id}/events`` (one job).

Wire format (https://html.spec.whatwg.org/multipage/server-sent-events.html): each bus event is
``id: <int>`` / ``event: <kind>`` / ``data: <json of Event.to_dict()>``. A comment line
``: keep-alive`` is sent after ``keepalive`` seconds without events. Resuming: a client sends the
last id it saw as the ``Last-Event-ID`` header (browsers do on reconnect) or ``last_event_id`` query;
it gets every buffered event after it; if some were already dropped from the buffer, a
``stream.gap`` event (no id) comes first, telling the client to refetch state over REST.

The job stream starts with a ``job.snapshot`` event (no id: the job as stored now), replays the
job's buffered events, then follows it live, and ends after the job's terminal ``job.state``.
``max_events`` and ``timeout`` bound a stream (tests, scripts); without them it runs until the
client goes away.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, FastAPI, Header, Query, Request
from fastapi.responses import StreamingResponse

from wsync.errors import InvalidInput, NotFound
from wsync.jobs.events import Event, EventBus, ObservedStore, job_state_data

router = APIRouter(tags=["events"])

_SSE_DOC = {200: {"content": {"text/event-stream": {"schema": {"type": "string"}}},
                  "description": "An event stream (text/event-stream)."}}
TERMINAL = ("succeeded", "failed", "cancelled")


def install(app: FastAPI, bus: EventBus | None = None) -> EventBus:
    """Give the app its bus (``app.state.events``) and the SSE routes. Call before startup."""
    app.state.events = bus or EventBus()
    app.include_router(router)
    return app.state.events


def observe(app: FastAPI, store):
    """The store the runner should use: job writes publish on the app's bus."""
    return ObservedStore(store, app.state.events)


def _bus(request: Request) -> EventBus:
    return request.app.state.events


def _frame(ev: Event) -> str:
    return f"id: {ev.id}\nevent: {ev.kind}\ndata: {json.dumps(ev.to_dict(), default=str)}\n\n"


def _plain_frame(kind: str, data: dict) -> str:
    return f"event: {kind}\ndata: {json.dumps({'kind': kind, 'data': data}, default=str)}\n\n"


def _last_id(header: str | None, query: int | None) -> int | None:
    raw = query if query is not None else header
    if raw is None or raw == "":
        return None
    try:
        value = int(raw)
    except (TypeError, ValueError):
        raise InvalidInput(f"Last-Event-ID must be an integer event id, got {raw!r}", field="Last-Event-ID") from None
    if value < 0:
        raise InvalidInput("Last-Event-ID must be >= 0", field="Last-Event-ID")
    return value


async def _follow(request: Request, bus: EventBus, cursor: int | None, *, job_id: str | None,
                  kinds: set[str] | None, max_events: int | None, timeout: float | None,
                  keepalive: float, first: list[str]) -> AsyncIterator[str]:
    """The stream body: ``first`` frames, then buffered and live events after ``cursor``."""
    deadline = None if timeout is None else time.monotonic() + timeout
    sent = 0
    for frame in first:
        yield frame
    while True:
        events, _ = bus.since(cursor)
        for ev in events:
            cursor = ev.id
            if (job_id is not None and ev.job_id != job_id) or (kinds and ev.kind not in kinds):
                continue
            yield _frame(ev)
            sent += 1
            if max_events is not None and sent >= max_events:
                return
            if job_id is not None and ev.kind == "job.state" and ev.data.get("state") in TERMINAL:
                return
        if cursor is None:
            cursor = bus.last_id
        wait = keepalive if deadline is None else min(keepalive, deadline - time.monotonic())
        if wait <= 0:
            return
        if not await bus.wait(cursor, wait):
            if deadline is not None and time.monotonic() >= deadline:
                return
            yield ": keep-alive\n\n"
        if await request.is_disconnected():
            return


def _response(body: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(body, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


LastEventHeader = Annotated[str | None, Header(alias="Last-Event-ID", description="Resume after this event id.")]
LastEventQuery = Annotated[int | None, Query(ge=0, description="Same as the Last-Event-ID header.")]
MaxEvents = Annotated[int | None, Query(ge=1, le=100000, description="End the stream after this many events.")]
Timeout = Annotated[float | None, Query(gt=0, le=86400, description="End the stream after this many seconds.")]
Keepalive = Annotated[float, Query(gt=0, le=300, description="Seconds between keep-alive comments.")]


@router.get("/v1/events", summary="Live events (Server-Sent Events): job states and progress, syncs, engines",
            responses=_SSE_DOC, response_class=StreamingResponse, operation_id="stream_events")
async def stream_events(request: Request, last_event_id_header: LastEventHeader = None,
                        last_event_id: LastEventQuery = None,
                        kinds: Annotated[str | None, Query(description="Comma-separated event kinds to keep.")] = None,
                        max_events: MaxEvents = None, timeout: Timeout = None, keepalive: Keepalive = 15.0):
    bus = _bus(request)
    cursor = _last_id(last_event_id_header, last_event_id)
    _, gap = bus.since(cursor)
    first = [_plain_frame("stream.gap", {"after": cursor, "oldest": bus.since(None)[0][0].id})] if gap else []
    if cursor is None:
        cursor = bus.last_id  # no resume point: live events only
    wanted = {k.strip() for k in kinds.split(",") if k.strip()} if kinds else None
    return _response(_follow(request, bus, cursor, job_id=None, kinds=wanted, max_events=max_events,
                             timeout=timeout, keepalive=keepalive, first=first))


@router.get("/v1/jobs/{job_id}/events", summary="One job's events (SSE): a snapshot, then progress until it ends",
            responses=_SSE_DOC, response_class=StreamingResponse, operation_id="stream_job_events")
async def stream_job_events(job_id: str, request: Request, last_event_id_header: LastEventHeader = None,
                            last_event_id: LastEventQuery = None, max_events: MaxEvents = None,
                            timeout: Timeout = None, keepalive: Keepalive = 15.0):
    bus = _bus(request)
    cursor = _last_id(last_event_id_header, last_event_id)
    start = bus.last_id  # taken before the snapshot: nothing between the two is missed
    job = await asyncio.to_thread(request.app.state.wsync.store.get_job, job_id)
    if job is None:
        raise NotFound(f"no job {job_id!r}", field="job_id")
    first = [_plain_frame("job.snapshot", job_state_data(job))]
    if job.state.terminal:
        replay = [e for e in bus.since(cursor)[0] if e.job_id == job_id and e.id <= start]
        first += [_frame(e) for e in replay]
        return _response(_iter(first))
    return _response(_follow(request, bus, cursor, job_id=job_id, kinds=None, max_events=max_events,
                             timeout=timeout, keepalive=keepalive, first=first))


async def _iter(frames: list[str]) -> AsyncIterator[str]:
    for frame in frames:
        yield frame
