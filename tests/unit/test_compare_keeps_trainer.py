"""`wsync compare` must not discard the user's trainer state: the comparison runs on a stashed-aside
trainer and gives the user's state back, so a step taken before it can be delta-synced after it."""

from __future__ import annotations

from tests.fakes.app import fake_client, wait_job


def _done(client, r):
    assert r.status_code == 202, r.text
    job = wait_job(client, r.json()["id"])
    assert job["state"] == "succeeded", job["error"]
    return job


def test_step_then_compare_then_delta_sync_still_works(tmp_path):
    with fake_client(tmp_path) as (client, hub):
        client.post("/v1/trainer/load", json={})
        eid = client.post("/v1/engines", json={}).json()["id"]
        _done(client, client.post("/v1/sync/dense", json={"engine_ids": [eid]}))
        step = client.post("/v1/trainer/step", json={"lr": 0.25}).json()
        trainer = client.app.state.wsync.fleet.trainer.actor.core
        held = client.post("/v1/patches", json={"kind": "random", "density": 0.01}).json()
        weights = {n: p.clone() for n, p in trainer.params.items()}
        version = client.get("/v1/trainer").json()["version"]
        assert version == held["id"] and step["version"] != version

        job = _done(client, client.post("/v1/comparisons", json={"engine_kind": "reference"}))
        assert any("restored" in ev["message"] for ev in job["events"])

        after = client.get("/v1/trainer").json()
        assert after["version"] == version  # the user's version, not the comparison's patch
        assert not [n for n in weights if not bool((trainer.params[n] == weights[n]).all())]
        # a delta sync of everything since the dense sync (step + patch) verifies
        delta = _done(client, client.post("/v1/sync/sparse", json={"engine_ids": [eid], "delta": True}))
        assert delta["result"]["verified"] is True and delta["result"]["version"] == version
        assert client.get(f"/v1/engines/{eid}").json()["version"] == version


def test_compare_without_a_loaded_trainer_loads_one(tmp_path):
    with fake_client(tmp_path) as (client, hub):
        _done(client, client.post("/v1/comparisons", json={"engine_kind": "reference"}))
        assert client.get("/v1/trainer").json()["loaded"] is True


def test_trainer_core_stash_gives_back_the_exact_weights_and_state(tmp_path):
    """The real TrainerCore (embedded tiny model, CPU): stash, change everything, unstash."""
    from wsync.actors.trainer import TrainerCore
    from wsync.models import resolve_model

    core = TrainerCore("cpu", max_snapshots=1)
    core.load(resolve_model(None), "float32")
    core.step("s-1", ["hello there"], "sgd", 0.01, 1)
    core.mark_synced("s-1", None, None, ["s-1"])
    before = core.fingerprint()
    core.stash()
    assert core.version.startswith("base:") and core.fingerprint() != before
    core.prepare_patch("p-1", "random", {"density": 0.01, "seed": 3})
    core.mark_synced("p-1", None, None, ["p-1"])
    info = core.unstash()
    assert info.version == "s-1" and core.fingerprint() == before
    assert core.synced.keys() == ["s-1"] and "p-1" not in core.patches
