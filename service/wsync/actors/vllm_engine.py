"""The vLLM engine core: a plain class the lead wraps with `ray.remote(num_gpus=1)`. It speaks the same
engine interface as the reference engine (engines/reference.py); all vLLM access goes through
`wsync.engines.vllm_adapter` (this module imports no vLLM).

Construction inside a Ray actor (vLLM 0.24): `vllm.LLM(..., tensor_parallel_size=1,
distributed_executor_backend="uni")` with `VLLM_ENABLE_V1_MULTIPROCESSING=0`, so the EngineCore and
its single GPU worker live in this actor's process, on the GPU Ray assigned to it (Ray sets
CUDA_VISIBLE_DEVICES; the uni executor uses cuda:0 = that GPU). Why not the reference example's
`ray.remote(LLM)` + `distributed_executor_backend="ray"` + VLLM_RAY_BUNDLE_INDICES: that shape keeps
the LLM actor at num_gpus=0 and lets vLLM start its own Ray worker actor inside a placement group; the
lead's actor already holds num_gpus=1, so a Ray executor would ask Ray for a *second* GPU. With
multiprocessing on (vLLM's default) vLLM would spawn an EngineCore child (it forces `spawn` inside a
Ray actor) that Ray does not track when the actor dies, and callables in collective_rpc would need
VLLM_ALLOW_INSECURE_SERIALIZATION. In-process avoids both; options["v1_multiprocessing"]=True opts
back in (everything here uses named collective_rpc methods, so it still works).

Two sync routes (options["sync_route"], EngineLaunch.sync_route; ready() reports which one is live):
  direct (opt-in):  wsync's own wire (wsync.transfer: bucketed dense, any sparse encoding, checkpoint
                    names) over a wsync SyncGroup the worker joins (wsync_open_sync_group), received by
                    the WsyncWorkerExtension straight into vLLM's runtime parameters through a
                    name-and-slice map built once per layout (q/k/v -> qkv_proj, gate/up -> gate_up_proj
                    at their row offsets) and a DenseReceiver kept with it; no model.load_weights. The
                    trainer sends with the same send_dense / send_sparse it uses for reference engines.
                    Where the worker cannot map the model (TP>1, quantized, an unmapped architecture),
                    the engine falls back to native at start and says why (ready()["sync_route_note"]).
  native (default): vLLM's own weight-transfer API and wire, below. The default because it is the route
                    proven through the service on the GPU machine; the direct route is proven there in
                    the benchmark harness (bench/vllm_bench.py), not yet through the service.

Native sync call sequence (the lead runs the trainer half concurrently on the trainer actor):
  pause():          llm.sleep(level=0)                                (scheduling paused)
  join_group():     llm.init_weight_transfer_engine({"init_info": {master_address, master_port,
                    rank_offset=rank, world_size}})   ||  trainer_open_group (rank 0)
  recv_dense():     Gen A/0.21-0.24: start_weight_update(is_checkpoint_format=True) -> update_weights(
                    {names, dtype_names, shapes, packed}) -> finish_weight_update ||  trainer_send_dense
                    Gen B-D ('sparse_nccl' engine): collective_rpc('wsync_recv_dense') over the same
                    communicator, model.load_weights                 ||  trainer_send_dense
  recv_sparse():    Gen A: start_weight_update(is_checkpoint_format=False) -> update_weights({names,
                    dtype_names, shapes, num_updates_list, update_kind="sparse_flat"}) -> finish
                    Gen B-D: start_weight_update() -> update_weights({... num_updates_list}) -> finish
                    dense_only/legacy: collective_rpc('wsync_recv_sparse') ||  trainer_send_sparse
                    then llm.reset_prefix_cache() (cached KV was computed with the old weights)
  resume():         llm.wake_up(tags=["scheduling"])

Names: param_metas/fingerprint report vLLM *runtime* parameters, which differ from HF names where
vLLM fuses tensors (q/k/v_proj -> qkv_proj, gate/up_proj -> gate_up_proj; a tied lm_head is absent).
Dense updates take HF (checkpoint) names through model.load_weights; Gen A-C sparse patches must use
runtime names (Gen D: checkpoint names)."""

from __future__ import annotations

import gc
import json
import os
import time
from pathlib import Path

from wsync.engines import vllm_adapter as va


class VLLMEngineError(RuntimeError):
    pass


