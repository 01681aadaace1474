"""Issue 11 on the in-process fakes: the sync layer's events (engine.state, trainer.version), the
transport in sync reports, launch/load as jobs, dtype inheritance, engine paging."""

from __future__ import annotations

import threading

import pytest

from tests.fakes.app import fake_client, wait_job
from tests.fakes.cores import FakeEngine


def _kinds(events, kind):
    return [e for e in events if e.kind == kind]


def test_sync_layer_publishes_engine_state_and_trainer_version(tmp_path):
    with fake_client(tmp_path) as (client, hub):
        seen = []
        client.app.state.events.subscribe(seen.append)
        assert client.post("/v1/trainer/load", json={}).status_code == 200
        eid = client.post("/v1/engines", json={}).json()["id"]
        states = [e.data["state"] for e in _kinds(seen, "engine.state") if e.data["id"] == eid]
        assert states[:2] == ["starting", "ready"]
        assert _kinds(seen, "trainer.version")[0].data["version"].startswith("base:")
        seen.clear()
        assert client.post("/v1/trainer/step", json={}).status_code == 200
        step_version = client.get("/v1/trainer").json()["version"]
        assert [e.data["version"] for e in _kinds(seen, "trainer.version")] == [step_version]
        r = client.post("/v1/sync/dense", json={"engine_ids": [eid]})
        done = wait_job(client, r.json()["id"])
        assert done["state"] == "succeeded", done["error"]
        states = [(e.data["state"], e.data["version"]) for e in _kinds(seen, "engine.state")]
        assert ("busy", states[0][1]) == states[0] and states[-1] == ("ready", step_version)
        assert client.delete(f"/v1/engines/{eid}").status_code == 200
        assert _kinds(seen, "engine.state")[-1].data["state"] == "stopped"


def test_sync_report_names_each_engines_transport_and_metrics_use_it(tmp_path):
    with fake_client(tmp_path) as (client, hub):
        client.post("/v1/trainer/load", json={})
        eid = client.post("/v1/engines", json={}).json()["id"]
        done = wait_job(client, client.post("/v1/sync/dense", json={"engine_ids": [eid]}).json()["id"])
        assert done["result"]["engines"][0]["transport"] == "gloo"
        assert done["result"]["engines"][0]["kind"] == "reference"
        client.delete(f"/v1/engines/{eid}")  # metrics must not need the engine's record any more
        text = client.get("/metrics").text
        line = [ln for ln in text.splitlines() if ln.startswith("wsync_sync_duration_seconds_count")][0]
        assert 'transport="gloo"' in line and "unknown" not in line


def test_launch_without_wait_is_a_job_and_the_engine_is_listed_at_once(tmp_path):
    with fake_client(tmp_path) as (client, hub):
        r = client.post("/v1/engines", json={"wait": False})
        assert r.status_code == 202, r.text
        job = r.json()
        assert job["kind"] == "engine_launch" and r.headers["Location"] == f"/v1/jobs/{job['id']}"
        eid = job["request"]["engine_id"]
        assert client.get(f"/v1/engines/{eid}").status_code == 200  # listed before it is ready
        done = wait_job(client, job["id"])
        assert done["state"] == "succeeded" and done["result"]["id"] == eid and done["result"]["state"] == "ready"
        assert [ev.get("phase") for ev in done["events"]][:1] == ["starting"]
        assert done["events"][-1]["phase"] == "ready"


def test_launch_with_wait_answers_202_past_the_server_bound(tmp_path, monkeypatch):
    gate, real_ready = threading.Event(), FakeEngine.ready

    def slow_ready(self):
        assert gate.wait(30)
        return real_ready(self)

    monkeypatch.setattr(FakeEngine, "ready", slow_ready)
    with fake_client(tmp_path, request_wait_s=0.2) as (client, hub):
        r = client.post("/v1/engines", json={"wait": True})
        assert r.status_code == 202 and r.json()["kind"] == "engine_launch"
        eid = r.json()["request"]["engine_id"]
        assert client.get(f"/v1/engines/{eid}").json()["state"] == "starting"
        gate.set()
        assert wait_job(client, r.json()["id"])["state"] == "succeeded"
        assert client.get(f"/v1/engines/{eid}").json()["state"] == "ready"
        r = client.post("/v1/engines", json={})  # ready within the bound: the engine itself, as before
        assert r.status_code == 201 and r.json()["state"] == "ready"


def test_failed_start_ends_in_a_failed_job_and_a_failed_engine(tmp_path, monkeypatch):
    def broken(self):
        raise RuntimeError("no room on the device")

    monkeypatch.setattr(FakeEngine, "ready", broken)
    with fake_client(tmp_path) as (client, hub):
        job = client.post("/v1/engines", json={"wait": False}).json()
        done = wait_job(client, job["id"])
        assert done["state"] == "failed" and "no room on the device" in done["error"]
        eng = client.get(f"/v1/engines/{job['request']['engine_id']}").json()
        assert eng["state"] == "failed" and "no room on the device" in eng["error"]


def test_trainer_load_is_a_job(tmp_path):
    with fake_client(tmp_path) as (client, hub):
        r = client.post("/v1/trainer/load", json={"wait": False})
        assert r.status_code == 202 and r.json()["kind"] == "trainer_load"
        done = wait_job(client, r.json()["id"])
        assert done["state"] == "succeeded" and done["result"]["loaded"] is True
        assert client.get("/v1/trainer").json()["loaded"] is True
        r = client.post("/v1/trainer/load", json={})
        assert r.status_code == 200 and r.json()["loaded"] is True


def test_engines_inherit_the_trainers_dtype_and_a_mismatch_is_refused_at_launch(tmp_path):
    with fake_client(tmp_path) as (client, hub):
        client.post("/v1/trainer/load", json={"dtype": "float32"})  # the fake trainer holds float32
        r = client.post("/v1/engines", json={"dtype": "bfloat16"})
        assert r.status_code == 409, r.text
        assert r.json()["error"]["field"] == "dtype" and "float32" in r.json()["error"]["message"]
        assert client.get("/v1/engines").json()["total"] == 0  # nothing half-made
        eng = client.post("/v1/engines", json={}).json()
        assert eng["dtype"] == "float32"


@pytest.mark.parametrize("limit,offset,want", [(1, 0, [0]), (2, 1, [1, 2]), (5, 3, [])])
def test_engines_are_paged(tmp_path, limit, offset, want):
    with fake_client(tmp_path) as (client, hub):
        ids = [client.post("/v1/engines", json={}).json()["id"] for _ in range(3)]
        page = client.get("/v1/engines", params={"limit": limit, "offset": offset}).json()
        assert [e["id"] for e in page["items"]] == [ids[i] for i in want]
        assert page["total"] == 3 and page["limit"] == limit and page["offset"] == offset
