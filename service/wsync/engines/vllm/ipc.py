"""vLLM worker side of the CUDA-IPC transport (trainer and engine on the same physical GPU).

`IpcReceiveMixin` adds `wsync_ipc_*` worker methods (called through `LLM.collective_rpc`; every argument
and result is plain data: str, int, float, bool, bytes, lists, dicts) on top of WsyncWorkerExtension's
name-and-slice map (`wsync_build_param_map`: HF checkpoint tensors -> dim-0 slices of vLLM's runtime
parameters, q/k/v -> qkv_proj and gate/up -> gate_up_proj at their output_sizes row offsets):

  wsync_ipc_map(export)            map the trainer's buffers (transfer.ipc.IpcExport as a dict), build the
                                   param map from the export's layout if needed and plan the copies
                                   (once; again only for a new export or when vLLM replaced its params)
  wsync_ipc_dense(export_id)       one dense sync: planned device copies, one stream sync
  wsync_ipc_map_staging(export)    map the trainer's sparse staging buffer (IpcStaging.export())
  wsync_ipc_sparse(staging_id, metas)  decode the staged stream on the GPU, check ranges, scatter
  wsync_ipc_flatten()              repoint vLLM's runtime parameters into one flat buffer per dtype
                                   (explicit, once; refused with a reason -> per-tensor paths stay)
  wsync_ipc_sparse_flat(staging_id, metas)  the flat format (transfer/ipc_flat.py): one range check
                                   (one host sync) and one index_copy_ per dtype run, whatever the count
  wsync_ipc_unmap()                drop every mapping (the trainer's memory is then releasable)
  wsync_ipc_memory(reset_peak)     this process's CUDA memory counters

A sync naming another export or staging id than the one mapped raises (transfer.ipc.IpcStaleLayoutError)
before any byte moves: the caller re-sends the export and retries. TP=1, PP=1, unquantized Qwen2/Llama
layouts (the map's own limits). Generation must be paused by the caller; prefix cache reset is the
caller's `LLM.reset_prefix_cache()` (an engine-core call, not a worker one).
"""

from __future__ import annotations

import gc
import time
from typing import Any

import torch

DEFAULT_BUCKET_BYTES = 1 << 28  # only sizes the NCCL route's receiver; the IPC route ignores it


def _ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1e3


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.current_stream().synchronize()


def _metas_of(export) -> list[dict]:
    return [{"name": e.name, "dtype": e.dtype, "shape": list(e.shape)} for e in export.layout]


def _norm(metas) -> list[tuple]:
    out = []
    for m in metas or []:
        get = m.get if isinstance(m, dict) else lambda k, m=m: getattr(m, k)
        out.append((str(get("name")), str(get("dtype")).removeprefix("torch."), [int(s) for s in get("shape")]))
    return out


