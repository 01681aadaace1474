"""wsync.engines.vllm on CPU: trainer helpers, the worker extension and VLLMEngineCore, with fake vLLM
modules, a loopback "NCCL" communicator and a fake vllm.LLM that records the call sequence."""

from __future__ import annotations

import types
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from tests.fakes.vllm_modules import PatchA, PatchD, api_of, make_importer, ns
from wsync.engines.contract import DenseUpdate, EngineCore, EngineDetails, SparseUpdate
from wsync.engines.vllm import detect
from wsync.engines.vllm import engine as ve
from wsync.engines.vllm import llm as vllm_llm
from wsync.engines.vllm import trainer as vt
from wsync.engines.vllm.detect import M_BASE, M_COMMON, M_FACTORY, M_NCCL, M_SPARSE, VLLMUnsupportedError
from wsync.engines.vllm.payloads import dense_update_info, sparse_update_info
from wsync.engines.vllm.worker import WsyncWorkerExtension
from wsync.transfer.meta import TensorMeta, dtype_name
from wsync.transfer.sparse import SparseMeta


# ---- a loopback wire: rank 0 records broadcasts, the receiver replays them in order --------------
class Wire:
    def __init__(self):
        self.sent: list[torch.Tensor] = []


class SendComm:
    def __init__(self, wire):
        self.wire = wire

    def broadcast(self, tensor, src, stream=None):
        assert src == 0
        self.wire.sent.append(tensor.clone())


class RecvComm:
    def __init__(self, wire):
        self.wire, self.i = wire, 0

    def broadcast(self, tensor, src, stream=None):
        x = self.wire.sent[self.i]
        self.i += 1
        assert (x.dtype, x.shape) == (tensor.dtype, tensor.shape), (x.dtype, x.shape, tensor.dtype, tensor.shape)
        tensor.copy_(x)


