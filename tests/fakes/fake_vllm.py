"""A CPU test double of vLLM for fast tests and the bench's `--fake-vllm` flow: its numbers mean nothing,
its point is to run the REAL WsyncWorkerExtension methods (wsync_build_param_map,
wsync_recv_dense_direct, wsync_recv_sparse_direct, wsync_recv_dense/sparse, wsync_fingerprint) where
no GPU is. The model mimics vLLM's Qwen2 runtime layout (QKV / gate-up modules with output_sizes, a
padded-or-not VocabParallelEmbedding stand-in, tied lm_head absent from named_parameters); "vLLM's own
paths" are the extension's unpacked wire over a gloo group (same bytes as vLLM's NCCL helpers)."""

from __future__ import annotations

import threading
import types
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from wsync.engines.contract import DenseUpdate, EngineDetails, ReceiveReport, SparseUpdate
from wsync.engines.vllm.payloads import dense_update_info, sparse_update_info
from wsync.engines.vllm.worker import WsyncWorkerExtension
from wsync.transfer.group import Rendezvous, SyncGroup, open_group
from wsync.transfer.meta import TensorMeta

# HF checkpoint name -> (fused runtime module, shard); written here, independent of the extension's map
FUSED = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
         "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}
Shape = Any  # duck-typed: hidden, heads, head_dim, kv_heads, intermediate, vocab, layers, tied (bench.shapes.Shape)


class _Linear(nn.Module):
    def __init__(self, out_sizes: list[int], cols: int, bias: bool) -> None:
        super().__init__()
        self.output_sizes = list(out_sizes)
        self.weight = nn.Parameter(torch.zeros(sum(out_sizes), cols, dtype=torch.bfloat16), requires_grad=False)
        if bias:
            self.bias = nn.Parameter(torch.zeros(sum(out_sizes), dtype=torch.bfloat16), requires_grad=False)


