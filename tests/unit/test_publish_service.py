"""The external-trainer routes and the publish job on in-process fakes (tests/fakes): a stand-in
publisher joins the fake wire as rank 0, sends, and reports done; the service pauses/joins/receives,
verifies against the publisher's fingerprints, sets versions and records the sync. Bad input: layout
mismatch (422 naming the tensor), a second publisher on a held slot (409), a publisher that goes away
mid-sync and an engine that dies (failed job naming the cause, versions unknown)."""

from __future__ import annotations

import threading
import time
import uuid

import pytest
import torch

from tests.fakes.app import fake_client, wait_job
from tests.fakes.cores import baseline
from tests.fakes.wire import Hub
from wsync.transfer.fingerprint import fingerprint
from wsync.transfer.meta import param_metas
from wsync.transfer.sparse import SparsePatch


@pytest.fixture
def svc(tmp_path):
    with fake_client(tmp_path, hub=Hub(timeout_s=3.0), group_timeout_s=3.0, publisher_lease_s=1.0,
                     publish_done_timeout_s=20.0) as (client, hub):
        engines = [client.post("/v1/engines", json={"kind": "reference"}).json() for _ in range(2)]
        assert all(e["state"] == "ready" for e in engines)
        yield client, hub, [e["id"] for e in engines]


class StandIn:
    """The publisher's side on the fake wire: rank 0 of the rendezvous it names."""

    def __init__(self, client, hub, name="policy", params=None):
        self.client, self.hub = client, hub
        self.params = params if params is not None else {n: t.clone() for n, t in baseline("fake-model").items()}
        r = client.post("/v1/trainers", json={"name": name, "params": [m.to_dict() for m in self.metas()]})
        assert r.status_code == 201, r.text
        self.id = r.json()["id"]

    def metas(self):
        return param_metas(self.params.items())

    def publish(self, engines, version, *, mode="dense", requested="dense", base=None, patches=None,
                send=True, done=True, error=None):
        name = f"pub-{uuid.uuid4().hex[:6]}"
        body = {"mode": mode, "requested": requested, "engine_ids": engines, "version": version,
                "base_version": base, "bucket_bytes": 4096,
                "rendezvous": {"host": "127.0.0.1", "port": 1, "world_size": len(engines) + 1, "name": name}}
        if patches is not None:
            body["sparse_metas"] = [{"name": p.name, "dtype": "float32", "shape": list(self.params[p.name].shape),
                                     "count": int(p.indices.numel()), "encoding": "flat_int32",
                                     "nbytes": int(p.indices.numel()) * 8} for p in patches]
        r = self.client.post(f"/v1/trainers/{self.id}/publish", json=body)
        if r.status_code != 202:
            return r, None
        acc = r.json()

        def sender():
            self.hub.join(name, 0, len(engines) + 1, 5.0)
            if not send:
                return
            if acc["mode"] == "dense":
                self.hub.send(name, ("dense", {n: t.clone() for n, t in self.params.items()}))
            else:
                self.hub.send(name, ("sparse", patches))
            if done:
                report = {"error": error} if error else {
                    "version": version, "mode": acc["mode"], "stats": {"bytes": 10, "wire_bytes": 10, "ms": 1.0},
                    "fingerprints": fingerprint(self.params.items()), "tensors": len(self.params), "total_ms": 2.0}
                d = self.client.post(f"/v1/trainers/{self.id}/publish/{acc['id']}/done", json=report)
                assert d.status_code == 204, d.text

        threading.Thread(target=sender, daemon=True).start()
        return r, wait_job(self.client, acc["id"])


def _versions(client, engines):
    return [client.get(f"/v1/engines/{e}").json()["version"] for e in engines]


def test_dense_then_sparse_publish_verified_and_recorded(svc):
    client, hub, engines = svc
    pub = StandIn(client, hub)
    pub.params["norm.weight"] += 1.0
    r, job = pub.publish(engines, "1")
    assert r.json()["plan"] == {e: "dense" for e in engines}
    assert job["state"] == "succeeded", job["error"]
    res = job["result"]
    assert (res["mode"], res["verified"], res["transport"], res["trainer"], res["version"]) == \
        ("dense", True, "gloo", "policy", "1")
    assert all(e["fingerprint_equal"] for e in res["engines"])
    assert _versions(client, engines) == ["1", "1"]
    # a sparse patch on top of version 1
    patch = SparsePatch("layer.weight", torch.tensor([0, 5], dtype=torch.int32), torch.tensor([3.0, 4.0]))
    pub.params["layer.weight"].view(-1)[[0, 5]] = torch.tensor([3.0, 4.0])
    r, job = pub.publish(engines, "2", mode="sparse", requested="auto", base="1", patches=[patch])
    assert job["state"] == "succeeded" and job["kind"] == "sync_sparse", job["error"]
    assert job["result"]["verified"] is True and _versions(client, engines) == ["2", "2"]
    assert client.get("/v1/results?kind=sync_sparse").json()["total"] == 1
    assert [c[1] for c in hub.calls if c[0] == hub.calls[-1][0]][-1] == "leave_group"  # group torn down
    assert all(e["state"] == "ready" for e in client.get("/v1/engines").json()["items"])