def _default_max_len(model: str, wanted: int | None) -> int:
    """options["max_model_len"], else min(1024, the model's max_position_embeddings) for a local folder."""
    if wanted:
        return int(wanted)
    try:
        cfg = json.loads((Path(model) / "config.json").read_text())
        return min(1024, int(cfg.get("max_position_embeddings") or 1024))
    except (OSError, ValueError, TypeError):
        return 1024


# ---- per-generation call sequences on a vllm.LLM (no vLLM import needed: method calls only) --
def _start(api: va.VLLMApi, llm, checkpoint_format: bool) -> None:
    if not api.has_start_finish:
        return  # 0.16-0.20: update_weights runs the whole session
    if api.start_takes_checkpoint_format:  # Gen A / 0.21-0.24
        llm.start_weight_update(is_checkpoint_format=checkpoint_format)
    else:
        llm.start_weight_update()


def _update(api: va.VLLMApi, llm, update_info: dict) -> None:
    """update_weights, then finish. When update_weights raises, the 0.24 worker has already closed the
    session (calling finish would raise a second, misleading error), so finish only on success."""
    llm.update_weights({"update_info": update_info})
    if api.has_start_finish:
        llm.finish_weight_update()


def engine_join_group(api: va.VLLMApi, llm, host: str, port: int, world_size: int, rank: int) -> None:
    """Blocks until every rank (trainer = 0) joined. `rank` is this engine's NCCL rank (TP=1)."""
    if api.generation == "legacy":
        llm.collective_rpc("wsync_init_group", args=(host, port, world_size, rank))
    else:
        llm.init_weight_transfer_engine({"init_info": va.init_info(host, port, world_size, rank_offset=rank)})


def engine_leave_group(api: va.VLLMApi, llm) -> None:
    if hasattr(llm, "shutdown_weight_transfer_engine"):  # 0.32+
        llm.shutdown_weight_transfer_engine()
    llm.collective_rpc("wsync_close_group")


def engine_recv_dense(api: va.VLLMApi, llm, metas: list, packed: bool, route: str) -> None:
    if route == "extension":  # e.g. a dense reseed of a 'sparse_nccl' engine (Gen B-D)
        if packed:
            raise va.VLLMUnsupportedError(f"vLLM {api.version}: the worker-extension dense path is unpacked only")
        llm.collective_rpc("wsync_recv_dense", kwargs=va.dense_update_info(metas, False, None))
        return
    _start(api, llm, checkpoint_format=True)
    _update(api, llm, va.dense_update_info(metas, packed, api))


def engine_recv_sparse(api: va.VLLMApi, llm, metas: list, route: str) -> None:
    if not metas:
        return  # nothing is broadcast for an empty patch set (vLLM rejects an empty num_updates_list)
    if route == "extension":
        info = va.sparse_update_info(metas, None)
        info.pop("update_kind")
        llm.collective_rpc("wsync_recv_sparse", kwargs=info)
        return
    _start(api, llm, checkpoint_format=False)
    _update(api, llm, va.sparse_update_info(metas, api))


