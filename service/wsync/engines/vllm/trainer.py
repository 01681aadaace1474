"""The trainer side of vLLM's own wire (the trainer actor, rank 0): open the group, send dense and
sparse through vLLM's trainer helpers where the generation has them, close. Where the engine receives
through the worker extension (dense into a 'sparse_nccl' engine, B-D) the bytes are vLLM's unpacked
wire, broadcast here over the same communicator: dense one tensor at a time; sparse int32 indices then
values per patch, from rank 0."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from .comm import communicator_of, current_stream, device_sync
from .detect import (
    M_BASE,
    M_COMMON,
    M_FACTORY,
    M_NCCL,
    M_SPARSE,
    VLLMApi,
    VLLMUnsupportedError,
    _vllm,
    check_packed,
    fields_of,
    receive_plan,
    require_installed,
)
from .payloads import shape_of


@dataclass
class TrainerGroup:
    api: VLLMApi
    comm: Any = None  # PyNcclCommunicator (trainer = rank 0)
    engine: Any = None  # C/D: stateful sparse trainer engine
    routes: dict = dataclasses.field(default_factory=dict)  # receive_plan(api): the engines' plan

    def raw(self):
        if self.comm is None:
            raise VLLMUnsupportedError(f"vLLM {self.api.version}: this trainer group exposes no NCCL communicator "
                                       "(open it with stateful=False for the worker-extension path)")
        return self.comm


class _DetachedClient:
    """A no-op VLLMWeightSyncClient: wsync drives the engine side itself (join_group / recv_sparse)."""

    def _noop(self, *args, **kwargs) -> None: ...
    init_weight_transfer_engine = start_weight_update = update_weights = finish_weight_update = _noop


def trainer_open_group(api: VLLMApi, master_address: str, master_port: int, world_size: int,
                       *, stateful: bool = True) -> TrainerGroup:
    """Rank 0 of the transfer group; call concurrently with every engine's join_group."""
    require_installed(api, "opening a vLLM transfer group")
    info = {"master_address": str(master_address), "master_port": int(master_port), "world_size": int(world_size)}
    g = TrainerGroup(api, routes=receive_plan(api))
    if api.static_trainer_api:  # A / B: NCCLWeightTransferEngine.trainer_init (rank 0)
        fn = getattr(getattr(_vllm(M_NCCL), "NCCLWeightTransferEngine", None), "trainer_init", None)
        g.comm = (fn or _vllm(M_COMMON).trainer_init)(info)  # B may keep it in nccl_common (UNVERIFIED)
    elif stateful:  # C / D, UNVERIFIED: doc §1.4 with a detached client
        init = _vllm(M_SPARSE).SparseNCCLTrainerInitInfo(**info, rank=0)
        g.engine = _vllm(M_FACTORY).WeightTransferTrainerFactory.trainer_init(init, client=_DetachedClient())
        g.comm = communicator_of(g.engine)
    else:  # C / D plain communicator, UNVERIFIED (nccl_common.trainer_init)
        g.comm = _vllm(M_COMMON).trainer_init(info)
    return g


def trainer_send_dense(api: VLLMApi, group: TrainerGroup, named_params: Iterable, packed: bool = False,
                       packed_buffer_size_bytes: int | None = None) -> float:
    """Broadcast every tensor in order (the order of the metas the engine got); returns send_ms."""
    if packed:
        check_packed(api, group.routes)
    t0 = time.perf_counter()
    if group.routes["dense"] == "native":  # Gen A: vLLM's static helper
        nccl = _vllm(M_NCCL)
        extra = {"packed_buffer_size_bytes": int(packed_buffer_size_bytes)} if packed_buffer_size_bytes else {}
        args = nccl.NCCLTrainerSendWeightsArgs(group=group.comm, packed=bool(packed), **extra)
        nccl.NCCLWeightTransferEngine.trainer_send_weights(iter(named_params), args)
    else:  # extension: the bytes of vLLM's unpacked dense (one broadcast per tensor)
        comm, stream = group.raw(), current_stream()
        for _, tensor in named_params:
            comm.broadcast(tensor.detach().contiguous(), src=0, stream=stream)
    device_sync()
    return (time.perf_counter() - t0) * 1e3