class _Embedding(nn.Module):
    def __init__(self, vocab: int, hidden: int) -> None:
        super().__init__()
        self.org_vocab_size = vocab
        padded = -(-vocab // 64) * 64
        self.weight = nn.Parameter(torch.zeros(padded, hidden, dtype=torch.bfloat16), requires_grad=False)


class _Norm(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(hidden, dtype=torch.bfloat16), requires_grad=False)


class Qwen2ForCausalLM(nn.Module):  # the class name is what the extension checks
    def __init__(self, s: Shape) -> None:
        super().__init__()
        h, q, kv, ff = s.hidden, s.heads * s.head_dim, s.kv_heads * s.head_dim, s.intermediate
        self.model = nn.Module()
        self.model.embed_tokens = _Embedding(s.vocab, h)
        self.model.layers = nn.ModuleList()
        for _ in range(s.layers):
            layer = nn.Module()
            layer.self_attn = nn.Module()
            layer.self_attn.qkv_proj = _Linear([q, kv, kv], h, True)
            layer.self_attn.o_proj = _Linear([h], q, False)
            layer.mlp = nn.Module()
            layer.mlp.gate_up_proj = _Linear([ff, ff], h, False)
            layer.mlp.down_proj = _Linear([h], ff, False)
            layer.input_layernorm, layer.post_attention_layernorm = _Norm(h), _Norm(h)
            self.model.layers.append(layer)
        self.model.norm = _Norm(h)
        self.lm_head = self.model.embed_tokens if s.tied else _Embedding(s.vocab, h)

    def load_weights(self, weights) -> set[str]:
        """vLLM-style loading of HF checkpoint tensors (stacked shards, tied lm_head skipped)."""
        params = dict(self.named_parameters())
        for name, w in weights:
            parts = name.split(".")
            fused = FUSED.get(parts[-2])
            if fused:
                path = ".".join(parts[:-2] + [fused[0]])
                sizes = self.get_submodule(path).output_sizes
                first = sum(sizes[:fused[1]])
                params[f"{path}.{parts[-1]}"].data[first:first + w.shape[0]].copy_(w)
            elif name in params:
                params[name].data[: w.shape[0]].copy_(w)
        return set(params)


class _Comm:
    """vLLM's PyNcclCommunicator surface (broadcast(tensor, src, stream)) over a wsync SyncGroup."""

    def __init__(self, group: SyncGroup) -> None:
        self.group = group

    def broadcast(self, tensor: torch.Tensor, src: int = 0, stream: Any = None) -> None:
        self.group.broadcast(tensor, src)


class FakeWorker(WsyncWorkerExtension):
    def __init__(self, s: Shape) -> None:
        self.device = torch.device("cpu")
        self.model_runner = types.SimpleNamespace(model=Qwen2ForCausalLM(s))
        hf = types.SimpleNamespace(tie_word_embeddings=s.tied)
        self.vllm_config = types.SimpleNamespace(
            parallel_config=types.SimpleNamespace(rank=0, world_size=1), quant_config=None,
            model_config=types.SimpleNamespace(hf_config=hf, enforce_eager=True))


class FakeLLM:
    def __init__(self, s: Shape) -> None:
        self.worker = FakeWorker(s)

    def collective_rpc(self, method: str, args: tuple = (), kwargs: dict | None = None) -> list:
        return [getattr(self.worker, method)(*args, **(kwargs or {}))]

    def reset_prefix_cache(self) -> None:
        pass


class FakeEngine:
    """The VLLMEngineCore surface the bench uses (engine contract types), on vLLM's wire through the
    extension's wsync_recv_dense / wsync_recv_sparse over a gloo group."""

    kind = "fake-vllm"

    def __init__(self, s: Shape) -> None:
        self.llm = FakeLLM(s)
        self.group: SyncGroup | None = None

    def ready(self) -> EngineDetails:
        return EngineDetails(kind=self.kind, model="fake", device="cpu", num_tensors=len(self.param_metas()),
                             transports=["vllm_native"])

    def join_group(self, rendezvous: dict, rank: int, transport: str = "vllm_native", timeout_s: float = 300.0) -> None:
        rdv = Rendezvous(rendezvous["host"], int(rendezvous["port"]), int(rendezvous["world_size"]), "gloo",
                         "fake-vllm")
        self.group = open_group(rdv, rank, "cpu")
        self.llm.worker._wsync_comm = _Comm(self.group)

    def param_metas(self) -> list[TensorMeta]:
        return [TensorMeta.from_dict(m) for m in self.llm.collective_rpc("wsync_param_metas")[0]]

    def fingerprint(self, names: list[str] | None = None) -> dict:
        return self.llm.collective_rpc("wsync_fingerprint", args=(names,))[0]

    def recv_dense(self, update: DenseUpdate) -> ReceiveReport:
        ms = self.llm.collective_rpc("wsync_recv_dense", kwargs=dense_update_info(update.metas))[0]
        return ReceiveReport(recv_ms=ms)

    def recv_sparse(self, update: SparseUpdate) -> ReceiveReport:
        ms = 0.0
        if update.metas:
            ms = self.llm.collective_rpc("wsync_recv_sparse", kwargs=sparse_update_info(update.metas))[0]
        return ReceiveReport(recv_ms=ms)

    def shutdown(self) -> None:
        if self.group is not None:
            self.group.close()
            self.group = None


# ---- the trainer-side helpers, same names as wsync.engines.vllm.trainer's ------------------------------------------
@dataclass
class FakeApi:
    version: str = "fake"
    generation: str = "fake"
    installed: bool = True
    notes: tuple = field(default_factory=tuple)


def detect_generation() -> FakeApi:
    return FakeApi()


def trainer_open_group(api: FakeApi, host: str, port: int, world_size: int) -> _Comm:
    return _Comm(open_group(Rendezvous(host, int(port), int(world_size), "gloo", "fake-vllm"), 0, "cpu"))


def trainer_send_dense(api: FakeApi, comm: _Comm, named, packed: bool = False) -> float:
    import time

    t0 = time.perf_counter()
    for _, t in named:
        comm.broadcast(t.detach().contiguous(), 0)
    return (time.perf_counter() - t0) * 1e3


def trainer_send_sparse(api: FakeApi, comm: _Comm, patches) -> float:
    import time

    t0 = time.perf_counter()
    for p in patches:
        comm.broadcast(p.indices.to(torch.int32).contiguous(), 0)
        comm.broadcast(p.values.contiguous(), 0)
    return (time.perf_counter() - t0) * 1e3


def trainer_close_group(comm: _Comm | None) -> None:
    if comm is not None:
        comm.group.close()


# ---- two ranks in one process -------------------------------------------------------------------
def run_pair(rank0, rank1):
    """rank0() in a thread, rank1() here; both results; re-raises either side's exception."""
    box: dict = {}

    def target():
        try:
            box["r0"] = rank0()
        except BaseException as exc:  # noqa: BLE001
            box["e0"] = exc

    th = threading.Thread(target=target)
    th.start()
    try:
        r1 = rank1()
    finally:
        th.join(60)
    if "e0" in box:
        raise box["e0"]
    return box.get("r0"), r1