class IpcReceiveMixin:
    """Worker methods of the IPC route; one of WsyncWorkerExtension's mixins (worker.py)."""

    def _wsync_ipc_state(self) -> dict:
        st = getattr(self, "_wsync_ipc", None)
        if st is None:
            from wsync.transfer.ipc import IpcMapping
            from wsync.transfer.ipc_sparse import StagingMapping

            index = self.device.index if getattr(self.device, "index", None) is not None \
                else torch.cuda.current_device()
            st = self._wsync_ipc = {"mapping": IpcMapping(torch.device("cuda", index)),
                                    "staging": StagingMapping(index), "map_token": None}
        return st

    def _wsync_ipc_targets(self) -> dict:
        """The param map, rebuilt (same metas) when vLLM replaced a mapped runtime Parameter (a reload or
        sleep level 2): copies must never go to dead storage."""
        m = getattr(self, "_wsync_map", None)
        if m is None:
            raise RuntimeError("wsync: no param map on this worker; call wsync_ipc_map first")
        ptrs = m.get("ptrs")
        if any(module._parameters.get(attr) is not p for module, attr, p in m["owners"]) or (
                ptrs is not None and ptrs != [p.data_ptr() for _, _, p in m["owners"]]):
            self.wsync_build_param_map(m["hf_metas"], m["bucket_bytes"])
            m = self._wsync_map
        return m

    def _wsync_ipc_plan(self, m: dict):
        """The copy plan for the current map (built once per map and export)."""
        st = self._wsync_ipc_state()
        if m.get("ipc_token") is None or st["map_token"] is not m["ipc_token"]:
            st["mapping"].drop_plans()
            m["ipc_token"] = st["map_token"] = object()
        live = {p.data.untyped_storage().data_ptr() for _, _, p in m["owners"]}
        skip = [n for n, t in m["targets"].items() if t.untyped_storage().data_ptr() not in live]  # tied lm_head
        return st["mapping"].plan(m["targets"], key=id(st["map_token"]), skip=skip)

    def wsync_ipc_map(self, export: dict, bucket_bytes: int = DEFAULT_BUCKET_BYTES, flatten: bool = False) -> dict:
        """Map the trainer's export (plain dict) and plan the dense copies. Idempotent for the same export.
        flatten: once the map is built, repoint the runtime parameters into one buffer per dtype
        (wsync_ipc_flatten, in the trainer's order so dense copies merge; its
        report under "flatten"; a refusal leaves everything as it was)."""
        from wsync.transfer.ipc import IpcExport

        t0 = time.perf_counter()
        st, exp = self._wsync_ipc_state(), IpcExport.from_dict(export)
        m = getattr(self, "_wsync_map", None)
        rebuilt = m is None or _norm(m["hf_metas"]) != _norm(_metas_of(exp))
        if rebuilt:
            self.wsync_build_param_map(_metas_of(exp), int(bucket_bytes))
        flat = self.wsync_ipc_flatten() if flatten else None  # after the map: laid out in the trainer's order
        t1 = time.perf_counter()
        remapped = st["mapping"].ensure(exp)
        t2 = time.perf_counter()
        plan = self._wsync_ipc_plan(self._wsync_ipc_targets())
        return {"export_id": exp.export_id, "remapped": remapped, "map_rebuilt": rebuilt, "flatten": flat,
                "buffers": len(exp.buffers), "tensors": plan.tensors, "copies": plan.copies, "bytes": plan.bytes,
                "param_map_ms": (t1 - t0) * 1e3, "open_ms": (t2 - t1) * 1e3, "plan_ms": _ms(t2), "ms": _ms(t0)}

    def wsync_ipc_dense(self, export_id: str) -> dict:
        """One dense sync from the mapped buffers into the runtime parameters; synchronized on return."""
        t0 = time.perf_counter()
        st = self._wsync_ipc_state()
        st["mapping"].check(export_id)  # before anything else: a stale sync moves no byte
        plan = self._wsync_ipc_plan(self._wsync_ipc_targets())
        t1 = time.perf_counter()
        st["mapping"].copy(export_id, plan)
        _sync()
        return {"copy_ms": _ms(t1), "ms": _ms(t0), "bytes": plan.bytes, "copies": plan.copies}

    def wsync_ipc_map_staging(self, export: dict) -> dict:
        t0 = time.perf_counter()
        remapped = self._wsync_ipc_state()["staging"].ensure(export)
        return {"staging_id": str(export["staging_id"]), "remapped": remapped, "ms": _ms(t0)}

    def wsync_ipc_sparse(self, staging_id: str, metas: list) -> dict:
        """Decode the staged patches (HF checkpoint names, flat indices) on the GPU, check every index is in
        range (a bad patch leaves the model untouched), scatter into the runtime slices, synchronize."""
        from wsync.transfer.apply import apply_patches
        from wsync.transfer.encodings import SparseMeta
        from wsync.transfer.ipc_sparse import in_range

        t0 = time.perf_counter()
        st, m = self._wsync_ipc_state(), self._wsync_ipc_targets()
        metas = [SparseMeta.from_dict(d) for d in metas]
        for meta in metas:
            t = m["targets"].get(meta.name)
            if t is None or list(t.shape) != meta.shape or str(t.dtype).removeprefix("torch.") != meta.dtype:
                raise ValueError(f"wsync: {meta.name}: not a mapped checkpoint tensor of {meta.dtype}{meta.shape}")
        st["mapping"].wait_ready()
        with torch.no_grad():
            patches = st["staging"].patches(str(staging_id), metas)
            t1 = time.perf_counter()
            live = [p for p in patches if p.count]
            if live and not in_range(live, [m["targets"][p.name].numel() for p in live]):
                raise ValueError("wsync: sparse index out of range; nothing was applied")
            t2 = time.perf_counter()
            apply_patches(m["targets"], live)
        _sync()
        return {"decode_ms": (t1 - t0) * 1e3, "check_ms": (t2 - t1) * 1e3, "apply_ms": _ms(t2), "ms": _ms(t0),
                "elements": sum(p.count for p in live), "tensors": len(live)}

    def _wsync_flatten_unsupported(self) -> str | None:
        why = self.wsync_direct_unsupported()
        if why:
            return why
        mc = getattr(self.vllm_config, "model_config", None)
        if getattr(mc, "enforce_eager", None) is not True:
            return "repointing parameters needs enforce_eager=True (CUDA graphs capture their addresses)"
        if getattr(mc, "enable_sleep_mode", False):
            return "repointing parameters would move them out of vLLM's sleep-mode memory pool"
        cg = getattr(getattr(self.vllm_config, "compilation_config", None), "cudagraph_mode", None)
        if cg is not None and "NONE" not in str(cg).upper():
            return f"repointing parameters needs CUDA graphs off (cudagraph_mode={cg})"
        return None

    def wsync_ipc_flatten(self) -> dict:
        """Explicit, once per engine: repoint every runtime parameter into ONE flat buffer per dtype
        (transfer.flat.flatten_by_dtype; the original memory is freed), so a flat-format sparse sync is one
        scatter per dtype. Only for the engines the direct map serves (TP=1, unquantized) run with
        enforce_eager and without sleep mode; else {"flattened": False, "reason"} and nothing changes
        (every path keeps working per tensor). The param map and every IPC copy plan are rebuilt after."""
        from wsync.transfer.flat import flatten_by_dtype

        t0 = time.perf_counter()
        why = self._wsync_flatten_unsupported()
        if why:
            return {"flattened": False, "reason": why, "ms": _ms(t0)}
        model = self._wsync_model()
        named = list(model.named_parameters())
        m = getattr(self, "_wsync_map", None)
        if m is not None:  # the trainer's order, so dense copies of neighbours merge
            rank = {rt: i for i, rt in enumerate(dict.fromkeys(self._wsync_runtime_names(m)))}
            named.sort(key=lambda kv: rank.get(kv[0], len(rank)))
        with torch.no_grad():
            out = flatten_by_dtype(named)
        if out.get("flattened") and not out.get("already"):
            _sync()
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if m is not None:
                self.wsync_build_param_map(m["hf_metas"], m["bucket_bytes"])
        return {**out, "ms": _ms(t0)}

    def _wsync_runtime_names(self, m: dict) -> list[str]:
        model = self._wsync_model()
        names = {id(p): n for n, p in model.named_parameters()}
        return [names[id(p)] for _, _, p in m["owners"] if id(p) in names]

    def _wsync_flat_ranges(self, m: dict):
        """transfer.ipc_flat.FlatRanges of the map's targets (cached with the map; the tied lm_head's
        placeholder is checked but never written)."""
        if m.get("flat_ranges") is None:
            from wsync.transfer.ipc_flat import flat_ranges

            live = {p.data.untyped_storage().data_ptr() for _, _, p in m["owners"]}
            skip = [n for n, t in m["targets"].items() if t.untyped_storage().data_ptr() not in live]
            m["flat_ranges"] = flat_ranges(m["targets"], skip)
        return m["flat_ranges"]

    def wsync_ipc_sparse_flat(self, staging_id: str, metas: list) -> dict:
        """A flat-format sparse sync (transfer/ipc_flat.py; metas = [[name, dtype, shape, count], ...] in
        flat order, HF checkpoint names, local flat indices): range check (one host sync; a bad index leaves
        the model untouched), one index_copy_ per dtype run into the runtime slices, synchronize."""
        from wsync.transfer.ipc_flat import apply_flat

        t0 = time.perf_counter()
        st, m = self._wsync_ipc_state(), self._wsync_ipc_targets()
        ranges = self._wsync_flat_ranges(m)
        st["mapping"].wait_ready()
        staged = st["staging"].flat(str(staging_id), metas)
        t1 = time.perf_counter()
        with torch.no_grad():
            out = apply_flat(ranges, staged)
        t2 = time.perf_counter()
        _sync()
        return {**out, "prep_ms": (t1 - t0) * 1e3, "apply_ms": (t2 - t1) * 1e3, "ms": _ms(t0),
                "tensors": sum(1 for x in staged.metas if x.count), "views": len(ranges.views)}

    def wsync_ipc_unmap(self) -> dict:
        st = getattr(self, "_wsync_ipc", None)
        if st is not None:
            st["mapping"].close()
            st["staging"].close()
            self._wsync_ipc = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.ipc_collect()
        return self.wsync_ipc_memory()

    def wsync_ipc_memory(self, reset_peak: bool = False) -> dict:
        out: dict[str, Any] = {}
        if torch.cuda.is_available():
            free, total = torch.cuda.mem_get_info()
            out = {"allocated": torch.cuda.memory_allocated(), "max_allocated": torch.cuda.max_memory_allocated(),
                   "reserved": torch.cuda.memory_reserved(), "device_free": free, "device_total": total}
            if reset_peak:
                torch.cuda.reset_peak_memory_stats()
        st = getattr(self, "_wsync_ipc", None)
        out["export_id"] = st["mapping"].export_id if st else None
        out["staging_id"] = st["staging"].staging_id if st else None
        return out

