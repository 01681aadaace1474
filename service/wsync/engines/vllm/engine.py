"""VLLMEngineCore: the vLLM engine behind the one engine contract (engines/contract.py), a plain class
the actors layer wraps with ``ray.remote(num_gpus=1)``. vLLM is reached only through this package.

Construction inside a Ray actor: ``vllm.LLM(..., tensor_parallel_size=1,
distributed_executor_backend="uni")`` with ``VLLM_ENABLE_V1_MULTIPROCESSING=0``, so vLLM's EngineCore
and its single GPU worker live in this actor's process, on the GPU Ray assigned to it (cuda:0 there).
Not the reference example's ``ray.remote(LLM)`` + Ray executor: the actor already holds num_gpus=1 and
a Ray executor would ask Ray for a second GPU. With multiprocessing on (options["v1_multiprocessing"])
vLLM spawns an EngineCore child Ray does not track; everything here uses named collective_rpc methods,
so that still works.

The route is decided once, at start, and reported in ready() (extra["route"], extra["route_note"]):
- "direct" (options["sync_route"]="direct"): wsync's own wire ("nccl" on a GPU, "gloo" on CPU) into
  the runtime parameters (engines/vllm/direct.py); the trainer sends with wsync's send_dense /
  send_sparse. Where the worker cannot map the model (TP>1, quantized, an unmapped architecture) the
  engine starts on "native" instead and says why.
- "native" (the default; the route proven through the service on the GPU machine): transport
  "vllm_native", vLLM's own weight-transfer API and wire; the trainer sends through
  engines/vllm/trainer.py. How each mode is received (vLLM's engine or the worker extension) is
  `receive_plan`, also fixed at start and reported (extra["receive"]).

Native call sequence (the trainer half runs concurrently on the trainer actor):
  pause():      llm.sleep(level=0)
  join_group(): llm.init_weight_transfer_engine({"init_info": {master_address, master_port,
                rank_offset=rank, world_size}})                      || trainer_open_group (rank 0)
  recv_dense(): Gen A: start_weight_update(is_checkpoint_format=True) -> update_weights({names,
                dtype_names, shapes, packed}) -> finish_weight_update  || trainer_send_dense
                Gen B-D ('sparse_nccl' engine): collective_rpc('wsync_recv_dense'), model.load_weights
  recv_sparse(): start_weight_update(Gen A: is_checkpoint_format=False) -> update_weights({names,
                dtype_names, shapes, num_updates_list, Gen A: update_kind="sparse_flat"}) -> finish
                                                                      || trainer_send_sparse
  after every receive: llm.reset_prefix_cache() (cached KV was computed with the old weights)
  resume():     llm.wake_up(tags=["scheduling"])

Names: param_metas/fingerprint report vLLM *runtime* parameters (q/k/v_proj fused into qkv_proj,
gate/up_proj into gate_up_proj; a tied lm_head absent). Dense updates use checkpoint names; native
sparse patches (Gen A-C) use runtime names (Gen D and the direct route: checkpoint names)."""

from __future__ import annotations

import gc
import os
import time

from wsync.engines.contract import IPC_FLAT, DenseUpdate, EngineDetails, ReceiveReport, SparseUpdate
from wsync.transfer.group import backend_for
from wsync.transfer.meta import TensorMeta, dtype_name

from .detect import detect_generation, receive_plan, require_installed
from .memory import check_gpu_memory
from .payloads import (
    count_of,
    dense_payload_bytes,
    engine_kwargs,
    init_info,
    meta_row,
    sparse_payload_bytes,
)

NATIVE = "vllm_native"
CUDA_IPC = "cuda_ipc"
ROUTES = ("direct", "native")


class VLLMEngineError(RuntimeError):
    pass


from .llm import (  # noqa: E402 - re-exported: callers import them from here
    _as_dict,
    _default_max_len,
    create_llm,
    gpu_uuid,
    greedy_params,
    native_recv_dense,
    native_recv_sparse,
    sampling_params,
    shutdown_llm,
)


