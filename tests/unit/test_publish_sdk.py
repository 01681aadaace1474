"""The SDK Publisher against a stand-in for the proposed /v1/trainers routes (httpx MockTransport; the
real routes are not built yet): register, publish dense then auto (sparse), done with fingerprints,
delete. The stand-in's engine is a real receiver on a real gloo group (rank 1)."""

from __future__ import annotations

import json
import threading
from datetime import UTC, datetime

import httpx
import torch

from wsync.transfer.dense import DenseReceiver
from wsync.transfer.fingerprint import fingerprint
from wsync.transfer.group import Rendezvous, open_group
from wsync.transfer.meta import TensorMeta
from wsync.transfer.sparse import SparseMeta, apply_patches, recv_sparse
from wsync_client import Client
from wsync_client.publisher import Publisher

from .test_publish_publisher import Policy, engine_params


class StandIn:
    def __init__(self):
        self.engine = engine_params()
        self.version = None
        self.metas: list[TensorMeta] = []
        self.calls: list[tuple[str, str]] = []
        self.jobs: dict[str, dict] = {}

    def handler(self, request: httpx.Request) -> httpx.Response:
        path, method = request.url.path, request.method
        self.calls.append((method, path))
        body = json.loads(request.content) if request.content else None
        if (method, path) == ("POST", "/v1/trainers"):
            self.metas = [TensorMeta.from_dict(m) for m in body["params"]]
            return httpx.Response(201, json={"id": "t1", "name": body["name"]})
        if (method, path) == ("GET", "/v1/engines"):
            return httpx.Response(200, json=[{"id": "e1", "version": self.version}])
        if method == "POST" and path == "/v1/trainers/t1/publish":
            job = {"body": body, "thread": threading.Thread(target=self._receive, args=(body,), daemon=True)}
            self.jobs[f"j{len(self.jobs)}"] = job
            job["thread"].start()
            return httpx.Response(202, json={"id": f"j{len(self.jobs) - 1}", "plan": {"e1": body["mode"]}})
        if method == "POST" and path.endswith("/done"):
            job = self.jobs[path.split("/")[-2]]
            job["thread"].join(60)
            got = fingerprint({n: self.engine[n] for n in body["fingerprints"]})
            job["verified"] = got == body["fingerprints"]
            self.version = body["version"] if job["verified"] else None
            job["done"] = body
            return httpx.Response(204)
        if method == "GET" and path.startswith("/v1/jobs/"):
            job = self.jobs[path.split("/")[-1]]
            if "verified" not in job:  # polled before `done` arrived (a slow machine): still running
                return httpx.Response(200, json={"id": path.split("/")[-1], "kind": "sync_dense", "state": "running",
                                                 "created_at": datetime.now(UTC).isoformat()})
            return httpx.Response(200, json={"id": path.split("/")[-1], "kind": "sync_dense", "state": "succeeded",
                                             "created_at": datetime.now(UTC).isoformat(),
                                             "result": {"verified": job["verified"]}})
        if (method, path) == ("DELETE", "/v1/trainers/t1"):
            return httpx.Response(204)
        return httpx.Response(404, json={"error": {"message": path}})

    def _receive(self, body):
        group = open_group(Rendezvous.from_dict(body["rendezvous"]), 1, "cpu", timeout_s=60)
        if body["mode"] == "dense":
            DenseReceiver(self.metas, body["bucket_bytes"], self.engine).recv(group)
        else:
            apply_patches(self.engine, recv_sparse(group, [SparseMeta.from_dict(m) for m in body["sparse_metas"]]))
        group.close()


def test_sdk_publisher_dense_then_auto_sparse():
    svc = StandIn()
    model = Policy()
    with Client("http://wsync.test", transport=httpx.MockTransport(svc.handler), max_retries=0) as c:
        with Publisher(c, model, name="policy", host="127.0.0.1", bucket_bytes=2048) as pub:
            first = pub.publish("auto", version=1)
            assert first.report.mode == "dense" and "no baseline" in first.report.fallback and first.verified
            with torch.no_grad():
                model.w[0, :3] = 7.0
            second = pub.publish("auto", version=2)
            assert (second.report.mode, second.report.base_version, second.report.elements) == ("sparse", "1", 3)
            assert second.verified and svc.version == "2"
        assert fingerprint(svc.engine) == fingerprint(dict(model.named_parameters()))
    assert svc.calls[0] == ("POST", "/v1/trainers") and svc.calls[-1] == ("DELETE", "/v1/trainers/t1")
    assert svc.jobs["j1"]["body"]["requested"] == "auto" and svc.jobs["j1"]["body"]["base_version"] == "1"
