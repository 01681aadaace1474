"""vLLM phase: one vLLM 0.24 engine (in the receiver process, "uni" executor, in-process engine core)
built from a generated random-weight HF folder. Measured: wsync dense straight into its runtime
parameters (WsyncWorkerExtension.wsync_build_param_map + wsync_recv_dense_direct), vLLM's own dense
(unpacked, packed; checkpoint format through model.load_weights), vLLM's sparse (Gen A sparse_flat,
runtime coordinates) and wsync sparse straight into runtime slices (wsync_recv_sparse_direct).

Checks never trust the engine's map: the sender rebuilds vLLM's runtime tensors from its own weights
with the bench's independent layout (q/k/v and gate/up concatenated along dim 0) and compares exact
fingerprints with what the worker reports for its runtime parameters."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import torch

from wsync.engines.contract import DenseUpdate, SparseUpdate
from wsync.transfer.dense import send_dense
from wsync.transfer.group import Rendezvous, open_group
from wsync.transfer.meta import TensorMeta, dtype_name
from wsync.transfer.sparse import SparseMeta

from .core import Ctx, dense_variant, init_sender, sparse_variant, summary
from .proto import CheckError, Clock, PeerError, check_equal, fingerprints, mutate
from .shapes import (
    fused_tensors,
    get_shape,
    runtime_layout,
    runtime_patches,
    runtime_shapes,
    write_hf_folder,
)


def _va(ctx: Ctx):
    """vLLM's trainer-side helpers: wsync.engines.vllm, or the CPU test double (--fake-vllm)."""
    if ctx.cfg.get("fake_vllm"):
        from tests.fakes import fake_vllm

        return fake_vllm
    from wsync.engines import vllm as va

    return va


def fused_fp(ctx: Ctx) -> dict:
    return fingerprints(list(fused_tensors(ctx.weights, ctx.extra["layout"])))


# ---- sender sections ----------------------------------------------------------------------------
def setup_vllm(ctx: Ctx) -> dict:
    va = _va(ctx)
    api = va.detect_generation()
    if not api.installed:
        raise RuntimeError(f"vLLM not importable: {'; '.join(api.notes)}")
    shape = init_sender(ctx, weights_seed=2, mutate_seed=11)
    ctx.extra["layout"] = layout = runtime_layout(ctx.metas, shape.tied)
    ctx.extra["rt_shapes"] = runtime_shapes(layout, ctx.metas)
    ctx.extra["api"] = api
    t0 = time.perf_counter()
    started = ctx.peer.call("vllm_start", gpu_util=ctx.cfg["gpu_util"])
    start_s = time.perf_counter() - t0
    ctrl, data, vport = ctx.rdv("ctrl"), ctx.rdv("data"), ctx.rdv("vllm").port
    ctx.start("vllm_groups", ctrl=ctrl.to_dict(), data=data.to_dict(), vport=vport,
              hf_metas=[m.to_dict() for m in ctx.metas])
    ctx.group = open_group(ctrl, 0, ctx.device, ctx.cfg["group_timeout_s"])
    ctx.group.barrier()
    ctx.extra["tgroup"] = va.trainer_open_group(api, "127.0.0.1", vport, 2)
    ctx.data = open_group(data, 0, ctx.device, ctx.cfg["group_timeout_s"])
    ctx.data.barrier()  # the worker's wsync_open_sync_group meets us here
    rx = ctx.finish()
    engine = {m["name"]: [int(d) for d in m["shape"]] for m in rx["runtime_metas"]}
    if engine != ctx.extra["rt_shapes"]:
        diff = [k for k in set(engine) | set(ctx.extra["rt_shapes"]) if engine.get(k) != ctx.extra["rt_shapes"].get(k)]
        raise RuntimeError(f"vLLM's runtime parameters differ from the bench's layout, e.g. {sorted(diff)[:4]}")
    return {"vllm_version": api.version, "generation": api.generation, "engine_start_s": start_s,
            "receiver": started, "runtime_params": len(engine)}


