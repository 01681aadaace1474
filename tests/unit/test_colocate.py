"""One GPU: the cuda_ipc transport's choice and session lifecycle through the real API and sync layer on
the in-process fakes (tests/fakes: the fake trainer "shares" its tensors with fake engines), the
placement function and the memory budget refusal (actors/placement.py)."""

from __future__ import annotations

import pytest

from tests.fakes.app import fake_client, wait_job
from tests.fakes.wire import Hub
from wsync.actors.placement import (
    PlacementError,
    actor_options,
    check_capacity,
    memory_budget,
    plan_placement,
    trainer_reserve,
)
from wsync.engines.contract import EngineDetails
from wsync.sync.transports import NoTransport, TrainerSide, choose, same_gpu


def _details(transports, uuid=None, device="cuda"):
    return EngineDetails(kind="reference", model="m", device=device, num_tensors=1, transports=transports,
                         gpu_uuid=uuid)


# ---- transport choice ------------------------------------------------------------------------
def test_same_gpu_uuid_chooses_cuda_ipc_else_nccl_else_gloo():
    both = ["cuda_ipc", "nccl"]
    assert choose(_details(both, "GPU-aaaa"), TrainerSide("cuda", "GPU-aaaa")).name == "cuda_ipc"
    assert choose(_details(both, "aaaa"), TrainerSide("cuda", "GPU-AAAA")).name == "cuda_ipc"  # prefix/case
    assert choose(_details(both, "GPU-bbbb"), TrainerSide("cuda", "GPU-aaaa")).name == "nccl"
    assert choose(_details(both, None), TrainerSide("cuda", None)).name == "nccl"  # unknown: never IPC
    assert choose(_details(["cuda_ipc", "gloo"], None, "cpu"), TrainerSide("cpu")).name == "gloo"
    # a vLLM engine on the native route lists cuda_ipc first: colocated it must get IPC, not NCCL
    assert choose(_details(["cuda_ipc", "vllm_native"], "GPU-a"), TrainerSide("cuda", "GPU-a")).name == "cuda_ipc"
    assert choose(_details(["cuda_ipc", "vllm_native"], "GPU-b"), TrainerSide("cuda", "GPU-a")).name == "vllm_native"
    with pytest.raises(NoTransport, match="GPU-b"):
        choose(_details(["cuda_ipc"], "GPU-b"), TrainerSide("cuda", "GPU-a"))
    assert not same_gpu(None, None) and not same_gpu("", "GPU-")
    assert same_gpu("GPU-GPU-abc", "abc")  # a doubled prefix (torch's str may already carry one)


def test_reference_engine_lists_cuda_ipc_only_on_a_gpu():
    import torch

    from wsync.engines.reference import ReferenceEngineCore

    core = ReferenceEngineCore.__new__(ReferenceEngineCore)
    core.device = torch.device("cpu")
    assert core._transports() == ["gloo"]
    core.device = torch.device("cuda:0")
    assert core._transports() == ["cuda_ipc", "nccl"]


# ---- session lifecycle on the fakes ------------------------------------------------------------
@pytest.fixture
def colo(tmp_path):
    hub = Hub()
    hub.transports = ["cuda_ipc", "nccl"]
    hub.trainer_gpu = hub.engine_gpu = "GPU-same"
    with fake_client(tmp_path, hub, device="cuda") as (client, hub):
        assert client.post("/v1/trainer/load", json={}).status_code == 200
        eng = client.post("/v1/engines", json={"kind": "reference"}).json()
        assert eng["state"] == "ready", eng
        yield client, hub, eng


def _sync(client, path, body):
    r = client.post(f"/v1/sync/{path}", json=body)
    assert r.status_code == 202, r.text
    return wait_job(client, r.json()["id"])


def _n(hub, who, method):
    return len([c for c in hub.calls if (who is None or c[0] == who) and c[1] == method])


