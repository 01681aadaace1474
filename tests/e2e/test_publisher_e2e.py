"""External trainers end to end: the service as its own process (uvicorn + Ray + gloo), reference
engines as Ray actors, this test process as the publisher. Good path through the SDK Publisher; bad
input: mismatched layout (422 naming the tensor), a second publisher on a held slot (409), a publisher
that goes silent mid-sync (failed job naming the lost lease, version unknown), an engine that dies
during a publish (failed job naming it)."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

from wsync.engines.hf import load_causal_lm
from wsync.models import resolve_model
from wsync.transfer.group import Rendezvous, free_port, open_group
from wsync.transfer.meta import param_metas
from wsync_client import Client, ConflictError, JobFailedError, UnprocessableEntityError
from wsync_client._core import APICall
from wsync_client.local import LocalServer
from wsync_client.publisher import Publisher

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    d = tmp_path_factory.mktemp("pub-e2e")
    env = {"WSYNC_DATABASE_URL": f"sqlite:///{d / 'wsync.db'}", "WSYNC_RAY_NUM_CPUS": "2", "WSYNC_DEVICE": "cpu",
           "RAY_AUTH_MODE": "disabled", "WSYNC_PUBLISHER_LEASE_S": "3", "WSYNC_GROUP_TIMEOUT_S": "20"}
    with LocalServer(env=env, ready_timeout=240, log_path=d / "server.log") as server:
        yield server


@pytest.fixture(scope="module")
def model():
    lm, _ = load_causal_lm(resolve_model(None), "float32", torch.device("cpu"))
    return lm


def _http(c, method, path, body=None):
    return c._call(APICall(method, path, body=body))


def test_publish_dense_then_auto_and_bad_input(service, model):
    with Client(service.url, timeout=120) as c:
        eid = c.engines.launch("reference", dtype="float32").id
        good = [m.to_dict() for m in param_metas(model.named_parameters())]
        bf16 = [dict(m) for m in good]
        bf16[0]["dtype"] = "bfloat16"
        with pytest.raises(UnprocessableEntityError) as err:
            _http(c, "POST", "/v1/trainers", {"name": "policy", "params": bf16})
        assert bf16[0]["name"] in err.value.message and err.value.field == "params.0"
        with Publisher(c, model, name="policy", host="127.0.0.1", bucket_bytes=1 << 20) as pub:
            with pytest.raises(ConflictError):
                _http(c, "POST", "/v1/trainers", {"name": "policy", "params": good})
            first = pub.publish("auto", engine_ids=[eid], version=0)
            assert first.report.mode == "dense" and first.verified and first.job.result["transport"] == "gloo"
            with torch.no_grad():
                next(model.parameters()).view(-1)[:7] += 1.0
            second = pub.publish("auto", engine_ids=[eid], version=1)
            assert second.report.mode == "sparse" and second.report.elements == 7 and second.verified
            assert c.engines.get(eid).version == "1"
            sample = _http(c, "POST", f"/v1/engines/{eid}/sample", {"prompts": ["Hi"], "n": 2, "max_new_tokens": 2})
            assert sample["version"] == "1" and len(sample["samples"][0]["logprobs"]) == 2
        c.engines.delete(eid)


def _silent_publish(c, engine_ids, version, beat: threading.Event | None = None):
    """Register, post a publish and host rank 0, then go silent (no bytes, no done; heartbeats only
    until ``beat`` is set, none without it)."""
    metas = [m.to_dict() for m in param_metas(resolve_params())]
    slot = _http(c, "POST", "/v1/trainers", {"name": f"silent-{version}", "params": metas})
    rdv = Rendezvous("127.0.0.1", free_port(), len(engine_ids) + 1, "gloo", f"silent-{version}")
    job = _http(c, "POST", f"/v1/trainers/{slot['id']}/publish",
                {"mode": "dense", "engine_ids": engine_ids, "version": version, "rendezvous": rdv.to_dict()})
    box = {}
    thread = threading.Thread(target=lambda: box.setdefault("g", open_group(rdv, 0, "cpu", timeout_s=30)), daemon=True)
    thread.start()
    if beat is not None:
        def beats():
            while not beat.wait(1.0):
                _http(c, "POST", f"/v1/trainers/{slot['id']}/heartbeat")
        threading.Thread(target=beats, daemon=True).start()
    return job["id"], box, thread


def _newest_engine_process(root: int) -> int:
    """The most recently started Ray actor process of a reference engine under the service's process."""
    parents, starts, names = {}, {}, {}
    for d in Path("/proc").iterdir():
        try:
            stat = (d / "stat").read_text().rsplit(")", 1)[1].split()
            parents[int(d.name)], starts[int(d.name)] = int(stat[1]), int(stat[19])
            names[int(d.name)] = (d / "cmdline").read_bytes().decode(errors="replace")
        except (OSError, ValueError, IndexError):
            continue

    def under(pid: int) -> bool:
        while pid > 1:
            if pid == root:
                return True
            pid = parents.get(pid, 0)
        return False

    found = [p for p in names if "ReferenceEngineCore" in names[p] and under(p)]
    assert found, "no engine process found"
    return max(found, key=starts.__getitem__)


_PARAMS: dict = {}


def resolve_params():
    if not _PARAMS:
        lm, _ = load_causal_lm(resolve_model(None), "float32", torch.device("cpu"))
        _PARAMS.update(dict(lm.named_parameters()))
    return _PARAMS.items()


def test_publisher_silent_mid_sync_fails_with_version_unknown(service):
    with Client(service.url, timeout=120) as c:
        eid = c.engines.launch("reference", dtype="float32").id
        job_id, box, thread = _silent_publish(c, [eid], "7")
        with pytest.raises(JobFailedError):
            c.wait(job_id, timeout=120)
        job = c.jobs.get(job_id)
        assert job.state == "failed" and "lost its lease" in job.error, job.error
        assert c.engines.get(eid).version is None
        thread.join(30)
        if "g" in box:
            box["g"].close()
        c.engines.delete(eid)


def test_engine_dies_during_a_publish(service):
    with Client(service.url, timeout=120) as c:
        eid = c.engines.launch("reference", dtype="float32").id
        stop = threading.Event()
        job_id, box, thread = _silent_publish(c, [eid], "8", beat=stop)
        thread.join(60)  # the engine joined: the publish is under way, the engine waits for bytes
        os.kill(_newest_engine_process(service.proc.pid), signal.SIGKILL)
        deadline = time.time() + 120
        while c.jobs.get(job_id).state not in ("failed", "succeeded") and time.time() < deadline:
            time.sleep(0.5)
        stop.set()
        job = c.jobs.get(job_id)
        assert job.state == "failed" and f"engine {eid} died" in job.error, job.error
        assert c.engines.get(eid).version is None
        if "g" in box:
            box["g"].close()