def wsync_vllm_dense(ctx: Ctx) -> dict:
    bucket, layout = ctx.cfg["bucket_bytes"], ctx.extra["layout"]
    built = ctx.peer.call("vllm_build_map", bucket=bucket)
    want = {name: [rt, first, rows] for rt, parts in layout.items() for name, first, rows in parts}
    if built["slices"] != want:
        bad = [n for n in want if built["slices"].get(n) != want[n]][:3]
        raise RuntimeError(f"the engine's param map differs from the bench's layout, e.g. {bad}")
    items = list(ctx.weights.items())

    def send() -> dict:
        st = send_dense(ctx.data, items, bucket)
        return {"send_ms": st.ms, "wire_bytes": st.wire_bytes, "messages": st.messages}

    out = dense_variant(ctx, "wsync dense -> vLLM", "vllm_wsync_dense", send, lambda: fused_fp(ctx), "vllm")
    out["map_build_ms"] = built["rpc_ms"]
    out["first_with_map_ms"] = out["first"]["ms"] + built["rpc_ms"]
    out["map"] = {k: built[k] for k in ("tensors", "runtime_params", "skipped", "padded_rows", "ms")}
    out["bucket_bytes"] = bucket
    return out


def _vllm_dense(ctx: Ctx, packed: bool) -> dict:
    va, api, tgroup = _va(ctx), ctx.extra["api"], ctx.extra["tgroup"]
    items = list(ctx.weights.items())

    def send() -> dict:
        return {"send_ms": va.trainer_send_dense(api, tgroup, items, packed=packed)}

    kind = "packed" if packed else "unpacked"
    return dense_variant(ctx, f"vLLM dense {kind}", f"vllm_native_dense_{kind}", send, lambda: fused_fp(ctx), "vllm")


def vllm_dense_unpacked(ctx: Ctx) -> dict:
    return _vllm_dense(ctx, False)


def vllm_dense_packed(ctx: Ctx) -> dict:
    return _vllm_dense(ctx, True)


def native_sparse_step(ctx: Ctx, density: float) -> dict:
    """vLLM's sparse path on the same real delta: runtime-coordinate flat_int32 patches, vLLM's trainer
    helper on the wire, start/update/finish_weight_update on the engine."""
    va, layout, shapes = _va(ctx), ctx.extra["layout"], ctx.extra["rt_shapes"]
    mutate(ctx.weights, density, ctx.gen)
    clock = Clock(ctx.device).start()
    patches = ctx.snap.diff("vllm", ctx.weights)
    diff_ms = clock.stop()
    rpatches = runtime_patches(patches, layout, shapes)
    metas = [{"name": p.name, "dtype": dtype_name(p.values.dtype), "shape": shapes[p.name], "count": p.count,
              "encoding": "flat_int32", "nbytes": p.count * (4 + p.values.element_size())} for p in rpatches]
    ctx.start("vllm_native_sparse")
    ctx.group.barrier()
    e2e = Clock(ctx.device).start()
    ctx.peer.send("data", metas)
    ctx.peer.recv("data")
    clock = Clock(ctx.device).start()
    va.trainer_send_sparse(ctx.extra["api"], ctx.extra["tgroup"], rpatches)
    send_ms = clock.stop()
    ctx.group.barrier()
    ms = e2e.stop()
    got = ctx.finish()
    check_equal(f"vLLM sparse d={density}", fused_fp(ctx), got.pop("fp"))
    ctx.verified += 1
    ctx.snap.update("vllm", patches)
    count = sum(p.count for p in rpatches)
    wire = sum(p.count * (4 + p.values.element_size()) for p in rpatches)
    return {"ms": ms, "send_ms": send_ms, "diff_ms": diff_ms, "changed": count, "wire_bytes": wire,
            "messages": 2 * len(rpatches), "wire_bytes_per_changed_elem": wire / count if count else 0.0,
            "recv_ms": got.get("recv_ms", 0.0)}


