"""API tests: the real app (real Ray, real trainer and engine actors, real SQLite) over the ASGI client."""

import time

import pytest
from fastapi.testclient import TestClient

from wsync.api.app import create_app
from wsync.settings import Settings


def make_settings(db_path) -> Settings:
    # a slow (busy 2-core) machine must not turn the synchronous load/launch these tests use into 202s
    return Settings(database_url=f"sqlite:///{db_path}", ray_num_cpus=2, device="cpu", request_wait_s=600)


@pytest.fixture(scope="session")
def db_path(tmp_path_factory):
    return tmp_path_factory.mktemp("api") / "wsync.db"


@pytest.fixture(scope="session")
def client(db_path):
    app = create_app(make_settings(db_path))
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def wait_job(client, job_id: str, timeout: float = 300.0) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["state"] in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} did not finish in {timeout}s")
