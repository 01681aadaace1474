"""wsync sync benchmark: NCCL floor, wsync dense/sparse (reference engine and vLLM engine), vLLM 0.24's own
dense (unpacked, packed) and sparse paths, on random weights of a Qwen2-family shape.

    python bench/sync_bench.py --device cuda --shape qwen2.5-0.5b,qwen2.5-3b --max-minutes 8 \
        --out bench/results/h100x2.json
    python bench/sync_bench.py --device cpu --shape tiny --skip-vllm --out bench/results/cpu.json

Two processes per phase (sender = rank 0 on GPU0, receiver = rank 1 on GPU1; gloo on CPU), driven
from here; a section that fails records {"error": ...} and the run goes on; a section that hangs or
kills its processes is cut off (its phase's remaining sections are recorded as skipped). After every
sync the receiver's weights must equal the sender's exactly (fingerprints), else exit code 1.
Exit 2: some section failed (the JSON says which). Definitions: docs/BENCHMARKS.md."""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import multiprocessing as mp
import os
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench` importable (children inherit sys.path)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
if importlib.util.find_spec("wsync") is None:  # a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "service"))

from bench.assemble import assemble, table_lines  # noqa: E402
from bench.shapes import get_shape, hf_metas, total_bytes  # noqa: E402

CORE = ["setup_core", "nccl_floor", "ref_dense", "ref_sparse"]
VLLM = ["setup_vllm", "wsync_vllm_dense", "vllm_dense_unpacked", "vllm_dense_packed", "vllm_sparse", "close_vllm"]
SECTION_TIMEOUT_S = {"setup_vllm": 600.0, "close_vllm": 30.0}
DEFAULT_TIMEOUT_S = 300.0
DENSITIES = "0.001,0.01,0.03,0.1,0.3"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda")
    p.add_argument("--shape", default="qwen2.5-0.5b", help="comma list; the first gives the top-level keys")
    p.add_argument("--iters", type=int, default=10, help="steady-state samples (median) per variant")
    p.add_argument("--warmup", type=int, default=2, help="syncs after the first, before the measured ones")
    p.add_argument("--densities", default=DENSITIES)
    p.add_argument("--encodings", default="flat_int32,auto", help="wsync sparse encodings (reference engine)")
    p.add_argument("--bucket-mb", type=float, default=256.0,
                   help="wsync dense bucket size (MiB; the service's default WSYNC_DENSE_BUCKET_BYTES)")
    p.add_argument("--out", default=None, help="result JSON (default bench/results/<device>.json)")
    p.add_argument("--plot", default=None, help="PNG (default: --out with .png)")
    p.add_argument("--skip-vllm", action="store_true")
    p.add_argument("--vllm-shapes", default=None, help="shapes that get the vLLM phase (default: the first)")
    p.add_argument("--gpu-util", type=float, default=0.4, help="vLLM gpu_memory_utilization")
    p.add_argument("--gpus", default=None, help="two CUDA device ids: sender,receiver (default 0,1)")
    p.add_argument("--max-minutes", type=float, default=9.0, help="stop starting sections after this")
    p.add_argument("--model-dir", default=os.path.join(tempfile.gettempdir(), "wsync-bench-models"))
    p.add_argument("--group-timeout-s", type=float, default=120.0)
    p.add_argument("--machine", default=None, help="label for the report (default: detected)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--fake-vllm", action="store_true",
                   help="CPU test double for the vLLM engine (tests the flow; its numbers mean nothing)")
    return p.parse_args(argv)


def _gpus(args: argparse.Namespace) -> tuple[str, str]:
    if args.gpus:
        a, b = args.gpus.split(",")
        return a.strip(), b.strip()
    visible = [v for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    return (visible[0], visible[1]) if len(visible) >= 2 else ("0", "1")


def _cfg(args: argparse.Namespace, shape: str) -> dict:
    sender, receiver = _gpus(args)
    return {"device": args.device, "shape": shape, "iters": args.iters, "warmup": args.warmup,
            "densities": [float(d) for d in args.densities.split(",") if d.strip()],
            "encodings": [e.strip() for e in args.encodings.split(",") if e.strip()],
            "bucket_bytes": int(args.bucket_mb * 2**20), "gpu_util": args.gpu_util, "model_dir": args.model_dir,
            "group_timeout_s": args.group_timeout_s, "peer_timeout_s": max(600.0, 2 * args.group_timeout_s),
            "sender_gpu": sender, "receiver_gpu": receiver, "cpu_threads": 1, "fake_vllm": args.fake_vllm}


def _wait(conn, procs, timeout_s: float) -> tuple | None:
    """The next driver message, or None when the time is up or a process died."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if conn.poll(1.0):
            try:
                return conn.recv()
            except EOFError:
                return None
        if not all(p.is_alive() for p in procs):
            return conn.recv() if conn.poll(0.5) else None
    return None


def _stop(procs, conn) -> None:
    try:
        conn.send(("exit",))
    except (OSError, BrokenPipeError):
        pass
    end = time.monotonic() + 45
    for p in procs:
        p.join(timeout=max(1.0, end - time.monotonic()))
    for p in procs:  # only our own children, by their handle
        if p.is_alive():
            p.kill()
            p.join(timeout=10)


def run_phase(cfg: dict, sections: list[str], deadline: float, log, progress=lambda raw: None) -> dict:
    from bench import roles

    ctx = mp.get_context("spawn")
    drv, drv_child = ctx.Pipe()
    peer_s, peer_r = ctx.Pipe()
    procs = [ctx.Process(target=roles.sender_main, args=(drv_child, peer_s, cfg), name="bench-sender"),
             ctx.Process(target=roles.receiver_main, args=(peer_r, cfg), name="bench-receiver")]
    for p in procs:
        p.start()
    results: dict = {}
    aborted = None
    try:
        for name in sections:
            left = deadline - time.monotonic()
            if aborted or left <= 0:
                results[name] = {"error": f"skipped: {aborted or '--max-minutes budget used up'}"}
                continue
            t0 = time.monotonic()
            drv.send(("run", name))
            msg = _wait(drv, procs, min(SECTION_TIMEOUT_S.get(name, DEFAULT_TIMEOUT_S), left + 30))
            if msg is None:
                aborted = f"section {name} timed out or its processes died"
                results[name] = {"error": aborted}
            else:
                results[name] = msg[2]
                if msg[2].get("unclean"):
                    aborted = f"section {name} failed mid-sync"
            res = results[name]
            progress(results)
            log(f"  {cfg['shape']}/{name}: {time.monotonic() - t0:.1f} s"
                + (f"  ERROR {str(res['error']).splitlines()[0][:200]}" if "error" in res else ""))
    finally:
        _stop(procs, drv)
    return results


def _vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def run_shape(args: argparse.Namespace, shape: str, with_vllm: bool, deadline: float, log,
              progress=lambda out: None) -> dict:
    cfg = _cfg(args, shape)
    raw: dict = {}
    for phase in [CORE] + ([VLLM] if with_vllm else []):
        done = dict(raw)
        raw.update(run_phase(cfg, phase, deadline, log,
                             lambda part: progress(_shape_result(cfg, {**done, **part}, with_vllm))))
    return _shape_result(cfg, raw, with_vllm)


def _shape_result(cfg: dict, raw: dict, with_vllm: bool) -> dict:
    shape = cfg["shape"]
    metas = hf_metas(get_shape(shape))
    out = {"shape": shape, "bytes": total_bytes(metas), "tensors": len(metas),
           "densities": [str(d) for d in cfg["densities"]], **assemble(raw, with_vllm)}
    setup = raw.get("setup_core") or {}
    out["device_name"] = setup.get("device")
    if with_vllm:
        setup = raw.get("setup_vllm") or {}
        out["vllm"] = {k: setup.get(k) for k in ("vllm_version", "generation", "engine_start_s")}
    out["raw"] = raw
    return out


def _header(args: argparse.Namespace, first: dict) -> dict:
    name = first.get("device_name") or "?"
    if args.device == "cuda":
        gpus, machine = f"2x {name}", args.machine or f"2x {name}, NCCL"
    else:
        gpus, machine = 0, args.machine or f"{name}, gloo"
    return {"model": f"{first['shape']} shapes, random bf16 weights ({first['bytes'] / 2**20:.0f} MiB, "
                     f"{first['tensors']} tensors)",
            "gpus": gpus, "machine": machine, "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "device": args.device, "backend": "nccl" if args.device == "cuda" else "gloo",
            "iters": args.iters, "warmup": args.warmup, "bucket_bytes": int(args.bucket_mb * 2**20),
            "fake_vllm": bool(args.fake_vllm), "args": vars(args)}


def write_outputs(result: dict, out: Path, plot: Path | None) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1, sort_keys=False, default=str) + "\n")
    tmp.replace(out)
    if plot is not None:
        try:
            from bench.plot import plot_result

            plot_result(result, plot)
        except Exception as exc:  # noqa: BLE001 - a plot never fails the run
            print(f"plot failed: {exc!r}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    shapes = [s.strip() for s in args.shape.split(",") if s.strip()]
    for s in shapes:
        get_shape(s)
    out = Path(args.out or f"bench/results/{args.device}.json")
    plot = None if args.no_plot else Path(args.plot or out.with_suffix(".png"))
    vllm_shapes = set((args.vllm_shapes or shapes[0]).split(","))
    want_vllm = (args.device == "cuda" or args.fake_vllm) and not args.skip_vllm
    has_vllm = want_vllm and (args.fake_vllm or _vllm_available())
    deadline = time.monotonic() + args.max_minutes * 60
    t0 = time.monotonic()
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    per_shape: dict = {}

    def combine() -> dict:
        main_res = per_shape[shapes[0]]
        res = {**_header(args, main_res), **{k: v for k, v in main_res.items() if k != "raw"}}
        if want_vllm and not has_vllm:
            res["errors"] = {**res["errors"], "vllm": "vLLM is not importable here: vLLM sections not run"}
        res["shapes"] = {s: {k: v for k, v in r.items() if k != "raw"} for s, r in per_shape.items() if s != shapes[0]}
        res["raw"] = {s: r["raw"] for s, r in per_shape.items()}
        res["elapsed_s"] = time.monotonic() - t0
        return res

    def checkpoint(shape: str, partial: dict) -> None:  # a cut-off run still leaves its numbers
        per_shape[shape] = partial
        write_outputs(combine(), out, None)

    for shape in shapes:
        log(f"[{shape}] {'with' if has_vllm and shape in vllm_shapes else 'without'} vLLM")
        checkpoint(shape, run_shape(args, shape, has_vllm and shape in vllm_shapes, deadline, log,
                                    lambda partial, s=shape: checkpoint(s, partial)))
    result = combine()
    write_outputs(result, out, plot)
    for shape, r in per_shape.items():
        print(f"\n== {shape} ({args.device}) ==")
        print("\n".join(table_lines(r)))
    print(f"\nwrote {out}" + (f" and {plot}" if plot else "") + f" in {time.monotonic() - t0:.0f} s")
    if any(r.get("check_failed") for r in per_shape.values()):
        print("FAILED: a receiver's weights differed from the sender's after a sync", file=sys.stderr)
        return 1
    return 2 if any(r.get("errors") for r in per_shape.values()) or result.get("errors") else 0


if __name__ == "__main__":
    sys.exit(main())
