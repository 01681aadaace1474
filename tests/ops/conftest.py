"""Operator-surface tests: a real uvicorn server in a thread, the app without Ray (start_fleet=False).

Jobs here are submitted straight to the app's JobRunner (the same path the routers use), so events,
metrics, auth and the dashboard are exercised over real HTTP without starting actors."""

from __future__ import annotations

import threading
import time

import pytest
import uvicorn

from wsync.api.app import create_app
from wsync.settings import Settings
from wsync_client.local import free_port


class ThreadServer:
    def __init__(self, app, port: int) -> None:
        self.app, self.port = app, port
        self.url = f"http://127.0.0.1:{port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                                    timeout_graceful_shutdown=1))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> ThreadServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)

    @property
    def state(self):
        return self.app.state.wsync

    @property
    def bus(self):
        return self.app.state.events

    def wait_job(self, job_id: str, timeout: float = 10.0):
        """Poll the store until the job is terminal (the runner has no blocking wait)."""
        deadline = time.monotonic() + timeout
        while True:
            job = self.state.runner.get(job_id)
            if job.state.value in ("succeeded", "failed", "cancelled", "interrupted"):
                return job
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job.state.value} after {timeout} s")
            time.sleep(0.02)


def make_app(tmp_path, **settings):
    return create_app(Settings(database_url=f"sqlite:///{tmp_path / 'wsync.db'}", **settings), start_fleet=False)


@pytest.fixture
def server(tmp_path):
    with ThreadServer(make_app(tmp_path), free_port()) as srv:
        yield srv