class TinyVLLMModel(nn.Module):
    """vLLM-like runtime layout: q/k/v fused into qkv_proj; load_weights maps HF names onto it."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.embed = nn.Parameter(torch.randn(10, 4, generator=g).to(torch.bfloat16))
        self.qkv_proj = nn.Parameter(torch.randn(12, 4, generator=g).to(torch.bfloat16))
        self.norm = nn.Parameter(torch.ones(4))

    def load_weights(self, weights):
        shard = {"q_proj": 0, "k_proj": 1, "v_proj": 2}
        for name, w in weights:
            if name in shard:
                self.qkv_proj.data[4 * shard[name]: 4 * shard[name] + 4].copy_(w)
            else:
                self.get_parameter(name).data.copy_(w)


def hf_params(seed: int = 1) -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [("embed", torch.randn(10, 4, generator=g).to(torch.bfloat16)),
            ("q_proj", torch.randn(4, 4, generator=g).to(torch.bfloat16)),
            ("k_proj", torch.randn(4, 4, generator=g).to(torch.bfloat16)),
            ("v_proj", torch.randn(4, 4, generator=g).to(torch.bfloat16)), ("norm", torch.randn(4, generator=g))]


class FakeWorker(WsyncWorkerExtension):
    def __init__(self, wire):
        self.device = torch.device("cpu")
        self.model_runner = types.SimpleNamespace(model=TinyVLLMModel())
        self.vllm_config = types.SimpleNamespace(parallel_config=types.SimpleNamespace(rank=0))
        self.weight_transfer_engine = types.SimpleNamespace(model_update_group=RecvComm(wire), shutdown=lambda: None)


def metas_of(named):
    return [{"name": n, "dtype": dtype_name(t.dtype), "shape": list(t.shape)} for n, t in named]


# ---- extension route: our trainer bytes == what our worker extension receives -------------------
def test_extension_dense_roundtrip_into_sparse_nccl_engine():
    api, wire = api_of("C", "0.28.0"), Wire()
    group = vt.TrainerGroup(api, comm=SendComm(wire), routes=detect.receive_plan(api))
    assert group.routes["dense"] == "extension"
    params = hf_params()
    vt.trainer_send_dense(api, group, params)
    assert [t.dtype for t in wire.sent] == [t.dtype for _, t in params]
    worker = FakeWorker(wire)
    worker.wsync_recv_dense(**dense_update_info(metas_of(params)))
    m = worker.model_runner.model
    assert torch.equal(m.embed, params[0][1]) and torch.equal(m.norm, params[4][1])
    assert torch.equal(m.qkv_proj, torch.cat([params[1][1], params[2][1], params[3][1]]))
    with pytest.raises(VLLMUnsupportedError, match="packed"):
        vt.trainer_send_dense(api, group, params, packed=True)


def test_extension_sparse_roundtrip_wire_order_and_apply():
    api, wire = api_of("A", "0.24.0"), Wire()
    group = vt.TrainerGroup(api, comm=SendComm(wire), routes=detect.receive_plan(api, extension_only=True))
    assert group.routes["sparse"] == "extension"
    patches = [PatchA("embed", torch.tensor([0, 5, 39]), torch.tensor([1.0, 2.0, 3.0], dtype=torch.bfloat16)),
               PatchA("qkv_proj", torch.tensor([47], dtype=torch.int32), torch.tensor([9.0], dtype=torch.bfloat16))]
    vt.trainer_send_sparse(api, group, patches)
    assert [t.dtype for t in wire.sent] == [torch.int32, torch.bfloat16, torch.int32, torch.bfloat16]
    worker = FakeWorker(wire)
    before = {n: p.detach().clone() for n, p in worker.model_runner.model.named_parameters()}
    metas = [{"name": p.name, "dtype": "bfloat16", "shape": list(before[p.name].shape), "count": len(p.indices)}
             for p in patches]
    worker.wsync_recv_sparse(**sparse_update_info(metas))
    m = worker.model_runner.model
    expect = before["embed"].view(-1).clone()
    expect[[0, 5, 39]] = torch.tensor([1.0, 2.0, 3.0], dtype=torch.bfloat16)
    assert torch.equal(m.embed.view(-1), expect)
    assert m.qkv_proj.view(-1)[47].item() == 9.0 and torch.equal(m.norm, before["norm"])


def test_extension_sparse_bad_name_consumes_wire_and_changes_nothing():
    api, wire = api_of("D"), Wire()  # C/D without the stateful trainer engine: vLLM's wire order by hand
    group = vt.TrainerGroup(api, comm=SendComm(wire), routes=detect.receive_plan(api))
    patches = [PatchA("embed", torch.tensor([1], dtype=torch.int32), torch.tensor([7.0], dtype=torch.bfloat16)),
               PatchA("q_proj", torch.tensor([1], dtype=torch.int32), torch.tensor([7.0], dtype=torch.bfloat16))]
    vt.trainer_send_sparse(api, group, patches)
    worker = FakeWorker(wire)
    before = worker.model_runner.model.embed.detach().clone()
    with pytest.raises(ValueError, match="qkv_proj"):
        worker.wsync_recv_sparse(names=["embed", "q_proj"], dtype_names=["bfloat16"] * 2, num_updates_list=[1, 1])
    assert worker.weight_transfer_engine.model_update_group.i == 4  # the trainer's send completed
    assert torch.equal(worker.model_runner.model.embed, before)


def test_extension_metas_fingerprint_and_close_group():
    worker = FakeWorker(Wire())
    metas = worker.wsync_param_metas()
    assert [m["name"] for m in metas] == ["embed", "qkv_proj", "norm"] and metas[0]["dtype"] == "bfloat16"
    fp = worker.wsync_fingerprint(["embed", "q_proj"])
    assert list(fp) == ["embed"]
    full = worker.wsync_fingerprint(None)
    assert set(full) == {"embed", "qkv_proj", "norm"} and fp["embed"] == full["embed"]
    closed = []
    worker._wsync_comm = SendComm(Wire())
    worker.weight_transfer_engine.shutdown = lambda: closed.append(True)
    worker.wsync_close_group()
    assert worker._wsync_comm is None and closed == [True]


# ---- native trainer paths call vLLM's own helpers -----------------------------------------------
@dataclass
class SendArgs:
    group: object
    src: int = 0
    packed: bool = False
    packed_buffer_size_bytes: int = 1 << 30


def fake_gen_a(calls):
    class Engine:
        @staticmethod
        def trainer_init(info):
            calls.append(("trainer_init", info))
            return "comm"

        @staticmethod
        def trainer_send_weights(iterator, args):
            calls.append(("send_weights", [n for n, _ in iterator], args))

        @staticmethod
        def trainer_send_sparse_weights(iterator, args):
            calls.append(("send_sparse", list(iterator), args))

    return {M_NCCL: ns("n", NCCLWeightTransferEngine=Engine, NCCLTrainerSendWeightsArgs=SendArgs),
            M_BASE: ns("b", SparseWeightPatch=PatchA)}


def test_gen_a_trainer_uses_vllm_static_helpers(monkeypatch):
    calls = []
    monkeypatch.setattr(vt, "_vllm", make_importer(fake_gen_a(calls)))
    api = api_of("A", "0.24.0")
    g = vt.trainer_open_group(api, "10.0.0.1", "29500", 2)
    assert calls.pop() == ("trainer_init", {"master_address": "10.0.0.1", "master_port": 29500, "world_size": 2})
    assert g.comm == "comm" and g.routes == {"dense": "native", "sparse": "native"}
    assert vt.trainer_send_dense(api, g, hf_params(), packed=True, packed_buffer_size_bytes=4096) >= 0
    _, names, args = calls.pop()
    assert names == ["embed", "q_proj", "k_proj", "v_proj", "norm"]
    assert args == SendArgs(group="comm", packed=True, packed_buffer_size_bytes=4096)
    p = types.SimpleNamespace(name="embed", indices=torch.tensor([1, 2], dtype=torch.int32),
                              values=torch.ones(2, dtype=torch.bfloat16))
    vt.trainer_send_sparse(api, g, [p])
    _, sent, args = calls.pop()
    assert sent == [PatchA("embed", p.indices, p.values)] and args == SendArgs(group="comm")
    assert vt.trainer_send_sparse(api, g, []) == 0.0 and not calls
    vt.trainer_close_group(g)
    assert g.comm is None


def test_gen_b_and_d_trainer_paths(monkeypatch):
    calls = []

    class SparseEngineB:
        @staticmethod
        def trainer_send_weights(iterator, args):
            calls.append(("b_send", list(iterator), args))

    class StatefulD:
        communicator = SendComm(Wire())

        def send_weights(self, patches):
            calls.append(("d_send", patches))

        def shutdown(self):
            calls.append(("d_shutdown",))

    class Factory:
        @staticmethod
        def trainer_init(info, *, client):
            calls.append(("d_init", info, client))
            return StatefulD()

    @dataclass(kw_only=True)
    class InitInfoD:
        master_address: str
        master_port: int
        world_size: int
        rank: int

    modules = fake_gen_a(calls)
    modules[M_COMMON] = ns("c", NCCLTrainerSendWeightsArgs=SendArgs)
    modules[M_SPARSE] = ns("s", SparseWeightPatch=PatchA, SparseNCCLWeightTransferEngine=SparseEngineB)
    monkeypatch.setattr(vt, "_vllm", make_importer(modules))
    b = api_of("B", "0.25.0")
    g = vt.trainer_open_group(b, "h", 1, 2)
    p = types.SimpleNamespace(name="embed", indices=torch.tensor([3], dtype=torch.int32), values=torch.ones(1))
    vt.trainer_send_sparse(b, g, [p])
    assert calls[-1] == ("b_send", [PatchA("embed", p.indices, p.values)], SendArgs(group="comm"))

    modules[M_SPARSE] = ns("s", SparseWeightPatch=PatchD, SparseNCCLTrainerInitInfo=InitInfoD)
    modules[M_FACTORY] = ns("f", WeightTransferTrainerFactory=Factory)
    d = api_of("D", "0.29.0")
    g = vt.trainer_open_group(d, "h", 1, 2)
    _, info, client = calls[-1]
    assert info == InitInfoD(master_address="h", master_port=1, world_size=2, rank=0)
    client.init_weight_transfer_engine({"init_info": {}})  # detached: the lead drives the engine side
    assert g.comm is StatefulD.communicator
    vt.trainer_send_sparse(d, g, [p], shapes={"embed": [10, 4]})
    assert calls[-1] == ("d_send", [PatchD("embed", p.indices, p.values, (10, 4))])
    with pytest.raises(ValueError, match="full_shape"):
        vt.trainer_send_sparse(d, g, [p])
    vt.trainer_close_group(g)
    assert calls[-1] == ("d_shutdown",)


# ---- VLLMEngineCore over a fake vllm.LLM --------------------------------------------------------
class FakeLLM:
    runtime = [{"name": "model.embed_tokens.weight", "dtype": "bfloat16", "shape": [10, 4]},
               {"name": "model.layers.0.self_attn.qkv_proj.weight", "dtype": "bfloat16", "shape": [12, 4]}]

    def __init__(self, model, **kw):
        self.model, self.kw, self.calls = model, kw, []

    def generate(self, prompts, params, use_tqdm=True):
        self.calls.append(("generate", params))
        out = types.SimpleNamespace(token_ids=(7,), text="x")
        return [types.SimpleNamespace(outputs=[out]) for _ in prompts]

    def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
        self.calls.append(("collective_rpc", method, args, kwargs))
        return [{"wsync_param_metas": self.runtime, "wsync_fingerprint": {"a": "1"},
                 "wsync_direct_unsupported": "fake: layout not mapped"}.get(method)]

    def __getattr__(self, name):  # sleep, wake_up, init_weight_transfer_engine, start/update/finish, ...
        if name.startswith("_"):
            raise AttributeError(name)
        return lambda *a, **k: self.calls.append((name, a, k))


@pytest.fixture
def engine_factory(monkeypatch):
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    modules = {"vllm": ns("vllm", SamplingParams=lambda **k: ("sp", k)),
               "vllm.config": ns("c", WeightTransferConfig=lambda backend: ("wtc", backend))}
    _imp = make_importer(modules)
    monkeypatch.setattr(ve, "_vllm", _imp, raising=False)
    monkeypatch.setattr(vllm_llm, "_vllm", _imp)
    monkeypatch.setattr("wsync.engines.vllm.payloads._vllm", make_importer(modules))
    monkeypatch.setattr(ve, "create_llm", lambda model, **kw: FakeLLM(model, **kw))

    def make(gen, version="0.24.0", **options):
        api = api_of(gen, version)
        monkeypatch.setattr(ve, "detect_generation", lambda: api)
        return ve.VLLMEngineCore("/models/tiny", "cuda", options or None)

    return make


RDV = {"host": "10.0.0.1", "port": 29500, "world_size": 2, "backend": "nccl", "name": "s1"}
DENSE = DenseUpdate([TensorMeta.from_dict(FakeLLM.runtime[0])], bucket_bytes=1 << 20)
SPARSE = SparseUpdate([SparseMeta(**FakeLLM.runtime[0], count=8, encoding="flat_int32", nbytes=48)])


def test_engine_gen_a_sequences(engine_factory):
    import os

    eng = engine_factory("A", gpu_memory_utilization=0.4, max_model_len=256)
    assert isinstance(eng, EngineCore)
    assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    llm = eng.llm
    assert llm.kw["weight_transfer_config"] == ("wtc", "nccl") and llm.kw["distributed_executor_backend"] == "uni"
    assert llm.kw["gpu_memory_utilization"] == 0.4 and llm.kw["max_model_len"] == 256 and llm.kw["enforce_eager"]
    assert eng.ready() == EngineDetails(
        kind="vllm", model="/models/tiny", device="cuda", num_tensors=2, transports=["vllm_native"], gpu_uuid=None,
        extra={"vllm_version": "0.24.0", "generation": "A", "weight_transfer_backend": "nccl", "route": "native",
               "receive": {"dense": "native", "sparse": "native"},
               "cuda_ipc_note": "fake: layout not mapped"})  # no worker map: no cuda_ipc offered
    assert eng.generate(["hi", "yo"], 2) == [{"token_ids": [7], "text": "x"}] * 2
    assert llm.calls[-1] == ("generate", ("sp", {"temperature": 0.0, "max_tokens": 2}))
    eng.pause()
    with pytest.raises(ve.VLLMEngineError, match="paused"):
        eng.generate(["hi"])
    eng.join_group(RDV, 1, "vllm_native")
    eng.prepare_sync(DENSE)  # a no-op on the native route
    out = eng.recv_dense(DENSE)
    assert out.recv_ms >= 0 and out.bytes == 80 and out.extra == {"route": "native", "transport": "vllm_native",
                                                                  "receive": "native"}
    got = eng.recv_sparse(SPARSE)
    assert got.bytes == 8 * (4 + 2) and got.elements == 8
    eng.resume()
    seq = [c for c in llm.calls if c[0] != "collective_rpc" or c[1] != "wsync_param_metas"]
    assert seq[-11:] == [
        ("sleep", (), {"level": 0}),
        ("init_weight_transfer_engine", ({"init_info": {"master_address": "10.0.0.1", "master_port": 29500,
                                                        "rank_offset": 1, "world_size": 2}},), {}),
        ("start_weight_update", (), {"is_checkpoint_format": True}),
        ("update_weights", ({"update_info": {"names": ["model.embed_tokens.weight"], "dtype_names": ["bfloat16"],
                                             "shapes": [[10, 4]], "packed": False}},), {}),
        ("finish_weight_update", (), {}),
        ("reset_prefix_cache", (), {}),
        ("start_weight_update", (), {"is_checkpoint_format": False}),
        ("update_weights", ({"update_info": {"names": ["model.embed_tokens.weight"], "dtype_names": ["bfloat16"],
                                             "shapes": [[10, 4]], "num_updates_list": [8],
                                             "update_kind": "sparse_flat"}},), {}),
        ("finish_weight_update", (), {}),
        ("reset_prefix_cache", (), {}),
        ("wake_up", (), {"tags": ["scheduling"]}),
    ]
    assert [m.to_dict() for m in eng.param_metas()] == FakeLLM.runtime and eng.fingerprint(["a"]) == {"a": "1"}
    eng.shutdown()
    assert ("collective_rpc", "wsync_close_group", (), None) in llm.calls and eng.llm is None
    with pytest.raises(ve.VLLMEngineError, match="shut down"):
        eng.generate(["hi"])


def test_engine_gen_d_routes_dense_through_extension(engine_factory):
    eng = engine_factory("D", "0.30.0")
    llm = eng.llm
    assert llm.kw["weight_transfer_config"] == ("wtc", "sparse_nccl")
    assert eng.ready().extra["receive"] == {"dense": "extension", "sparse": "native"}
    eng.join_group(RDV, 2, "vllm_native")
    assert eng.recv_dense(DENSE).extra["receive"] == "extension"
    eng.recv_sparse(SPARSE)
    eng.recv_sparse(SparseUpdate([]))  # empty patch set: nothing moves
    assert llm.calls[-7:] == [
        ("collective_rpc", "wsync_recv_dense", (), {"names": ["model.embed_tokens.weight"],
                                                    "dtype_names": ["bfloat16"], "shapes": [[10, 4]]}),
        ("reset_prefix_cache", (), {}),
        ("start_weight_update", (), {}),
        ("update_weights", ({"update_info": {"names": ["model.embed_tokens.weight"], "dtype_names": ["bfloat16"],
                                             "shapes": [[10, 4]], "num_updates_list": [8]}},), {}),
        ("finish_weight_update", (), {}),
        ("reset_prefix_cache", (), {}),
        ("reset_prefix_cache", (), {}),
    ]
    init = next(c for c in llm.calls if c[0] == "init_weight_transfer_engine")
    assert init[1][0]["init_info"]["rank_offset"] == 2
    with pytest.raises(VLLMUnsupportedError, match="0.30.0.*packed"):
        eng.recv_dense(DenseUpdate(DENSE.metas, 1 << 20, packed=True))


def test_engine_extension_only_receives_both_modes_through_the_worker(engine_factory):
    eng = engine_factory("A", native_via_extension=True)
    eng.join_group(RDV, 1, "vllm_native")
    eng.recv_dense(DENSE)
    eng.recv_sparse(SPARSE)
    rpcs = [c[1] for c in eng.llm.calls if c[0] == "collective_rpc" and c[1] != "wsync_param_metas"]
    assert rpcs[-2:] == ["wsync_recv_dense", "wsync_recv_sparse"]
    assert not any(c[0] in ("start_weight_update", "update_weights") for c in eng.llm.calls)


def test_engine_refusals(engine_factory):
    eng = engine_factory("B", "0.25.0")
    with pytest.raises(ve.VLLMEngineError, match="not joined"):
        eng.recv_dense(DENSE)
    with pytest.raises(ve.VLLMEngineError, match=r"receives on \['vllm_native'\], not 'nccl'"):
        eng.join_group(RDV, 1, "nccl")
    with pytest.raises(ve.VLLMEngineError, match="rank 0"):
        eng.join_group(RDV, 0, "vllm_native")
    eng.join_group(RDV, 1, "vllm_native")
    bad = SparseUpdate([SparseMeta("model.layers.0.self_attn.q_proj.weight", "bfloat16", [4, 4], 1, "flat_int32", 6)])
    with pytest.raises(ve.VLLMEngineError, match="qkv_proj"):
        eng.recv_sparse(bad)
    with pytest.raises(ve.VLLMEngineError, match="engine has bfloat16"):
        eng.recv_sparse(SparseUpdate([SparseMeta("model.embed_tokens.weight", "bfloat16", [9, 4], 1, "flat_int32", 6)]))
    assert not any(c[0] == "update_weights" for c in eng.llm.calls)
    with pytest.raises(ve.VLLMEngineError, match="sync_route"):
        engine_factory("A", sync_route="fast")
    with pytest.raises(VLLMUnsupportedError, match=r"vLLM >= 0\.23"):
        engine_factory("old", "0.22.1")
