"""The service's resources end to end over ASGI: trainer, engines, patches, syncs, jobs, results."""

import pytest

from .conftest import wait_job



def test_health(client):
    assert client.get("/livez").json()["status"] == "ok"
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["checks"] == {"ray": "ok", "database": "ok", "engines": "ok"}
    assert ready.headers["X-Request-ID"]


def test_openapi_lists_resources(client):
    paths = client.get("/openapi.json").json()["paths"]
    for p in ("/v1/engines", "/v1/trainer/load", "/v1/patches", "/v1/sync/dense", "/v1/sync/sparse",
              "/v1/comparisons", "/v1/jobs/{job_id}", "/v1/results"):
        assert p in paths


def test_patch_before_load_is_conflict(client):
    if client.get("/v1/trainer").json()["loaded"]:
        pytest.skip("trainer already loaded by an earlier test")
    r = client.post("/v1/patches", json={"kind": "reference"})
    assert r.status_code == 409 and r.json()["error"]["field"] == "trainer"


@pytest.fixture(scope="module")
def fleet(client):
    info = client.post("/v1/trainer/load", json={}).json()
    assert info["loaded"] and info["version"].startswith("base:")
    engines = [client.post("/v1/engines", json={"kind": "reference", "name": f"t{i}"}).json() for i in range(2)]
    assert all(e["state"] == "ready" for e in engines)
    return {"trainer": info, "engines": [e["id"] for e in engines]}


def test_engines_resource(client, fleet):
    listed = client.get("/v1/engines").json()
    assert {e["id"] for e in listed["items"]} >= set(fleet["engines"])
    one = client.get(f"/v1/engines/{fleet['engines'][0]}").json()
    assert one["kind"] == "reference" and one["version"] == fleet["trainer"]["version"]
    missing = client.get("/v1/engines/e-nope")
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found"
    gen = client.post(f"/v1/engines/{fleet['engines'][0]}/generate", json={"prompts": ["Hello"], "max_new_tokens": 2})
    assert len(gen.json()["generations"][0]["token_ids"]) == 2


def test_dense_then_sparse_sync(client, fleet):
    engines = fleet["engines"]
    patch = client.post("/v1/patches", json={"kind": "reference", "rows": 32}).json()
    assert len(patch["selected_token_ids"]) == 32 and patch["tensors"][0]["count"] == 32 * 256
    # The engines still serve the baseline: a sparse sync of this patch is fine.
    job = client.post("/v1/sync/sparse", json={"engine_ids": engines, "patch_id": patch["id"]})
    assert job.status_code == 202 and job.json()["state"] in ("queued", "running", "succeeded")
    done = wait_job(client, job.json()["id"])
    assert done["state"] == "succeeded", done["error"]
    assert done["result"]["verified"] is True and done["result"]["version"] == patch["id"]
    assert client.get(f"/v1/engines/{engines[0]}").json()["version"] == patch["id"]

    # A random patch moves the trainer on; dense brings both engines along.
    rnd = client.post("/v1/patches", json={"kind": "random", "density": 0.01, "seed": 3}).json()
    assert rnd["base_version"] == patch["id"]
    dense = wait_job(client, client.post("/v1/sync/dense", json={"engine_ids": engines}).json()["id"])
    assert dense["state"] == "succeeded", dense["error"]
    assert dense["result"]["verified"] is True
    assert dense["result"]["payload_bytes"] == fleet["trainer"]["param_bytes"]
    # The trainer's parameters sit in the wire's buckets: every broadcast left from their own storage.
    assert dense["result"]["zero_copy"] == dense["result"]["messages"] >= 1
    assert all(client.get(f"/v1/engines/{e}").json()["version"] == rnd["id"] for e in engines)
    # The transfer group opened by the first sync was kept and reused by the second.
    opened = [ev for ev in dense["events"] if "opening" in ev["message"]]
    assert opened == [] and any("opening" in ev["message"] for ev in done["events"])


