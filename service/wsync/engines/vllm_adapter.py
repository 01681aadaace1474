"""The ONE module that touches vLLM: every vLLM import goes through `_vllm`, inside functions, so importing
this module never imports vllm. Routes: "native" = vLLM's weight-transfer engine; "extension" =
WsyncWorkerExtension via collective_rpc on the same wire (dense: one broadcast per tensor; sparse: int32
indices then values per patch, from rank 0). Gen A + extension checked against vLLM 0.24.0; B/C/D UNVERIFIED."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import importlib.util
import math
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch

EXTENSION_QUALNAME = "wsync.engines.vllm_adapter.WsyncWorkerExtension"
WT = "vllm.distributed.weight_transfer"
M_BASE, M_NCCL, M_COMMON = WT + ".base", WT + ".nccl_engine", WT + ".nccl_common"
M_SPARSE, M_FACTORY = WT + ".sparse_nccl_engine", WT + ".factory"
M_CKPT = "vllm.model_executor.model_loader.checkpoint_weight_patch"


class VLLMUnsupportedError(RuntimeError):
    """A sync mode that the installed vLLM cannot do (the message names the version)."""


def _vllm(name: str):
    """Import a vLLM module. All vLLM imports go through here (tests monkeypatch it)."""
    return importlib.import_module(name)


# ---- generation detection ---------------------------------------------------------------------
@dataclass(frozen=True)
class VLLMApi:
    version: str
    generation: str  # "A" | "B" | "C" | "D" | "dense_only" | "legacy" | "none"
    supports_sparse: bool = False  # a native sparse engine exists
    sparse_backend: str | None = None  # "nccl" (A) | "sparse_nccl" (B-D)
    dense_backend: str | None = None  # "nccl" where native dense exists (0.16+)
    checkpoint_coords: bool = False  # D: sparse names/indices are checkpoint (HF) coordinates
    start_takes_checkpoint_format: bool = False  # A and 0.21-0.24
    has_start_finish: bool = False  # start/finish_weight_update exist (0.21+)
    stateful_trainer: bool = False  # C/D: WeightTransferTrainerFactory trainer engines
    static_trainer_api: bool = False  # A/B/dense_only: NCCLWeightTransferEngine.trainer_* statics
    packed_in_update_info: bool = False  # packing fields ride update_info (< 0.28)
    tp_sparse: bool = False  # sparse with TP > 1 (D)
    notes: tuple[str, ...] = ()

    @property
    def installed(self) -> bool:
        return self.generation != "none"


def _make_api(gen: str, version: str, **extra) -> VLLMApi:
    sparse, static = gen in ("A", "B", "C", "D"), gen in ("A", "B", "dense_only")
    flags = dict(supports_sparse=sparse, sparse_backend=("nccl" if gen == "A" else "sparse_nccl") if sparse else None,
                 dense_backend=None if gen == "legacy" else "nccl", checkpoint_coords=gen == "D",
                 start_takes_checkpoint_format=gen == "A", has_start_finish=gen != "legacy",
                 stateful_trainer=gen in ("C", "D"), static_trainer_api=static, packed_in_update_info=static,
                 tp_sparse=gen == "D")
    return VLLMApi(version=version, generation=gen, **{**flags, **extra})


def _probe(importer: Callable[[str], Any] | None):
    """(load, exists, attr). find_spec / import_module by default; `importer(name)` (a module, or
    ImportError) replaces both so a test can feed a fake module tree. A submodule that fails to
    import for any reason counts as absent."""

    def load(name: str):
        try:
            return importer(name) if importer else importlib.import_module(name)
        except Exception:
            if name == "vllm" and not isinstance(sys.exc_info()[1], ImportError):
                raise
            return None

    def exists(name: str) -> bool:
        if importer is not None or name in sys.modules:
            return load(name) is not None
        try:
            return importlib.util.find_spec(name) is not None
        except Exception:
            return False

    return load, exists, lambda module, name: getattr(load(module), name, None) if exists(module) else None


def _fields(cls) -> dict:
    return dict(getattr(cls, "__dataclass_fields__", None) or {})


def detect_generation(importer: Callable[[str], Any] | None = None) -> VLLMApi:
    """The feature probes of the reference doc (§4), in its recommended order. A 0.23-0.24: sparse in
    backend "nccl" (update_kind), static trainer helpers, runtime names, TP=1; B 0.25-0.27: backend
    "sparse_nccl"; C 0.28: + stateful trainer engine; D 0.29-0.33: checkpoint names + full_shape,
    TP/EP; dense_only 0.16-0.22; legacy: no weight_transfer package; none: vllm not importable."""
    load, exists, attr = _probe(importer)
    try:
        root = load("vllm")
    except Exception as exc:  # a broken install (e.g. a torch/CUDA mismatch) counts as absent
        return VLLMApi("", "none", notes=(f"import vllm failed: {exc!r}",))
    if root is None:
        return VLLMApi("", "none", notes=("vllm is not installed",))
    v = str(getattr(root, "__version__", None) or "unknown")
    # 1. checkpoint-patch loader + SparseWeightPatch.full_shape required -> D (sparse module probed first: cheap)
    if exists(M_SPARSE) and exists(M_CKPT):
        f = _fields(attr(M_SPARSE, "SparseWeightPatch") or attr(M_BASE, "SparseWeightPatch")).get("full_shape")
        if f is not None and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            return _make_api("D", v)
    # 2. separate sparse backend -> B, or C when the stateful sparse trainer engine exists
    if exists(M_SPARSE):
        factory = attr(M_FACTORY, "WeightTransferTrainerFactory") or attr(WT, "WeightTransferTrainerFactory")
        mod = load(M_SPARSE)
        stateful = hasattr(mod, "SparseNCCLTrainerInitInfo") or not hasattr(
            getattr(mod, "SparseNCCLWeightTransferEngine", None), "trainer_send_weights")
        if factory is not None and stateful:
            return _make_api("C", v)
        return _make_api("B", v, notes=("trainer factory without a sparse trainer engine",) if factory else ())
    # 3. update_kind on the base update info -> A (sparse MVP inside "nccl")
    update_cls = attr(M_BASE, "WeightTransferUpdateInfo")
    if "update_kind" in _fields(update_cls):
        return _make_api("A", v)
    # 4. native dense only; 0.16-0.20 carry is_checkpoint_format in update_info, no start/finish
    if exists(WT):
        old = "is_checkpoint_format" in _fields(update_cls)
        return _make_api("dense_only", v, has_start_finish=not old, start_takes_checkpoint_format=not old)
    return _make_api("legacy", v)


# ---- capability checks ------------------------------------------------------------------------
def engine_backend(api: VLLMApi, mode: str = "both") -> str | None:
    """weight_transfer_config backend for an engine that must take `mode` ("dense"|"sparse"|"both")."""
    if not api.installed:
        raise VLLMUnsupportedError("vLLM is not installed: no vLLM engine can be created")
    if api.generation == "legacy":
        return None
    return "sparse_nccl" if api.generation in ("B", "C", "D") and mode != "dense" else "nccl"


def require(api: VLLMApi, mode: str, *, backend: str | None = None, allow_extension: bool = False,
            tensor_parallel_size: int = 1) -> str:
    """Route of `mode` ("dense" | "dense_packed" | "sparse") into an engine running weight-transfer
    `backend` (default: engine_backend(api)): "native", or "extension" when allowed. Raises
    VLLMUnsupportedError, naming the installed vLLM version, when the mode is impossible."""
    if mode not in ("dense", "dense_packed", "sparse"):
        raise ValueError(f"unknown sync mode {mode!r}")
    if not api.installed:
        raise VLLMUnsupportedError(f"vLLM is not installed; {mode} sync into a vLLM engine is impossible")
    v, g = api.version, api.generation
    backend = engine_backend(api) if backend is None else backend
    if mode == "sparse":
        if tensor_parallel_size > 1 and not api.tp_sparse:
            raise VLLMUnsupportedError(f"vLLM {v} (Gen {g}): sparse weight updates require TP=1 and PP=1 "
                                       "(checkpoint-coordinate TP/EP sparse needs vLLM >= 0.29)")
        if api.supports_sparse and backend == api.sparse_backend:
            return "native"
        why = (f"vLLM {v} engine runs weight-transfer backend {backend!r}; native sparse needs "
               f"{api.sparse_backend!r}" if api.supports_sparse else
               f"vLLM {v} has no native sparse weight transfer (it first shipped in 0.23.0)")
    elif api.dense_backend == "nccl" and backend == "nccl":
        return "native"
    elif mode == "dense_packed":
        raise VLLMUnsupportedError(f"vLLM {v} (Gen {g}, backend {backend!r}): packed dense needs the native "
                                   "'nccl' backend; the worker-extension path is unpacked only")
    elif backend == "sparse_nccl":
        why = (f"vLLM {v} (Gen {g}) runs one weight-transfer backend per engine, and a 'sparse_nccl' engine "
               "cannot take a dense round (dense and sparse shared 'nccl' only in 0.23-0.24). Reseed plan: keep "
               "'sparse_nccl' for patches and send the dense baseline over the same NCCL communicator through "
               "the worker extension, applied with model.load_weights (or restart the engine)")
    else:
        why = f"vLLM {v} predates the native weight-transfer API (dense 'nccl' first shipped in 0.16.0)"
    if allow_extension:
        return "extension"
    raise VLLMUnsupportedError(f"{why}; route it through the legacy worker-extension path: LLM(worker_extension_cls="
                               f"'{EXTENSION_QUALNAME}') + collective_rpc('wsync_recv_{mode.split('_')[0]}', ...)")


def routes(api: VLLMApi, backend: str | None = None) -> dict[str, str]:
    """The routes both the engine and the trainer derive (same vLLM on both sides, so they agree)."""
    return {m: require(api, m, backend=backend, allow_extension=True) for m in ("dense", "sparse")}


# ---- payload builders (pure Python) -----------------------------------------------------------
def dtype_str(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def itemsize(dtype) -> int:
    return getattr(torch, dtype_str(dtype)).itemsize


def _get(m, key):
    return m.get(key) if isinstance(m, dict) else getattr(m, key, None)


def _shape_of(m, shapes: dict | None):
    found = (_get(m, "full_shape"), _get(m, "shape"), (shapes or {}).get(_get(m, "name")))
    return next((x for x in found if x is not None), None)


def _meta(m, shapes: dict | None = None) -> tuple[str, str, list[int]]:
    """(name, dtype, shape) of a meta dict, a TensorMeta/SparseMeta, or a patch object."""
    name, values = _get(m, "name"), _get(m, "values")
    dtype = _get(m, "dtype") or (values.dtype if values is not None else None)
    shape = _shape_of(m, shapes)
    if dtype is None or shape is None:
        raise ValueError(f"{name}: need dtype and shape (pass shapes={{name: shape}} for patch objects)")
    return name, dtype_str(dtype), [int(s) for s in shape]


def _count(m) -> int:
    return int(c) if (c := _get(m, "count")) is not None else int(_get(m, "indices").numel())


def _columns(rows) -> dict:
    return {"names": [r[0] for r in rows], "dtype_names": [r[1] for r in rows], "shapes": [r[2] for r in rows]}


def dense_update_info(metas: Iterable, packed: bool = False, api: VLLMApi | None = None, *,
                      packed_buffer_size_bytes: int | None = None, packed_num_buffers: int | None = None) -> dict:
    """names, dtype_names, shapes (+ packed fields where they ride update_info, < 0.28). For Gen A
    exactly the reference example's dict; api=None means Gen A."""
    info: dict[str, Any] = _columns([_meta(m) for m in metas])
    if api is None or api.packed_in_update_info:
        info["packed"] = bool(packed)
        extra = {"packed_buffer_size_bytes": packed_buffer_size_bytes, "packed_num_buffers": packed_num_buffers}
        info.update({k: int(x) for k, x in extra.items() if packed and x is not None})
    elif packed:
        raise VLLMUnsupportedError(f"vLLM {api.version}: packing rides init_info (>= 0.28), not update_info")
    return info