def vllm_sparse(ctx: Ctx) -> dict:
    # vLLM's dense reload ran since the map was built: rebuild it (cheap) rather than trust that every
    # runtime Parameter object survived (the worker refuses a stale map, but only after the sender
    # started sending, which would leave the pair mid-sync).
    try:
        out: dict[str, Any] = {"map_rebuild_ms": ctx.peer.call("vllm_build_map", bucket=ctx.cfg["bucket_bytes"])["ms"]}
    except PeerError as exc:
        out = {"map_rebuild_error": str(exc).strip().splitlines()[-1]}
    for d in ctx.cfg["densities"]:
        out[str(d)] = {}
        for variant in ("vllm", "wsync_auto"):
            if variant == "wsync_auto" and "map_rebuild_error" in out:
                out[str(d)][variant] = {"error": "no param map: " + out["map_rebuild_error"]}
                continue
            try:
                if variant == "vllm":
                    res = summary(ctx, [native_sparse_step(ctx, d) for _ in range(ctx.n)])
                else:
                    res = sparse_variant(ctx, "vllm", d, "auto", "vllm_wsync_sparse", lambda: fused_fp(ctx))
            except CheckError:
                raise
            except Exception as exc:  # noqa: BLE001 - recorded, the run goes on while the pair is in step
                res = {"error": f"{type(exc).__name__}: {exc}"}
                if ctx.in_step:
                    out[str(d)][variant] = res
                    raise
            out[str(d)][variant] = res
    return out


def close_vllm(ctx: Ctx) -> dict:
    """The last section of the phase: both processes then leave with os._exit (roles.py), which frees
    the GPUs at once. Teardown (engine shutdown, closing the NCCL groups one side at a time) is skipped:
    it ran into the section timeout in every GPU run (90 s, then 30 s with only the worker's wsync group
    closed), and nothing is measured after it."""
    ctx.extra.pop("tgroup", None)
    ctx.peer.call("vllm_close")
    ctx.extra["hard_exit"] = True
    return {}


VLLM_SENDER_SECTIONS = {"setup_vllm": setup_vllm, "wsync_vllm_dense": wsync_vllm_dense,
                        "vllm_dense_unpacked": vllm_dense_unpacked, "vllm_dense_packed": vllm_dense_packed,
                        "vllm_sparse": vllm_sparse, "close_vllm": close_vllm}


# ---- receiver handlers --------------------------------------------------------------------------
def rx_vllm_start(rx: Ctx, gpu_util: float) -> dict:
    from wsync.engines.vllm.engine import VLLMEngineCore

    shape = get_shape(rx.cfg["shape"])
    t0 = time.perf_counter()
    folder = write_hf_folder(shape, Path(rx.cfg["model_dir"]) / f"wsync-bench-{shape.name}", rx.device)
    if rx.device.type == "cuda":
        torch.cuda.empty_cache()  # the generated weights' blocks: vLLM sizes itself from free memory
    t1 = time.perf_counter()
    if rx.cfg.get("fake_vllm"):
        from tests.fakes.fake_vllm import FakeEngine

        engine = FakeEngine(shape)
    else:
        # native: the bench drives the direct path's worker methods itself, on its own groups
        options = {"gpu_memory_utilization": float(gpu_util), "sync_route": "native"}
        engine = VLLMEngineCore(str(folder), "cuda", options)
    rx.extra["engine"] = engine
    return {"folder_s": t1 - t0, "start_s": time.perf_counter() - t1, "ready": dataclasses.asdict(engine.ready())}


