"""Render docs/BENCHMARKS.md from one or more result JSONs of bench/sync_bench.py.

    python bench/report.py bench/results/h100x2.json bench/results/cpu.json bench/results/h200x1.json \
        --out docs/BENCHMARKS.md

A GPU result gets absolute times and ratios; a CPU (gloo) result gets ratios only. A result file that
does not exist yet is listed as "not run yet"."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.assemble import fmt, targets  # noqa: E402

HOWTO = """\
## Running the bench (bench/README)

```
# GPU machine, 2 GPUs (sender = GPU0 / rank 0, receiver = GPU1 / rank 1), with the devpack unpacked
# (docs/gpu.md steps 1-2; send the last part with `bash .devpack/receive.sh && scripts/bench-gpu $OUT/b`):
scripts/bench-gpu OUTDIR          # = python bench/sync_bench.py --device cuda --shape qwen2.5-0.5b,qwen2.5-3b \\
                                  #     --iters 10 --max-minutes 8 --out OUTDIR/h100x2.json (+ env)
# the run on this page used --max-minutes 5.5 (the session's GPU time), so the 3B shape did not run
# one GPU (trainer and a vLLM engine colocated, CUDA IPC; issue 10), one device call:
scripts/bench-gpu1 OUTDIR         # = python -m bench.colo_bench --out OUTDIR -> OUTDIR/h200x1.json, h200x1-raw.json
python bench/colo_plot.py bench/results/h200x1.json   # its plot, bench/results/h200x1.png
# CPU, two processes over gloo (ratios only):
python bench/sync_bench.py --device cpu --shape tiny --skip-vllm --out bench/results/cpu.json
# this page:
python bench/report.py bench/results/h100x2.json bench/results/cpu.json bench/results/h200x1.json \\
  --out docs/BENCHMARKS.md
```