def test_sparse_on_wrong_baseline_is_refused(client, fleet):
    old = client.get("/v1/patches").json()["items"][-1]  # the first patch: its base is long gone
    r = client.post("/v1/sync/sparse", json={"engine_ids": fleet["engines"], "patch_id": old["id"]})
    assert r.status_code == 409
    assert r.json()["error"]["rule"] == "baseline_match"


def test_inline_sparse_sync(client, fleet):
    body = {"engine_ids": fleet["engines"][:1],
            "patches": [{"name": "model.norm.weight", "indices": [0, 7, 255], "values": [0.5, -1.25, 2.0]}],
            "encoding": "auto"}
    done = wait_job(client, client.post("/v1/sync/sparse", json=body).json()["id"])
    assert done["state"] == "succeeded", done["error"]
    assert done["result"]["verified"] is True and done["result"]["payload_bytes"] == 3 * 4 + 3 * 2


def test_jobs_and_results_listing(client, fleet):
    jobs = client.get("/v1/jobs", params={"kind": "sync_dense"}).json()
    assert jobs["total"] >= 1 and all(j["kind"] == "sync_dense" for j in jobs["items"])
    res = client.get("/v1/results", params={"limit": 2}).json()
    assert res["limit"] == 2 and len(res["items"]) <= 2 and res["total"] >= 3
    times = [r["created_at"] for r in client.get("/v1/results").json()["items"]]
    assert times == sorted(times, reverse=True)
    one = res["items"][0]
    assert client.get(f"/v1/results/{one['id']}").json() == one
    finished = jobs["items"][0]["id"]
    assert client.post(f"/v1/jobs/{finished}/cancel").status_code == 409
    assert client.get("/v1/jobs/job-nope").status_code == 404


def test_real_optimizer_step_then_delta_sync(client, fleet):
    """A real AdamW step on the trainer, then a delta sync that sends exactly what changed."""
    engines = fleet["engines"]
    seed = wait_job(client, client.post("/v1/sync/dense", json={"engine_ids": engines}).json()["id"])
    assert seed["state"] == "succeeded", seed["error"]
    step = client.post("/v1/trainer/step", json={"optimizer": "adamw", "lr": 1e-3})
    assert step.status_code == 200, step.text
    assert step.json()["version"].startswith("s-") and len(step.json()["losses"]) == 1
    done = wait_job(client, client.post("/v1/sync/sparse", json={"engine_ids": engines, "delta": True,
                                                                 "encoding": "auto"}).json()["id"])
    assert done["state"] == "succeeded", done["error"]
    res = done["result"]
    assert res["verified"] is True and res["version"] == step.json()["version"]
    assert 0 < res["changed_fraction"] < 1 and res["diff_gbps"] > 0
    # Nothing changed since: the next delta is empty but still a valid, verified sync.
    again = wait_job(client, client.post("/v1/sync/sparse", json={"engine_ids": engines, "delta": True}).json()["id"])
    assert again["state"] == "succeeded" and again["result"]["payload_bytes"] == 0
    assert again["result"]["verified"] is True


def test_delta_without_snapshot_is_refused(client, fleet):
    fresh = client.post("/v1/engines", json={"kind": "reference"}).json()["id"]
    r = client.post("/v1/sync/sparse", json={"engine_ids": [fresh], "delta": True})
    assert r.status_code == 409 and r.json()["error"]["rule"] in ("snapshot_exists", "baseline_match")
    client.delete(f"/v1/engines/{fresh}")


def test_dead_engine_answers_503(client, fleet):

    eid = client.post("/v1/engines", json={"kind": "reference"}).json()["id"]
    client.app.state.wsync.fleet.engines[eid].actor.kill()  # the engine process dies under us
    r = client.post(f"/v1/engines/{eid}/generate", json={"prompts": ["Hello"]})
    # liveness (Ray's control store) already shows it failed, with the cause (issue 12)
    assert r.status_code in (409, 503), r.text
    info = client.get(f"/v1/engines/{eid}").json()
    assert info["state"] == "failed" and info["error"]
    ready = client.get("/readyz")
    assert ready.status_code == 503 and eid in ready.json()["checks"]["engines"]
    assert client.delete(f"/v1/engines/{eid}").json()["state"] == "stopped"