def rx_vllm_groups(rx: Ctx, ctrl: dict, data: dict, vport: int, hf_metas: list) -> dict:
    engine = rx.extra["engine"]
    rx.extra["hf_metas"] = hf_metas
    rx.ready()
    rx.group = open_group(Rendezvous.from_dict(ctrl), 1, rx.device, rx.cfg["group_timeout_s"])
    rx.group.barrier()
    engine.join_group({"host": "127.0.0.1", "port": vport, "world_size": 2, "backend": "nccl"}, 1, "vllm_native")
    engine.llm.collective_rpc("wsync_open_sync_group", args=(data, 1, float(rx.cfg["group_timeout_s"])))
    return {"runtime_metas": [m.to_dict() for m in engine.param_metas()]}


def rx_vllm_build_map(rx: Ctx, bucket: int) -> dict:
    t0 = time.perf_counter()
    built = rx.extra["engine"].llm.collective_rpc("wsync_build_param_map", args=(rx.extra["hf_metas"], bucket))[0]
    return {**built, "rpc_ms": (time.perf_counter() - t0) * 1e3}


def _timed_engine_step(rx: Ctx, fn) -> dict:
    """ready, barrier, fn() (receive + apply), barrier; then the engine's runtime fingerprints."""
    engine = rx.extra["engine"]
    rx.ready()
    rx.group.barrier()
    clock = Clock(rx.device).start()
    parts = fn(engine) or {}
    parts = dataclasses.asdict(parts) if dataclasses.is_dataclass(parts) else parts
    recv_ms = clock.stop()
    rx.group.barrier()
    return {**{f"rx_{k}": v for k, v in parts.items() if isinstance(v, (int, float))},
            "recv_ms": recv_ms, "fp": engine.fingerprint()}


def rx_vllm_wsync_dense(rx: Ctx) -> dict:
    def fn(engine) -> dict:
        got = engine.llm.collective_rpc("wsync_recv_dense_direct")[0]
        engine.llm.reset_prefix_cache()
        return got

    return _timed_engine_step(rx, fn)


def rx_vllm_native_dense(rx: Ctx, packed: bool) -> dict:
    update = DenseUpdate([TensorMeta.from_dict(m) for m in rx.extra["hf_metas"]], int(rx.cfg["bucket_bytes"]), packed)
    return _timed_engine_step(rx, lambda engine: engine.recv_dense(update))


def _metas_from_sender(rx: Ctx) -> list:
    metas = rx.peer.recv("data")
    rx.peer.send("data", "got")
    return metas


def rx_vllm_native_sparse(rx: Ctx) -> dict:
    def fn(engine):
        return engine.recv_sparse(SparseUpdate([SparseMeta.from_dict(m) for m in _metas_from_sender(rx)]))

    return _timed_engine_step(rx, fn)


def rx_vllm_wsync_sparse(rx: Ctx) -> dict:
    def fn(engine) -> dict:
        """Post the receives, then tell the sender to go (its send time is then the wire's), then finish."""
        posted = engine.llm.collective_rpc("wsync_post_sparse_direct", args=(rx.peer.recv("data"),))[0]
        rx.peer.send("data", "got")
        done = engine.llm.collective_rpc("wsync_finish_sparse_direct")[0]
        engine.llm.reset_prefix_cache()
        return {**posted, **done}

    return _timed_engine_step(rx, fn)


def rx_vllm_close(rx: Ctx) -> dict:
    rx.extra["hard_exit"] = True  # no engine.shutdown() and no group close: see close_vllm
    return {}


VLLM_RECEIVER_HANDLERS = {
    "vllm_start": rx_vllm_start, "vllm_groups": rx_vllm_groups, "vllm_build_map": rx_vllm_build_map,
    "vllm_wsync_dense": rx_vllm_wsync_dense,
    "vllm_native_dense_unpacked": lambda rx: rx_vllm_native_dense(rx, False),
    "vllm_native_dense_packed": lambda rx: rx_vllm_native_dense(rx, True),
    "vllm_native_sparse": rx_vllm_native_sparse, "vllm_wsync_sparse": rx_vllm_wsync_sparse,
    "vllm_close": rx_vllm_close,
}
