"""CUDA IPC on ONE GPU, two real processes (torch.multiprocessing spawn): the trainer (this process)
exports its flat buckets and a sparse staging buffer as plain data; the engine process maps them, copies
dense syncs and decodes + scatters sparse ones; fingerprints must match after every sync. Also: a stale
export is refused, a handle from another GPU is refused, and the trainer's memory is released once the
engine closes its mapping (torch.cuda.memory_allocated before/after). Writes ipc-one-gpu.json under
$OUT (or $WSYNC_GPU_REPORT_DIR) and prints a summary last.

Run on the GPU machine: python -m pytest tests/gpu/test_ipc_one_gpu.py -m gpu1 -v -s -o addopts=""
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import traceback
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu1, pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 1,
                                                   reason="needs one CUDA GPU")]
MIB = 1 << 20
TIMEOUT_S = 120


def _handle(state: dict, cmd: str, args) -> dict:
    """One command of the engine process. Runs in its own frame, so no view of the trainer's memory
    outlives it except what the mapping itself keeps (a lingering view would keep the trainer's memory)."""
    from wsync.transfer.apply import apply_patches
    from wsync.transfer.encodings import SparseMeta
    from wsync.transfer.fingerprint import fingerprint
    from wsync.transfer.ipc import IpcExport
    from wsync.transfer.ipc_sparse import in_range

    mapping, staging, targets = state["mapping"], state["staging"], state["targets"]
    t0 = time.perf_counter()
    if cmd == "map":
        exp = IpcExport.from_dict(args)
        if not targets:
            targets.update({e.name: torch.zeros(e.shape, dtype=getattr(torch, e.dtype), device="cuda")
                            for e in exp.layout})
        before = torch.cuda.memory_allocated()
        remapped = mapping.ensure(exp)
        plan = mapping.plan(targets)
        mapping.copy(exp.export_id, plan)
        torch.cuda.synchronize()
        return {"ms": (time.perf_counter() - t0) * 1e3, "remapped": remapped, "copies": plan.copies,
                "alloc_delta": torch.cuda.memory_allocated() - before, "fp": fingerprint(targets)}
    if cmd == "dense":
        mapping.check(args)
        mapping.copy(args, mapping.plan(targets))
        torch.cuda.synchronize()
        return {"ms": (time.perf_counter() - t0) * 1e3, "fp": fingerprint(targets)}
    if cmd == "staging":
        return {"remapped": staging.ensure(args)}
    if cmd == "sparse":
        staging_id, metas = args
        metas = [SparseMeta.from_dict(m) for m in metas]
        patches = [p for p in staging.patches(staging_id, metas) if p.count]
        assert in_range(patches, [targets[p.name].numel() for p in patches])
        apply_patches(targets, patches)
        torch.cuda.synchronize()
        return {"ms": (time.perf_counter() - t0) * 1e3, "fp": fingerprint(targets)}
    if cmd == "close":
        before = torch.cuda.memory_allocated()
        mapping.close()
        staging.close()
        return {"alloc_before": before, "alloc_after": torch.cuda.memory_allocated()}
    raise ValueError(cmd)


def _consumer(conn) -> None:
    """The engine process: plain-data commands in, plain-data results out."""
    from wsync.transfer.ipc import IpcMapping
    from wsync.transfer.ipc_sparse import StagingMapping

    torch.cuda.set_device(0)
    state = {"mapping": IpcMapping(torch.device("cuda", 0)), "staging": StagingMapping(0), "targets": {}}
    while True:
        cmd, args = conn.recv()
        if cmd == "exit":
            conn.send(("ok", None))
            return
        try:
            conn.send(("ok", _handle(state, cmd, args)))
        except Exception as exc:  # noqa: BLE001 - reported to the trainer
            conn.send(("error", {"type": type(exc).__name__, "msg": str(exc), "tb": traceback.format_exc()}))


class Engine:
    def __init__(self) -> None:
        ctx = torch.multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_consumer, args=(child,), daemon=True)
        self.proc.start()

    def call(self, cmd: str, args=None, expect_error: str | None = None):
        self.conn.send((cmd, args))
        if not self.conn.poll(TIMEOUT_S):
            raise TimeoutError(f"engine process: no answer to {cmd} in {TIMEOUT_S} s")
        status, out = self.conn.recv()
        if expect_error:
            assert status == "error" and out["type"] == expect_error, out
            return out
        assert status == "ok", out.get("tb") if isinstance(out, dict) else out
        return out

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.call("exit")
        self.proc.join(10)
        if self.proc.is_alive():
            self.proc.kill()


def _model(device) -> dict[str, torch.Tensor]:
    g = torch.Generator(device=device).manual_seed(0)
    shapes = {"embed": [8192, 512], **{f"l{i}.{k}": s for i in range(4) for k, s in
                                         (("q", [512, 512]), ("kv", [256, 512]), ("bias", [512]),
                                          ("up", [2048, 512]), ("down", [512, 2048]), ("norm", [512]))}}
    return {n: torch.randn(s, generator=g, device=device).to(torch.bfloat16) for n, s in shapes.items()}


