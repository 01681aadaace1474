"""schemathesis against the app's own OpenAPI, in-process over ASGI, with a real fleet (Ray, the
tiny trainer, one reference engine) so operations reach the code behind the validation.

Bounded: ``WSYNC_FUZZ_EXAMPLES`` examples per operation (default 6). Goal: 0 server errors (5xx)
and responses that match the documented schema. Run: ``pytest -m fuzz tests/fuzz``.
"""

import os

import pytest

schemathesis = pytest.importorskip("schemathesis", reason="pip install -e '.[test]' (schemathesis)")
from fastapi.testclient import TestClient  # noqa: E402
from hypothesis import HealthCheck, Phase, settings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import response_schema_conformance  # noqa: E402

from wsync.api.app import create_app  # noqa: E402
from wsync.settings import Settings  # noqa: E402

pytestmark = pytest.mark.fuzz
EXAMPLES = int(os.environ.get("WSYNC_FUZZ_EXAMPLES", "6"))


@pytest.fixture(scope="module")
def fuzz_app(tmp_path_factory):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub downloads from fuzzed model names
    root = tmp_path_factory.mktemp("fuzz")
    cfg = Settings(database_url=f"sqlite:///{root / 'wsync.db'}", cache_dir=root / "cache", ray_num_cpus=2,
                   device="cpu", max_engines=2, max_body_bytes=1024 * 1024, max_patch_elements=4096,
                   request_wait_s=1.0)  # long operations answer 202 + a job at once: no fuzzed call waits
    app = create_app(cfg)
    with TestClient(app, raise_server_exceptions=False) as c:
        _done(c, c.post("/v1/trainer/load", json={}), 200)
        _done(c, c.post("/v1/engines", json={"kind": "reference", "name": "fuzz"}), 201)
        yield app


def _done(c, r, ok: int) -> None:
    """A long operation answers ``ok`` at once or 202 + a job (request_wait_s=1 here): wait for the job."""
    import time

    if r.status_code == ok:
        return
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    for _ in range(600):
        job = c.get(f"/v1/jobs/{job_id}").json()
        if job["state"] in ("succeeded", "failed", "cancelled"):
            assert job["state"] == "succeeded", job
            return
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} did not finish")


def _without_lifespan(app):
    """The app as started by the fixture: schemathesis' client must not run start-up again (a second
    start on the same database is refused by the instance lease, as it should be)."""

    async def asgi(scope, receive, send):
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                kind = message["type"].rsplit(".", 1)[-1]
                await send({"type": f"lifespan.{kind}.complete"})
                if kind == "shutdown":
                    return
        await app(scope, receive, send)

    return asgi


@pytest.fixture(scope="module")
def api_schema(fuzz_app):
    return schemathesis.openapi.from_asgi("/openapi.json", _without_lifespan(fuzz_app))


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, phases=[Phase.explicit, Phase.generate],
          suppress_health_check=list(HealthCheck))
def test_no_server_errors(case):
    if case.path.endswith("/events"):
        return  # Server-Sent Event streams stay open by design (tests/ops/test_events.py covers them, bounded)
    steps = case.body.get("steps") if case.path == "/v1/trainer/step" and isinstance(case.body, dict) else None
    if isinstance(steps, (int, float)) and not isinstance(steps, bool):  # 66.0 validates as 66 steps too
        case.body["steps"] = min(steps, 2)  # up to 100 real optimizer steps on 2 CPUs: minutes, not a bug
    response = case.call(timeout=120)
    case.validate_response(response, checks=[not_a_server_error, response_schema_conformance])
