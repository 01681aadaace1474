"""One shape of the one-GPU benchmark (run by bench/colo_bench.py in its own process, so each shape
starts from a clean GPU): the trainer lives in THIS process (random bf16 weights laid out flat in
dense buckets), a vLLM 0.24 engine on the same GPU runs its engine core in its own process (V1
multiprocessing, spawn), loaded with dummy weights from a config-only folder (no hub, no safetensors).

Sections, in order (each recorded in the raw JSON as it finishes; a failed section records its error and
the run goes on while the engine answers):
  floor          torch._foreach_copy_ of every parameter into one flat buffer (the d2d copy floor)
  engine         LLM start (worker_extension_cls=WsyncWorkerExtension, weight_transfer backend "ipc")
  wsync_dense    first = export + map + plan + copy; steady = mark_ready + one RPC of planned copies
  wsync_sparse   per density: the flat IPC format (transfer/ipc_flat.py): write into the shared staging
                 buffer (a few cats) + one RPC (range check + one scatter per dtype into the runtime
                 params, repointed into one buffer per dtype at engine setup: wsync_ipc_flatten)
  wsync_unmap    the engine drops its mappings; the trainer closes its exports
  vllm_unpacked  vLLM's own ipc backend: start_weight_update -> trainer_send_weights -> finish
  vllm_packed    the same with packed=True and a buffer >= the largest tensor
Every sync is checked: the engine's runtime fingerprints (wsync_fingerprint) must equal the trainer's
weights laid out as vLLM holds them (bench.shapes.fused_tensors: q/k/v and gate/up concatenated).
Memory: the trainer's and the engine's torch.cuda.max_memory_allocated above their allocation before
each sync (peak stats reset right before it), max over the section's syncs.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

MIB = 1 << 20


def _setup_env() -> None:
    """Before vllm is imported: engine core in its own (spawned) process; vLLM's own ipc path through
    LLM.update_weights needs pickled handle args (wsync's own path passes plain data only)."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    os.environ["VLLM_WORKER_MULTIPROC_METHOD"] = "spawn"
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    conf = os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "")
    if "expandable_segments:True" in conf:
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = conf.replace("expandable_segments:True", "expandable_segments:False")


def _sync() -> None:
    torch.cuda.synchronize()


def _stats(samples: list[float], warmup: int) -> dict:
    steady = samples[1 + warmup:] or samples[1:] or samples
    return {"first": samples[0] if samples else None, "median": statistics.median(steady) if steady else None,
            "min": min(steady) if steady else None, "samples": samples}


