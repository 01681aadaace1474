"""Sans-I/O core shared by `Client` and `AsyncClient`.

Every API operation is written once, as a *plan*: a generator that yields `Send(request)` or
`Sleep(seconds)` actions and gets back the `httpx.Response` (or has the transport exception thrown
in). Request building, response parsing, error mapping, the retry decision and job polling all live
here. The sync client runs a plan with `httpx.Client.send` / `time.sleep`, the async client with
`await httpx.AsyncClient.send` / `asyncio.sleep`; that small driver is the only duplicated code.
"""

from __future__ import annotations

import email.utils
import os
import random
import time
import uuid
from dataclasses import dataclass, field, replace
from datetime import timezone
from typing import Any, Callable, Generator, Mapping, TypeVar, Union
from urllib.parse import quote

import httpx
import pydantic

from wsync import __version__
from wsync.schemas import JobInfo, JobState

from .errors import (
    APIConnectionError,
    APIResponseValidationError,
    APITimeoutError,
    InvalidRequestError,
    JobFailedError,
    JobTimeoutError,
    status_error_from_response,
)

T = TypeVar("T")

DEFAULT_BASE_URL = "http://127.0.0.1:8321"
DEFAULT_TIMEOUT = 60.0
DEFAULT_MAX_RETRIES = 3
RETRY_AFTER_CAP_S = 60.0
BACKOFF_BASE_S = 0.5
BACKOFF_CAP_S = 8.0
#: Statuses worth retrying for idempotent requests.
RETRY_STATUSES = frozenset({429, 502, 503, 504})
#: Statuses where the server guarantees it did not act, so even a non-idempotent POST is retried.
RETRY_STATUSES_UNSAFE = frozenset({429, 503})
#: Transport errors raised before the request left the client (safe to retry any request).
NOT_SENT_ERRORS = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)
USER_AGENT = f"wsync-client/{__version__}"
IDEMPOTENCY_HEADER = "Idempotency-Key"


@dataclass(frozen=True)
class APICall:
    """One logical API request (possibly several attempts)."""

    method: str
    path: str
    body: Any = None
    params: Mapping[str, Any] | None = None
    cast: Any = None  #: pydantic model class (or parametrized generic) to parse into; None: raw JSON
    idempotent: bool | None = None  #: default: everything but POST
    max_retries: int | None = None  #: override the client's max_retries for this call
    accept: frozenset[int] = field(default_factory=frozenset)  #: extra statuses parsed as success
    #: POST: the Idempotency-Key sent with every attempt (default: a fresh one per call, so a retried
    #: POST is done once by the server and is as safe to retry as a GET)
    idempotency_key: str | None = None
    #: a 202 answer is parsed as the JobInfo of a long operation (launch, load) instead of ``cast``
    job_on_202: bool = False

    @property
    def is_idempotent(self) -> bool:
        if self.idempotent is not None:
            return self.idempotent
        return self.method.upper() != "POST" or self.idempotency_key is not None


@dataclass(frozen=True)
class Send:
    request: httpx.Request


@dataclass(frozen=True)
class Sleep:
    seconds: float


Plan = Generator[Union[Send, Sleep], Any, T]


def path_param(value: str) -> str:
    """Quote an id for use as one path segment (an id can never climb to another route)."""
    value = getattr(value, "id", value)  # accept model instances (JobInfo, EngineInfo, ...)
    if not isinstance(value, str) or not value:
        raise InvalidRequestError(f"expected a non-empty id string, got {value!r}", field="id")
    return quote(value, safe="")


def build_body(model_cls: type[pydantic.BaseModel], /, **fields: Any) -> dict[str, Any]:
    """Validate arguments with the wire model and return its JSON body (server defaults for unset fields)."""
    try:
        model = model_cls.model_validate(fields)
    except pydantic.ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err.get("loc", ())) or None
        msg = err.get("msg", str(exc))
        raise InvalidRequestError(f"{loc}: {msg}" if loc else msg, field=loc, rule=err.get("type")) from None
    return model.model_dump(mode="json", exclude_unset=True)