class VLLMEngineCore:
    """The engine contract over a vllm.LLM. options: sync_route ("native" | "direct"),
    gpu_memory_utilization, enforce_eager, max_model_len, v1_multiprocessing, and
    native_via_extension (receive both modes through the worker extension, same wire)."""

    kind = "vllm"

    def __init__(self, model: str, device: str = "cuda", options: dict | None = None):
        opts = dict(options or {})
        self.model_name, self.device = model, device
        wanted = str(opts.get("sync_route") or "native")
        if wanted not in ROUTES:
            raise VLLMEngineError(f"sync_route must be 'direct' or 'native', not {wanted!r}")
        self.api = detect_generation()
        require_installed(self.api, "a vLLM engine")
        self.plan = receive_plan(self.api, extension_only=bool(opts.get("native_via_extension")))
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1" if opts.get("v1_multiprocessing") else "0"
        if device == "cuda":
            check_gpu_memory(float(opts.get("gpu_memory_utilization", 0.5)), bool(opts.get("colocated")))
        kwargs = engine_kwargs(self.api, float(opts.get("gpu_memory_utilization", 0.5)),
                               bool(opts.get("enforce_eager", True)),
                               max_model_len=_default_max_len(model, opts.get("max_model_len")))
        kwargs["dtype"] = str(opts.get("dtype") or "bfloat16")  # the trainer's (wsync.sync.registry)
        self.llm = create_llm(model, **kwargs)
        self.route, self.route_note = wanted, None
        unsupported = self._direct_unsupported() if (wanted == "direct" or device == "cuda") else None
        if wanted == "direct":
            self.route_note = unsupported
            self.route = "native" if self.route_note else "direct"
        # CUDA IPC (a trainer on this GPU) goes through the worker's name-and-slice map, on either route
        self.ipc_note = "not on CUDA" if device != "cuda" else unsupported
        self.transport: str | None = None  # the transport of the group joined, None outside one
        self.ipc_flatten: dict | None = None  # the worker's flatten report at the last cuda_ipc map
        self.paused = False
        self._map_key: tuple | None = None
        self._runtime_metas: list[TensorMeta] | None = None

    # ---- contract: serving --------------------------------------------------------------
    def ready(self) -> EngineDetails:
        extra = {"vllm_version": self.api.version, "generation": self.api.generation,
                 "weight_transfer_backend": self.api.sparse_backend, "route": self.route,
                 **({"receive": dict(self.plan)} if self.route == "native" else {}),
                 **({"route_note": self.route_note} if self.route_note else {}),
                 **({"cuda_ipc_note": self.ipc_note} if self.ipc_note and self.device == "cuda" else {}),
                 **({"ipc_flatten": "flattened" if self.ipc_flatten.get("flattened") else
                     str(self.ipc_flatten.get("reason"))} if self.ipc_flatten else {})}
        return EngineDetails(kind=self.kind, model=self.model_name, device=self.device,
                             num_tensors=len(self.param_metas()), transports=self.transports(),
                             gpu_uuid=gpu_uuid() if self.device == "cuda" else None, extra=extra)

    def transports(self) -> list[str]:
        """What this engine receives on, best first: CUDA IPC (only usable from a trainer on this same
        GPU, where NCCL cannot work), then wsync's wire on the direct route, vLLM's otherwise."""
        base = [backend_for(self.device)] if self.route == "direct" else [NATIVE]
        return ([CUDA_IPC] if self.ipc_note is None else []) + base

    def generate(self, prompts: list[str], max_new_tokens: int = 1) -> list[dict]:
        llm = self._require_llm()
        if self.paused:
            raise VLLMEngineError("engine is paused for a weight update")
        outs = llm.generate(list(prompts), greedy_params(max_new_tokens), use_tqdm=False)
        return [{"token_ids": [int(t) for t in o.outputs[0].token_ids], "text": o.outputs[0].text} for o in outs]

    def sample(self, prompts: list[str], n: int = 1, max_new_tokens: int = 16, temperature: float = 1.0,
               top_k: int = 0, seed: int = 0) -> list[dict]:
        """Rollouts (engines.contract.SamplingEngine): per prompt prompt_ids, token_ids [n][T], logprobs
        [n][T] (vLLM's logprob of each sampled token), texts."""
        llm = self._require_llm()
        if self.paused:
            raise VLLMEngineError("engine is paused for a weight update")
        params = sampling_params(n, max_new_tokens, temperature, top_k, seed)
        out = []
        for o in llm.generate(list(prompts), params, use_tqdm=False):
            tokens = [[int(t) for t in c.token_ids] for c in o.outputs]
            lps = [[float(step[t].logprob) for step, t in zip(c.logprobs or [], ids)]
                   for c, ids in zip(o.outputs, tokens)]
            out.append({"prompt_ids": [int(t) for t in o.prompt_token_ids], "token_ids": tokens, "logprobs": lps,
                        "texts": [c.text for c in o.outputs]})
        return out

    def pause(self) -> None:
        self._require_llm().sleep(level=0)
        self.paused = True

    def resume(self) -> None:
        self._require_llm().wake_up(tags=["scheduling"])
        self.paused = False

    def shutdown(self) -> None:
        if self.llm is None:
            return
        try:
            self.leave_group()
        finally:
            llm, self.llm = self.llm, None
            shutdown_llm(llm)
            del llm
            gc.collect()
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    # ---- contract: weights --------------------------------------------------------------
    def param_metas(self) -> list[TensorMeta]:
        """Runtime parameters of the served model (vLLM names; see the module docstring)."""
        if self._runtime_metas is None:
            got = self._require_llm().collective_rpc("wsync_param_metas")[0]
            self._runtime_metas = [TensorMeta.from_dict(m) for m in got]
        return list(self._runtime_metas)

    def fingerprint(self, names: list[str] | None = None) -> dict[str, str]:
        """wsync.transfer.fingerprint over runtime parameters, computed inside the worker. Unknown
        names (e.g. HF q_proj names of a fused qkv_proj) are left out of the answer."""
        return self._require_llm().collective_rpc("wsync_fingerprint", args=(names,))[0]

    def join_group(self, rendezvous: dict, rank: int, transport: str, timeout_s: float = 300.0) -> None:
        """Join the trainer's group at `rank` (>= 1; the trainer is 0) on one of ready().transports:
        "vllm_native" joins vLLM's own group, otherwise the worker joins a wsync SyncGroup."""
        llm = self._require_llm()
        if transport not in self.transports():
            raise VLLMEngineError(f"this vLLM engine ({self.route} route) receives on {self.transports()}, "
                                  f"not {transport!r}")
        if int(rank) < 1:
            raise VLLMEngineError("rank 0 is the trainer; a vLLM engine joins at rank >= 1")
        if self.transport is not None:
            self.leave_group()
        if transport == CUDA_IPC:
            export = (rendezvous.get("exports") or {}).get(str(rank))
            if export is None:
                raise VLLMEngineError(f"cuda_ipc rendezvous carries no export for rank {rank}")
            self._ipc_map(llm, export)  # raises IpcDeviceError from another GPU
        elif transport == NATIVE:
            llm.init_weight_transfer_engine({"init_info": init_info(
                rendezvous["host"], int(rendezvous["port"]), int(rendezvous["world_size"]), rank_offset=int(rank))})
        else:
            llm.collective_rpc("wsync_open_sync_group", args=(dict(rendezvous), int(rank), float(timeout_s), False))
        self.transport = transport

    def leave_group(self) -> None:
        llm, transport, self.transport = self.llm, self.transport, None
        if llm is None or transport is None:
            return
        if transport == CUDA_IPC:
            llm.collective_rpc("wsync_ipc_unmap")
        elif transport == NATIVE:
            if hasattr(llm, "shutdown_weight_transfer_engine"):  # 0.32+
                llm.shutdown_weight_transfer_engine()
            llm.collective_rpc("wsync_close_group")
        else:
            llm.collective_rpc("wsync_close_sync_group")

    def prepare_sync(self, update: DenseUpdate) -> None:
        """Direct route, before the trainer sends anything: build (or keep) the worker's map for this
        layout, so a model the map cannot serve fails here and never leaves the trainer mid-broadcast.
        A no-op on the native route."""
        if self.route == "direct" and self.transport != CUDA_IPC:
            self._ensure_map(update.metas, int(update.bucket_bytes))

    def recv_dense(self, update: DenseUpdate) -> ReceiveReport:
        llm, metas = self._require_group(), list(update.metas)
        if self.transport == CUDA_IPC:
            return self._recv_dense_ipc(llm, update)
        if self.transport != NATIVE:
            self._ensure_map(metas, int(update.bucket_bytes))
            t0 = time.perf_counter()
            got = llm.collective_rpc("wsync_recv_dense_direct")[0]
            return self._report(t0, int(got["bytes"]), messages=int(got.get("messages", 0)),
                                zero_copy=int(got.get("zero_copy", 0)))
        t0 = time.perf_counter()
        native_recv_dense(self.api, llm, metas, bool(update.packed), self.plan)
        return self._report(t0, dense_payload_bytes(metas), receive=self.plan["dense"])

    def recv_sparse(self, update: SparseUpdate) -> ReceiveReport:
        llm, metas = self._require_group(), list(update.metas)
        nbytes, elements = sparse_payload_bytes(metas), sum(count_of(m) for m in metas)
        if self.transport == CUDA_IPC:
            return self._recv_sparse_ipc(llm, update, nbytes)
        if self.transport != NATIVE:
            if self._map_key is None:
                raise VLLMEngineError("no param map yet: call prepare_sync first")
            t0 = time.perf_counter()
            got = llm.collective_rpc("wsync_recv_sparse_direct", args=([_as_dict(m) for m in metas],))[0]
            return self._report(t0, nbytes, elements=elements, wire_bytes=int(got.get("wire_bytes", 0)))
        if any((_as_dict(m).get("encoding") or "flat_int32") != "flat_int32" for m in metas):
            raise VLLMEngineError("vLLM's own wire takes the flat_int32 sparse encoding only")
        if not (self.plan["sparse"] == "native" and self.api.checkpoint_coords):
            self._check_runtime_names(metas)
        t0 = time.perf_counter()
        native_recv_sparse(self.api, llm, metas, self.plan)
        return self._report(t0, nbytes, elements=elements, receive=self.plan["sparse"])

    # ---- cuda_ipc (engines/vllm/ipc.py on the worker) -------------------------------------
    def _recv_dense_ipc(self, llm, update: DenseUpdate) -> ReceiveReport:
        ipc = update.ipc
        if ipc is None:
            raise VLLMEngineError("a cuda_ipc dense sync needs the update's ipc field (the trainer's export id)")
        t0 = time.perf_counter()
        if ipc.export is not None:  # the trainer re-exported (new layout or buffers): map it before copying
            self._ipc_map(llm, ipc.export)
        got = llm.collective_rpc("wsync_ipc_dense", args=(ipc.export_id,))[0]
        return self._report(t0, int(got["bytes"]), messages=int(got.get("copies", 0)),
                            copy_ms=float(got.get("copy_ms", 0.0)))

    def _ipc_map(self, llm, export: dict) -> None:
        """Map the trainer's export and flatten the runtime parameters (one buffer per dtype) where the
        worker allows it (it refuses with a reason -- CUDA graphs, sleep mode, TP>1 -- and changes
        nothing; flat sparse syncs then scatter per runtime view). ``ipc_flatten``: its report."""
        from .ipc import DEFAULT_BUCKET_BYTES

        got = llm.collective_rpc("wsync_ipc_map", args=(export, DEFAULT_BUCKET_BYTES, True))[0]
        self.ipc_flatten = (got or {}).get("flatten")

    def _recv_sparse_ipc(self, llm, update: SparseUpdate, nbytes: int) -> ReceiveReport:
        """The flat format (what the service's trainer writes) -> wsync_ipc_sparse_flat; an update
        without the flat marker (an encoded per-tensor stream) -> wsync_ipc_sparse."""
        ipc = update.ipc
        if ipc is None:
            raise VLLMEngineError("a cuda_ipc sparse sync needs the update's ipc field (the staging id)")
        t0 = time.perf_counter()
        if ipc.staging is not None:
            llm.collective_rpc("wsync_ipc_map_staging", args=(ipc.staging,))
        if ipc.fmt == IPC_FLAT:
            got = llm.collective_rpc("wsync_ipc_sparse_flat", args=(ipc.staging_id, list(ipc.flat or [])))[0]
        else:
            got = llm.collective_rpc("wsync_ipc_sparse", args=(ipc.staging_id, [_as_dict(m) for m in update.metas]))[0]
        return self._report(t0, nbytes, elements=int(got.get("elements", 0)), apply_ms=float(got.get("ms", 0.0)),
                            ipc_format=ipc.fmt)

    # ---- helpers ------------------------------------------------------------------------
    def _require_llm(self):
        if self.llm is None:
            raise VLLMEngineError("engine was shut down")
        return self.llm

    def _require_group(self):
        llm = self._require_llm()
        if self.transport is None:
            raise VLLMEngineError("engine has not joined a transfer group")
        return llm

    def _direct_unsupported(self) -> str | None:
        """Why the worker cannot serve the direct route (None: it can)."""
        try:
            return self.llm.collective_rpc("wsync_direct_unsupported")[0]
        except Exception as exc:  # noqa: BLE001 - no worker extension: vLLM's own path still works
            return f"wsync worker extension unavailable: {exc}"

    def _ensure_map(self, hf_metas: list, bucket_bytes: int) -> None:
        """Build the worker's name-and-slice map (and dense receiver) once per layout: checkpoint names,
        dtypes, shapes in wire order, and the dense bucket size."""
        rows = [meta_row(m) for m in hf_metas]
        key = (tuple((n, d, tuple(s)) for n, d, s in rows), int(bucket_bytes))
        if key != self._map_key:
            metas = [{"name": n, "dtype": d, "shape": s} for n, d, s in rows]
            self._require_llm().collective_rpc("wsync_build_param_map", args=(metas, int(bucket_bytes)))
            self._map_key = key

    def _check_runtime_names(self, metas: list) -> None:
        """Refuse before any byte moves (the trainer's send then has no receiver: the sync layer must
        tear the group down). Gen A-C patches address runtime parameters by flat index."""
        runtime = {m.name: m for m in self.param_metas()}
        for name, dtype, shape in (meta_row(m) for m in metas):
            r = runtime.get(name)
            if r is None:
                raise VLLMEngineError(f"{name}: no such runtime parameter in vLLM (runtime names fuse "
                                      "q/k/v_proj into qkv_proj and gate/up_proj into gate_up_proj)")
            if list(r.shape) != list(shape) or r.dtype != dtype_name(dtype):
                raise VLLMEngineError(f"{name}: engine has {r.dtype}{list(r.shape)}, update says {dtype}{shape}")

    def _report(self, t0: float, nbytes: int, *, elements: int = 0, messages: int = 0, zero_copy: int = 0,
                **extra) -> ReceiveReport:
        ms = (time.perf_counter() - t0) * 1e3
        self._require_llm().reset_prefix_cache()
        return ReceiveReport(recv_ms=ms, bytes=nbytes, elements=elements, messages=messages, zero_copy=zero_copy,
                             extra={"route": self.route, "transport": self.transport, **extra})