def test_cuda_ipc_session_opened_once_reused_and_shown_in_results(colo):
    client, hub, eng = colo
    assert eng["details"]["transport"] == "cuda_ipc" and eng["details"]["gpu_uuid"] == "GPU-same"
    first = _sync(client, "dense", {"engine_ids": [eng["id"]]})
    again = _sync(client, "dense", {"engine_ids": [eng["id"]]})
    assert first["state"] == again["state"] == "succeeded", (first["error"], again["error"])
    for done in (first, again):
        assert done["result"]["verified"] is True
        assert [e["transport"] for e in done["result"]["engines"]] == ["cuda_ipc"]
    assert _n(hub, "trainer", "ipc_open") == 1 and _n(hub, "trainer", "open_group") == 0  # opened once
    assert _n(hub, None, "map_export") == 0  # the export mapped at join is still current: no re-send
    patch = client.post("/v1/patches", json={"kind": "random", "density": 0.01}).json()
    sp = _sync(client, "sparse", {"engine_ids": [eng["id"]], "patch_id": patch["id"]})
    assert sp["state"] == "succeeded" and sp["result"]["verified"] is True, sp["error"]
    patch2 = client.post("/v1/patches", json={"kind": "random", "density": 0.01}).json()
    sp2 = _sync(client, "sparse", {"engine_ids": [eng["id"]], "patch_id": patch2["id"]})
    assert sp2["state"] == "succeeded" and sp2["result"]["verified"] is True
    assert _n(hub, None, "map_staging") == 1  # the staging buffer is mapped once, then reused
    assert _n(hub, "trainer", "ipc_open") == 1


def test_layout_change_remaps_before_copying(colo):
    """A trainer reload re-allocates its tensors: the next dense sync carries the new export, the engine
    maps it first and the sync verifies (never a copy from the old export)."""
    client, hub, eng = colo
    assert _sync(client, "dense", {"engine_ids": [eng["id"]]})["state"] == "succeeded"
    assert client.post("/v1/trainer/reset").status_code == 200
    done = _sync(client, "dense", {"engine_ids": [eng["id"]]})
    assert done["state"] == "succeeded" and done["result"]["verified"] is True, done["error"]
    assert _n(hub, None, "map_export") == 1 and _n(hub, "trainer", "ipc_open") == 1


def test_failed_ipc_sync_tears_down_every_side_and_versions_become_unknown(colo):
    client, hub, eng = colo
    assert _sync(client, "dense", {"engine_ids": [eng["id"]]})["state"] == "succeeded"
    group = [c for c in hub.calls if c[1] == "ipc_open"][-1][2]
    hub.fail["recv"] = "the engine died mid-copy"
    done = _sync(client, "dense", {"engine_ids": [eng["id"]]})
    assert done["state"] == "failed" and "died mid-copy" in done["error"]
    assert ("trainer", "close_group", group) in hub.calls
    assert any(c[1] == "leave_group" and c[2] == group for c in hub.calls)
    assert client.app.state.wsync.fleet.groups.names() == []
    assert client.get(f"/v1/engines/{eng['id']}").json()["version"] is None
    again = _sync(client, "dense", {"engine_ids": [eng["id"]]})  # a dense reseed opens a fresh session
    assert again["state"] == "succeeded" and again["result"]["verified"] is True
    assert _n(hub, "trainer", "ipc_open") == 2


def test_engine_on_another_gpu_gets_nccl_and_a_handle_from_another_gpu_is_refused(tmp_path):
    hub = Hub()
    hub.transports = ["cuda_ipc", "nccl"]
    hub.trainer_gpu, hub.engine_gpu = "GPU-a", "GPU-b"
    with fake_client(tmp_path, hub, device="cuda") as (client, hub):
        client.post("/v1/trainer/load", json={})
        eng = client.post("/v1/engines", json={"kind": "reference"}).json()
        assert eng["details"]["transport"] == "nccl"
        # force the IPC transport onto it anyway: the trainer refuses the session, the job fails clearly
        from wsync.sync.transports import CudaIpc

        client.app.state.wsync.fleet.engines[eng["id"]].transport = CudaIpc()
        done = _sync(client, "dense", {"engine_ids": [eng["id"]]})
        assert done["state"] == "failed" and "IpcDeviceError" in done["error"] and "GPU-b" in done["error"]
        assert client.get(f"/v1/engines/{eng['id']}").json()["version"] is None


def test_colocated_vllm_engine_that_does_not_fit_is_refused_with_409(tmp_path):
    hub = Hub()
    with fake_client(tmp_path, hub, device="cuda") as (client, hub):
        client.post("/v1/trainer/load", json={})
        client.app.state.wsync.fleet.actors.colocated = True  # what RayActors reports on one GPU
        r = client.post("/v1/engines", json={"kind": "vllm", "gpu_memory_utilization": 0.9})
        assert r.status_code == 409, r.text
        err = r.json()["error"]
        assert err["field"] == "gpu_memory_utilization" and "90.0 GiB" in err["message"]
        assert "80.0 GiB is free" in err["message"]


