"""The service killed mid-job (SIGKILL to its whole process group) and restarted on the same database
(issue 12, item 4): the job it was running shows ``interrupted`` with the cause, and every job and result
stored before is still listed. A real uvicorn server (wsync_client.local.LocalServer), real Ray, a file
SQLite database, a short instance lease so the second server may take over after the TTL."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx
import pytest

from wsync_client.local import LocalServer

from .conftest import BOUNDS, wait_job

pytestmark = pytest.mark.faults

LEASE_TTL_S = 3.0


def local_server(db: Path, log: Path) -> LocalServer:
    """A server on ``db`` that starts a Ray of its own (never joins one this test process started)."""
    server = LocalServer(env=server_env(db), log_path=log)
    for name in ("RAY_ADDRESS", "WSYNC_RAY_ADDRESS"):
        server.env.pop(name, None)
    return server


def server_env(db: Path) -> dict[str, str]:
    env = {f"WSYNC_{k.upper()}": str(v) for k, v in BOUNDS.items()}
    env.update(WSYNC_DATABASE_URL=f"sqlite:///{db}", WSYNC_DEVICE="cpu", WSYNC_RAY_NUM_CPUS="2",
               WSYNC_LEASE_TTL_S=str(LEASE_TTL_S), WSYNC_LEASE_HEARTBEAT_S="1",
               RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    return env


def descendants(root: int) -> dict[int, str]:
    """pid -> command line of every process below ``root`` (from /proc; Ray's raylet and its workers)."""
    parent, cmd = {}, {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            parent[int(d.name)] = int(stat.rsplit(")", 1)[1].split()[1])
            cmd[int(d.name)] = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError, IndexError):
            continue
    out, todo = {}, [root]
    while todo:
        p = todo.pop()
        for child, pp in parent.items():
            if pp == p and child not in out:
                out[child] = cmd.get(child, "")
                todo.append(child)
    return out


def totals(c: httpx.Client) -> tuple[int, int]:
    return c.get("/v1/results").json()["total"], c.get("/v1/jobs").json()["total"]


def test_service_killed_mid_job_and_restarted_marks_the_job_interrupted_and_keeps_history(tmp_path):
    db = tmp_path / "wsync.db"
    first = local_server(db, tmp_path / "first.log")
    stopped: list[int] = []
    try:
        first.start()
        first.wait_ready()
        with httpx.Client(base_url=first.url, timeout=120) as c:
            loaded = c.post("/v1/trainer/load", json={})
            assert loaded.status_code == 200, (loaded.text, first.log_tail(40))
            r = c.post("/v1/engines", json={"kind": "reference", "name": "r0"})
            assert r.status_code == 201 and r.json()["state"] == "ready", r.text
            eng = r.json()["id"]
            done = wait_job(c, c.post("/v1/sync/dense", json={"engine_ids": [eng]}).json()["id"])
            assert done["state"] == "succeeded", done
            before = totals(c)
            # Hold the next sync in flight: the engine's process is stopped, so the job waits in its
            # group rendezvous (bounded by group_timeout_s, far longer than the kill below takes).
            engines = [p for p, cmd in descendants(first.proc.pid).items() if "ReferenceEngineCore" in cmd]
            assert len(engines) == 1, descendants(first.proc.pid)
            for p in engines:
                os.kill(p, signal.SIGSTOP)
                stopped.append(p)
            c.post("/v1/patches", json={"kind": "random", "density": 0.01, "seed": 5})
            sub = c.post("/v1/sync/dense", json={"engine_ids": [eng]})
            assert sub.status_code == 202, sub.text
            job_id = sub.json()["id"]
            time.sleep(1.0)
            assert c.get(f"/v1/jobs/{job_id}").json()["state"] == "running"
        tree = descendants(first.proc.pid)
        os.killpg(first.proc.pid, signal.SIGKILL)  # the server and everything in its session, no clean-up
        for p in tree:  # Ray daemons that left the session
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        first.proc.wait(30)
        time.sleep(LEASE_TTL_S + 1.0)  # the dead server's lease expires
        second = local_server(db, tmp_path / "second.log")
        with second:
            with httpx.Client(base_url=second.url, timeout=60) as c:
                job = c.get(f"/v1/jobs/{job_id}").json()
                assert job["state"] == "interrupted", job
                assert job["error"].startswith("interrupted: the service stopped before this job finished"), job
                assert job["finished_at"] is not None
                assert c.get(f"/v1/jobs/{done['id']}").json()["state"] == "succeeded"
                results, jobs = totals(c)
                assert results == before[0] and jobs == before[1] + 1  # the interrupted sync; none lost
                listed = {r["job_id"] for r in c.get("/v1/results", params={"limit": 200}).json()["items"]}
                assert done["id"] in listed
                for e in c.get("/v1/engines").json()["items"]:  # an engine the new server knows serves unknown
                    assert e["id"] != eng or e["version"] is None, e
    finally:
        for p in stopped:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        first.stop(grace_s=5)