def sparse_update_info(items: Iterable, api: VLLMApi | None = None, *, shapes: dict | None = None) -> dict:
    """From metas ({name, dtype, shape, count}) or patch objects: names, dtype_names, shapes (D: full
    checkpoint shapes), num_updates_list; Gen A (or api=None) adds update_kind="sparse_flat"."""
    items = list(items)
    info: dict[str, Any] = {**_columns([_meta(m, shapes) for m in items]),
                            "num_updates_list": [_count(m) for m in items]}
    if api is None or api.generation == "A":
        info["update_kind"] = "sparse_flat"
    return info


def init_info(master_address: str, master_port: int, world_size: int, rank_offset: int = 1, *,
              packed: bool | None = None, packed_buffer_size_bytes: int | None = None) -> dict:
    """Worker init_info (NCCLWeightTransferInitInfo); packing fields only when given (they exist >= 0.28)."""
    info = {"master_address": str(master_address), "master_port": int(master_port),
            "rank_offset": int(rank_offset), "world_size": int(world_size)}
    extra = {"packed": packed, "packed_buffer_size_bytes": packed_buffer_size_bytes}
    return {**info, **{k: val for k, val in extra.items() if val is not None}}


def dense_payload_bytes(metas: Iterable) -> int:
    return sum(math.prod(s) * itemsize(d) for _, d, s in (_meta(m) for m in metas))