# ---- placement -----------------------------------------------------------------------------------
def test_one_gpu_places_trainer_and_engines_fractionally():
    p = plan_placement("cuda", 1.0)
    assert p.colocated
    assert actor_options(p, "trainer")["num_gpus"] == 0.25 and actor_options(p, "engine")["num_gpus"] == 0.25
    check_capacity(p, "engine", 0.75)  # fits next to the trainer
    with pytest.raises(PlacementError, match=r"needs 0.25 GPU.*1 GPU\(s\), 0 free"):
        check_capacity(p, "engine", 0.0)


def test_two_gpus_place_whole_gpus_and_refuse_a_third_at_once():
    p = plan_placement("cuda", 2.0)
    assert not p.colocated and actor_options(p, "engine")["num_gpus"] == 1.0
    with pytest.raises(PlacementError, match="needs 1 GPU; the cluster has 2 GPU"):
        check_capacity(p, "engine", 0.0, "TrainerCore 1 GPU, ReferenceEngineCore 1 GPU")
    off = plan_placement("cuda", 1.0, colocate="off")
    with pytest.raises(PlacementError, match="WSYNC_COLOCATE"):
        check_capacity(off, "engine", 0.0)
    assert plan_placement("cuda", 2.0, colocate="on").colocated
    assert actor_options(plan_placement("cpu", 0.0), "engine") == {"num_cpus": 0, "max_concurrency": 1}


def test_memory_budget_names_what_it_needs_and_what_it_found():
    gib = 1 << 30
    assert memory_budget(0.5, 100 * gib, 140 * gib, trainer_param_bytes=gib, trainer_allocated=gib) is None
    why = memory_budget(0.8, 100 * gib, 140 * gib, trainer_param_bytes=10 * gib, trainer_allocated=10 * gib,
                        snapshots=1)
    assert why is not None
    assert "needs 112.0 GiB" in why and "100.0 GiB is free" in why and "gpu_memory_utilization <=" in why
    assert trainer_reserve(gib, 1) == int(gib * 5) + 2 * gib


def test_ray_actors_refuse_an_engine_at_once_when_its_gpu_share_is_not_free(monkeypatch):
    """No Ray actor is created (it would wait forever): the refusal names the need, the cluster and the
    holders; with share free, the engine gets the colocated fraction and is told it is colocated."""
    import wsync.actors.engine as ae
    from wsync.settings import Settings

    actors = ae.RayActors(Settings(device="cuda"))
    actors.device, actors.placement = "cuda", plan_placement("cuda", 1.0)
    monkeypatch.setattr(ae, "PLACEMENT_WAIT_S", 0.0)
    monkeypatch.setattr(ae.ray, "available_resources", lambda: {"GPU": 0.0})
    monkeypatch.setattr(ae, "_holders", lambda: "TrainerCore 0.25 GPU, VLLMEngineCore 0.75 GPU")
    created = []
    monkeypatch.setattr(ae.ray, "remote", lambda cls: created.append(cls))
    with pytest.raises(PlacementError, match=r"needs 0.25 GPU.*0 free \(TrainerCore 0.25 GPU"):
        actors.create_engine("reference", "m", "cuda", {})
    assert created == [] and actors.colocated


def test_legacy_actor_options_still_give_one_gpu_per_actor():
    from wsync.actors.engine import actor_options as legacy

    assert legacy("cuda")["num_gpus"] == 1.0 and legacy("cpu") == {"num_cpus": 0, "max_concurrency": 1}


# ---- the vLLM engine core's cuda_ipc calls (fake LLM: only the call sequence) ---------------------
class _IpcLLM:
    def __init__(self):
        self.calls = []

    def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
        self.calls.append((method, args))
        return [{"wsync_direct_unsupported": None, "wsync_param_metas": [],
                 "wsync_ipc_dense": {"bytes": 64, "copies": 1, "copy_ms": 0.1},
                 "wsync_ipc_map": {"flatten": {"flattened": False, "reason": "needs enforce_eager=True"}},
                 "wsync_ipc_sparse": {"elements": 3, "ms": 0.1},
                 "wsync_ipc_sparse_flat": {"elements": 3, "scatters": 1, "ms": 0.1}}.get(method)]

    def __getattr__(self, name):  # reset_prefix_cache, sleep, wake_up, ...
        if name.startswith("_"):
            raise AttributeError(name)
        return lambda *a, **k: self.calls.append((name, a))