- Shapes (`--shape`, comma list; the first one gives the top-level JSON keys, the others go under
  `shapes`): `tiny` (wsync's embedded model), `qwen2.5-0.5b`, `qwen2.5-1.5b`, `qwen2.5-3b`,
  `qwen2.5-7b` (untied lm_head). Weights are random bf16, generated on the device; the vLLM engine
  starts from a generated HF folder (config + random safetensors + wsync's tiny tokenizer) under
  `--model-dir`. Only the first shape gets the vLLM phase unless `--vllm-shapes` says otherwise.
- Each shape runs in phases of two fresh processes (core: floor, reference engine; vllm: one vLLM
  engine in the receiver, `uni` executor, engine core in-process). A failing section records
  `{"error": ...}` and the run goes on; a hung one is cut off after its timeout. `--max-minutes`
  (default 9) stops starting sections once spent. Exit 0: all ran; 1: a receiver's weights differed
  from the sender's after a sync (fingerprints); 2: some section failed (see `errors`).
- `--iters N` measured syncs per variant after the first and `--warmup` (2) more; steady = their
  median. `--densities`, `--encodings` (reference engine; the vLLM engine gets `auto`),
  `--bucket-mb` (wsync dense bucket, 256 = the service default), `--gpu-util` (vLLM, 0.4), `--gpus 0,1`.
- `--fake-vllm`: a CPU test double of the vLLM engine and vLLM's trainer helpers (tests/fakes/fake_vllm.py)
  that runs the vLLM phase's flow and the real `WsyncWorkerExtension` direct methods over gloo; its
  numbers mean nothing (the unit tests use it).
- Outputs: the JSON (`--out`), a PNG beside it (`bench/plot.py` redraws it), a table on stdout.
"""

DEFINITIONS = """\
## What is measured

- **End to end (`*_ms`)**: both processes meet at a barrier; the sender's clock runs until a second
  barrier that the receiver enters only after the update is applied in its parameters and its device
  is synchronized. Sparse end to end starts before the trainer plans and encodes the patch and
  includes sending the per-sync metadata out of band (a pipe round trip); dense metadata is exchanged
  once per engine and reused. vLLM paths include vLLM's own start/update/finish_weight_update and
  `reset_prefix_cache`; wsync's vLLM paths also reset the prefix cache.
- **Send (`*_send_ms`)**: trainer side only. Dense: `wsync.transfer.dense.send_dense` (packing into
  double-buffered flat buckets + broadcasts). Sparse: the broadcasts alone, after the receiver holds
  the metadata; planning and encoding are `wsync_sparse_build_ms`.
- **First** (`*_first_ms`): the first sync of that path (groups already open). wsync's dense sync is
  the very first sync into the fresh vLLM engine, and `wsync_dense_first_ms` includes building the
  engine's name-and-slice map once; vLLM's variants follow it, so `vllm_dense_first_ms` (the first of
  vLLM's faster variant) does not pay the engine's cold start.
- **Steady**: median of `--iters` syncs after the first and `--warmup` more.
- **NCCL floor**: one broadcast of one flat buffer of the model's total bytes.
- **Real deltas**: before every sparse sync the trainer changes a Bernoulli(density) subset of every
  tensor (low mantissa bits), diffs its weights bit-exactly against the version last synced to that
  engine (`wsync.transfer.delta.Snapshot`, on the device) and syncs that patch. `diff_gbps` = bytes
  compared (both versions, 2x the model) / diff time, as the service reports it. Dense syncs also
  move a small real change each time.
- **wire_bytes_per_changed_elem**: bytes broadcast (values + indices + alignment) / changed elements,
  wsync `auto` encoding; vLLM's flat int32 is 4 + 2 = 6 for bf16.
- **Correctness**: after every timed sync the receiver's exact fingerprints
  (`wsync.transfer.fingerprint`) must equal the sender's; for vLLM the sender concatenates q/k/v and
  gate/up itself (independently of the engine's map) and compares against the worker's runtime
  parameters. A mismatch fails the run.
"""


def _p(x, nd: int = 3) -> str:
    return fmt(x, nd)


def _ratio(a, b) -> str:
    return f"{a / b:.2f}x" if a is not None and b else "-"


def _dense_table(r: dict, absolute: bool) -> list[str]:
    floor, vbest = r.get("nccl_broadcast_ms"), r.get("vllm_dense_ms")
    rows = [("raw broadcast, one buffer (floor)", "nccl_broadcast_ms", "nccl_broadcast_first_ms"),
            ("wsync dense, send only", "wsync_dense_send_ms", None),
            ("wsync dense -> reference engine", "wsync_ref_dense_ms", "wsync_ref_dense_first_ms"),
            ("wsync dense -> reference engine, send only", "wsync_ref_dense_send_ms", None)]
    if r.get("wsync_dense_engine") == "vllm":
        rows.append(("wsync dense -> vLLM engine (direct)", "wsync_dense_ms", "wsync_dense_first_ms"))
    rows += [("vLLM dense, unpacked", "vllm_dense_unpacked_ms", "vllm_dense_unpacked_first_ms"),
             ("vLLM dense, packed", "vllm_dense_packed_ms", "vllm_dense_packed_first_ms")]
    head = ("| path | steady ms | first ms | x floor | x vLLM best |" if absolute
            else "| path | x floor | first x floor | x vLLM best |")
    out = [head, "|" + "---|" * (head.count("|") - 1)]
    for label, key, first in rows:
        v, f = r.get(key), r.get(first) if first else None
        if v is None and f is None:
            continue
        if absolute:
            out.append(f"| {label} | {_p(v)} | {_p(f)} | {_ratio(v, floor)} | {_ratio(v, vbest)} |")
        else:
            out.append(f"| {label} | {_ratio(v, floor)} | {_ratio(f, floor)} | {_ratio(v, vbest)} |")
    return out


def _sparse_table(r: dict, absolute: bool) -> list[str]:
    dens = r.get("densities") or []
    g = lambda key, d: (r.get(key) or {}).get(d)  # noqa: E731
    dense = r.get("wsync_dense_ms")
    if absolute:
        head = ("| density | changed elems | vLLM sparse ms | wsync ms | wsync / vLLM | wsync send ms | build ms "
                "| ref auto ms | ref flat ms | diff GB/s | wire B/elem | auto encodings |")
    else:
        head = ("| density | wsync / wsync dense | wsync / vLLM | send / dense send | build / e2e "
                "| ref flat / ref auto "
                "| wire B/elem | auto encodings |")
    out = [head, "|" + "---|" * (head.count("|") - 1)]
    for d in dens:
        enc = ", ".join(f"{k} {v}" for k, v in ((r.get("auto_encodings") or {}).get(d) or {}).items())
        w, v = g("wsync_sparse_ms", d), g("vllm_sparse_ms", d)
        if absolute:
            out.append(f"| {d} | {_p(g('changed_elems', d))} | {_p(v)} | {_p(w)} | {_ratio(w, v)} "
                       f"| {_p(g('wsync_sparse_send_ms', d))} | {_p(g('wsync_sparse_build_ms', d))} "
                       f"| {_p(g('wsync_ref_sparse_ms', d))} | {_p(g('wsync_ref_sparse_flat_ms', d))} "
                       f"| {_p(g('diff_gbps', d))} | {_p(g('wire_bytes_per_changed_elem', d), 4)} | {enc} |")
        else:
            out.append(f"| {d} | {_ratio(w, dense)} | {_ratio(w, v)} "
                       f"| {_ratio(g('wsync_sparse_send_ms', d), r.get('wsync_dense_send_ms'))} "
                       f"| {_ratio(g('wsync_sparse_build_ms', d), w)} "
                       f"| {_ratio(g('wsync_ref_sparse_flat_ms', d), g('wsync_ref_sparse_ms', d))} "
                       f"| {_p(g('wire_bytes_per_changed_elem', d), 4)} | {enc} |")
    return out


def _targets_table(r: dict, absolute: bool) -> list[str]:
    out = ["| target | value | bound | value / bound | status |", "|---|---|---|---|---|"]
    for t in targets(r):
        wire = t["target"].startswith("wire")
        val = _p(t["value"], 4) if absolute or wire else "-"
        bound = _p(t["bound"], 4) if absolute or wire else "-"
        ratio = f"{t['ratio']:.3f}" if t["ratio"] is not None else "-"
        out.append(f"| `{t['target']}` | {val} | {bound} | {ratio} | **{t['status']}** |")
    return out


def _why(r: dict, t: dict, absolute: bool) -> str:
    """One line of numbers behind a missed target (times as ratios to the floor when not absolute)."""
    name, d = t["target"], "0.01" if "0.01" in t["target"] else "0.03"
    floor = r.get("nccl_broadcast_ms")
    g = lambda key: (r.get(key) or {}).get(d)  # noqa: E731
    ms = (lambda v: f"{fmt(v)} ms") if absolute else (lambda v: f"{v / floor:.2f}x floor" if v and floor else "-")
    if name.startswith("wsync_dense_send_ms"):
        vs = f"vs floor {ms(floor)}" if absolute else "(bound 1.5x floor)"
        return (f"dense send {ms(r.get('wsync_dense_send_ms'))} {vs} "
                f"({fmt(r.get('bytes', 0) / 2**20)} MiB in {fmt(r.get('bucket_bytes', 0) / 2**20)} MiB buckets)")
    if name.startswith("wsync_ref_dense_ms"):
        return (f"end to end {ms(r.get('wsync_ref_dense_ms'))} = send {ms(r.get('wsync_ref_dense_send_ms'))} "
                f"+ receiver tail (last bucket's unpack) and barriers")
    if name.startswith("wsync_dense_ms"):
        return f"wsync -> vLLM {ms(r.get('wsync_dense_ms'))} vs vLLM's best dense {ms(r.get('vllm_dense_ms'))}"
    if name.startswith("wsync_dense_first_ms"):
        return (f"first {ms(r.get('wsync_dense_first_ms'))} incl. map build {ms(r.get('wsync_dense_map_build_ms'))};"
                f" vLLM first {ms(r.get('vllm_dense_first_ms'))}")
    if name.startswith("wsync_sparse_send_ms"):
        return (f"send {ms(g('wsync_sparse_send_ms'))} for {fmt(g('wire_bytes_per_changed_elem'))} B x "
                f"{fmt(g('changed_elems'))} changed elements; bound {ms(t['bound'])}")
    if name.startswith("wsync_sparse_ms"):
        return (f"end to end {ms(g('wsync_sparse_ms'))} = build (plan + encode) {ms(g('wsync_sparse_build_ms'))} "
                f"+ send {ms(g('wsync_sparse_send_ms'))} + metadata, decode and apply; vLLM {ms(g('vllm_sparse_ms'))}")
    if name.startswith("wire"):
        enc = (r.get("auto_encodings") or {}).get(d)
        return (f"{fmt(g('wire_bytes_per_changed_elem'), 5)} B/elem = 2 B bf16 value + gap-encoded indices "
                f"(16-bit once any gap "
                f"in a tensor reaches 256, which at density {d} is nearly certain) + 8-byte section alignment; "
                f"encodings chosen per tensor: {enc}")
    return f"{fmt(t['value'])} vs bound {fmt(t['bound'])}"


def render_result(r: dict, png: str | None, notes: str | None = None) -> list[str]:
    gpu = r.get("device") == "cuda"
    vinfo = r.get("vllm") or {}
    title = f"## {r.get('machine', '?')}: {r.get('model', '?')}"
    out = [title, "", f"- date {r.get('date', '?')}; backend {r.get('backend')}; iters {r.get('iters')} "
           f"(+{r.get('warmup')} warm-up, after the first); bucket {fmt((r.get('bucket_bytes') or 0) / 2**20)} MiB; "
           f"verified syncs {r.get('verified_syncs')}; check failed: {r.get('check_failed')}"]
    if r.get("fake_vllm"):
        out.append("- **vLLM here is the CPU test double (`--fake-vllm`): its numbers mean nothing.**")
    if vinfo:
        out.append(f"- vLLM {vinfo.get('vllm_version')} (Gen {vinfo.get('generation')}); engine start "
                   f"{fmt(vinfo.get('engine_start_s'))} s")
    if not gpu:
        out.append("- CPU run: times are not comparable with GPU links, so only ratios are shown. With two "
                   "processes on few cores, wsync's packing/unpacking copies compete with gloo's own copies for "
                   "the same cores (on a GPU they overlap with NCCL); the targets are the GPU run's.")
    out += ["", "### Dense", ""] + _dense_table(r, gpu)
    out += ["", "### Sparse (real deltas)", ""] + _sparse_table(r, gpu)
    out += ["", "### Targets (issue #4)", ""] + _targets_table(r, gpu)
    missed = [t for t in targets(r) if t["status"] == "missed"]
    if missed:
        out += ["", "Missed, with the numbers:", ""] + [f"- `{t['target']}`: {_why(r, t, gpu)}" for t in missed]
    if notes:  # hand-written analysis of this run, kept next to its JSON
        out += ["", notes.strip()]
    if png:
        out += ["", f"![{r.get('machine')}]({png})"]
    for shape, sub in (r.get("shapes") or {}).items():
        out += ["", f"### Also: {shape} ({fmt(sub.get('bytes', 0) / 2**20)} MiB)", ""] + _dense_table(sub, gpu)
        out += [""] + _sparse_table(sub, gpu)
    errors = {**(r.get("errors") or {}), **{f"{s}/{k}": v for s, sub in (r.get("shapes") or {}).items()
                                             for k, v in (sub.get("errors") or {}).items()}}
    if errors:
        out += ["", "Errors recorded:", ""] + [f"- `{k}`: {str(v).splitlines()[0][:300]}" for k, v in errors.items()]
    return out


def render(paths: list[Path], doc: Path) -> str:
    lines = ["# wsync benchmarks", "",
             "Generated by `bench/report.py` from the result JSONs under `bench/results/` (edit the generator, "
             "not this page). Issue #4: sync at link speed, dense and sparse, against vLLM and the NCCL floor.",
             ""]
    for path in paths:
        if path.name.startswith("h200x1"):  # issue 10's one-GPU result has its own schema
            from bench.colo_report import render_one_gpu

            lines += render_one_gpu(path, doc) + [""]
            continue
        if not path.exists():
            lines += [f"## {path.name}: not run yet", "", f"`{path}` does not exist yet; see the commands below.", ""]
            continue
        r = json.loads(path.read_text())
        png = path.with_suffix(".png")
        rel = os.path.relpath(png, doc.parent) if png.exists() else None
        notes = path.with_suffix(".notes.md")
        lines += render_result(r, rel, notes.read_text() if notes.exists() else None) + [""]
    lines += [DEFINITIONS, HOWTO]
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("results", nargs="+", type=Path)
    p.add_argument("--out", type=Path, default=Path("docs/BENCHMARKS.md"))
    args = p.parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(render(args.results, args.out))
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