def sparse_payload_bytes(items: Iterable) -> int:
    """int32 indices + values, per patch."""
    return sum(_count(m) * (4 + itemsize(_get(m, "dtype") or _get(m, "values").dtype)) for m in items)


def engine_kwargs(api: VLLMApi, mode: str = "both", gpu_memory_utilization: float = 0.5,
                  enforce_eager: bool = True, *, max_model_len: int | None = None, worker_extension: bool = True,
                  config_factory: Callable[[str], Any] | None = None) -> dict:
    """vllm.LLM kwargs: TP=1 on the "uni" executor, so the engine runs inside the Ray actor that owns
    the GPU (never a nested Ray executor asking Ray for another GPU)."""
    kw: dict[str, Any] = {"tensor_parallel_size": 1, "gpu_memory_utilization": float(gpu_memory_utilization),
                          "enforce_eager": bool(enforce_eager), "dtype": "bfloat16",
                          "distributed_executor_backend": "uni",
                          **({"max_model_len": int(max_model_len)} if max_model_len else {}),
                          **({"worker_extension_cls": EXTENSION_QUALNAME} if worker_extension else {})}
    backend = engine_backend(api, mode)
    if backend is not None:
        factory = config_factory or (lambda b: _vllm("vllm.config").WeightTransferConfig(backend=b))
        kw["weight_transfer_config"] = factory(backend)
    return kw


# ---- engine side (inside the actor that owns the vllm.LLM) -------------------------------------
def create_llm(model: str, **kwargs):
    return _vllm("vllm").LLM(model=model, **kwargs)