def test_vllm_engine_cuda_ipc_call_sequence(monkeypatch):
    from tests.fakes.vllm_modules import api_of
    from wsync.engines.contract import DenseUpdate, IpcDense, IpcSparse, SparseUpdate
    from wsync.engines.vllm import engine as ve
    from wsync.transfer.sparse import SparseMeta

    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    monkeypatch.setattr(ve, "create_llm", lambda model, **kw: _IpcLLM())
    monkeypatch.setattr(ve, "engine_kwargs", lambda *a, **k: {})
    monkeypatch.setattr(ve, "detect_generation", lambda: api_of("A", "0.24.0"))
    eng = ve.VLLMEngineCore("/models/tiny", "cuda", {})  # the native route still offers cuda_ipc first
    assert eng.transports() == ["cuda_ipc", "vllm_native"]
    llm = eng.llm
    eng.join_group({"name": "g", "world_size": 2, "exports": {"1": {"export_id": "e1"}}}, 1, "cuda_ipc")
    assert llm.calls[-1] == ("wsync_ipc_map", ({"export_id": "e1"}, 1 << 28, True))  # flatten where allowed
    assert eng.ready().extra["ipc_flatten"] == "needs enforce_eager=True"  # the worker's refusal, reported
    eng.prepare_sync(DenseUpdate([], 1024))  # nothing to build: the map came with the export
    llm.calls.clear()
    got = eng.recv_dense(DenseUpdate([], 1024, ipc=IpcDense("e1")))
    assert [c[0] for c in llm.calls] == ["wsync_ipc_dense", "reset_prefix_cache"] and got.bytes == 64
    llm.calls.clear()
    eng.recv_dense(DenseUpdate([], 1024, ipc=IpcDense("e2", {"export_id": "e2"})))  # re-exported: map first
    assert [c[0] for c in llm.calls] == ["wsync_ipc_map", "wsync_ipc_dense", "reset_prefix_cache"]
    assert llm.calls[1][1] == ("e2",)
    llm.calls.clear()
    meta = SparseMeta("model.embed_tokens.weight", "bfloat16", [10, 4], 3, "flat_int32", 18)
    flat = [["model.embed_tokens.weight", "bfloat16", [10, 4], 3]]
    out = eng.recv_sparse(SparseUpdate([meta], ipc=IpcSparse("s1", {"staging_id": "s1"}, "ipc_flat", flat)))
    assert [c[0] for c in llm.calls] == ["wsync_ipc_map_staging", "wsync_ipc_sparse_flat", "reset_prefix_cache"]
    assert llm.calls[1][1] == ("s1", flat) and out.elements == 3 and out.extra["ipc_format"] == "ipc_flat"
    llm.calls.clear()  # an update without the flat marker: the encoded per-tensor stream
    out = eng.recv_sparse(SparseUpdate([meta], ipc=IpcSparse("s1")))
    assert [c[0] for c in llm.calls] == ["wsync_ipc_sparse", "reset_prefix_cache"]
    assert llm.calls[0][1][0] == "s1" and llm.calls[0][1][1][0]["name"] == "model.embed_tokens.weight"
    with pytest.raises(ve.VLLMEngineError, match="ipc field"):
        eng.recv_dense(DenseUpdate([], 1024))
    llm.calls.clear()
    eng.leave_group()
    assert llm.calls == [("wsync_ipc_unmap", ())]


def test_vllm_engine_memory_check_names_need_and_free(monkeypatch):
    import torch

    from wsync.engines.vllm import memory as mm

    gib = 1 << 30
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(mm.time, "sleep", lambda s: None)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (50 * gib, 140 * gib))
    with pytest.raises(mm.VLLMMemoryError, match=r"needs 70.0 GiB of this GPU's 140.0 GiB, but only 50.0 GiB is free"):
        mm.check_gpu_memory(0.5, colocated=True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (100 * gib, 140 * gib))
    mm.check_gpu_memory(0.5, colocated=True)  # fits