def _patches(params, density: float, seed: int):
    from wsync.transfer.encodings import SparsePatch

    g = torch.Generator(device="cuda").manual_seed(seed)
    out = []
    for name, t in params.items():
        flat = t.view(-1)
        idx = (torch.rand(flat.numel(), generator=g, device="cuda") < density).nonzero().view(-1)
        flat[idx] = (flat[idx].float() + 0.25).to(t.dtype)
        out.append(SparsePatch(name, idx.to(torch.int32), flat[idx].clone()))
    return out


def _report(name: str, data: dict) -> None:
    out = os.environ.get("OUT") or os.environ.get("WSYNC_GPU_REPORT_DIR")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / name).write_text(json.dumps(data, indent=2, default=str) + "\n")
    print(f"SUMMARY {name}: " + json.dumps({k: v for k, v in data.items() if k != "steps"}, default=str))


@pytest.mark.parametrize("use_event", [False, True])
def test_ipc_one_gpu_dense_sparse_stale_foreign_and_release(use_event):
    from wsync.transfer.fingerprint import fingerprint
    from wsync.transfer.flat import flatten_params
    from wsync.transfer.ipc import IpcExporter
    from wsync.transfer.ipc_sparse import IpcStaging
    from wsync.transfer.meta import param_metas
    from wsync.transfer.sparse import plan_sparse

    torch.cuda.set_device(0)
    dev = torch.device("cuda", 0)
    torch.cuda.synchronize()
    mem0 = torch.cuda.memory_allocated()
    report: dict = {"use_event": use_event, "mem0": mem0, "steps": {}}
    engine = Engine()
    try:
        params = _model(dev)
        flatten_params(params, 16 * MIB)
        exporter = IpcExporter(params, use_event=use_event)
        exp = exporter.current()
        exporter.mark_ready()
        nbytes = sum(exp.sizes)
        got = engine.call("map", exp.to_dict(binary="base64"))  # JSON-able form, decoded on the other side
        assert got["fp"] == fingerprint(params) and got["remapped"]
        assert got["alloc_delta"] < MIB, "mapping must not allocate in the engine process"
        report["steps"]["first"] = {k: got[k] for k in ("ms", "copies", "alloc_delta")}
        for i in range(3):
            torch._foreach_mul_(list(params.values()), 1.5)  # no loop variable left holding a bucket
            exporter.mark_ready()
            got = engine.call("dense", exporter.current().export_id)
            assert got["fp"] == fingerprint(params)
            report["steps"][f"dense{i}"] = got["ms"]
        staging = IpcStaging(dev)
        specs = {m.name: m for m in param_metas(params.items())}
        for density in (0.001, 0.01, 0.1):
            patches = _patches(params, density, seed=int(density * 1e4))
            metas = plan_sparse(patches, specs, "auto", params)
            _, grew = staging.write(metas, patches, params)
            if grew:
                engine.call("staging", staging.export())
            exporter.mark_ready()
            torch.cuda.current_stream().synchronize()
            got = engine.call("sparse", (staging.staging_id, [m.to_dict() for m in metas]))
            assert got["fp"] == fingerprint(params)
            report["steps"][f"sparse{density}"] = {"ms": got["ms"], "grew": grew, "capacity": staging.capacity}
        # a trainer that re-laid out its buckets: the old export is refused, the new one maps
        flatten_params(params, 64 * MIB)
        new = exporter.current()
        assert new.export_id != exp.export_id
        exporter.mark_ready()
        engine.call("dense", new.export_id, expect_error="IpcStaleLayoutError")
        got = engine.call("map", new.to_dict())
        assert got["remapped"] and got["fp"] == fingerprint(params)
        # a handle naming another GPU
        foreign = new.to_dict()
        foreign["uuid"] = "GPU-00000000-0000-0000-0000-000000000000"
        foreign["export_id"] = ""  # a consistent export of another GPU (the id hashes the uuid)
        err = engine.call("map", foreign, expect_error="IpcDeviceError")
        report["foreign_error"] = err["msg"]
        # release: the trainer drops its buffers while the engine still maps them, then the engine closes
        del params, patches, exp, new, foreign
        exporter.close()
        staging.close()
        torch.cuda.synchronize()
        report["mem_while_engine_maps"] = torch.cuda.memory_allocated() - mem0
        closed = engine.call("close")
        report["engine_close"] = closed
        deadline = time.time() + 10
        while time.time() < deadline:
            torch.cuda.ipc_collect()
            if torch.cuda.memory_allocated() <= mem0 + MIB:
                break
            time.sleep(0.1)
        report["mem_after_close"] = torch.cuda.memory_allocated() - mem0
        report["shared_bytes"] = nbytes
        assert report["mem_after_close"] <= MIB, report
    finally:
        engine.stop()
        _report(f"ipc-one-gpu-{'event' if use_event else 'sync'}.json", report)