def greedy_params(max_tokens: int):  # temperature 0 = greedy
    return _vllm("vllm").SamplingParams(temperature=0.0, max_tokens=int(max_tokens))


def shutdown_llm(llm) -> None:
    getattr(getattr(getattr(llm, "llm_engine", None), "engine_core", None), "shutdown", lambda: None)()
    with contextlib.suppress(Exception):
        ps = _vllm("vllm.distributed.parallel_state")
        ps.destroy_model_parallel()
        ps.destroy_distributed_environment()


# ---- trainer side (the trainer actor, on GPU; vLLM's own helpers put the bytes on the wire) -----
@dataclass
class TrainerGroup:
    api: VLLMApi
    comm: Any = None  # PyNcclCommunicator (trainer = rank 0)
    engine: Any = None  # C/D: stateful sparse trainer engine
    routes: dict = dataclasses.field(default_factory=dict)

    def raw(self):
        if self.comm is None:
            raise VLLMUnsupportedError(f"vLLM {self.api.version}: this trainer group exposes no NCCL communicator "
                                       "(open it with stateful=False for the worker-extension path)")
        return self.comm


class _DetachedClient:
    """A no-op VLLMWeightSyncClient: the lead drives the engine side itself (join_group / recv_sparse)."""

    def _noop(self, *args, **kwargs) -> None: ...
    init_weight_transfer_engine = start_weight_update = update_weights = finish_weight_update = _noop


def _communicator_of(obj):
    """The PyNcclCommunicator inside a vLLM worker/trainer engine (attribute names vary by version)."""
    found = (getattr(obj, a, None) for a in ("model_update_group", "communicator", "_communicator", "comm", "_comm"))
    return next((c for c in found if hasattr(c, "broadcast")), None)


def _stateless_comm(host: str, port: int, rank: int, world_size: int, device):
    pg = _vllm("vllm.distributed.utils").StatelessProcessGroup.create(
        host=host, port=int(port), rank=int(rank), world_size=int(world_size))
    return _vllm("vllm.distributed.device_communicators.pynccl").PyNcclCommunicator(pg, device=device)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.accelerator.synchronize() if hasattr(torch, "accelerator") else torch.cuda.synchronize()


def _stream():
    return torch.cuda.current_stream() if torch.cuda.is_available() else None


def trainer_open_group(api: VLLMApi, master_address: str, master_port: int, world_size: int,
                       *, stateful: bool = True) -> TrainerGroup:
    """Rank 0 of the transfer group; call concurrently with every engine's join_group."""
    if not api.installed:
        raise VLLMUnsupportedError("vLLM is not installed; the trainer cannot open a vLLM transfer group")
    info = {"master_address": str(master_address), "master_port": int(master_port), "world_size": int(world_size)}
    g = TrainerGroup(api, routes=routes(api))
    if api.static_trainer_api:  # A / B / dense_only: NCCLWeightTransferEngine.trainer_init (rank 0)
        fn = getattr(getattr(_vllm(M_NCCL), "NCCLWeightTransferEngine", None), "trainer_init", None)
        g.comm = (fn or _vllm(M_COMMON).trainer_init)(info)  # B may keep it in nccl_common (UNVERIFIED)
    elif api.stateful_trainer and stateful:  # C / D, UNVERIFIED: doc §1.4 with a detached client
        init = _vllm(M_SPARSE).SparseNCCLTrainerInitInfo(**info, rank=0)
        g.engine = _vllm(M_FACTORY).WeightTransferTrainerFactory.trainer_init(init, client=_DetachedClient())
        g.comm = _communicator_of(g.engine)
    elif api.stateful_trainer:  # C / D plain communicator, UNVERIFIED (nccl_common.trainer_init)
        g.comm = _vllm(M_COMMON).trainer_init(info)
    else:  # legacy: StatelessProcessGroup + PyNcclCommunicator, as the extension does
        g.comm = _stateless_comm(info["master_address"], info["master_port"], 0, info["world_size"],
                                 torch.cuda.current_device())
    return g


def trainer_send_dense(api: VLLMApi, group: TrainerGroup, named_params: Iterable, packed: bool = False,
                       packed_buffer_size_bytes: int | None = None) -> float:
    """Broadcast every tensor in order (the order of the metas the engine got); returns send_ms."""
    route = require(api, "dense_packed", allow_extension=True) if packed else group.routes["dense"]
    t0 = time.perf_counter()
    if route == "native" and api.static_trainer_api:
        nccl = _vllm(M_NCCL)
        extra = {"packed_buffer_size_bytes": int(packed_buffer_size_bytes)} if packed_buffer_size_bytes else {}
        args = nccl.NCCLTrainerSendWeightsArgs(group=group.comm, packed=bool(packed), **extra)
        nccl.NCCLWeightTransferEngine.trainer_send_weights(iter(named_params), args)
    elif route == "native":
        raise VLLMUnsupportedError(f"vLLM {api.version} (Gen {api.generation}): native dense from a stateful "
                                   "trainer needs NCCLTrainerInitInfo + WeightSource (not implemented)")
    else:  # extension: the bytes of vLLM's unpacked dense (one broadcast per tensor)
        comm, stream = group.raw(), _stream()
        for _, tensor in named_params:
            comm.broadcast(tensor.detach().contiguous(), src=0, stream=stream)
    _sync()
    return (time.perf_counter() - t0) * 1e3


