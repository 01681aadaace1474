"""Resource namespaces (`client.engines`, `client.jobs`, ...), written once for both clients.

Each method builds an `APICall` (or a composed plan) and hands it to the owning client's driver:
on `Client` it returns the parsed model, on `AsyncClient` an awaitable of the same model.
Arguments are validated with the wire models of `wsync.schemas` before anything is sent.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

from wsync.schemas import (
    ComparisonCreate,
    ComparisonReport,
    EngineInfo,
    EngineLaunch,
    GenerateRequest,
    GenerateResponse,
    JobInfo,
    Page,
    PatchInfo,
    PatchPrepare,
    ResultInfo,
    SyncDense,
    SyncReport,
    SyncSparse,
    TrainerInfo,
    TrainerLoad,
    TrainerStep,
    TrainerStepResult,
)

from ._core import APICall, Plan, build_body, path_param
from ._events import ServerEvent, events_call
from .errors import APIResponseValidationError, JobFailedError

if TYPE_CHECKING:  # pragma: no cover
    from ._core import BaseClient

__all__ = ["Engines", "Trainer", "Patches", "Sync", "Comparisons", "Jobs", "Results", "Events", "bind_resources"]


def _ids(value: str | Iterable[str]) -> list[str]:
    return [value] if isinstance(value, str) else [getattr(v, "id", v) for v in value]


class _Resource:
    def __init__(self, client: "BaseClient") -> None:
        self._client = client

    def _request(self, method: str, path: str, *, cast: Any = None, body: Any = None,
                 params: dict[str, Any] | None = None, idempotent: bool | None = None) -> Any:
        return self._client._call(APICall(method, path, body=body, params=params, cast=cast, idempotent=idempotent))


class Engines(_Resource):
    def launch(self, kind: str = "reference", model: str | None = None, name: str | None = None,
               wait: bool = True, *, timeout: float | None = None, poll_interval: float = 0.5,
               on_poll: Callable[[JobInfo], None] | None = None, **opts: Any) -> EngineInfo:
        """POST /v1/engines. `opts`: other EngineLaunch fields (dtype, gpu_memory_utilization, ...).

        The server answers the engine when it is ready within its wait bound, else 202 with the launch
        job: then this waits for the job (`on_poll` sees each poll: progress; `timeout` seconds, None =
        forever) and returns the engine, ready or failed (with its error). With ``wait=False``: the
        engine as listed now (``starting``). On AsyncClient: an awaitable."""
        body = build_body(EngineLaunch, kind=kind, model=model, name=name, wait=wait, **opts)
        return self._client._drive(self._launch_plan(body, wait, timeout, poll_interval, on_poll))

    def _launch_plan(self, body: dict, wait: bool, timeout: float | None, poll_interval: float,
                     on_poll: Callable[[JobInfo], None] | None) -> Plan[EngineInfo]:
        c = self._client
        out = yield from c._request_plan(APICall("POST", "/v1/engines", body=body, cast=EngineInfo, job_on_202=True))
        if isinstance(out, EngineInfo):
            return out
        if on_poll is not None:
            on_poll(out)
        engine_id = path_param(str(out.request.get("engine_id") or ""))
        if wait:
            try:
                yield from c._wait_plan(out.id, timeout, poll_interval, on_poll)
            except JobFailedError:
                pass  # the engine says why (state failed, error)
        return (yield from c._request_plan(APICall("GET", f"/v1/engines/{engine_id}", cast=EngineInfo)))

    def list(self, limit: int | None = None, offset: int | None = None) -> Page[EngineInfo]:
        return self._request("GET", "/v1/engines", params={"limit": limit, "offset": offset}, cast=Page[EngineInfo])

    def get(self, engine_id: str) -> EngineInfo:
        return self._request("GET", f"/v1/engines/{path_param(engine_id)}", cast=EngineInfo)

    def delete(self, engine_id: str) -> EngineInfo:
        return self._request("DELETE", f"/v1/engines/{path_param(engine_id)}", cast=EngineInfo)

    def generate(self, engine_id: str, prompts: str | Sequence[str], max_new_tokens: int = 1) -> GenerateResponse:
        body = build_body(GenerateRequest, prompts=[prompts] if isinstance(prompts, str) else list(prompts),
                          max_new_tokens=max_new_tokens)
        # Read-only on the server side, so safe to retry like a GET.
        return self._request("POST", f"/v1/engines/{path_param(engine_id)}/generate", body=body,
                             cast=GenerateResponse, idempotent=True)


class Trainer(_Resource):
    def get(self) -> TrainerInfo:
        return self._request("GET", "/v1/trainer", cast=TrainerInfo)

    def load(self, model: str | None = None, dtype: str = "bfloat16", *, timeout: float | None = None,
             poll_interval: float = 0.5, on_poll: Callable[[JobInfo], None] | None = None) -> TrainerInfo:
        """POST /v1/trainer/load. The server answers the trainer when loaded within its wait bound, else
        202 with the load job: then this waits for it (JobFailedError if the load fails, JobTimeoutError
        after `timeout`) and returns the trainer. On AsyncClient: an awaitable."""
        body = build_body(TrainerLoad, model=model, dtype=dtype)
        return self._client._drive(self._load_plan(body, timeout, poll_interval, on_poll))

    def _load_plan(self, body: dict, timeout: float | None, poll_interval: float,
                   on_poll: Callable[[JobInfo], None] | None) -> Plan[TrainerInfo]:
        c = self._client
        out = yield from c._request_plan(APICall("POST", "/v1/trainer/load", body=body, cast=TrainerInfo,
                                                 job_on_202=True))
        if isinstance(out, TrainerInfo):
            return out
        if on_poll is not None:
            on_poll(out)
        job = yield from c._wait_plan(out.id, timeout, poll_interval, on_poll)
        return typed_result(job)

    def reset(self) -> TrainerInfo:
        return self._request("POST", "/v1/trainer/reset", cast=TrainerInfo)

    def step(self, **fields: Any) -> TrainerStepResult:
        """POST /v1/trainer/step: a real optimizer step (texts, optimizer, lr, steps)."""
        return self._request("POST", "/v1/trainer/step", body=build_body(TrainerStep, **fields), cast=TrainerStepResult)


class Patches(_Resource):
    def prepare(self, kind: str = "reference", **fields: Any) -> PatchInfo:
        """POST /v1/patches. `fields`: PatchPrepare fields (rows, density, seed, params, patches, ...)."""
        body = build_body(PatchPrepare, kind=kind, **fields)
        return self._request("POST", "/v1/patches", body=body, cast=PatchInfo)

    def get(self, patch_id: str) -> PatchInfo:
        return self._request("GET", f"/v1/patches/{path_param(patch_id)}", cast=PatchInfo)

    def list(self, limit: int | None = None, offset: int | None = None) -> Page[PatchInfo]:
        return self._request("GET", "/v1/patches", params={"limit": limit, "offset": offset}, cast=Page[PatchInfo])


class Sync(_Resource):
    def dense(self, engine_ids: str | Iterable[str], bucket_bytes: int | None = None, verify: bool = True) -> JobInfo:
        body = build_body(SyncDense, engine_ids=_ids(engine_ids), bucket_bytes=bucket_bytes, verify=verify)
        return self._request("POST", "/v1/sync/dense", body=body, cast=JobInfo)

    def sparse(self, engine_ids: str | Iterable[str], patch_id: str | None = None, patches: list[Any] | None = None,
               encoding: str = "flat_int32", verify: bool = True, delta: bool = False) -> JobInfo:
        """Exactly one source: a prepared ``patch_id``, inline ``patches``, or ``delta=True`` (the trainer's
        bit-exact difference from the version the engines serve). ``encoding``: flat_int32, gap, gap8,
        bitmask, rows or auto."""
        fields: dict[str, Any] = {"engine_ids": _ids(engine_ids), "encoding": encoding, "verify": verify}
        if delta:
            fields["delta"] = True
        if patch_id is not None:
            fields["patch_id"] = getattr(patch_id, "id", patch_id)
        if patches is not None:
            fields["patches"] = patches
        return self._request("POST", "/v1/sync/sparse", body=build_body(SyncSparse, **fields), cast=JobInfo)


class Comparisons(_Resource):
    def create(self, **fields: Any) -> JobInfo:
        """POST /v1/comparisons (ComparisonCreate fields). The job's result is a ComparisonReport dict."""
        return self._request("POST", "/v1/comparisons", body=build_body(ComparisonCreate, **fields), cast=JobInfo)

    def run(self, *, timeout: float | None = None, poll_interval: float = 0.5,
            on_poll: Callable[[JobInfo], None] | None = None, **fields: Any) -> ComparisonReport:
        """Create a comparison, wait for it and return the parsed ComparisonReport."""
        return self._client._drive(self._run_plan(fields, timeout, poll_interval, on_poll))

    def _run_plan(self, fields: dict[str, Any], timeout: float | None, poll_interval: float,
                  on_poll: Callable[[JobInfo], None] | None) -> Plan[ComparisonReport]:
        c = self._client
        body = build_body(ComparisonCreate, **fields)
        job = yield from c._request_plan(APICall("POST", "/v1/comparisons", body=body, cast=JobInfo))
        if on_poll is not None:
            on_poll(job)
        job = yield from c._wait_plan(job.id, timeout, poll_interval, on_poll)
        return report_of(job)


