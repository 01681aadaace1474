"""`Client` (blocking) and `AsyncClient` (asyncio): the same surface, two small drivers."""

from __future__ import annotations

import asyncio
import copy
import time
from typing import Any, AsyncIterator, Callable, Iterator, Mapping, TypeVar

import httpx

from wsync.schemas import Health, JobInfo

from ._core import DEFAULT_MAX_RETRIES, DEFAULT_TIMEOUT, APICall, BaseClient, Plan, backoff_delay, run_async, run_sync
from ._events import ServerEvent, SSEDecoder, events_call, finished, poll_as_events, should_reconnect, stream_request
from ._resources import Comparisons, Engines, Events, Jobs, Patches, Results, Sync, Trainer, bind_resources
from .errors import APIConnectionError, NotFoundError, status_error_from_response

T = TypeVar("T")
_NOT_GIVEN: Any = object()

__all__ = ["Client", "AsyncClient"]


class _Surface(BaseClient):
    """What both clients expose besides the resources: health, ready, wait, with_options."""

    engines: Engines
    trainer: Trainer
    patches: Patches
    sync: Sync
    comparisons: Comparisons
    jobs: Jobs
    results: Results
    events: Events
    _owns_http: bool

    def health(self) -> Health:
        """GET /livez."""
        return self._call(APICall("GET", "/livez", cast=Health))

    def ready(self) -> Health:
        """GET /readyz, one attempt (no retries): Health when ready, else InternalServerError (503)
        whose `.body` is the Health document with the failing checks."""
        return self._call(APICall("GET", "/readyz", cast=Health, max_retries=0))

    def wait(self, job_id: str | JobInfo, timeout: float | None = None, poll_interval: float = 0.5,
             on_poll: Callable[[JobInfo], None] | None = None) -> JobInfo:
        """Shortcut for `jobs.wait`."""
        return self.jobs.wait(job_id, timeout=timeout, poll_interval=poll_interval, on_poll=on_poll)

    def with_options(self, *, timeout: Any = _NOT_GIVEN, max_retries: int | None = None,
                     headers: Mapping[str, str] | None = None) -> Any:
        """A copy with other per-request settings that shares this client's connection pool."""
        clone = copy.copy(self)
        clone._owns_http = False
        clone.headers = {**self.headers, **(headers or {})}
        if timeout is not _NOT_GIVEN:
            clone.timeout = timeout
        if max_retries is not None:
            clone.max_retries = max_retries
        bind_resources(clone)
        return clone


class Client(_Surface):
    """Blocking wsync client.

    >>> with Client() as c:                    # base_url: arg, else $WSYNC_URL, else 127.0.0.1:8321
    ...     e = c.engines.launch()
    ...     job = c.sync.dense([e.id])
    ...     c.wait(job.id)
    """

    def __init__(
        self,
        base_url: str | None = None,
        timeout: float | httpx.Timeout | None = DEFAULT_TIMEOUT,
        max_retries: int = DEFAULT_MAX_RETRIES,
        headers: Mapping[str, str] | None = None,
        *,
        api_token: str | None = None,
        http_client: httpx.Client | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        super().__init__(base_url, timeout, max_retries, headers, api_token)
        self._owns_http = http_client is None
        self._http = http_client or httpx.Client(transport=transport, timeout=timeout)
        self._sleep = time.sleep

    def _drive(self, plan: Plan[T]) -> T:
        return run_sync(plan, self._http.send, self._sleep)

    def _stream_events(self, call: APICall) -> Iterator[ServerEvent]:
        """Iterate an SSE stream; a dropped connection is resumed with Last-Event-ID."""
        dec, attempt = SSEDecoder(), 0
        while True:
            try:
                resp = self._http.send(stream_request(self, call, dec.last_id), stream=True)
                try:
                    if not resp.is_success:
                        resp.read()
                        raise status_error_from_response(resp)
                    attempt = 0
                    for line in resp.iter_lines():
                        if (ev := dec.feed(line)) is not None:
                            yield ev
                    if (ev := dec.feed("")) is not None:
                        yield ev
                    return
                finally:
                    resp.close()
            except httpx.TransportError as exc:
                if not should_reconnect(exc, attempt, self.max_retries):
                    raise APIConnectionError(f"GET {call.path}: {type(exc).__name__}: {exc}") from exc
                self._sleep(backoff_delay(attempt))
                attempt += 1

    def _follow(self, job_id: Any, timeout: float | None,
                on_event: Callable[[ServerEvent], None] | None) -> JobInfo:
        try:
            for ev in self._stream_events(events_call(job_id, timeout=timeout)):
                if on_event is not None:
                    on_event(ev)
                if ev.terminal and ev.kind == "job.state":  # a terminal snapshot: the replay follows
                    break
        except NotFoundError:  # a server without the events route (or no such job: polling says so)
            return self._drive(self._wait_plan(job_id, timeout, 0.5, poll_as_events(on_event)))
        return finished(self.jobs.get(job_id), timeout)

    def close(self) -> None:
        if self._owns_http:
            self._http.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient(_Surface):
    """asyncio wsync client: the surface of `Client`, every method returns an awaitable.

    >>> async with AsyncClient() as c:
    ...     job = await c.comparisons.create()
    ...     job = await c.wait(job.id)
    """

    def __init__(
        self,
        base_url: str | None = None,
        timeout: float | httpx.Timeout | None = DEFAULT_TIMEOUT,
        max_retries: int = DEFAULT_MAX_RETRIES,
        headers: Mapping[str, str] | None = None,
        *,
        api_token: str | None = None,
        http_client: httpx.AsyncClient | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        super().__init__(base_url, timeout, max_retries, headers, api_token)
        self._owns_http = http_client is None
        self._http = http_client or httpx.AsyncClient(transport=transport, timeout=timeout)
        self._sleep = asyncio.sleep

    def _drive(self, plan: Plan[T]) -> Any:  # -> Awaitable[T]
        return run_async(plan, self._http.send, self._sleep)

    async def _stream_events(self, call: APICall) -> AsyncIterator[ServerEvent]:
        """`Client._stream_events` with awaitable I/O."""
        dec, attempt = SSEDecoder(), 0
        while True:
            try:
                resp = await self._http.send(stream_request(self, call, dec.last_id), stream=True)
                try:
                    if not resp.is_success:
                        await resp.aread()
                        raise status_error_from_response(resp)
                    attempt = 0
                    async for line in resp.aiter_lines():
                        if (ev := dec.feed(line)) is not None:
                            yield ev
                    if (ev := dec.feed("")) is not None:
                        yield ev
                    return
                finally:
                    await resp.aclose()
            except httpx.TransportError as exc:
                if not should_reconnect(exc, attempt, self.max_retries):
                    raise APIConnectionError(f"GET {call.path}: {type(exc).__name__}: {exc}") from exc
                await self._sleep(backoff_delay(attempt))
                attempt += 1

    async def _follow(self, job_id: Any, timeout: float | None,
                      on_event: Callable[[ServerEvent], None] | None) -> JobInfo:
        try:
            async for ev in self._stream_events(events_call(job_id, timeout=timeout)):
                if on_event is not None:
                    on_event(ev)
                if ev.terminal and ev.kind == "job.state":  # a terminal snapshot: the replay follows
                    break
        except NotFoundError:
            return await self._drive(self._wait_plan(job_id, timeout, 0.5, poll_as_events(on_event)))
        return finished(await self.jobs.get(job_id), timeout)

    async def close(self) -> None:
        if self._owns_http:
            await self._http.aclose()

    aclose = close

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