class Run:
    def __init__(self, cfg: dict) -> None:
        self.cfg, self.deadline = cfg, float(cfg["deadline"])
        self.raw: dict = {"shape": cfg["shape"], "cfg": cfg, "sections": {}, "errors": {}}
        self.path = Path(cfg["raw_out"])
        self.llm = None
        self.gen = torch.Generator(device="cuda").manual_seed(11)

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.raw, indent=1, default=str))
        tmp.replace(self.path)

    def left_s(self) -> float:
        return self.deadline - time.time()

    def section(self, name: str, fn, min_s: float = 20.0) -> bool:
        if self.left_s() < min_s:
            self.raw["errors"][name] = f"skipped: {self.left_s():.0f} s left of the time budget"
            print(f"[{self.cfg['shape']}] {name}: SKIPPED (time)", flush=True)
            self.save()
            return False
        t0 = time.perf_counter()
        print(f"[{self.cfg['shape']}] {name} ...", flush=True)
        try:
            self.raw["sections"][name] = out = fn()
            out["section_s"] = time.perf_counter() - t0
            print(f"[{self.cfg['shape']}] {name}: ok in {out['section_s']:.1f} s", flush=True)
            return True
        except Exception as exc:  # noqa: BLE001 - recorded; the caller decides whether to go on
            self.raw["errors"][name] = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"
            print(f"[{self.cfg['shape']}] {name}: FAILED {type(exc).__name__}: {exc}", flush=True)
            return False
        finally:
            self.save()

    def rpc(self, method: str, *args):
        return self.llm.collective_rpc(method, args=args)[0]

    # ---- trainer ---------------------------------------------------------------------------------
    def setup(self) -> dict:
        from wsync.transfer.flat import flatten_params
        from wsync.transfer.ipc import check_allocator, layout_of

        from .shapes import (
            get_shape,
            hf_metas,
            make_weights,
            runtime_layout,
            total_bytes,
        )

        check_allocator()
        torch.cuda.set_device(0)
        self.shape = get_shape(self.cfg["shape"])
        self.metas = hf_metas(self.shape)
        self.weights = make_weights(self.metas, torch.device("cuda", 0), seed=2)
        buckets = flatten_params(self.weights, int(self.cfg["bucket_mb"]) * MIB)
        self.layout = runtime_layout(self.metas, self.shape.tied)
        self.specs = {m.name: m for m in self.metas}
        self.shapes = {m.name: tuple(m.shape) for m in self.metas}
        _sync()
        torch.cuda.empty_cache()
        storages, _ = layout_of(self.weights)
        return {"bytes": total_bytes(self.metas), "tensors": len(self.metas), "flattened_buckets": buckets,
                "storages": len(storages), "largest_tensor_bytes": max(m.nbytes for m in self.metas),
                "device": torch.cuda.get_device_name(0), "uuid": str(torch.cuda.get_device_properties(0).uuid),
                "trainer_allocated_mib": torch.cuda.memory_allocated() / MIB}

    def expected(self) -> dict:
        from wsync.transfer.fingerprint import fingerprint

        from .shapes import fused_tensors

        with torch.no_grad():
            return fingerprint(list(fused_tensors(self.weights, self.layout)))

    def check(self, what: str) -> None:
        from .proto import check_equal

        check_equal(what, self.expected(), self.rpc("wsync_fingerprint"))

    def floor(self) -> dict:
        srcs = [t for t in self.weights.values()]
        total = sum(t.numel() * t.element_size() for t in srcs)
        dst = torch.empty(total, dtype=torch.uint8, device="cuda")
        views, off = [], 0
        for t in srcs:
            n = t.numel() * t.element_size()
            views.append(dst[off:off + n].view(t.dtype).view(t.shape))
            off += n
        samples = []
        for _ in range(2 + int(self.cfg["iters"]) * 2):
            _sync()
            t0 = time.perf_counter()
            torch._foreach_copy_(views, srcs)
            _sync()
            samples.append((time.perf_counter() - t0) * 1e3)
        ok = all(torch.equal(v, s) for v, s in zip(views[:3], srcs[:3]))
        del dst, views
        torch.cuda.empty_cache()
        return {**_stats(samples, 1), "bytes": total, "copied_equal": ok}

    # ---- engine ----------------------------------------------------------------------------------
    def engine(self) -> dict:
        from wsync.engines.vllm.detect import EXTENSION_QUALNAME
        from wsync.engines.vllm.engine import create_llm
        from wsync.engines.vllm.trainer import weight_transfer_config

        folder = write_config_folder(self.shape, Path(self.cfg["model_dir"]) / f"colo-{self.shape.name}")
        free0, total = torch.cuda.mem_get_info()
        t0 = time.perf_counter()
        self.llm = create_llm(str(folder), load_format="dummy", dtype="bfloat16", enforce_eager=True,
                       gpu_memory_utilization=float(self.cfg["gpu_util"]), max_model_len=2048, max_num_seqs=8,
                       tensor_parallel_size=1, distributed_executor_backend="uni", seed=0,
                       worker_extension_cls=EXTENSION_QUALNAME,
                       weight_transfer_config=weight_transfer_config("ipc"))
        start_s = time.perf_counter() - t0
        metas = self.rpc("wsync_param_metas")
        # one-time engine setup, untimed by the syncs: the name-and-slice map, then vLLM's runtime params
        # repointed into one flat buffer per dtype (flat sparse apply = one scatter per dtype)
        hf = [{"name": m.name, "dtype": m.dtype, "shape": list(m.shape)} for m in self.metas]
        self.rpc("wsync_build_param_map", hf, int(self.cfg["bucket_mb"]) * MIB)
        flatten = self.rpc("wsync_ipc_flatten")
        print(f"[{self.cfg['shape']}] flatten: {flatten}", flush=True)
        return {"start_s": start_s, "runtime_params": len(metas), "flatten": flatten,
                "free_before_gib": free0 / 2**30,
                "total_gib": total / 2**30, "free_after_gib": torch.cuda.mem_get_info()[0] / 2**30,
                "engine_memory": self.rpc("wsync_ipc_memory", False)}

    def _timed(self, fn) -> tuple[float, dict, dict]:
        """(ms, fn's result, extra memory MiB of trainer and engine) of one sync."""
        self.rpc("wsync_ipc_memory", True)
        eng0 = self.rpc("wsync_ipc_memory", False)["allocated"]
        _sync()
        torch.cuda.reset_peak_memory_stats()
        tr0 = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        out = fn()
        ms = (time.perf_counter() - t0) * 1e3
        _sync()
        tr = (torch.cuda.max_memory_allocated() - tr0) / MIB
        eng = (self.rpc("wsync_ipc_memory", False)["max_allocated"] - eng0) / MIB
        return ms, out, {"trainer": tr, "engine": eng}

    # ---- wsync colocated -------------------------------------------------------------------------
    def wsync_dense(self) -> dict:
        from wsync.transfer.ipc import IpcExporter

        from .proto import mutate

        self.exporter = IpcExporter(self.weights)

        def first():
            exp = self.exporter.current()
            self.exporter.mark_ready()
            mapped = self.rpc("wsync_ipc_map", exp.to_dict())
            return {"map": mapped, "copy": self.rpc("wsync_ipc_dense", exp.export_id)}

        ms, out, mem = self._timed(first)
        self.check("wsync dense first")
        samples, parts, mems = [ms], [out], [mem]

        def steady():
            exp = self.exporter.current()
            self.exporter.mark_ready()
            return self.rpc("wsync_ipc_dense", exp.export_id)

        for i in range(int(self.cfg["warmup"]) + int(self.cfg["iters"])):
            mutate(self.weights, 1e-4, self.gen)
            ms, out, mem = self._timed(steady)
            self.check(f"wsync dense {i}")
            samples.append(ms)
            parts.append(out)
            mems.append(mem)
        return {**_stats(samples, int(self.cfg["warmup"])), "first_parts": parts[0],
                "engine_ms": [p.get("ms") for p in parts[1:]],
                "extra_mib": {k: max(m[k] for m in mems) for k in ("trainer", "engine")},
                "verified_syncs": len(samples)}

    def wsync_sparse(self) -> dict:
        from wsync.transfer.ipc_sparse import IpcStaging

        self.staging = IpcStaging(torch.device("cuda", 0))
        out: dict = {}
        for density in self.cfg["densities"]:
            if self.left_s() < 30:
                out[str(density)] = {"error": "skipped: time budget"}
                continue
            samples, parts, mems = [], [], []
            try:
                for i in range(1 + int(self.cfg["sparse_warmup"]) + int(self.cfg["sparse_iters"])):
                    patches = mutate_patches(self.weights, density, self.gen)
                    ms, part, mem = self._timed(lambda p=patches: self._sparse_once(p))
                    self.check(f"wsync sparse {density} #{i}")
                    samples.append(ms)
                    parts.append({**part, "changed": sum(p.count for p in patches)})
                    mems.append(mem)
                    patches = None  # the next step's patches are built without these alive
            except Exception as exc:  # noqa: BLE001 - this density failed; the next one may not
                out[str(density)] = {"error": f"{type(exc).__name__}: {exc}", "tb": traceback.format_exc()}
                self.raw["errors"][f"wsync_sparse_{density}"] = out[str(density)]["error"]
                print(f"[{self.cfg['shape']}] sparse {density}: FAILED {type(exc).__name__}: {exc}", flush=True)
                continue
            out[str(density)] = {**_stats(samples, int(self.cfg["sparse_warmup"])), "parts": parts,
                                 "extra_mib": {k: max(m[k] for m in mems) for k in ("trainer", "engine")},
                                 "staging_capacity": self.staging.capacity, "verified_syncs": len(samples)}
        return out

    def _sparse_once(self, patches: list) -> dict:
        """One timed sparse sync in the flat IPC format (transfer/ipc_flat.py): write every patch into the
        staging buffer (one cat for the indices, one per dtype for the values; no planning, no host sync),
        (re-send the buffer if it grew), mark ready, one RPC (range check + one scatter per dtype)."""
        t0 = time.perf_counter()
        metas, nbytes, grew = self.staging.write_flat(patches, self.shapes)
        t1 = time.perf_counter()
        remap = self.rpc("wsync_ipc_map_staging", self.staging.export()) if grew else None
        self.exporter.mark_ready()
        t2 = time.perf_counter()
        eng = self.rpc("wsync_ipc_sparse_flat", self.staging.staging_id, [m.to_list() for m in metas])
        return {"format": "ipc_flat", "plan_ms": 0.0, "write_ms": (t1 - t0) * 1e3, "ready_ms": (t2 - t1) * 1e3,
                "rpc_ms": (time.perf_counter() - t2) * 1e3, "staged_bytes": nbytes, "grew": grew,
                "remap": remap, "engine": eng}

    def wsync_unmap(self) -> dict:
        before = torch.cuda.memory_allocated()
        eng = self.rpc("wsync_ipc_unmap")
        self.exporter.close()
        self.staging.close() if hasattr(self, "staging") else None
        torch.cuda.ipc_collect()
        return {"engine": eng, "trainer_freed_mib": (before - torch.cuda.memory_allocated()) / MIB}

    # ---- vLLM's own ipc backend ------------------------------------------------------------------
    def vllm_ipc(self, packed: bool) -> dict:
        from wsync.engines.vllm.trainer import vllm_ipc_send

        from .proto import mutate

        if not getattr(self, "_wt_init", False):
            self.llm.init_weight_transfer_engine({"init_info": {}})
            self._wt_init = True
        largest = max(m.nbytes for m in self.metas)
        size = max(1 << 30, -(-largest // (256 * MIB)) * 256 * MIB)
        sends: list[float] = []

        def one():
            self.llm.start_weight_update(is_checkpoint_format=True)
            sends.append(vllm_ipc_send(self.llm, self.weights.items(), packed=packed, buffer_bytes=size))
            self.llm.finish_weight_update()

        samples, mems = [], []
        for i in range(1 + int(self.cfg["warmup"]) + int(self.cfg["vllm_iters"])):
            if i:
                mutate(self.weights, 1e-4, self.gen)
            ms, _, mem = self._timed(one)
            self.check(f"vLLM ipc {'packed' if packed else 'unpacked'} #{i}")
            samples.append(ms)
            mems.append(mem)
        return {**_stats(samples, int(self.cfg["warmup"])), "send": _stats(sends, int(self.cfg["warmup"])),
                "buffer_bytes": size if packed else None, "verified_syncs": len(samples),
                "extra_mib": {k: max(m[k] for m in mems) for k in ("trainer", "engine")}}


def mutate_patches(weights: dict, density: float, gen: torch.Generator) -> list:
    """A trainer step at `density`: flip low mantissa bits of a Bernoulli(density) subset of every tensor
    in place (every chosen element changes, stays finite) and return the patches (ascending int32 indices,
    new values). As bench.proto.mutate, plus the patches, so no snapshot of the weights is needed."""
    from wsync.transfer.encodings import SparsePatch

    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32}
    out = []
    with torch.no_grad():
        for name, t in weights.items():
            flat = t.view(-1)
            idx = (torch.rand(flat.numel(), generator=gen, device=t.device) < density).nonzero().view(-1)
            if idx.numel():
                view = flat.view(ints[t.element_size()])
                flips = torch.randint(1, 128, (idx.numel(),), generator=gen, device=t.device).to(view.dtype)
                view[idx] = view[idx] ^ flips
            out.append(SparsePatch(name, idx.to(torch.int32), flat[idx].clone()))
    return out


def write_config_folder(shape, dest: Path) -> Path:
    """config.json (bench.shapes.hf_config) + the tiny model's tokenizer files; no weights (dummy load)."""
    from wsync.models.tiny import ensure_default_model

    from .shapes import hf_config

    tiny = Path(ensure_default_model())
    dest.mkdir(parents=True, exist_ok=True)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        if (tiny / f).exists():
            shutil.copy(tiny / f, dest / f)
    (dest / "config.json").write_text(json.dumps(hf_config(shape, tiny), indent=2, sort_keys=True) + "\n")
    return dest


def main(cfg_path: str) -> int:
    _setup_env()
    cfg = json.loads(Path(cfg_path).read_text())
    run = Run(cfg)
    run.raw["started"] = time.time()
    ok = (run.section("setup", run.setup, 0) and run.section("floor", run.floor)
          and run.section("engine", run.engine, 60))
    if ok:
        if run.section("wsync_dense", run.wsync_dense):
            run.section("wsync_sparse", run.wsync_sparse)
            run.section("wsync_unmap", run.wsync_unmap, 5)
        run.section("vllm_unpacked", lambda: run.vllm_ipc(False))
        run.section("vllm_packed", lambda: run.vllm_ipc(True))
    run.raw["finished"] = time.time()
    run.save()
    if run.llm is not None:  # best effort, bounded: the driver kills the process group anyway
        import threading

        core = getattr(getattr(run.llm, "llm_engine", None), "engine_core", None)
        stopper = threading.Thread(target=getattr(core, "shutdown", lambda: None), daemon=True)
        stopper.start()
        stopper.join(timeout=20)
    print(f"[{cfg['shape']}] done; errors: {sorted(run.raw['errors'])}", flush=True)
    sys.stdout.flush()
    os._exit(0)  # no engine teardown: nothing is measured after it, and the process exit frees the GPU


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
