"""Issue 10's one-GPU benchmark: trainer and vLLM engine colocated on ONE GPU, synced through CUDA IPC.

    python -m bench.colo_bench --out DIR [--shape qwen2.5-0.5b,qwen2.5-7b] [--max-minutes 9.25]
    python -m bench.colo_bench --cpu-smoke DIR      # no CUDA, no vLLM: the JSON assembly on synthetic raws

Each shape runs in its own process (bench/colo_run.py: trainer in that process, vLLM's engine core in
its own), with a deadline from --max-minutes; a shape that runs out of time keeps what it finished. Writes
DIR/h200x1.json with exactly issue 10's keys per shape:
  d2d_floor_ms               median torch._foreach_copy_ of every parameter into one flat buffer
  vllm_ipc_ms                best steady (median after warm-up) end to end of vLLM's ipc backend,
                             unpacked or packed (start_weight_update -> trainer_send_weights -> finish)
  vllm_ipc_first_ms          the smaller of the two modes' first syncs
  wsync_colo_dense_ms        median steady wsync dense sync (mark_ready + one RPC of planned copies)
  wsync_colo_dense_first_ms  first wsync dense sync: export + map + plan + copy
  wsync_colo_sparse_ms       {"0.001": ..., "0.01": ..., "0.03": ..., "0.1": ...}: plan + encode into the
                             staging buffer + one RPC (GPU decode + scatter), median steady
  extra_gpu_mem_mib          extra GPU memory of a wsync dense sync: trainer + engine peak allocation
                             above what they held before it (max over the syncs)
(null where a section failed or ran out of time; the reason is in DIR/h200x1-raw.json), plus
DIR/h200x1-raw.json (every sample, part timings, memory, errors) and DIR/h200x1-<shape>.log.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHAPES = ("qwen2.5-0.5b", "qwen2.5-7b")
DENSITIES = ("0.001", "0.01", "0.03", "0.1")
KEYS = ("d2d_floor_ms", "vllm_ipc_ms", "vllm_ipc_first_ms", "wsync_colo_dense_ms", "wsync_colo_dense_first_ms",
        "wsync_colo_sparse_ms", "extra_gpu_mem_mib")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "bench" / "results"))
    p.add_argument("--shape", default=",".join(SHAPES))
    p.add_argument("--densities", default=",".join(DENSITIES))
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--sparse-warmup", type=int, default=1)
    p.add_argument("--sparse-iters", type=int, default=3)
    p.add_argument("--vllm-iters", type=int, default=3)
    p.add_argument("--bucket-mb", type=int, default=512, help="trainer's flat bucket size")
    p.add_argument("--gpu-util", type=float, default=0.3, help="vLLM gpu_memory_utilization")
    p.add_argument("--model-dir", default="/tmp/wsync-colo-models")
    p.add_argument("--max-minutes", type=float, default=9.25)
    p.add_argument("--name", default="h200x1")
    p.add_argument("--cpu-smoke", metavar="DIR", help="assemble synthetic raws into DIR (no CUDA, no vLLM)")
    return p.parse_args(argv)


# ---- assembly (pure) ----------------------------------------------------------------------------------
def _get(d: dict, *path):
    for k in path:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def shape_result(raw: dict) -> dict:
    """Issue 10's keys of one shape from its raw sections (None where a section is missing)."""
    s = raw.get("sections", {})
    steady = [x for x in (_get(s, "vllm_unpacked", "median"), _get(s, "vllm_packed", "median")) if x is not None]
    firsts = [x for x in (_get(s, "vllm_unpacked", "first"), _get(s, "vllm_packed", "first")) if x is not None]
    extra = _get(s, "wsync_dense", "extra_mib")
    return {
        "d2d_floor_ms": _get(s, "floor", "median"),
        "vllm_ipc_ms": min(steady) if steady else None,
        "vllm_ipc_first_ms": min(firsts) if firsts else None,
        "wsync_colo_dense_ms": _get(s, "wsync_dense", "median"),
        "wsync_colo_dense_first_ms": _get(s, "wsync_dense", "first"),
        "wsync_colo_sparse_ms": {d: _get(s, "wsync_sparse", d, "median") for d in DENSITIES},
        "extra_gpu_mem_mib": max(0.0, extra["trainer"]) + max(0.0, extra["engine"]) if extra else None,
    }


def assemble(raws: dict[str, dict], gpus: str, date: str) -> dict:
    return {"gpus": gpus, "date": date, "shapes": {name: shape_result(raw) for name, raw in raws.items()}}


def gpus_of(raws: dict[str, dict]) -> str:
    names = {_get(r, "sections", "setup", "device") for r in raws.values()} - {None}
    return f"1x {min(names)}" if names else "1x unknown GPU"