def _vllm_patches(api: VLLMApi, patches: list, shapes: dict | None):
    cls = getattr(_vllm(M_BASE if api.generation == "A" else M_SPARSE), "SparseWeightPatch", None)
    cls = cls or _vllm(M_BASE).SparseWeightPatch
    out = []
    for p in patches:
        kw = {"name": p.name, "indices": p.indices.to(torch.int32).contiguous(), "values": p.values.contiguous()}
        if "full_shape" in _fields(cls):  # C: optional, D: required (the full checkpoint shape)
            full = _shape_of(p, shapes)
            if full is None and api.generation == "D":
                raise ValueError(f"{p.name}: vLLM {api.version} (Gen D) needs full_shape; pass shapes={{name: shape}}")
            kw["full_shape"] = tuple(int(d) for d in full) if full is not None else None
        out.append(cls(**kw))
    return out


def trainer_send_sparse(api: VLLMApi, group: TrainerGroup, patches: Iterable, *, shapes: dict | None = None) -> float:
    """Per patch, in order: int32 indices then values, from rank 0; returns send_ms. Gen D needs each
    patch's full checkpoint shape (a `full_shape`/`shape` attribute, or `shapes={name: shape}`)."""
    patches, route, t0 = list(patches), group.routes["sparse"], time.perf_counter()
    if not patches:
        return 0.0
    if route == "native" and api.generation == "A":
        nccl = _vllm(M_NCCL)
        nccl.NCCLWeightTransferEngine.trainer_send_sparse_weights(
            iter(_vllm_patches(api, patches, shapes)), nccl.NCCLTrainerSendWeightsArgs(group=group.comm))
    elif route == "native" and api.generation == "B":  # UNVERIFIED (doc §0: static sparse trainer API)
        args_cls = (getattr(_vllm(M_COMMON), "NCCLTrainerSendWeightsArgs", None)
                    or _vllm(M_NCCL).NCCLTrainerSendWeightsArgs)
        _vllm(M_SPARSE).SparseNCCLWeightTransferEngine.trainer_send_weights(
            iter(_vllm_patches(api, patches, shapes)), args_cls(group=group.comm))
    elif route == "native" and group.engine is not None:  # C / D stateful engine, UNVERIFIED (doc §1.4)
        group.engine.send_weights(_vllm_patches(api, patches, shapes))
    else:  # extension, or C/D without the stateful engine: vLLM's wire order by hand
        comm, stream = group.raw(), _stream()
        for p in patches:
            comm.broadcast(p.indices.to(torch.int32).contiguous(), src=0, stream=stream)
            comm.broadcast(p.values.detach().contiguous(), src=0, stream=stream)
    _sync()
    return (time.perf_counter() - t0) * 1e3


def trainer_close_group(group: TrainerGroup | None) -> None:
    if group is not None:
        if group.engine is not None and hasattr(group.engine, "shutdown"):
            group.engine.shutdown()
        group.engine = group.comm = None


