"""API over the store on SQLite and PostgreSQL (no Ray: start_fleet=False): page bounds, jobs a
previous process left unfinished, and the instance lease refusing a second server."""

import pytest
from fastapi.testclient import TestClient

from tests.dbs import db_url  # noqa: F401  (fixture)
from wsync.api.app import create_app
from wsync.jobs.lease import LeaseHeld
from wsync.jobs.store import MAX_OFFSET, Store
from wsync.schemas import JobKind, JobState
from wsync.settings import Settings


def _app(url, port=8321):
    return create_app(Settings(database_url=url, device="cpu", port=port), start_fleet=False)


@pytest.mark.parametrize("path", ["/v1/jobs", "/v1/results", "/v1/patches"])
def test_offset_overflow_is_a_422_naming_offset(db_url, path):  # noqa: F811
    with TestClient(_app(db_url), raise_server_exceptions=False) as c:
        for bad in (2**63, MAX_OFFSET + 1):
            r = c.get(path, params={"offset": bad})
            assert r.status_code == 422 and r.json()["error"]["field"] == "offset", r.text
        r = c.get(path, params={"offset": MAX_OFFSET})
        assert r.status_code == 200 and r.json()["items"] == []


def test_a_restart_marks_unfinished_jobs_interrupted_and_keeps_the_rest(db_url):  # noqa: F811
    s = Store(db_url)
    left_running = s.create_job(JobKind.sync_dense, {"engine_ids": ["e1"]})
    s.transition(left_running.id, [JobState.queued], JobState.running)
    left_queued = s.create_job(JobKind.sync_sparse, {})
    done = s.create_job(JobKind.comparison, {})
    s.transition(done.id, [JobState.queued], JobState.running)
    res = s.add_result(done.id, JobKind.comparison, {"ok": True})
    s.transition(done.id, [JobState.running], JobState.succeeded, result_id=res.id)
    s.close()
    with TestClient(_app(db_url), raise_server_exceptions=False) as c:
        jobs = {j["id"]: j for j in c.get("/v1/jobs").json()["items"]}
        assert jobs[left_running.id]["state"] == "interrupted" and jobs[left_queued.id]["state"] == "interrupted"
        assert jobs[left_running.id]["finished_at"] and "interrupted" in jobs[left_running.id]["error"]
        assert jobs[done.id]["state"] == "succeeded"
        assert c.get("/v1/results").json()["items"][0]["id"] == res.id
        assert c.get("/v1/jobs", params={"state": "interrupted"}).json()["total"] == 2
        r = c.post(f"/v1/jobs/{left_running.id}/cancel")
        assert r.status_code == 409 and r.json()["error"]["field"] == "job_id"


def test_a_second_server_on_the_same_database_refuses_to_start_before_touching_jobs(db_url):  # noqa: F811
    with TestClient(_app(db_url, 8321), raise_server_exceptions=False) as first:
        job = first.app.state.wsync.store.create_job(JobKind.sync_dense, {})  # queued in the live server
        with pytest.raises(LeaseHeld) as err:
            with TestClient(_app(db_url, 8399), raise_server_exceptions=False):
                pass
        assert "127.0.0.1:8321" in str(err.value)
        assert first.get(f"/v1/jobs/{job.id}").json()["state"] == "queued"  # not marked by the refused server
    with TestClient(_app(db_url, 8399), raise_server_exceptions=False) as again:  # released at shutdown
        assert again.get(f"/v1/jobs/{job.id}").json()["state"] == "interrupted"
