"""VLLMEngineCore on the direct route (opt-in: EngineLaunch.sync_route="direct"): it joins a wsync
SyncGroup, builds the worker's name-and-slice map once per layout, and receives wsync's own dense and
sparse wire (any encoding, checkpoint names) straight into vLLM-shaped runtime parameters.

CPU: the real WsyncWorkerExtension in a vLLM-shaped fake model (tests/fakes/fake_vllm.py), a real 2-rank gloo
group (trainer in a thread), wsync's send_dense / send_sparse on the trainer side."""

from __future__ import annotations

import pytest
import torch

from bench.shapes import SHAPES, fused_tensors, hf_metas, make_weights, runtime_layout
from tests.fakes import fake_vllm
from tests.fakes.fake_vllm import run_pair
from tests.fakes.vllm_modules import api_of
from wsync.engines.contract import DenseUpdate, SparseUpdate
from wsync.engines.vllm import engine as ve
from wsync.transfer.delta import diff_patches
from wsync.transfer.dense import send_dense
from wsync.transfer.fingerprint import fingerprint
from wsync.transfer.group import Rendezvous, free_port, open_group
from wsync.transfer.sparse import plan_sparse, send_sparse

TINY = SHAPES["tiny"]
BUCKET = 8192
API = api_of("A", "0.24.0")


@pytest.fixture
def engine(monkeypatch):
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    monkeypatch.setattr(ve, "create_llm", lambda model, **kw: fake_vllm.FakeLLM(TINY))
    monkeypatch.setattr(ve, "engine_kwargs", lambda *a, **k: {})
    monkeypatch.setattr(ve, "detect_generation", lambda: API)
    eng = ve.VLLMEngineCore("/models/tiny", "cpu", {"sync_route": "direct"})
    yield eng
    eng.leave_group()


def runtime_fp(eng) -> dict:
    return fingerprint(dict(eng.llm.worker.model_runner.model.named_parameters()))


def expected_fp(weights: dict) -> dict:
    return fingerprint(list(fused_tensors(weights, runtime_layout(hf_metas(TINY), TINY.tied))))


def test_direct_route_dense_then_sparse_auto(engine):
    info = engine.ready()
    assert info.transports == ["gloo"] and info.extra["route"] == "direct" and "route_note" not in info.extra
    assert info.num_tensors == len(engine.param_metas()) and info.gpu_uuid is None
    metas = hf_metas(TINY)
    weights = make_weights(metas, torch.device("cpu"), seed=4)
    rdv = Rendezvous("127.0.0.1", free_port(), 2, "gloo", "direct-engine")
    box: dict = {}

    def trainer_open():
        box["g"] = open_group(rdv, 0, "cpu", 30.0)

    run_pair(trainer_open, lambda: engine.join_group(rdv.to_dict(), 1, "gloo"))
    group = box["g"]
    before = runtime_fp(engine)
    update = DenseUpdate(metas, BUCKET)
    _, got = run_pair(lambda: send_dense(group, list(weights.items()), BUCKET), lambda: engine.recv_dense(update))
    assert got.extra["route"] == "direct" and got.bytes == sum(m.nbytes for m in metas) and got.messages > 0
    assert runtime_fp(engine) == expected_fp(weights) != before
    map_calls = engine._map_key
    # A second dense sync reuses the map (no rebuild) and still lands exactly.
    for t in weights.values():
        t.view(-1)[:3] += 1
    run_pair(lambda: send_dense(group, list(weights.items()), BUCKET), lambda: engine.recv_dense(update))
    assert engine._map_key is map_calls and runtime_fp(engine) == expected_fp(weights)
    # Sparse, auto encoding (not vLLM's flat_int32 wire), checkpoint names of fused tensors included.
    old = {n: t.clone() for n, t in weights.items()}
    gen = torch.Generator().manual_seed(3)
    for name in ("model.layers.0.self_attn.k_proj.weight", "model.layers.1.mlp.up_proj.weight",
                 "model.embed_tokens.weight"):
        flat = weights[name].view(-1)
        idx = torch.randperm(flat.numel(), generator=gen)[:50]
        flat[idx] = flat[idx] + 1
    patches = diff_patches(weights, old)
    specs = {m.name: m for m in metas}
    smetas = plan_sparse(patches, specs, "auto", weights)
    assert {m.encoding for m in smetas} != {"flat_int32"}
    engine.prepare_sync(update)
    assert engine._map_key is map_calls
    sparse_update = SparseUpdate(smetas)
    _, got = run_pair(lambda: send_sparse(group, patches, smetas, weights), lambda: engine.recv_sparse(sparse_update))
    assert got.extra["route"] == "direct" and got.extra["wire_bytes"] > 0
    assert got.elements == sum(m.count for m in smetas)
    a, b = runtime_fp(engine), expected_fp(weights)
    assert a == b, [n for n in a if a[n] != b.get(n)]
    group.close()


def test_native_route_on_request_and_fallback_reason(monkeypatch):
    monkeypatch.setattr(ve, "create_llm", lambda model, **kw: fake_vllm.FakeLLM(TINY))
    monkeypatch.setattr(ve, "engine_kwargs", lambda *a, **k: {})
    monkeypatch.setattr(ve, "detect_generation", lambda: API)
    native = ve.VLLMEngineCore("/models/tiny", "cpu", {"sync_route": "native"})
    assert native.ready().transports == ["vllm_native"] and native.ready().extra["route"] == "native"
    with pytest.raises(ve.VLLMEngineError, match="receives on"):
        native.join_group({"host": "127.0.0.1", "port": 1, "world_size": 2, "backend": "gloo"}, 1, "gloo")
    with pytest.raises(ve.VLLMEngineError, match="sync_route"):
        ve.VLLMEngineCore("/models/tiny", "cpu", {"sync_route": "fast"})
    unmapped = fake_vllm.FakeLLM(TINY)
    model = unmapped.worker.model_runner.model
    model.__class__ = type("GemmaForCausalLM", (type(model),), {})
    monkeypatch.setattr(ve, "create_llm", lambda model, **kw: unmapped)
    assert ve.VLLMEngineCore("/models/tiny", "cpu", {}).ready().extra["route"] == "native"  # the default
    fallback = ve.VLLMEngineCore("/models/tiny", "cpu", {"sync_route": "direct"})
    info = fallback.ready()
    assert info.transports == ["vllm_native"] and info.extra["route"] == "native"
    assert "not mapped" in info.extra["route_note"]