class Jobs(_Resource):
    def get(self, job_id: str) -> JobInfo:
        return self._request("GET", f"/v1/jobs/{path_param(job_id)}", cast=JobInfo)

    def list(self, state: str | None = None, kind: str | None = None, limit: int | None = None,
             offset: int | None = None) -> Page[JobInfo]:
        params = {"state": state, "kind": kind, "limit": limit, "offset": offset}
        return self._request("GET", "/v1/jobs", params=params, cast=Page[JobInfo])

    def cancel(self, job_id: str) -> JobInfo:
        # Cancelling twice has the same effect as once: safe to retry.
        return self._request("POST", f"/v1/jobs/{path_param(job_id)}/cancel", cast=JobInfo, idempotent=True)

    def wait(self, job_id: str, timeout: float | None = None, poll_interval: float = 0.5,
             on_poll: Callable[[JobInfo], None] | None = None) -> JobInfo:
        """Poll until the job ends. Returns the succeeded JobInfo; raises JobFailedError (failed or
        cancelled, `.job` attached) or JobTimeoutError (after `timeout` seconds, None = forever).
        `on_poll(job)` is called with every JobInfo fetched (progress display)."""
        return self._client._drive(self._client._wait_plan(job_id, timeout, poll_interval, on_poll))

    def result(self, job_id: str) -> Any:
        """The job's result typed by its kind (SyncReport, ComparisonReport, EngineInfo, TrainerInfo;
        None until it has one). On AsyncClient: an awaitable."""
        return self._client._drive(self._result_plan(job_id))

    def _result_plan(self, job_id: str) -> Plan[Any]:
        job = yield from self._client._request_plan(APICall("GET", f"/v1/jobs/{path_param(job_id)}", cast=JobInfo))
        return typed_result(job)

    def follow(self, job_id: str, timeout: float | None = None,
               on_event: Callable[[ServerEvent], None] | None = None) -> JobInfo:
        """Like `wait`, driven by the job's event stream (GET /v1/jobs/{id}/events): `on_event` sees
        the snapshot, every progress event and state change as they happen. Polls instead on a
        server without the events route. On AsyncClient: an awaitable."""
        return self._client._follow(job_id, timeout, on_event)


