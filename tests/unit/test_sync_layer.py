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
    done = _sync(client, "sparse", {"engine_ids": engines, "patch_id": patch["id"], "all_or_nothing": True})
    assert done["state"] == "failed" and "the wire broke" in done["error"] and "transfer failed" in done["error"]
    assert ("trainer", "close_group", group) in hub.calls
    assert len([c for c in _calls(hub, "leave_group") if c[2] == group]) == 2
    assert hub.open_groups() == [] and _fleet(client).groups.names() == []
    assert all(client.get(f"/v1/engines/{e}").json()["version"] is None for e in engines)
    # sparse is refused until a dense reseed, which opens a fresh group and makes versions known again
    r = client.post("/v1/sync/sparse", json={"engine_ids": engines, "delta": True})
    assert r.status_code == 409 and r.json()["error"]["rule"] == "quarantined"  # the engine blamed
    q = {e: client.get(f"/v1/engines/{e}").json()["quarantined"] for e in engines}
    blamed = [e for e in engines if q[e]]
    assert len(blamed) == 1 and q[blamed[0]].startswith("transfer: ") and "the wire broke" in q[blamed[0]]
    r = client.post("/v1/sync/sparse", json={"engine_ids": [e for e in engines if e not in blamed], "delta": True})
    assert r.status_code == 409 and r.json()["error"]["rule"] == "baseline_match"  # the other: unknown
    assert _sync(client, "dense", {"engine_ids": engines})["result"]["verified"] is True
    assert client.get(f"/v1/engines/{blamed[0]}").json()["quarantined"] is None
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


# ---- issue 12: bounded waits, liveness, per-engine outcomes (fakes) ---------------------------------
def test_a_failed_engine_does_not_stop_the_others_from_committing(svc):
    """Fan-out: the engine that broke is quarantined with the cause; the other commits and verifies."""
    client, hub, engines = svc
    patch = client.post("/v1/patches", json={"kind": "random", "density": 0.01}).json()
    hub.fail["recv"] = "the wire broke"
    done = _sync(client, "sparse", {"engine_ids": engines, "patch_id": patch["id"]})
    assert done["state"] == "failed" and "transfer failed" in done["error"] and "the wire broke" in done["error"]
    outcomes = [ev for ev in done["events"] if ev["message"] == "per-engine outcomes"][0]["engines"]
    by = {o["engine_id"]: o for o in outcomes}
    bad = [e for e in engines if by[e]["outcome"] == "failed"]
    good = [e for e in engines if by[e]["outcome"] == "committed"]
    assert len(bad) == 1 and len(good) == 1 and "the wire broke" in by[bad[0]]["cause"]
    assert by[good[0]]["version"] == patch["id"]
    assert client.get(f"/v1/engines/{good[0]}").json()["version"] == patch["id"]
    info = client.get(f"/v1/engines/{bad[0]}").json()
    assert info["version"] is None and info["quarantined"] and info["state"] == "ready"


def test_a_stuck_engine_is_named_and_the_next_sync_to_a_healthy_engine_is_not_blocked(tmp_path):
    """An engine that never joins (a stopped process): the open is bounded by group_timeout_s, the
    fault names that engine and the phase, and a sync to the healthy engine then succeeds at once."""
    with fake_client(tmp_path, group_timeout_s=1.0, probe_timeout_s=0.5) as (client, hub):
        hub.timeout_s = 1.0
        client.post("/v1/trainer/load", json={})
        a, b = (client.post("/v1/engines", json={"kind": "reference"}).json()["id"] for _ in range(2))
        stuck = _fleet(client).engines[b].actor.core
        stuck.frozen.set()
        try:
            done = _sync(client, "dense", {"engine_ids": [a, b], "all_or_nothing": True})
            assert done["state"] == "failed", done
            assert "open group failed" in done["error"] and f"engine {b}: not answering" in done["error"]
            assert f"engine {a}:" not in done["error"].split("|")[0]  # the healthy one only waited
            ok = _sync(client, "dense", {"engine_ids": [a]})
            assert ok["state"] == "succeeded" and ok["result"]["verified"] is True
            assert client.get(f"/v1/engines/{b}").json()["quarantined"].startswith("open group")
        finally:
            stuck.frozen.clear()


def test_a_dead_engine_is_failed_in_the_list_and_readyz_and_never_blocks_others(svc):
    client, hub, engines = svc
    assert client.get("/readyz").status_code == 200
    _fleet(client).engines[engines[1]].actor.kill("kill -9")
    info = client.get(f"/v1/engines/{engines[1]}").json()
    assert info["state"] == "failed" and "kill -9" in info["error"]
    listed = {e["id"]: e["state"] for e in client.get("/v1/engines").json()["items"]}
    assert listed == {engines[0]: "ready", engines[1]: "failed"}
    r = client.get("/readyz")
    assert r.status_code == 503 and engines[1] in r.json()["checks"]["engines"]
    r = client.post("/v1/sync/dense", json={"engine_ids": engines})
    assert r.status_code == 409 and r.json()["error"]["field"] == "engine_ids.1"
    assert _sync(client, "dense", {"engine_ids": engines[:1]})["state"] == "succeeded"


def test_an_engine_killed_during_a_sync_fails_it_and_the_other_commits(svc):
    client, hub, engines = svc
    assert _sync(client, "dense", {"engine_ids": engines})["state"] == "succeeded"
    victim = _fleet(client).engines[engines[1]].actor
    orig = hub.log

    def log(who, method, arg=None):  # the victim dies as its receive starts
        if method == "recv" and who == victim.core.name:
            victim.kill("kill -9 during the transfer")
            raise RuntimeError("connection reset by peer")
        return orig(who, method, arg)

    hub.log = log
    done = _sync(client, "dense", {"engine_ids": engines})
    hub.log = orig
    assert done["state"] == "failed" and f"engine {engines[1]}" in done["error"] and "kill -9" in done["error"]
    assert client.get(f"/v1/engines/{engines[1]}").json()["state"] == "failed"
    assert client.get(f"/v1/engines/{engines[0]}").json()["version"] == client.get("/v1/trainer").json()["version"]
