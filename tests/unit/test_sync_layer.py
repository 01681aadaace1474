"""The API and the sync layer on in-process fakes (tests/fakes): groups, teardown, cancelling, 409s."""

from __future__ import annotations

import pytest

from tests.fakes.app import fake_client, wait_job, wait_state


@pytest.fixture
def svc(tmp_path):
    with fake_client(tmp_path, group_timeout_s=42.0) as (client, hub):
        assert client.post("/v1/trainer/load", json={}).status_code == 200
        engines = [client.post("/v1/engines", json={"kind": "reference"}).json() for _ in range(2)]
        assert all(e["state"] == "ready" and e["details"]["transport"] == "gloo" for e in engines)
        yield client, hub, [e["id"] for e in engines]


def _fleet(client):
    return client.app.state.wsync.fleet


def _calls(hub, method):
    return [c for c in hub.calls if c[1] == method]


def _sync(client, path, body):
    r = client.post(f"/v1/sync/{path}", json=body)
    assert r.status_code == 202, r.text
    return wait_job(client, r.json()["id"])


def test_one_sparse_sync_end_to_end(svc):
    """One sparse sync: each side called once, in order, with the settings' group timeout."""
    client, hub, engines = svc
    patch = client.post("/v1/patches", json={"kind": "random", "density": 0.01}).json()
    hub.calls.clear()
    done = _sync(client, "sparse", {"engine_ids": engines, "patch_id": patch["id"]})
    assert done["state"] == "succeeded", done["error"]
    res = done["result"]
    assert res["verified"] is True and res["version"] == patch["id"] and res["tensors"] == 1
    assert [c[1] for c in hub.calls if c[0] == "trainer"] == ["open_group", "sparse_plan", "send_sparse"]
    for name in {c[0] for c in hub.calls} - {"trainer"}:
        assert [c[1] for c in hub.calls if c[0] == name] == ["join_group", "prepare_sync", "recv"]
    assert hub.timeouts_seen and set(hub.timeouts_seen) == {42.0}
    assert all(client.get(f"/v1/engines/{e}").json()["version"] == patch["id"] for e in engines)


def test_group_is_reused_then_switched(svc):
    client, hub, engines = svc
    first = _sync(client, "dense", {"engine_ids": engines})
    again = _sync(client, "dense", {"engine_ids": engines})
    assert first["state"] == again["state"] == "succeeded"
    assert len(_calls(hub, "open_group")) == 1  # the second sync reused the group
    assert not any("opening" in ev["message"] for ev in again["events"])
    old = _calls(hub, "open_group")[0][2]
    one = _sync(client, "dense", {"engine_ids": engines[:1]})  # another engine set: switch
    assert one["state"] == "succeeded" and one["result"]["verified"] is True
    assert ("trainer", "close_group", old) in hub.calls
    assert len([c for c in _calls(hub, "leave_group") if c[2] == old]) == 2  # both engines left it
    assert hub.open_groups() == [_calls(hub, "open_group")[-1][2]]
    assert _fleet(client).groups.names() == hub.open_groups()


def test_failed_transfer_tears_down_every_side_and_versions_become_unknown(svc):
    client, hub, engines = svc
    assert _sync(client, "dense", {"engine_ids": engines})["state"] == "succeeded"
    group = _calls(hub, "open_group")[-1][2]
    patch = client.post("/v1/patches", json={"kind": "random", "density": 0.01}).json()
    hub.fail["recv"] = "the wire broke"
    done = _sync(client, "sparse", {"engine_ids": engines, "patch_id": patch["id"]})
    assert done["state"] == "failed" and "the wire broke" in done["error"]
    assert ("trainer", "close_group", group) in hub.calls
    assert len([c for c in _calls(hub, "leave_group") if c[2] == group]) == 2
    assert hub.open_groups() == [] and _fleet(client).groups.names() == []
    assert all(client.get(f"/v1/engines/{e}").json()["version"] is None for e in engines)
    # sparse is refused until a dense reseed, which opens a fresh group and makes versions known again
    r = client.post("/v1/sync/sparse", json={"engine_ids": engines, "delta": True})
    assert r.status_code == 409 and r.json()["error"]["rule"] == "baseline_match"
    assert _sync(client, "dense", {"engine_ids": engines})["result"]["verified"] is True
    assert {client.get(f"/v1/engines/{e}").json()["version"] for e in engines} == {patch["id"]}


def _blocked_delta(client, hub, engines):
    """A delta job held inside the trainer (before the safe point)."""
    assert _sync(client, "dense", {"engine_ids": engines})["state"] == "succeeded"
    assert client.post("/v1/trainer/step", json={"lr": 0.5}).status_code == 200
    trainer = _fleet(client).trainer.actor.core
    trainer.gate.clear()
    r = client.post("/v1/sync/sparse", json={"engine_ids": engines, "delta": True})
    assert r.status_code == 202
    return trainer, wait_state(client, r.json()["id"], "running")