def summary_lines(result: dict, raws: dict[str, dict]) -> list[str]:
    lines = []
    for name, r in result["shapes"].items():
        fmt = {k: (f"{v:.2f}" if isinstance(v, float) else v) for k, v in r.items() if k != "wsync_colo_sparse_ms"}
        sp = {d: (round(v, 2) if isinstance(v, float) else v) for d, v in r["wsync_colo_sparse_ms"].items()}
        errs = sorted(raws.get(name, {}).get("errors", {}))
        lines.append(f"{name}: {fmt} sparse={sp} errors={errs}")
    return lines


# ---- driver --------------------------------------------------------------------------------------------
def _run_shape(args: argparse.Namespace, shape: str, deadline: float, out: Path) -> dict:
    raw_path, log_path = out / f"{args.name}-{shape}.raw.json", out / f"{args.name}-{shape}.log"
    cfg = {"shape": shape, "deadline": deadline, "raw_out": str(raw_path), "warmup": args.warmup,
           "iters": args.iters, "sparse_warmup": args.sparse_warmup, "sparse_iters": args.sparse_iters,
           "vllm_iters": args.vllm_iters, "bucket_mb": args.bucket_mb, "gpu_util": args.gpu_util,
           "model_dir": args.model_dir, "densities": [float(d) for d in args.densities.split(",")]}
    cfg_path = out / f"{args.name}-{shape}.cfg.json"
    cfg_path.write_text(json.dumps(cfg, indent=1))
    raw_path.unlink(missing_ok=True)
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "bench.colo_run", str(cfg_path)], cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)

        def pump() -> None:
            for line in proc.stdout:
                log.write(line)
                log.flush()
                if line.startswith("[") or "Error" in line[:200]:
                    print(line, end="", flush=True)

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:  # the child watches the deadline itself; this is the backstop
            proc.wait(timeout=max(1.0, deadline + 45 - time.time()))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the shape's own process group (its engine core too)
            proc.wait(timeout=30)
            log.write("\n[driver] killed at the deadline\n")
        reader.join(timeout=10)
        try:  # leftovers of the shape's process group (e.g. an engine core that outlived its parent)
            os.killpg(proc.pid, signal.SIGKILL)
            time.sleep(3)  # let the driver release the GPU memory before the next shape starts
        except ProcessLookupError:
            pass
    raw = json.loads(raw_path.read_text()) if raw_path.exists() else {"sections": {}, "errors": {}}
    raw.setdefault("errors", {})
    if proc.returncode not in (0, None):
        raw["errors"]["process"] = f"exit code {proc.returncode}; see {log_path.name}"
    return raw


def write(out: Path, name: str, result: dict, raws: dict) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{name}-raw.json").write_text(json.dumps(raws, indent=1, default=str) + "\n")
    return path


def smoke_raws() -> dict[str, dict]:
    """Synthetic raw sections shaped as colo_run writes them (numbers mean nothing)."""
    def sec(median, first):
        return {"median": median, "first": first, "samples": [first, median]}

    raws = {}
    for i, shape in enumerate(SHAPES):
        k = 1.0 + 9 * i
        raws[shape] = {"sections": {
            "setup": {"device": "CPU smoke (not a GPU)"}, "floor": sec(1.0 * k, 1.5 * k),
            "wsync_dense": {**sec(2.0 * k, 20.0 * k), "extra_mib": {"trainer": 0.0, "engine": 0.5}},
            "wsync_sparse": {d: sec(float(d) * 10 * k, float(d) * 20 * k) for d in DENSITIES},
            "vllm_unpacked": sec(150.0 * k, 200.0 * k), "vllm_packed": sec(110.0 * k, 120.0 * k)},
            "errors": {}}
    del raws[SHAPES[1]]["sections"]["vllm_packed"]  # as when a mode fails: the other one stands
    raws[SHAPES[1]]["errors"]["vllm_packed"] = "ValueError: smoke"
    return raws


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    date = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d")
    if args.cpu_smoke:
        raws = smoke_raws()
        result = assemble(raws, gpus_of(raws), date)
        path = write(Path(args.cpu_smoke), args.name + "-smoke", result, raws)
        print("\n".join(summary_lines(result, raws)) + f"\nwrote {path}")
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    end = t0 + args.max_minutes * 60
    shapes = [s for s in args.shape.split(",") if s]
    raws: dict[str, dict] = {}
    for i, shape in enumerate(shapes):
        left = end - time.time()
        share = left if i == len(shapes) - 1 else min(left * 0.42, 300.0)
        raws[shape] = _run_shape(args, shape, time.time() + share - 50, out)
        write(out, args.name, assemble(raws, gpus_of(raws), date), raws)
    result = assemble(raws, gpus_of(raws), date)
    path = write(out, args.name, result, raws)
    print(f"wrote {path} in {time.time() - t0:.0f} s")
    print("SUMMARY\n" + "\n".join(summary_lines(result, raws)))
    failed = any(r.get("errors") for r in raws.values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