# ---- worker extension (mixed into vLLM's Worker via worker_extension_cls) ----------------------
class WsyncWorkerExtension:
    """collective_rpc methods run on each vLLM worker (`self` is the Worker), prefixed to avoid clashes.
    Receives over its own group (legacy) or the native engine's communicator, same wire as vLLM.
    Dense: model.load_weights (checkpoint/HF names). Sparse: received whole, checked, then index_copy_
    into the runtime parameter (runtime names, TP=1); a bad patch leaves the model untouched."""

    def wsync_init_group(self, master_address: str, master_port: int, world_size: int, rank_offset: int = 1):
        rank = int(rank_offset) + int(getattr(self.vllm_config.parallel_config, "rank", 0))
        self._wsync_comm = _stateless_comm(master_address, master_port, rank, world_size, self.device)

    def wsync_close_group(self) -> None:
        self._wsync_comm = None
        getattr(getattr(self, "weight_transfer_engine", None), "shutdown", lambda: None)()

    def _wsync_comm_or_native(self):
        comm = getattr(self, "_wsync_comm", None) or _communicator_of(getattr(self, "weight_transfer_engine", None))
        if comm is None:
            raise RuntimeError("wsync: no transfer group on this worker (join_group first)")
        return comm

    def wsync_recv_dense(self, names: list, dtype_names: list, shapes: list, **_: Any) -> float:
        comm, model, stream, t0 = self._wsync_comm_or_native(), self.model_runner.model, _stream(), time.perf_counter()
        with torch.no_grad():
            for name, dt, shape in zip(names, dtype_names, shapes):
                w = torch.empty(shape, dtype=getattr(torch, dt), device=self.device)
                comm.broadcast(w, src=0, stream=stream)
                model.load_weights(weights=[(name, w)])
        _sync()
        return (time.perf_counter() - t0) * 1e3

    def wsync_recv_sparse(self, names: list, dtype_names: list, num_updates_list: list, **_: Any) -> float:
        comm, model, stream, t0 = self._wsync_comm_or_native(), self.model_runner.model, _stream(), time.perf_counter()
        got = []
        for dt, n in zip(dtype_names, num_updates_list):
            idx = torch.empty(int(n), dtype=torch.int32, device=self.device)
            val = torch.empty(int(n), dtype=getattr(torch, dt), device=self.device)
            comm.broadcast(idx, src=0, stream=stream)
            comm.broadcast(val, src=0, stream=stream)
            got.append((idx, val))
        params = dict(model.named_parameters())
        for name, (idx, val) in zip(names, got):
            p = params.get(name)
            if p is None or not p.data.is_contiguous() or p.dtype != val.dtype:
                raise ValueError(f"wsync: {name}: no contiguous {val.dtype} runtime parameter by that name "
                                 "(sparse patches use runtime names, e.g. fused qkv_proj / gate_up_proj)")
            if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= p.numel()):
                raise ValueError(f"wsync: {name}: sparse index out of range for {p.numel()} elements")
        with torch.no_grad():
            for name, (idx, val) in zip(names, got):
                params[name].data.view(-1).index_copy_(0, idx.long(), val)
        _sync()
        return (time.perf_counter() - t0) * 1e3

    def wsync_param_metas(self) -> list[dict]:
        return [{"name": n, "dtype": dtype_str(p.dtype), "shape": list(p.shape)}
                for n, p in self.model_runner.model.named_parameters()]

    def wsync_fingerprint(self, names: list | None = None) -> dict:
        from wsync.transfer.fingerprint import fingerprint

        params = dict(self.model_runner.model.named_parameters())
        with torch.no_grad():
            return fingerprint([(n, params[n].data) for n in (params if names is None else names) if n in params])

    # ---- wsync fast path (added for #4): wsync's own wire straight into runtime storage ---------
    # Checked against vLLM 0.24.0 (Gen A) worker internals: TP=1/PP=1, unquantized Qwen2/Llama-style
    # models whose fused runtime params are QKVParallelLinear / MergedColumnParallelLinear
    # (`output_sizes` along dim 0); layerwise reload restores the same Parameter objects afterwards.
    _WSYNC_FUSED = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
                    "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}
    _WSYNC_DIRECT_ARCHS = ("Qwen2ForCausalLM", "LlamaForCausalLM", "Qwen3ForCausalLM")

    def wsync_open_sync_group(self, rendezvous: dict, rank: int = 1, timeout_s: float = 300.0,
                              warmup: bool = True) -> dict:
        """Join a wsync.transfer SyncGroup (torch ProcessGroupNCCL on its own TCPStore; the trainer opens
        rank 0 concurrently); kept on the worker for the *_direct methods until wsync_close_sync_group.
        warmup: one barrier() so NCCL's communicator exists before the first sync (the trainer must
        then call group.barrier() after open_group too)."""
        from wsync.transfer.group import Rendezvous, open_group

        self.wsync_close_sync_group()
        self._wsync_group = open_group(Rendezvous.from_dict(dict(rendezvous)), int(rank), self.device, timeout_s)
        if warmup:
            self._wsync_group.barrier()
        return {"rank": int(rank), "device": str(self.device)}

    def wsync_close_sync_group(self) -> None:
        """Abort, not the graceful shutdown: closing the group gracefully inside vLLM's worker stalled
        until a timeout on the GPU machine (vLLM 0.24.0; the bench's teardown and the service's engine
        deletion). Not yet re-run on a GPU with abort."""
        group, self._wsync_group = getattr(self, "_wsync_group", None), None
        if group is not None:
            group.close(abort=True)

    def _wsync_model(self):
        runner = self.model_runner
        return runner.get_model() if hasattr(runner, "get_model") else runner.model

    def _wsync_locate(self, model, name: str, shape: list) -> tuple[str, int, int, Any]:
        """(runtime param name, first row, rows, owning module) of one HF checkpoint tensor."""
        parts = name.split(".")
        fused = self._WSYNC_FUSED.get(parts[-2]) if len(parts) >= 2 else None
        path = ".".join(parts[:-2] + [fused[0]] if fused else parts[:-1])
        try:
            module = model.get_submodule(path)
        except AttributeError:
            raise ValueError(f"wsync: {name}: no module {path!r} in the vLLM model") from None
        if not fused:
            return name, 0, int(shape[0]) if shape else 1, module
        sizes = [int(s) for s in getattr(module, "output_sizes", None) or []]
        if len(sizes) <= fused[1]:
            raise ValueError(f"wsync: {name}: {type(module).__name__} {path!r} has no output_sizes shard {fused[1]}")
        return f"{path}.{parts[-1]}", sum(sizes[:fused[1]]), sizes[fused[1]], module

    def wsync_direct_unsupported(self) -> str | None:
        """Why wsync's direct path (map + *_direct receives) cannot serve this engine, or None if it can."""
        pc = self.vllm_config.parallel_config
        if int(getattr(pc, "world_size", 1)) != 1 or getattr(self.vllm_config, "quant_config", None) is not None:
            return "wsync direct path: TP=1, PP=1 and unquantized weights only"
        name = type(self._wsync_model()).__name__
        if name not in self._WSYNC_DIRECT_ARCHS:
            return f"wsync direct path: {name} layout not mapped (supported: {', '.join(self._WSYNC_DIRECT_ARCHS)})"
        return None

    def wsync_build_param_map(self, hf_metas: list, bucket_bytes: int) -> dict:
        """Once per engine: map every HF checkpoint tensor (metas in wire order, as send_dense sends them)
        to a dim-0 slice of a runtime parameter (q/k/v -> qkv_proj, gate/up -> gate_up_proj at their
        output_sizes offsets, a tied lm_head received and dropped, the rest 1:1), validated: dtype, shape,
        contiguity, no overlap, every runtime parameter fully covered (embedding padding rows excepted)."""
        from wsync.transfer.meta import TensorMeta

        t0 = time.perf_counter()
        model = self._wsync_model()
        why = self.wsync_direct_unsupported()
        if why:
            raise VLLMUnsupportedError(why)
        hf_cfg = getattr(getattr(self.vllm_config, "model_config", None), "hf_config", None)
        hf_cfg = hf_cfg.get_text_config() if hasattr(hf_cfg, "get_text_config") else hf_cfg
        tied = bool(getattr(hf_cfg, "tie_word_embeddings", False))
        runtime = dict(model.named_parameters())
        metas = [TensorMeta(*_meta(m)) for m in hf_metas]
        targets, spans, owners, skipped, slices = {}, {}, [], [], {}
        for meta in metas:
            if meta.name in targets:
                raise ValueError(f"wsync: {meta.name} appears twice in the metas")
            if meta.name.startswith("lm_head.") and tied and meta.name not in runtime:
                targets[meta.name] = torch.empty(meta.shape, dtype=meta.torch_dtype, device=self.device)
                skipped.append(meta.name)
                continue
            rt, first, rows, module = self._wsync_locate(model, meta.name, meta.shape)
            p = runtime.get(rt)
            if p is None:
                raise ValueError(f"wsync: {meta.name}: no runtime parameter {rt!r}")
            if p.dtype != meta.torch_dtype or not p.data.is_contiguous() or list(p.shape[1:]) != meta.shape[1:] \
                    or p.dim() != len(meta.shape) or (meta.shape and meta.shape[0] != rows) \
                    or first + rows > (p.shape[0] if p.dim() else 1):
                raise ValueError(f"wsync: {meta.name} {meta.dtype}{meta.shape} does not fit rows [{first}, "
                                 f"{first + rows}) of {rt} {dtype_str(p.dtype)}{list(p.shape)}")
            targets[meta.name] = p.data.narrow(0, first, rows).view(meta.shape) if meta.shape else p.data
            spans.setdefault(rt, []).append((first, first + rows, meta.name, hasattr(module, "org_vocab_size")))
            owners.append((module, rt.rsplit(".", 1)[-1], p))
            slices[meta.name] = [rt, first, rows]
        padded = self._wsync_check_coverage(runtime, spans)
        self._wsync_map = {"metas": metas, "targets": targets, "bucket_bytes": int(bucket_bytes), "owners": owners,
                           "hf_metas": list(hf_metas)}
        return {"tensors": len(metas), "runtime_params": len(runtime), "skipped": skipped, "padded_rows": padded,
                "slices": slices, "bucket_bytes": int(bucket_bytes), "ms": (time.perf_counter() - t0) * 1e3}

    @staticmethod
    def _wsync_check_coverage(runtime: dict, spans: dict) -> dict:
        """Every runtime parameter tiled by its slices, in order, no gap or overlap; only an embedding
        (a module with org_vocab_size) may keep uncovered padding rows at the end. Returns those."""
        padded, missing = {}, [n for n in runtime if n not in spans]
        if missing:
            raise ValueError(f"wsync: runtime parameters no checkpoint tensor maps to: {missing[:5]} "
                             f"({len(missing)} in all)")
        for rt, parts in spans.items():
            end, rows = 0, int(runtime[rt].shape[0]) if runtime[rt].dim() else 1
            for first, stop, name, _ in sorted(parts):
                if first != end:
                    raise ValueError(f"wsync: {rt}: rows [{min(first, end)}, {max(first, end)}) "
                                     f"{'overlap' if first < end else 'uncovered'} at {name}")
                end = stop
            if end != rows and not (end < rows and parts[0][3]):
                raise ValueError(f"wsync: {rt}: checkpoint slices cover {end} of {rows} rows")
            if end != rows:
                padded[rt] = rows - end
        return padded

    def _wsync_ready(self) -> tuple[Any, dict]:
        """(group, map), after checking that every mapped runtime parameter is still the same object
        (e.g. not replaced by a reload or sleep level 2): writes would otherwise go to dead storage, so a
        stale map is rebuilt from the same checkpoint metas first."""
        group, m = getattr(self, "_wsync_group", None), getattr(self, "_wsync_map", None)
        if group is None or m is None:
            raise RuntimeError("wsync: call wsync_open_sync_group and wsync_build_param_map first")
        stale = [attr for module, attr, p in m["owners"] if module._parameters.get(attr) is not p]
        if stale:  # rebuilt here, before any byte moves, so the sender is never left waiting
            self.wsync_build_param_map(m["hf_metas"], m["bucket_bytes"])
            m = self._wsync_map
        return group, m

    @staticmethod
    def _wsync_in_range(indices: list, numels: list) -> bool:
        """0 <= i < numel for every index of every tensor: fused multi-tensor max reductions where the
        build has them, one host sync either way."""
        try:
            hi, neg_lo = torch._foreach_max(indices), torch._foreach_max(torch._foreach_neg(indices))
        except (AttributeError, NotImplementedError, RuntimeError):
            hi, neg_lo = [i.max() for i in indices], [(-i).max() for i in indices]
        limit = torch.tensor(numels, dtype=torch.int64, device=indices[0].device)
        return bool(((torch.stack(list(hi)).long() < limit) & (torch.stack(list(neg_lo)).long() <= 0)).all())

    def wsync_recv_dense_direct(self) -> dict:
        """Receive one wsync dense sync (send_dense's bucket stream: plan_buckets order, double-buffered,
        single big tensors zero-copy) straight into the runtime parameter slices of the map, through a
        DenseReceiver kept with the map (rebuilt with it), so each sync is one broadcast and at most one
        fused copy per bucket."""
        from wsync.transfer.dense import DenseReceiver

        group, m = self._wsync_ready()
        with torch.no_grad():
            if m.get("receiver") is None:  # built on the first dense sync: staging buffers, byte views
                m["receiver"] = DenseReceiver(m["metas"], m["bucket_bytes"], m["targets"], self.device)
            stats = m["receiver"].recv(group)
        return {"recv_ms": stats.ms, "bytes": stats.bytes, "messages": stats.messages,
                "zero_copy": stats.zero_copy}

    def wsync_post_sparse_direct(self, metas: list) -> dict:
        """First half of a sparse sync (send_sparse's wire: flat_int32 patches, then one packed stream, HF
        checkpoint names and flat indices): check names/shapes against the map, allocate and post the
        receives, return at once. The sender may start as soon as this returns; then call
        wsync_finish_sparse_direct. Nothing is written to the model here."""
        from wsync.transfer.sparse import SparseMeta, post_sparse

        group, m = self._wsync_ready()
        t0 = time.perf_counter()
        metas = [SparseMeta.from_dict(d) for d in metas]
        for meta in metas:
            t = m["targets"].get(meta.name)
            if t is None or list(t.shape) != meta.shape or dtype_str(t.dtype) != meta.dtype:
                raise ValueError(f"wsync: {meta.name}: not a mapped checkpoint tensor of {meta.dtype}{meta.shape}")
        self._wsync_pending = (post_sparse(group, metas, self.device), t0)
        return {"post_ms": (time.perf_counter() - t0) * 1e3}

    def wsync_finish_sparse_direct(self) -> dict:
        """Second half: wait for the posted receives, decode on the GPU, check every index is in range
        (one host sync; a bad patch leaves the model untouched), then scatter each patch into its runtime
        slice (O(changed))."""
        from wsync.transfer.sparse import apply_patches

        pending, self._wsync_pending = getattr(self, "_wsync_pending", None), None
        if pending is None:
            raise RuntimeError("wsync: no posted sparse receive; call wsync_post_sparse_direct first")
        rx, t0 = pending
        _, m = self._wsync_ready()
        with torch.no_grad():
            patches, stats = rx.wait()
            t1 = time.perf_counter()
            live = [p for p in patches if p.count]
            if live and not self._wsync_in_range([p.indices for p in live],
                                                 [m["targets"][p.name].numel() for p in live]):
                raise ValueError("wsync: sparse index out of range; nothing was applied")
            t2 = time.perf_counter()
            apply_patches(m["targets"], live)  # q/k/v and gate/up slices share a storage: one scatter each
        _sync()
        t3 = time.perf_counter()
        return {"recv_ms": (t3 - t0) * 1e3, "wait_decode_ms": stats.ms, "check_ms": (t2 - t1) * 1e3,
                "apply_ms": (t3 - t2) * 1e3, "wire_bytes": stats.wire_bytes,
                "elements": sum(p.count for p in patches)}

    def wsync_recv_sparse_direct(self, metas: list) -> dict:
        """A whole sparse sync into the runtime slices: wsync_post_sparse_direct + wsync_finish_sparse_direct."""
        posted = self.wsync_post_sparse_direct(metas)
        return {**posted, **self.wsync_finish_sparse_direct()}
