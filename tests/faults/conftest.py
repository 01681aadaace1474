"""Fault-injection fixtures: the real app (real Ray actors, real gloo groups, real SQLite) over ASGI, with
small bounds so every fault ends in seconds, and helpers that kill -9 / SIGSTOP an actor's process."""

from __future__ import annotations

import os
import signal
import time

import pytest
import ray
from fastapi.testclient import TestClient

from wsync.api.app import create_app
from wsync.settings import Settings

#: small bounds (seconds) so a fault ends quickly; the same values go to the LocalServer of the restart test
BOUNDS = {"group_timeout_s": 5.0, "transfer_timeout_s": 10.0, "call_timeout_s": 10.0, "sync_timeout_s": 30.0}
FINAL = ("succeeded", "failed", "cancelled", "interrupted")


def fault_settings(db_path) -> Settings:
    return Settings(database_url=f"sqlite:///{db_path}", ray_num_cpus=2, device="cpu", **BOUNDS)


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    """One service per module (a fresh Ray each: a killed trainer or engine never leaks into another module)."""
    app = create_app(fault_settings(tmp_path_factory.mktemp("faults") / "wsync.db"))
    with TestClient(app, raise_server_exceptions=False) as c:
        assert c.post("/v1/trainer/load", json={}).status_code == 200
        yield c


def fleet_of(client):
    return client.app.state.wsync.fleet


def pid_of(handle) -> int:
    """The OS pid of a Ray actor's worker process (asked of Ray's control store, not of the actor)."""
    info = ray._private.state.actors(actor_id=handle._actor_id.hex())
    pid = info.get("Pid") if info else None
    if not pid:
        pid = ray.get(handle.__ray_call__.remote(lambda self: os.getpid()), timeout=30)
    return int(pid)


def engine_pid(client, engine_id: str) -> int:
    return pid_of(fleet_of(client).engines[engine_id].actor.handle)


def trainer_pid(client) -> int:
    return pid_of(fleet_of(client).trainer.actor.handle)


def kill9(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)


def wait_job(client, job_id: str, timeout: float = 120.0) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["state"] in FINAL:
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} did not finish in {timeout}s: {client.get(f'/v1/jobs/{job_id}').json()}")


def wait_event(client, job_id: str, needle: str, timeout: float = 60.0) -> dict:
    """Block until the job's events contain ``needle`` (or it ended); returns the job."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["state"] in FINAL or any(needle in ev["message"] for ev in job.get("events") or []):
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id}: no event {needle!r} in {timeout}s")


def launch_engines(client, n: int, prefix: str) -> list[str]:
    out = []
    for i in range(n):
        r = client.post("/v1/engines", json={"kind": "reference", "name": f"{prefix}{i}"})
        assert r.status_code in (200, 201), r.text
        assert r.json()["state"] == "ready", r.json()
        out.append(r.json()["id"])
    return out


def engine(client, engine_id: str) -> dict:
    return client.get(f"/v1/engines/{engine_id}").json()


def counts(client) -> tuple[int, int]:
    """(results, jobs) stored so far."""
    return (client.get("/v1/results").json()["total"], client.get("/v1/jobs").json()["total"])


def wait_engine_state(client, engine_id: str, state: str, timeout: float = 30.0) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        e = engine(client, engine_id)
        if e["state"] == state:
            return e
        time.sleep(0.2)
    return engine(client, engine_id)


def dense(client, engine_ids, **kw) -> dict:
    r = client.post("/v1/sync/dense", json={"engine_ids": engine_ids, **kw})
    return {"status": r.status_code, **r.json()}