def vllm_patches(api: VLLMApi, patches: list, shapes: dict | None):
    """wsync patches as vLLM's SparseWeightPatch (C: optional full_shape, D: required)."""
    cls = getattr(_vllm(M_BASE if api.generation == "A" else M_SPARSE), "SparseWeightPatch", None)
    cls = cls or _vllm(M_BASE).SparseWeightPatch
    out = []
    for p in patches:
        kw = {"name": p.name, "indices": p.indices.to(torch.int32).contiguous(), "values": p.values.contiguous()}
        if "full_shape" in fields_of(cls):
            full = shape_of(p, shapes)
            if full is None and api.generation == "D":
                raise ValueError(f"{p.name}: vLLM {api.version} (Gen D) needs full_shape; pass shapes={{name: shape}}")
            kw["full_shape"] = tuple(int(d) for d in full) if full is not None else None
        out.append(cls(**kw))
    return out


def trainer_send_sparse(api: VLLMApi, group: TrainerGroup, patches: Iterable, *, shapes: dict | None = None) -> float:
    """Per patch, in order: int32 indices then values, from rank 0; returns send_ms. Gen D needs each
    patch's full checkpoint shape (a `full_shape`/`shape` attribute, or `shapes={name: shape}`)."""
    patches, native, t0 = list(patches), group.routes["sparse"] == "native", time.perf_counter()
    if not patches:
        return 0.0
    if native and api.generation == "A":
        nccl = _vllm(M_NCCL)
        nccl.NCCLWeightTransferEngine.trainer_send_sparse_weights(
            iter(vllm_patches(api, patches, shapes)), nccl.NCCLTrainerSendWeightsArgs(group=group.comm))
    elif native and api.generation == "B":  # UNVERIFIED (doc §0: static sparse trainer API)
        args_cls = (getattr(_vllm(M_COMMON), "NCCLTrainerSendWeightsArgs", None)
                    or _vllm(M_NCCL).NCCLTrainerSendWeightsArgs)
        _vllm(M_SPARSE).SparseNCCLWeightTransferEngine.trainer_send_weights(
            iter(vllm_patches(api, patches, shapes)), args_cls(group=group.comm))
    elif native and group.engine is not None:  # C / D stateful engine, UNVERIFIED (doc §1.4)
        group.engine.send_weights(vllm_patches(api, patches, shapes))
    else:  # C/D without the stateful engine: vLLM's wire order by hand
        comm, stream = group.raw(), current_stream()
        for p in patches:
            comm.broadcast(p.indices.to(torch.int32).contiguous(), src=0, stream=stream)
            comm.broadcast(p.values.detach().contiguous(), src=0, stream=stream)
    device_sync()
    return (time.perf_counter() - t0) * 1e3


def trainer_close_group(group: TrainerGroup | None) -> None:
    if group is not None:
        if group.engine is not None and hasattr(group.engine, "shutdown"):
            group.engine.shutdown()
        group.engine = group.comm = None


# ---- vLLM's own ipc backend (the one-GPU baseline the bench compares against) -------------------
def vllm_ipc_send(llm, named_params: Iterable, *, packed: bool, buffer_bytes: int | None = None) -> float:
    """One send through vLLM's own `ipc` weight-transfer backend into ``llm`` (an engine started with
    WeightTransferConfig(backend="ipc") whose transfer engine is initialised): handles go through
    `LLM.update_weights` (pickled: needs VLLM_ALLOW_INSECURE_SERIALIZATION=1 when the engine core runs in
    its own process). The caller wraps it in start/finish_weight_update. Returns the send's ms."""
    ipc = _vllm("vllm.distributed.weight_transfer.ipc_engine")
    extra = {"packed": True, "packed_buffer_size_bytes": int(buffer_bytes)} if packed else {"packed": False}
    args = ipc.IPCTrainerSendWeightsArgs(
        send_mode=lambda info: llm.update_weights({"update_info": dataclasses.asdict(info)}), **extra)
    t0 = time.perf_counter()
    ipc.IPCWeightTransferEngine.trainer_send_weights(iter(list(named_params)), args)
    return (time.perf_counter() - t0) * 1e3


def weight_transfer_config(backend: str):
    """vllm.config.WeightTransferConfig(backend=...)."""
    return _vllm("vllm.config").WeightTransferConfig(backend=backend)
