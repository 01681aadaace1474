"""wsync's direct route into vLLM: wsync's own wire (wsync.transfer: bucketed dense, any sparse
encoding, checkpoint names) over a wsync SyncGroup the worker joins, received straight into vLLM's
runtime parameters through a name-and-slice map built once per layout (q/k/v -> qkv_proj, gate/up ->
gate_up_proj at their output_sizes row offsets, a tied lm_head received and dropped, the rest 1:1);
no model.load_weights, no layerwise reload.

A mixin of WsyncWorkerExtension (worker.py): its methods run on the vLLM worker (`self` is vLLM's
Worker: device, model_runner, vllm_config) and are called by name through collective_rpc, so their
names are the wire between the engine core and the worker. Other receive paths (e.g. CUDA IPC) may
reuse the map: `_wsync_ready()` returns (group, map) with map["targets"] = {checkpoint name: runtime
slice view}. Checked against vLLM 0.24.0 (Gen A) worker internals: TP=1/PP=1, unquantized
Qwen2/Llama-style models whose fused runtime params are QKVParallelLinear / MergedColumnParallelLinear
(`output_sizes` along dim 0); layerwise reload restores the same Parameter objects afterwards."""

from __future__ import annotations

import time
from typing import Any

import torch

from wsync.transfer.meta import dtype_name

from .comm import device_sync
from .detect import VLLMUnsupportedError
from .payloads import meta_row


class DirectReceiveMixin:
    """The name-and-slice map and the direct dense / sparse receive (collective_rpc methods)."""

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
        metas = [TensorMeta(*meta_row(m)) for m in hf_metas]
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
                                 f"{first + rows}) of {rt} {dtype_name(p.dtype)}{list(p.shape)}")
            targets[meta.name] = p.data.narrow(0, first, rows).view(meta.shape) if meta.shape else p.data
            spans.setdefault(rt, []).append((first, first + rows, meta.name, hasattr(module, "org_vocab_size")))
            owners.append((module, rt.rsplit(".", 1)[-1], p))
            slices[meta.name] = [rt, first, rows]
        padded = self._wsync_check_coverage(runtime, spans)
        self._wsync_map = {"metas": metas, "targets": targets, "bucket_bytes": int(bucket_bytes), "owners": owners,
                           "hf_metas": list(hf_metas), "ptrs": [p.data_ptr() for _, _, p in owners]}
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
            if t is None or list(t.shape) != meta.shape or dtype_name(t.dtype) != meta.dtype:
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
        device_sync()
        t3 = time.perf_counter()
        return {"recv_ms": (t3 - t0) * 1e3, "wait_decode_ms": stats.ms, "check_ms": (t2 - t1) * 1e3,
                "apply_ms": (t3 - t2) * 1e3, "wire_bytes": stats.wire_bytes,
                "elements": sum(p.count for p in patches)}

    def wsync_recv_sparse_direct(self, metas: list) -> dict:
        """A whole sparse sync into the runtime slices: wsync_post_sparse_direct + wsync_finish_sparse_direct."""
        posted = self.wsync_post_sparse_direct(metas)
        return {**posted, **self.wsync_finish_sparse_direct()}
