"""Server-Sent Events for the SDK, sans-I/O like `_core`: the decoder, the request and the resume logic
live here once; `Client` and `AsyncClient` only differ in how they read lines (see `_client`).

    for ev in client.events.stream(kinds=["sync.finished"]):   # reconnects with Last-Event-ID
        print(ev.kind, ev.data["total_ms"])
    job = client.jobs.follow(job_id, on_event=print)          # events until the job ends
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import httpx

from ._core import APICall, BaseClient, path_param

TERMINAL = ("succeeded", "failed", "cancelled")


@dataclass(frozen=True)
class ServerEvent:
    """One event: `kind` (e.g. job.state, job.event, sync.finished), its `data`, the bus `id`
    (None for stream-local events: job.snapshot, stream.gap), the `job_id` it concerns."""

    kind: str
    data: dict[str, Any] = field(default_factory=dict)
    id: int | None = None
    job_id: str | None = None
    at: str | None = None

    @property
    def terminal(self) -> bool:
        """A job.state / job.snapshot of a finished job."""
        return self.kind in ("job.state", "job.snapshot") and self.data.get("state") in TERMINAL

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "kind": self.kind, "at": self.at, "job_id": self.job_id, "data": self.data}


class SSEDecoder:
    """Feed it lines (without newline); it returns a ServerEvent at each blank line that ends one."""

    def __init__(self) -> None:
        self._event: str | None = None
        self._data: list[str] = []
        self._id: str | None = None
        self.last_id: int | None = None

    def feed(self, line: str) -> ServerEvent | None:
        if line == "":
            return self._dispatch()
        if line.startswith(":"):
            return None  # comment (keep-alive)
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "event":
            self._event = value
        elif name == "data":
            self._data.append(value)
        elif name == "id":
            self._id = value
        return None

    def _dispatch(self) -> ServerEvent | None:
        if not self._data and self._event is None:
            return None
        raw, kind, sid = "\n".join(self._data), self._event or "message", self._id
        self._event, self._data, self._id = None, [], None
        try:
            body = json.loads(raw) if raw else {}
        except ValueError:
            body = {"data": {"text": raw}}
        ev_id = int(sid) if sid and sid.isdigit() else None
        if ev_id is not None:
            self.last_id = ev_id
        return ServerEvent(kind=body.get("kind", kind), data=body.get("data") or {}, id=ev_id,
                           job_id=body.get("job_id"), at=body.get("at"))


def events_call(job_id: Any = None, *, kinds: Iterable[str] | None = None, max_events: int | None = None,
                timeout: float | None = None) -> APICall:
    path = "/v1/events" if job_id is None else f"/v1/jobs/{path_param(job_id)}/events"
    params = {"kinds": ",".join(kinds) if kinds else None, "max_events": max_events, "timeout": timeout}
    return APICall("GET", path, params=params)


def stream_request(client: BaseClient, call: APICall, last_id: int | None) -> httpx.Request:
    """The GET for a stream: no read timeout (keep-alives arrive every 15 s), Last-Event-ID to resume."""
    request = client._build_request(call, request_id=f"sse-{last_id or 0}", attempt=0)
    request.headers["Accept"] = "text/event-stream"
    if last_id is not None:
        request.headers["Last-Event-ID"] = str(last_id)
    connect = client.timeout if isinstance(client.timeout, (int, float)) else 30.0
    request.extensions["timeout"] = httpx.Timeout(connect, read=None).as_dict()
    return request


def should_reconnect(error: BaseException | None, attempt: int, max_retries: int) -> bool:
    """Resume after a dropped connection (not after an HTTP error answer), up to max_retries in a row."""
    return isinstance(error, httpx.TransportError) and attempt < max_retries


def finished(job: Any, timeout: float | None) -> Any:
    """The outcome of following a job: the JobInfo when it succeeded, else the matching error."""
    from .errors import JobFailedError, JobTimeoutError

    if job.state.value == "succeeded":
        return job
    if job.state.terminal:
        raise JobFailedError(job)
    raise JobTimeoutError(job.id, timeout or 0.0, job)


def poll_as_events(on_event: Any) -> Any:
    """An `on_poll` for the polling fallback (a server without the events route) that reports each
    new job event and state change to `on_event` as ServerEvents."""
    seen = {"events": 0, "state": None}

    def on_poll(job: Any) -> None:
        if on_event is None:
            return
        for ev in job.events[seen["events"]:]:
            on_event(ServerEvent("job.event", dict(ev), job_id=job.id))
        seen["events"] = len(job.events)
        if job.state != seen["state"]:
            seen["state"] = job.state
            on_event(ServerEvent("job.state", job.model_dump(mode="json", exclude={"events", "request"}),
                                 job_id=job.id))
    return on_poll
