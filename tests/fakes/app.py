"""The real app (API, sync layer, jobs, SQLite) on in-process fake cores: no Ray, no models."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fastapi.testclient import TestClient

from wsync.api.app import create_app
from wsync.settings import Settings

from .actors import fake_actors
from .wire import Hub


@contextmanager
def fake_client(tmp_path: Path, hub: Hub | None = None, device: str = "cpu",
                **settings) -> Iterator[tuple[TestClient, Hub]]:
    hub = hub or Hub()
    s = Settings(database_url=f"sqlite:///{tmp_path / 'wsync.db'}", device="cpu", default_model="fake-model",
                 allow_hub_models=True, cache_dir=tmp_path, **settings)
    with TestClient(create_app(s, actors=fake_actors(hub, device)), raise_server_exceptions=False) as client:
        yield client, hub


def wait_job(client: TestClient, job_id: str, timeout: float = 30.0) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["state"] in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.02)
    raise AssertionError(f"job {job_id} did not finish in {timeout}s")


def wait_state(client: TestClient, job_id: str, state: str, timeout: float = 10.0) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["state"] == state:
            return job
        time.sleep(0.02)
    raise AssertionError(f"job {job_id} never reached {state}")
