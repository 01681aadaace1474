"""wsync_client against httpx.MockTransport: parsing, errors, retries, wait(), sync and async."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from email.utils import formatdate

import httpx
import pytest

from wsync.schemas import ComparisonReport, EngineInfo, JobInfo, JobState, Page, PatchInfo, ResultInfo, TrainerInfo
from wsync_client import (
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    AsyncClient,
    BadRequestError,
    Client,
    ConflictError,
    InternalServerError,
    InvalidRequestError,
    JobFailedError,
    JobTimeoutError,
    NotFoundError,
    RateLimitError,
    UnprocessableEntityError,
    __version__,
)
from wsync_client._core import parse_retry_after

NOW = "2025-01-01T00:00:00Z"
BASE = "http://wsync.test"


def engine(id_: str = "e-1", state: str = "ready") -> dict:
    return {"id": id_, "kind": "reference", "model": "tiny", "state": state, "version": "base:tiny",
            "created_at": NOW}


def job(state: str = "queued", kind: str = "sync_dense", **extra) -> dict:
    return {"id": "j-1", "kind": kind, "state": state, "created_at": NOW, **extra}


def report(**verdicts) -> dict:
    v = {"baseline_equal": True, "patch_selection_equal": True, "patch_digest_equal": True,
         "after_equal": True, "any_output_changed": True, **verdicts}
    phase = {"engine_id": "e-1", "trainer_before": [[1]], "before": [[1]], "after": [[2]], "trainer_after": [[2]],
             "selected_token_ids": [5, 6], "patch_digest": "abc", "payload_bytes": 10, "wire_bytes": 10,
             "send_ms": 1.0, "total_ms": 2.0}
    return {"ok": all(v.values()), "model": "tiny", "engine_kind": "reference", "prompts": ["hi"], "verdicts": v,
            "trainer_engine_baseline_equal": True, "dense_payload_mb": 8.5, "sparse_payload_mb": 0.01,
            "dense_send_ms": 3.0, "sparse_send_ms": 1.0, "dense": phase, "sparse": phase}


def err(status: int, type_: str = "error", message: str = "boom", headers: dict | None = None, **detail):
    body = {"error": {"type": type_, "message": message, **detail}}
    return httpx.Response(status, json=body, headers={"X-Request-ID": "hdr-rid", **(headers or {})})


class Recorder:
    """A MockTransport handler that answers from a list (last one repeats) and records requests."""

    def __init__(self, *responses):
        self.responses = list(responses)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        item = self.responses.pop(0) if len(self.responses) > 1 else self.responses[0]
        if isinstance(item, Exception):
            raise item
        return item(request) if callable(item) else item


def sync_client(rec: Recorder, **kw) -> tuple[Client, list[float]]:
    c = Client(BASE, transport=httpx.MockTransport(rec), **kw)
    sleeps: list[float] = []
    c._sleep = sleeps.append
    return c, sleeps


def async_client(rec: Recorder, **kw) -> tuple[AsyncClient, list[float]]:
    c = AsyncClient(BASE, transport=httpx.MockTransport(rec), **kw)
    sleeps: list[float] = []

    async def fake_sleep(s: float) -> None:
        sleeps.append(s)

    c._sleep = fake_sleep
    return c, sleeps


# -- parsing & request building ---------------------------------------------------------------------

def test_launch_parses_engine_and_sends_body_and_headers():
    rec = Recorder(httpx.Response(201, json=engine()))
    c, _ = sync_client(rec)
    info = c.engines.launch(name="a", gpu_memory_utilization=0.6)
    assert isinstance(info, EngineInfo) and info.id == "e-1" and info.state.value == "ready"
    req = rec.requests[0]
    assert req.method == "POST" and str(req.url) == f"{BASE}/v1/engines"
    assert json.loads(req.content) == {"kind": "reference", "model": None, "name": "a", "wait": True,
                                       "gpu_memory_utilization": 0.6}
    assert req.headers["user-agent"] == f"wsync-client/{__version__}"
    uuid.UUID(req.headers["x-request-id"])


def test_resources_paths_params_and_models():
    page = {"items": [], "total": 0, "limit": 50, "offset": 0}
    routes = {
        ("GET", "/v1/engines"): {"items": [engine()], "total": 1, "limit": 50, "offset": 0},
        ("GET", "/v1/trainer"): {"loaded": True, "model": "tiny"},
        ("POST", "/v1/trainer/load"): {"loaded": True, "model": "m"},
        ("POST", "/v1/patches"): {"id": "p-1", "kind": "random", "created_at": NOW, "base_version": "base:tiny",
                                  "tensors": [], "num_elements": 3, "payload_bytes": 24, "digest": "d"},
        ("POST", "/v1/sync/sparse"): job(kind="sync_sparse"),
        ("GET", "/v1/results"): {**page, "items": [{"id": "r-1", "job_id": "j-1", "kind": "comparison",
                                                    "created_at": NOW, "data": {"x": 1}}]},
        ("GET", "/v1/jobs"): page,
        ("POST", "/v1/jobs/j%2F1/cancel"): job("cancelled"),
    }

    def handler(req: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json=routes[(req.method, req.url.raw_path.decode().split("?")[0])])

    rec = Recorder(handler)
    c, _ = sync_client(rec)
    engines = c.engines.list()
    assert isinstance(engines, Page) and isinstance(engines.items[0], EngineInfo)
    assert isinstance(c.trainer.get(), TrainerInfo)
    assert c.trainer.load(model="m").model == "m"
    assert json.loads(rec.requests[-1].content) == {"model": "m", "dtype": "bfloat16"}
    p = c.patches.prepare(kind="random", density=0.01, seed=7)
    assert isinstance(p, PatchInfo)
    assert json.loads(rec.requests[-1].content) == {"kind": "random", "density": 0.01, "seed": 7}
    assert c.sync.sparse("e-1", patch_id="p-1").kind.value == "sync_sparse"
    assert json.loads(rec.requests[-1].content) == {"engine_ids": ["e-1"], "patch_id": "p-1",
                                                    "encoding": "flat_int32", "verify": True}
    res = c.results.list(kind="comparison", limit=5)
    assert isinstance(res.items[0], ResultInfo)
    assert dict(rec.requests[-1].url.params) == {"kind": "comparison", "limit": "5", "offset": "0"}
    c.jobs.list(state="running")
    assert dict(rec.requests[-1].url.params) == {"state": "running"}
    assert c.jobs.cancel("j/1").state == JobState.cancelled  # ids are quoted as one path segment


def test_client_side_validation_sends_nothing():
    rec = Recorder(httpx.Response(200, json={}))
    c, _ = sync_client(rec)
    with pytest.raises(InvalidRequestError):
        c.sync.sparse(["e-1"])  # neither patch_id nor patches
    with pytest.raises(InvalidRequestError) as ei:
        c.trainer.load(dtype="int8")
    assert ei.value.field == "dtype"
    assert rec.requests == []


def test_base_url_from_env(monkeypatch):
    monkeypatch.setenv("WSYNC_URL", "http://env-host:9/")
    assert Client().base_url == "http://env-host:9"
    monkeypatch.delenv("WSYNC_URL")
    assert Client().base_url == "http://127.0.0.1:8321"


def test_context_manager_and_with_options():
    rec = Recorder(httpx.Response(200, json={"status": "ok"}))
    with Client(BASE, transport=httpx.MockTransport(rec)) as c:
        quick = c.with_options(timeout=1.0, max_retries=0)
        assert quick.health().status == "ok" and quick._http is c._http and quick.max_retries == 0
    assert c._http.is_closed
    assert rec.requests[0].url.path == "/livez"


# -- errors -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("status,cls", [(400, BadRequestError), (404, NotFoundError), (409, ConflictError),
                                        (422, UnprocessableEntityError), (429, RateLimitError),
                                        (500, InternalServerError), (501, InternalServerError),
                                        (418, APIStatusError)])
def test_status_maps_to_error_class(status, cls):
    rec = Recorder(err(status, "conflict", "engine e-1 lacks base", field="engine_ids.0", rule="version",
                       request_id="rid-1"))
    c, _ = sync_client(rec, max_retries=0)
    with pytest.raises(cls) as ei:
        c.engines.get("e-1")
    e = ei.value
    assert type(e) is cls and e.status_code == status and e.request_id == "rid-1"
    assert (e.type, e.field, e.rule, e.message) == ("conflict", "engine_ids.0", "version", "engine e-1 lacks base")
    assert str(e) == f"{status} conflict: engine e-1 lacks base (field=engine_ids.0, rule=version, request_id=rid-1)"


def test_error_without_body_uses_header_request_id():
    rec = Recorder(httpx.Response(404, text="nope", headers={"X-Request-ID": "hdr"}))
    c, _ = sync_client(rec)
    with pytest.raises(NotFoundError) as ei:
        c.jobs.get("j-1")
    assert ei.value.request_id == "hdr" and ei.value.message == "nope"


def test_ready_503_raises_without_retry():
    rec = Recorder(httpx.Response(503, json={"status": "starting", "checks": {"ray": "down"}}))
    c, sleeps = sync_client(rec)
    with pytest.raises(InternalServerError) as ei:
        c.ready()
    assert len(rec.requests) == 1 and not sleeps and ei.value.body["checks"] == {"ray": "down"}


# -- retries ----------------------------------------------------------------------------------------

def test_retry_after_seconds_is_honoured():
    rec = Recorder(err(429, "rate_limited", headers={"Retry-After": "2"}), httpx.Response(200, json=engine()))
    c, sleeps = sync_client(rec)
    assert c.engines.get("e-1").id == "e-1"
    assert sleeps == [2.0]
    assert rec.requests[0].headers["x-request-id"] == rec.requests[1].headers["x-request-id"]
    assert rec.requests[1].headers["x-retry-count"] == "1"


def test_retry_after_http_date_and_cap():
    now = time.time()
    assert parse_retry_after({"retry-after": formatdate(now + 10, usegmt=True)}, now=now) == pytest.approx(10, abs=1)
    assert parse_retry_after({"retry-after": "3600"}) == 60.0
    assert parse_retry_after({"retry-after": "garbage"}) is None
    assert parse_retry_after({"retry-after": formatdate(now - 50, usegmt=True)}, now=now) == 0.0


def test_get_retries_with_backoff_until_max_retries():
    rec = Recorder(err(503, "unavailable"))
    c, sleeps = sync_client(rec, max_retries=3)
    with pytest.raises(InternalServerError):
        c.engines.list()
    assert len(rec.requests) == 4
    assert [r.headers.get("x-retry-count") for r in rec.requests] == [None, "1", "2", "3"]
    for s, base in zip(sleeps, [0.5, 1.0, 2.0]):
        assert 0.75 * base <= s <= base


def test_post_not_retried_on_500():
    rec = Recorder(err(500))
    c, sleeps = sync_client(rec)
    with pytest.raises(InternalServerError):
        c.sync.dense(["e-1"])
    assert len(rec.requests) == 1 and sleeps == []


@pytest.mark.parametrize("status", [502, 504])
def test_post_retried_on_gateway_errors_with_one_idempotency_key(status):
    """openai-python style: every POST carries an Idempotency-Key, the same on every attempt, so the
    server does a retried request once and the SDK may retry it like a GET."""
    rec = Recorder(err(status), httpx.Response(202, json=job()))
    c, sleeps = sync_client(rec)
    assert c.sync.dense(["e-1"]).id == "j-1"
    keys = [r.headers.get("idempotency-key") for r in rec.requests]
    assert len(keys) == 2 and keys[0] and keys[0] == keys[1] and len(sleeps) == 1
    c.sync.dense(["e-1"])
    assert rec.requests[-1].headers["idempotency-key"] != keys[0]  # a new call, a new key


@pytest.mark.parametrize("status", [429, 503])
def test_post_retried_on_429_and_503(status):
    rec = Recorder(err(status), httpx.Response(202, json=job()))
    c, sleeps = sync_client(rec)
    assert c.sync.dense(["e-1"]).state == JobState.queued
    assert len(rec.requests) == 2 and len(sleeps) == 1


def test_post_retried_on_connect_error_and_read_timeout():
    rec = Recorder(httpx.ConnectError("refused"), httpx.Response(202, json=job()))
    c, _ = sync_client(rec)
    assert c.comparisons.create().id == "j-1"
    assert json.loads(rec.requests[0].content) == {}
    rec = Recorder(httpx.ReadTimeout("slow"))
    c, _ = sync_client(rec)
    with pytest.raises(APITimeoutError):
        c.comparisons.create()
    # a read timeout is retried too: the Idempotency-Key makes the server do it once
    assert len(rec.requests) == 4 and len({r.headers["idempotency-key"] for r in rec.requests}) == 1
    rec = Recorder(httpx.ReadTimeout("slow"))
    c, _ = sync_client(rec)
    with pytest.raises(APITimeoutError):
        c.patches.prepare()
    assert len(rec.requests) == 4


def test_get_retried_on_network_errors_then_raises():
    rec = Recorder(httpx.ReadError("reset"))
    c, sleeps = sync_client(rec, max_retries=2)
    with pytest.raises(APIConnectionError) as ei:
        c.trainer.get()
    assert not isinstance(ei.value, APITimeoutError) and isinstance(ei.value.__cause__, httpx.ReadError)
    assert len(rec.requests) == 3 and len(sleeps) == 2


# -- wait -------------------------------------------------------------------------------------------

def test_wait_success_polls_until_succeeded():
    rec = Recorder(httpx.Response(200, json=job("queued")), httpx.Response(200, json=job("running")),
                   httpx.Response(200, json=job("succeeded", result={"mode": "dense"})))
    c, sleeps = sync_client(rec)
    seen = []
    done = c.wait("j-1", poll_interval=0.25, on_poll=lambda j: seen.append(j.state.value))
    assert isinstance(done, JobInfo) and done.result == {"mode": "dense"}
    assert sleeps == [0.25, 0.25] and seen == ["queued", "running", "succeeded"]


@pytest.mark.parametrize("state", ["failed", "cancelled"])
def test_wait_failure_raises_job_failed(state):
    rec = Recorder(httpx.Response(200, json=job("running")), httpx.Response(200, json=job(state, error="oom")))
    c, _ = sync_client(rec)
    with pytest.raises(JobFailedError) as ei:
        c.jobs.wait("j-1")
    assert ei.value.job.state.value == state and ei.value.job.error == "oom"
    assert "oom" in str(ei.value)


def test_wait_timeout_raises_job_timeout():
    rec = Recorder(httpx.Response(200, json=job("running")))
    c, sleeps = sync_client(rec)
    clock = [100.0]
    c._clock = lambda: clock[0]
    c._sleep = lambda s: (sleeps.append(s), clock.__setitem__(0, clock[0] + s))
    with pytest.raises(JobTimeoutError) as ei:
        c.wait("j-1", timeout=1.2, poll_interval=0.5)
    assert sleeps == [0.5, 0.5, pytest.approx(0.2)]
    assert ei.value.job.state == JobState.running and ei.value.timeout == 1.2


def test_comparisons_run_returns_report():
    rec = Recorder(httpx.Response(202, json=job(kind="comparison")),
                   httpx.Response(200, json=job("succeeded", kind="comparison", result=report())))
    c, _ = sync_client(rec)
    rep = c.comparisons.run(engine_kind="reference", rows=4)
    assert isinstance(rep, ComparisonReport) and rep.verdicts.after_equal
    assert json.loads(rec.requests[0].content) == {"engine_kind": "reference", "rows": 4}


# -- async ------------------------------------------------------------------------------------------

def test_async_parsing_errors_and_retry_after():
    async def go():
        rec = Recorder(err(503, headers={"Retry-After": "1.5"}), httpx.Response(201, json=engine()),
                       err(409, "conflict", field="engine_ids", request_id="rid-9"))
        c, sleeps = async_client(rec)
        async with c:
            info = await c.engines.launch()
            assert isinstance(info, EngineInfo) and sleeps == [1.5]
            with pytest.raises(ConflictError) as ei:
                await c.sync.dense(["e-1"])
            assert ei.value.status_code == 409 and ei.value.request_id == "rid-9" and ei.value.field == "engine_ids"
        assert c._http.is_closed

    asyncio.run(go())


def test_async_post_not_retried_on_500_and_connect_error_retried():
    async def go():
        rec = Recorder(err(500))
        c, _ = async_client(rec)
        with pytest.raises(InternalServerError):
            await c.patches.prepare()
        assert len(rec.requests) == 1
        rec = Recorder(httpx.ConnectError("refused"))
        c, sleeps = async_client(rec, max_retries=2)
        with pytest.raises(APIConnectionError):
            await c.patches.prepare()
        assert len(rec.requests) == 3 and len(sleeps) == 2

    asyncio.run(go())


def test_async_wait_success_failure_timeout():
    async def go():
        rec = Recorder(httpx.Response(200, json=job("running")), httpx.Response(200, json=job("succeeded")))
        c, sleeps = async_client(rec)
        assert (await c.wait("j-1")).state == JobState.succeeded and sleeps == [0.5]

        rec = Recorder(httpx.Response(200, json=job("failed", error="bad patch")))
        c, _ = async_client(rec)
        with pytest.raises(JobFailedError) as ei:
            await c.jobs.wait("j-1")
        assert ei.value.job.error == "bad patch"

        rec = Recorder(httpx.Response(200, json=job("queued")))
        c, sleeps = async_client(rec)
        c._clock = lambda: sum(sleeps)  # time advances only by the (fake) sleeps
        with pytest.raises(JobTimeoutError) as ei:
            await c.wait("j-1", timeout=2.0, poll_interval=0.5)
        assert sleeps == [0.5] * 4 and len(rec.requests) == 5 and ei.value.job.state == JobState.queued

    asyncio.run(go())


def test_launch_202_waits_for_the_job_and_returns_the_engine():
    launch_job = job(kind="engine_launch", request={"engine_id": "e-9"})
    rec = Recorder(httpx.Response(202, json=launch_job),
                   httpx.Response(200, json=job("running", kind="engine_launch", request={"engine_id": "e-9"})),
                   httpx.Response(200, json=job("succeeded", kind="engine_launch", request={"engine_id": "e-9"},
                                                result=engine("e-9"))),
                   httpx.Response(200, json=engine("e-9")))
    c, sleeps = sync_client(rec)
    polled = []
    out = c.engines.launch(on_poll=polled.append)
    assert out.id == "e-9" and out.state.value == "ready"
    assert [p.state.value for p in polled] == ["queued", "running", "succeeded"]
    assert [r.url.path for r in rec.requests] == ["/v1/engines", "/v1/jobs/j-1", "/v1/jobs/j-1", "/v1/engines/e-9"]


def test_load_202_returns_the_typed_trainer_and_job_results_are_typed():
    from wsync_client import typed_result

    info = {"loaded": True, "model": "m", "dtype": "float32", "version": "base:m"}
    rec = Recorder(httpx.Response(202, json=job(kind="trainer_load")),
                   httpx.Response(200, json=job("succeeded", kind="trainer_load", result=info)))
    c, _ = sync_client(rec)
    out = c.trainer.load()
    assert out.loaded is True and out.dtype == "float32"
    from wsync.schemas import JobInfo, SyncReport

    sync = JobInfo.model_validate(job("succeeded", result={"mode": "dense", "engine_ids": ["e-1"], "payload_bytes": 1,
                                                           "wire_bytes": 1, "send_ms": 1.0, "total_ms": 2.0,
                                                           "tensors": 1, "version": "v"}))
    assert isinstance(typed_result(sync), SyncReport)