class Events(_Resource):
    def stream(self, job_id: str | None = None, kinds: Iterable[str] | None = None,
               max_events: int | None = None, timeout: float | None = None) -> Any:
        """Iterate server events (GET /v1/events, or one job's): ServerEvent objects, resumed with
        Last-Event-ID after a dropped connection. `kinds` filters (e.g. ["sync.finished"]);
        `max_events` / `timeout` make the server end the stream. Client: an iterator; AsyncClient:
        an async iterator."""
        return self._client._stream_events(events_call(job_id, kinds=kinds, max_events=max_events, timeout=timeout))


class Results(_Resource):
    def list(self, kind: str | None = None, limit: int = 50, offset: int = 0) -> Page[ResultInfo]:
        params = {"kind": kind, "limit": limit, "offset": offset}
        return self._request("GET", "/v1/results", params=params, cast=Page[ResultInfo])

    def get(self, result_id: str) -> ResultInfo:
        return self._request("GET", f"/v1/results/{path_param(result_id)}", cast=ResultInfo)


#: What a succeeded job's result is, by job kind.
RESULT_TYPES: dict[str, Any] = {"sync_dense": SyncReport, "sync_sparse": SyncReport, "comparison": ComparisonReport,
                                "engine_launch": EngineInfo, "trainer_load": TrainerInfo}


def typed_result(job: JobInfo) -> Any:
    """A job's result parsed by its kind (SyncReport, ComparisonReport, EngineInfo, TrainerInfo);
    None while the job has none; the raw dict for a kind this SDK does not know."""
    if job.result is None:
        return None
    kind = getattr(job.kind, "value", job.kind)
    cls = RESULT_TYPES.get(kind)
    if cls is None:
        return job.result
    try:
        return cls.model_validate(job.result)
    except Exception as exc:  # pydantic.ValidationError
        raise APIResponseValidationError(f"job {job.id}: result is not a {cls.__name__}: {exc}") from None


def report_of(job: JobInfo) -> ComparisonReport:
    """The ComparisonReport of a succeeded comparison job."""
    try:
        return ComparisonReport.model_validate(job.result)
    except Exception as exc:  # pydantic.ValidationError or a None result
        raise APIResponseValidationError(f"job {job.id}: result is not a ComparisonReport: {exc}") from None


def bind_resources(client: "BaseClient") -> None:
    client.engines = Engines(client)
    client.trainer = Trainer(client)
    client.patches = Patches(client)
    client.sync = Sync(client)
    client.comparisons = Comparisons(client)
    client.jobs = Jobs(client)
    client.results = Results(client)
    client.events = Events(client)