def test_sparse_onto_an_engine_without_the_baseline(svc):
    client, hub, engines = svc
    pub = StandIn(client, hub)
    patch = SparsePatch("norm.weight", torch.tensor([1], dtype=torch.int32), torch.tensor([9.0]))
    r, _ = pub.publish(engines, "2", mode="sparse", requested="sparse", base="1", patches=[patch], send=False)
    assert r.status_code == 409 and r.json()["error"]["rule"] == "baseline_match"
    assert engines[0] in r.json()["error"]["message"]
    # auto: dense for every engine of the stream, saying which engine lacked the baseline
    r, job = pub.publish(engines, "2", mode="sparse", requested="auto", base="1", patches=[patch])
    acc = r.json()
    assert acc["mode"] == "dense" and set(acc["plan"].values()) == {"dense"} and engines[0] in acc["fallback"]
    assert job["state"] == "succeeded" and job["result"]["fallback"] == acc["fallback"]
    assert _versions(client, engines) == ["2", "2"]


def test_layout_mismatch_is_422_naming_the_tensor(svc):
    client, _hub, _engines = svc
    params = {n: t.clone() for n, t in baseline("fake-model").items()}
    metas = [m.to_dict() for m in param_metas(params.items())]
    metas[1]["shape"] = [8, 9]
    r = client.post("/v1/trainers", json={"name": "policy", "params": metas})
    assert r.status_code == 422
    err = r.json()["error"]
    assert err["field"] == "params.1" and err["rule"] == "layout_shape" and metas[1]["name"] in err["message"]
    r = client.post("/v1/trainers", json={"name": "policy", "params": metas[:1] + metas[2:]})
    assert r.status_code == 422 and r.json()["error"]["rule"] == "layout_missing"
    assert client.get("/v1/trainers").json() == []  # nothing registered


def test_second_publisher_on_a_held_slot_is_409_until_freed(svc):
    client, hub, _engines = svc
    first = StandIn(client, hub)
    metas = [m.to_dict() for m in first.metas()]
    r = client.post("/v1/trainers", json={"name": "policy", "params": metas})
    assert r.status_code == 409 and r.json()["error"]["field"] == "name" and first.id in r.json()["error"]["message"]
    assert client.post("/v1/trainers", json={"name": "other", "params": metas}).status_code == 201
    assert client.delete(f"/v1/trainers/{first.id}").status_code == 204
    second = client.post("/v1/trainers", json={"name": "policy", "params": metas})
    assert second.status_code == 201
    time.sleep(1.2)  # the lease (1 s) runs out without heartbeats: the slot frees
    assert client.post(f"/v1/trainers/{second.json()['id']}/heartbeat").status_code == 404
    assert client.post("/v1/trainers", json={"name": "policy", "params": metas}).status_code == 201


def test_publisher_gone_mid_sync_fails_the_job_and_versions_become_unknown(svc):
    client, hub, engines = svc
    pub = StandIn(client, hub)
    _, job = pub.publish(engines, "1")
    assert job["state"] == "succeeded"
    _, job = pub.publish(engines, "2", send=False)  # joins, then goes silent: no bytes, no done, no heartbeat
    assert job["state"] == "failed" and "lost its lease" in job["error"] and "policy" in job["error"]
    assert _versions(client, engines) == [None, None]
    assert all(e["state"] == "ready" for e in client.get("/v1/engines").json()["items"])
    leaves = [c for c in hub.calls if c[1] == "leave_group"]
    assert len(leaves) >= 4  # both engines left after each publish


def test_publisher_reports_an_error(svc):
    client, hub, engines = svc
    pub = StandIn(client, hub)
    _, job = pub.publish(engines, "1", error="RuntimeError: gloo connection reset")
    assert job["state"] == "failed" and "the publisher reported: RuntimeError: gloo connection reset" in job["error"]
    assert _versions(client, engines) == [None, None]


def test_a_dead_engine_is_refused_before_a_publish_starts(svc):
    """Liveness is checked at submit: an engine whose actor died is `failed` and a publish naming it is a
    409 on that engine (nothing joins, nothing moves; the others keep their version). An engine dying
    *during* a publish is tests/e2e/test_publisher_e2e.py's (real Ray)."""
    client, hub, engines = svc
    pub = StandIn(client, hub)
    before = _versions(client, engines)
    client.app.state.wsync.fleet.engines[engines[1]].actor.kill()
    r, job = pub.publish(engines, "1", send=False)
    assert job is None and r.status_code == 409, r.text
    assert r.json()["error"]["field"] == "engine_ids.1"
    assert _versions(client, engines)[0] == before[0]


def test_publish_request_checks(svc):
    client, hub, engines = svc
    pub = StandIn(client, hub)
    base = {"mode": "dense", "engine_ids": engines, "version": "1",
            "rendezvous": {"host": "127.0.0.1", "port": 1, "world_size": 2}}
    r = client.post(f"/v1/trainers/{pub.id}/publish", json=base)
    assert r.status_code == 422 and r.json()["error"]["field"] == "rendezvous.world_size"
    r = client.post(f"/v1/trainers/{pub.id}/publish", json={**base, "engine_ids": ["e-nope"]})
    assert r.status_code == 404
    r = client.post("/v1/trainers/t-nope/publish", json=base)
    assert r.status_code == 404 and r.json()["error"]["field"] == "trainer_id"
    r = client.post(f"/v1/trainers/{pub.id}/publish/job-x/done", json={"error": "x"})
    assert r.status_code == 404 and r.json()["error"]["field"] == "job_id"