class VLLMEngineCore:
    kind = "vllm"

    def __init__(self, model: str, device: str = "cuda", options: dict | None = None):
        opts = dict(options or {})
        self.model_name, self.device = model, device
        self.api = va.detect_generation()
        if not self.api.installed:
            raise va.VLLMUnsupportedError(f"vLLM engine needs vLLM installed ({'; '.join(self.api.notes)})")
        self.backend = va.engine_backend(self.api, "both")
        self.routes = va.routes(self.api, self.backend)
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1" if opts.get("v1_multiprocessing") else "0"
        kwargs = va.engine_kwargs(self.api, "both", float(opts.get("gpu_memory_utilization", 0.5)),
                                  bool(opts.get("enforce_eager", True)),
                                  max_model_len=_default_max_len(model, opts.get("max_model_len")))
        self.llm = va.create_llm(model, **kwargs)
        self.sync_route, self.sync_note = self._pick_sync_route(str(opts.get("sync_route") or "native"))
        self._map_key: tuple | None = None
        self.paused = False
        self.in_group = False
        self._runtime_metas: dict[str, dict] | None = None
        self._last: dict = {}

    # ---- serving ------------------------------------------------------------------------
    def ready(self) -> dict:
        return {"kind": self.kind, "model": self.model_name, "device": self.device,
                "vllm_version": self.api.version, "generation": self.api.generation,
                "weight_transfer_backend": self.backend, "routes": dict(self.routes),
                "sync_route": self.sync_route, "sync_protocol": "wsync" if self.direct else "vllm",
                **({"sync_route_note": self.sync_note} if self.sync_note else {})}

    @property
    def direct(self) -> bool:
        """wsync's own wire straight into vLLM's runtime parameters (see the module docstring)."""
        return self.sync_route == "direct"

    def health(self) -> dict:
        alive = self.llm is not None
        return {"ok": alive, "paused": self.paused, "in_group": self.in_group,
                "generation": self.api.generation, "last_sync": dict(self._last)}

    def generate(self, prompts: list[str], max_new_tokens: int = 1) -> list[dict]:
        llm = self._require_llm()
        if self.paused:
            raise VLLMEngineError("engine is paused for a weight update")
        outs = llm.generate(list(prompts), va.greedy_params(max_new_tokens), use_tqdm=False)
        return [{"token_ids": [int(t) for t in o.outputs[0].token_ids], "text": o.outputs[0].text} for o in outs]

    def pause(self) -> None:
        self._require_llm().sleep(level=0)
        self.paused = True

    def resume(self) -> None:
        self._require_llm().wake_up(tags=["scheduling"])
        self.paused = False

    # ---- weights ------------------------------------------------------------------------
    def param_metas(self) -> list[dict]:
        """Runtime parameters of the served model (vLLM names; see the module docstring)."""
        return list(self._metas().values())

    def fingerprint(self, names: list[str] | None = None) -> dict[str, str]:
        """wsync.transfer.fingerprint over runtime parameters, computed inside the worker. Unknown
        names (e.g. HF q_proj names of a fused qkv_proj) are left out of the answer."""
        return self._require_llm().collective_rpc("wsync_fingerprint", args=(names,))[0]

    def join_group(self, rendezvous: dict, rank: int) -> None:
        llm = self._require_llm()
        if str(rendezvous.get("backend", "nccl")) != "nccl" and not self.direct:
            raise VLLMEngineError(f"vLLM engines sync over NCCL only, not {rendezvous.get('backend')!r}")
        if int(rank) < 1:
            raise VLLMEngineError("rank 0 is the trainer; a vLLM engine joins at rank >= 1")
        if self.in_group:
            self.leave_group()
        if self.direct:
            llm.collective_rpc("wsync_open_sync_group", args=(dict(rendezvous), int(rank), 300.0, False))
            self.in_group = True
            return
        engine_join_group(self.api, llm, rendezvous["host"], int(rendezvous["port"]),
                             int(rendezvous["world_size"]), int(rank))
        self.in_group = True

    def leave_group(self) -> None:
        if self.llm is not None and self.in_group:
            if self.direct:
                self.llm.collective_rpc("wsync_close_sync_group")
            else:
                engine_leave_group(self.api, self.llm)
        self.in_group = False

    def recv_dense(self, update: dict) -> dict:
        llm, metas, packed = self._require_group(), list(update["metas"]), bool(update.get("packed", False))
        if self.direct:
            self._ensure_map(metas, int(update["bucket_bytes"]))
            t0 = time.perf_counter()
            got = llm.collective_rpc("wsync_recv_dense_direct")[0]
            return {**self._done("dense", "direct", t0, int(got["bytes"])), "zero_copy": got.get("zero_copy", 0),
                    "messages": got.get("messages", 0)}
        route = self._route("dense_packed" if packed else "dense", update.get("route"))
        t0 = time.perf_counter()
        engine_recv_dense(self.api, llm, metas, packed, route)
        return self._done("dense", route, t0, va.dense_payload_bytes(metas))

    def recv_sparse(self, update: dict) -> dict:
        llm, metas = self._require_group(), list(update["metas"])
        if self.direct:
            if self._map_key is None:
                raise VLLMEngineError("no param map yet: call prepare_sync first")
            t0 = time.perf_counter()
            got = llm.collective_rpc("wsync_recv_sparse_direct", args=(metas,))[0]
            return {**self._done("sparse", "direct", t0, va.sparse_payload_bytes(metas) if metas else 0),
                    "wire_bytes": got.get("wire_bytes", 0)}
        route = self._route("sparse", update.get("route"))
        if any(m.get("encoding", "flat_int32") != "flat_int32" for m in metas):
            raise VLLMEngineError("vLLM engines take the flat_int32 sparse encoding only (vLLM's wire order)")
        if not (route == "native" and self.api.checkpoint_coords):
            self._check_runtime_names(metas)
        t0 = time.perf_counter()
        engine_recv_sparse(self.api, llm, metas, route)
        return self._done("sparse", route, t0, va.sparse_payload_bytes(metas) if metas else 0)

    def shutdown(self) -> None:
        if self.llm is None:
            return
        try:
            self.leave_group()
        finally:
            llm, self.llm = self.llm, None
            va.shutdown_llm(llm)
            del llm
            gc.collect()
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    # ---- helpers ------------------------------------------------------------------------
    def _require_llm(self):
        if self.llm is None:
            raise VLLMEngineError("engine was shut down")
        return self.llm

    def _require_group(self):
        llm = self._require_llm()
        if not self.in_group:
            raise VLLMEngineError("engine has not joined a transfer group")
        return llm

    def _route(self, mode: str, forced: str | None) -> str:
        """The engine's route for `mode`; an update may force "extension" (same wire, e.g. to exercise
        the reseed path on Gen A) or "native" (refused where impossible)."""
        if forced == "extension":
            return "extension"
        if forced == "native" or mode == "dense_packed":
            return va.require(self.api, mode, backend=self.backend)
        return self.routes[mode]

    def _pick_sync_route(self, wanted: str) -> tuple[str, str | None]:
        """"direct" (wsync's wire into the runtime parameters) where the worker extension can map this
        model, else vLLM's own weight-transfer API ("native"), with the reason."""
        if wanted not in ("direct", "native"):
            raise VLLMEngineError(f"sync_route must be 'direct' or 'native', not {wanted!r}")
        if wanted == "native":
            return "native", None
        try:
            why = self.llm.collective_rpc("wsync_direct_unsupported")[0]
        except Exception as exc:  # noqa: BLE001 - no worker extension: vLLM's own path still works
            why = f"wsync worker extension unavailable: {exc}"
        return ("native", why) if why else ("direct", None)

    def prepare_sync(self, hf_metas: list, bucket_bytes: int) -> dict:
        """Direct route, before the trainer sends anything: build (or keep) the worker's map for this
        layout, so a model the map cannot serve fails here and never leaves the trainer mid-broadcast."""
        if not self.direct:
            return {"route": self.sync_route}
        self._ensure_map(hf_metas, int(bucket_bytes))
        return {"route": "direct"}

    def _ensure_map(self, hf_metas: list, bucket_bytes: int) -> None:
        """Build the worker's name-and-slice map (and dense receiver) once per layout: checkpoint names,
        dtypes, shapes in wire order, and the dense bucket size."""
        key = (tuple((m["name"], va.dtype_str(m["dtype"]), tuple(int(d) for d in m["shape"])) for m in hf_metas),
               int(bucket_bytes))
        if key != self._map_key:
            self._require_llm().collective_rpc("wsync_build_param_map", args=(list(hf_metas), int(bucket_bytes)))
            self._map_key = key

    def _metas(self) -> dict[str, dict]:
        if self._runtime_metas is None:
            metas = self._require_llm().collective_rpc("wsync_param_metas")[0]
            self._runtime_metas = {m["name"]: m for m in metas}
        return self._runtime_metas

    def _check_runtime_names(self, metas: list[dict]) -> None:
        """Refuse before any byte moves (the trainer's send then has no receiver: the lead must tear
        the group down). Gen A-C patches address runtime parameters by flat index."""
        runtime = self._metas()
        for m in metas:
            r = runtime.get(m["name"])
            if r is None:
                raise VLLMEngineError(f"{m['name']}: no such runtime parameter in vLLM (runtime names fuse "
                                      "q/k/v_proj into qkv_proj and gate/up_proj into gate_up_proj)")
            if list(r["shape"]) != list(m["shape"]) or r["dtype"] != va.dtype_str(m["dtype"]):
                raise VLLMEngineError(f"{m['name']}: engine has {r['dtype']}{list(r['shape'])}, "
                                      f"update says {m['dtype']}{list(m['shape'])}")

    def _done(self, mode: str, route: str, t0: float, nbytes: int) -> dict:
        ms = (time.perf_counter() - t0) * 1e3
        self._require_llm().reset_prefix_cache()
        self._last = {"mode": mode, "route": route, "recv_ms": ms, "bytes": nbytes}
        return {"recv_ms": ms, "bytes": nbytes, "route": route}
