"""Idempotency-Key on POSTs: a retried request returns the first one's answer (the same job) and does
nothing twice; another body with the same key is refused naming the header; tokens still apply."""

from __future__ import annotations

from tests.fakes.app import fake_client, wait_job


def test_retried_launch_returns_the_first_job_and_starts_one_engine(tmp_path):
    with fake_client(tmp_path) as (client, hub):
        h = {"Idempotency-Key": "launch-1"}
        first = client.post("/v1/engines", json={"wait": False}, headers=h)
        again = client.post("/v1/engines", json={"wait": False}, headers=h)
        assert first.status_code == again.status_code == 202
        assert again.json()["id"] == first.json()["id"] and again.headers["Idempotent-Replayed"] == "true"
        assert client.get("/v1/engines").json()["total"] == 1
        other = client.post("/v1/engines", json={"wait": False}, headers={"Idempotency-Key": "launch-2"})
        assert other.json()["id"] != first.json()["id"]
        assert client.get("/v1/engines").json()["total"] == 2
        wait_job(client, first.json()["id"])


def test_retried_sync_is_one_job_and_a_different_body_is_refused(tmp_path):
    with fake_client(tmp_path) as (client, hub):
        client.post("/v1/trainer/load", json={})
        eid = client.post("/v1/engines", json={}).json()["id"]
        h = {"Idempotency-Key": "sync-1"}
        first = client.post("/v1/sync/dense", json={"engine_ids": [eid]}, headers=h).json()
        wait_job(client, first["id"])
        again = client.post("/v1/sync/dense", json={"engine_ids": [eid]}, headers=h)
        assert again.status_code == 202 and again.json()["id"] == first["id"]
        assert client.get("/v1/jobs", params={"kind": "sync_dense"}).json()["total"] == 1
        bad = client.post("/v1/sync/dense", json={"engine_ids": [eid], "verify": False}, headers=h)
        assert bad.status_code == 422
        err = bad.json()["error"]
        assert err["field"] == "Idempotency-Key" and err["rule"] == "idempotency_key_reuse"


def test_errors_are_replayed_but_transient_ones_are_not(tmp_path):
    with fake_client(tmp_path) as (client, hub):
        h = {"Idempotency-Key": "k"}
        r1 = client.post("/v1/sync/dense", json={"engine_ids": ["e-nope"]}, headers=h)
        assert r1.status_code == 409  # no trainer loaded: a definite answer, stored
        client.post("/v1/trainer/load", json={})
        r2 = client.post("/v1/sync/dense", json={"engine_ids": ["e-nope"]}, headers=h)
        assert r2.status_code == 409 and r2.json() == r1.json()


def test_a_replay_needs_the_token(tmp_path):
    with fake_client(tmp_path, api_token="s3cret") as (client, hub):
        auth = {"Authorization": "Bearer s3cret", "Idempotency-Key": "t-1"}
        first = client.post("/v1/engines", json={"wait": False}, headers=auth)
        assert first.status_code == 202
        anon = client.post("/v1/engines", json={"wait": False}, headers={"Idempotency-Key": "t-1"})
        assert anon.status_code == 401 and "Idempotent-Replayed" not in anon.headers
        again = client.post("/v1/engines", json={"wait": False}, headers=auth)
        assert again.json()["id"] == first.json()["id"]