def test_cancel_running_job_stops_at_safe_point(svc):
    client, hub, engines = svc
    trainer, job = _blocked_delta(client, hub, engines)
    versions = [client.get(f"/v1/engines/{e}").json()["version"] for e in engines]
    assert client.post(f"/v1/jobs/{job['id']}/cancel").status_code == 200
    trainer.gate.set()
    done = wait_job(client, job["id"])
    assert done["state"] == "cancelled"
    assert not _calls(hub, "send_sparse")  # nothing moved
    assert [client.get(f"/v1/engines/{e}").json()["version"] for e in engines] == versions
    assert None not in versions


def test_cancel_queued_job_and_409_under_contention(svc):
    client, hub, engines = svc
    trainer, running = _blocked_delta(client, hub, engines)
    queued = client.post("/v1/sync/dense", json={"engine_ids": engines}).json()
    assert queued["state"] == "queued"
    cancelled = client.post(f"/v1/jobs/{queued['id']}/cancel").json()
    assert cancelled["state"] == "cancelled"
    busy = client.post("/v1/trainer/step", json={})  # the running job holds the trainer
    assert busy.status_code == 409 and busy.headers["Retry-After"] == "2"
    sends_before = len(_calls(hub, "send_dense"))
    trainer.gate.set()
    assert wait_job(client, running["id"])["state"] == "succeeded"
    assert wait_job(client, queued["id"])["state"] == "cancelled"
    assert len(_calls(hub, "send_dense")) == sends_before  # the cancelled job never ran


def test_patch_no_longer_held_is_refused_at_submit(svc):
    client, hub, engines = svc
    patch = client.post("/v1/patches", json={"kind": "random", "density": 0.01}).json()
    assert client.post("/v1/trainer/reset").status_code == 200
    r = client.post("/v1/sync/sparse", json={"engine_ids": engines, "patch_id": patch["id"]})
    assert r.status_code == 409 and r.json()["error"]["rule"] == "patch_held"


def test_transport_is_chosen_from_what_the_engine_lists(svc):
    from wsync.sync.transports import NoTransport, TrainerSide, choose

    client, _, _ = svc
    fleet = _fleet(client)
    # the fake engine reads its transports from the launch options
    ok = fleet.actors.create_engine("reference", "fake-model", "cpu", {"transports": ["cuda_ipc", "gloo"]})
    bad = fleet.actors.create_engine("reference", "fake-model", "cpu", {"transports": ["vllm_native"]})
    ok, bad = fleet.caller.wait([ok.call("ready"), bad.call("ready")])
    assert choose(ok, TrainerSide("cpu")).name == "gloo"  # cuda_ipc has no transport class yet
    with pytest.raises(NoTransport):
        choose(bad, TrainerSide("cpu"))
    assert choose(bad, TrainerSide("cuda")).name == "vllm_native"


def test_vllm_native_transport_on_a_gpu_trainer(tmp_path):
    """An engine that lists only vllm_native gets the VLLMNative transport: vLLM's trainer-side calls,
    flat_int32 whatever encoding was asked for; the sync run itself is the same code."""
    from tests.fakes.wire import Hub

    hub = Hub()
    hub.transports = ["vllm_native"]
    with fake_client(tmp_path, hub, device="cuda") as (client, hub):
        client.post("/v1/trainer/load", json={})
        eng = client.post("/v1/engines", json={"kind": "reference"}).json()
        assert eng["details"]["transport"] == "vllm_native"
        patch = client.post("/v1/patches", json={"kind": "random", "density": 0.01}).json()
        done = _sync(client, "sparse", {"engine_ids": [eng["id"]], "patch_id": patch["id"], "encoding": "gap"})
        assert done["state"] == "succeeded" and done["result"]["verified"] is True
        assert ("trainer", "sparse_plan", "flat_int32") in hub.calls
        trainer = [c[1] for c in hub.calls if c[0] == "trainer"]
        assert "open_vllm_group" in trainer and "send_sparse_vllm" in trainer and "open_group" not in trainer


def test_comparison_job_on_fakes(svc):
    client, hub, _ = svc
    r = client.post("/v1/comparisons", json={"engine_kind": "reference", "rows": 4})
    assert r.status_code == 202, r.text
    done = wait_job(client, r.json()["id"])
    assert done["state"] == "succeeded", done["error"]
    res = done["result"]
    assert res["dense"]["verified"] is True and res["sparse"]["verified"] is True
    assert res["verdicts"]["baseline_equal"] is True
    assert len(client.get("/v1/engines").json()["items"]) == 2  # its engines were deleted