def parse_retry_after(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """Seconds to wait from a `Retry-After` (delta-seconds or HTTP date), capped; None if absent/bad."""
    raw = headers.get("retry-after")
    if raw is None:
        return None
    raw = raw.strip()
    try:
        delay = float(raw)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(raw)
        except (TypeError, ValueError, IndexError):
            return None
        if when is None:
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
        delay = when.timestamp() - (time.time() if now is None else now)
    if delay != delay:  # NaN
        return None
    return min(max(delay, 0.0), RETRY_AFTER_CAP_S)


def backoff_delay(attempt: int) -> float:
    """Exponential backoff with jitter: 0.5 s, 1 s, 2 s ... capped at 8 s, minus up to 25 %."""
    base = min(BACKOFF_BASE_S * (2 ** attempt), BACKOFF_CAP_S)
    return base * (1.0 - 0.25 * random.random())


def should_retry(call: APICall, *, status: int | None = None, error: BaseException | None = None) -> bool:
    """The retry decision: idempotent requests on network errors and 429/502/503/504; non-idempotent
    ones only when the request never left (connect errors) or the server says it did not act (429/503)."""
    if error is not None:
        if isinstance(error, NOT_SENT_ERRORS):
            return True
        return call.is_idempotent and isinstance(error, httpx.TransportError)
    if status is None:
        return False
    return status in (RETRY_STATUSES if call.is_idempotent else RETRY_STATUSES_UNSAFE)


class BaseClient:
    """Configuration plus the plans; subclasses add `_http`, `_sleep` and `_drive`."""

    _http: Any  # httpx.Client | httpx.AsyncClient (both have build_request)

    def __init__(
        self,
        base_url: str | None = None,
        timeout: float | httpx.Timeout | None = DEFAULT_TIMEOUT,
        max_retries: int = DEFAULT_MAX_RETRIES,
        headers: Mapping[str, str] | None = None,
        api_token: str | None = None,
    ) -> None:
        if max_retries < 0:
            raise ValueError("max_retries must be >= 0")
        self.base_url = (base_url or os.environ.get("WSYNC_URL") or DEFAULT_BASE_URL).rstrip("/")
        self.timeout = timeout
        self.max_retries = max_retries
        self.headers: dict[str, str] = {"User-Agent": USER_AGENT, "Accept": "application/json", **(headers or {})}
        token = api_token or os.environ.get("WSYNC_API_TOKEN")
        if token and "Authorization" not in self.headers:
            self.headers["Authorization"] = f"Bearer {token}"
        self._clock = time.monotonic
        from ._resources import bind_resources  # late: resources import this module

        bind_resources(self)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base_url={self.base_url!r})"

    # -- request building / response parsing ------------------------------------------------------

    def _build_request(self, call: APICall, request_id: str, attempt: int) -> httpx.Request:
        headers = {**self.headers, "X-Request-ID": request_id}
        if call.idempotency_key is not None:
            headers[IDEMPOTENCY_HEADER] = call.idempotency_key
        if attempt:
            headers["X-Retry-Count"] = str(attempt)
        params = {k: getattr(v, "value", v) for k, v in (call.params or {}).items() if v is not None}
        return self._http.build_request(
            call.method, self.base_url + call.path, params=params or None,
            json=call.body, headers=headers, timeout=self.timeout,
        )

    @staticmethod
    def _parse(call: APICall, response: httpx.Response) -> Any:
        try:
            data = response.json() if response.content else None
        except ValueError:
            raise APIResponseValidationError(
                f"{call.method} {call.path}: response is not JSON: {response.text[:200]!r}", response=response
            ) from None
        if call.cast is None:
            return data
        try:
            return call.cast.model_validate(data)
        except pydantic.ValidationError as exc:
            raise APIResponseValidationError(
                f"{call.method} {call.path}: unexpected response body: {exc}", response=response
            ) from None

    # -- plans ------------------------------------------------------------------------------------

    def _request_plan(self, call: APICall) -> Plan[Any]:
        """One call with retries. The X-Request-ID stays the same across attempts (X-Retry-Count grows)."""
        request_id = str(uuid.uuid4())
        if call.method.upper() == "POST" and call.idempotency_key is None:
            call = replace(call, idempotency_key=f"wsync-retry-{uuid.uuid4()}")  # one key, every attempt
        max_retries = self.max_retries if call.max_retries is None else call.max_retries
        attempt = 0
        while True:
            request = self._build_request(call, request_id, attempt)
            retry_after: float | None = None
            try:
                response = yield Send(request)
            except httpx.TransportError as exc:
                cls = APITimeoutError if isinstance(exc, httpx.TimeoutException) else APIConnectionError
                error: Exception = cls(f"{call.method} {request.url}: {type(exc).__name__}: {exc}", request=request)
                error.__cause__ = exc
                retry = should_retry(call, error=exc)
            else:
                if response.status_code == 202 and call.job_on_202:
                    return self._parse(replace(call, cast=JobInfo), response)
                if response.is_success or response.status_code in call.accept:
                    return self._parse(call, response)
                error = status_error_from_response(response)
                retry = should_retry(call, status=response.status_code)
                retry_after = parse_retry_after(response.headers)
            if not retry or attempt >= max_retries:
                raise error
            yield Sleep(retry_after if retry_after is not None else backoff_delay(attempt))
            attempt += 1

    def _call(self, call: APICall) -> Any:
        return self._drive(self._request_plan(call))

    def _wait_plan(self, job_id: Any, timeout: float | None, poll_interval: float,
                   on_poll: Callable[[JobInfo], None] | None = None) -> Plan[JobInfo]:
        """Poll GET /v1/jobs/{id} until terminal; JobFailedError / JobTimeoutError otherwise.
        `on_poll(job)` (optional, synchronous) sees every JobInfo fetched, e.g. to print progress."""
        if poll_interval <= 0:
            raise ValueError("poll_interval must be > 0")
        call = APICall("GET", f"/v1/jobs/{path_param(job_id)}", cast=JobInfo)
        deadline = None if timeout is None else self._clock() + timeout
        while True:
            job: JobInfo = yield from self._request_plan(call)
            if on_poll is not None:
                on_poll(job)
            if job.state == JobState.succeeded:
                return job
            if job.state.terminal:
                raise JobFailedError(job)
            delay = poll_interval
            if deadline is not None:
                remaining = deadline - self._clock()
                if remaining <= 0:
                    raise JobTimeoutError(job.id, timeout or 0.0, job)
                delay = min(delay, remaining)
            yield Sleep(delay)

    def _drive(self, plan: Plan[T]) -> Any:  # pragma: no cover - overridden
        raise NotImplementedError


def run_sync(plan: Plan[T], send: Any, sleep: Any) -> T:
    """Run a plan to completion with blocking I/O."""
    try:
        action = next(plan)
        while True:
            if isinstance(action, Sleep):
                sleep(action.seconds)
                action = plan.send(None)
                continue
            try:
                response = send(action.request)
            except httpx.TransportError as exc:
                action = plan.throw(exc)
            else:
                action = plan.send(response)
    except StopIteration as stop:
        return stop.value
    finally:
        plan.close()


async def run_async(plan: Plan[T], send: Any, sleep: Any) -> T:
    """Run a plan to completion with awaitable I/O (same protocol as `run_sync`)."""
    try:
        action = next(plan)
        while True:
            if isinstance(action, Sleep):
                await sleep(action.seconds)
                action = plan.send(None)
                continue
            try:
                response = await send(action.request)
            except httpx.TransportError as exc:
                action = plan.throw(exc)
            else:
                action = plan.send(response)
    except StopIteration as stop:
        return stop.value
    finally:
        plan.close()

