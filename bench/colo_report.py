"""The "one GPU" section of docs/BENCHMARKS.md, from bench/results/h200x1.json (bench/colo_bench.py):
what is measured, and once the JSON exists the table, the ratios and issue 10's targets. Called by
bench/report.py for a result path named h200x1*.json; no number appears here that the JSONs lack (the
explanations of misses, the crossover and the history come from the raw JSON and an earlier run beside
it: bench/colo_explain.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from bench.colo_explain import crossover, explain_sparse_miss, flatten_lines, history, load_beside

TITLE = "## One GPU (H200): trainer and vLLM engine on the same GPU, CUDA IPC (issue 10)"
SMALL, BIG = "qwen2.5-0.5b", "qwen2.5-7b"
DENSITIES = ("0.001", "0.01", "0.03", "0.1")

METHOD = """\
Trainer in the driver process (random bf16 weights of the shape, laid out flat in 512 MiB dense
buckets by `transfer/flat.py`); one vLLM 0.24.0 engine on the same GPU, engine core in its own
process (V1 multiprocessing, spawn), `load_format="dummy"` from a config-only folder,
`worker_extension_cls=wsync.engines.vllm.worker.WsyncWorkerExtension`, weight-transfer backend `ipc`,
`enforce_eager=True`.
Each shape runs in a fresh process (`bench/colo_run.py`). End to end = host wall time from an idle GPU
to the engine's return, steady = median after the warm-ups; every sync is checked: the engine's
runtime fingerprints must equal the trainer's weights laid out as vLLM holds them.

- **d2d floor**: `torch._foreach_copy_` of every parameter into one flat buffer, same GPU.
- **vLLM ipc**: `start_weight_update` -> `IPCWeightTransferEngine.trainer_send_weights` (callable
  send mode calling `LLM.update_weights`) -> `finish_weight_update`; unpacked, and packed with a buffer
  of max(1 GiB, the largest tensor rounded up to 256 MiB); `vllm_ipc_ms` = the better steady mode,
  `vllm_ipc_first_ms` = the smaller first sync. Needs `VLLM_ALLOW_INSECURE_SERIALIZATION=1` (pickled
  handle args); wsync's path sends plain data only.
- **wsync colocated dense**: first = export the trainer's buckets (one CUDA IPC handle per bucket) +
  map them in the worker + build the HF-name -> runtime-slice map and the copy plan + copy; steady =
  `mark_ready` (one stream sync) + one `collective_rpc` whose worker runs the planned copies
  (`torch._foreach_copy_` over precomputed views, fused qkv / gate_up slices at their row offsets)
  and one stream sync. No staging copy on the trainer, no layerwise reload.
- **wsync colocated sparse** (density d, real bit flips), the flat format `ipc_flat`
  (`transfer/ipc_flat.py`): no `plan_sparse`, no encoding on the trainer. The trainer writes the sync
  into the shared staging buffer (mapped once by the engine, re-sent only when it grows) with one
  `torch.cat` for all int32 indices and one per dtype for the values (`write`), then `mark_ready`, one
  stream sync (`ready`); one `collective_rpc` (`rpc`) whose worker range-checks every index (one host
  sync; nothing written when one is out of range) and writes with one `index_copy_` per chunk of 2^25
  indices into the engine's flat runtime buffer (`engine.prep_ms` / `apply_ms` / `ms` in the raw JSON).
  The trainer's diff is not timed (the trainer step produces the patches).
- **engine flattening** (once, at map time, not timed in any sync; reported below): vLLM's runtime
  parameters are repointed into one flat buffer per dtype (`wsync_ipc_flatten`: needs `enforce_eager`,
  no sleep mode), so the flat sparse apply is one scatter per dtype and chunk, whatever the tensor count.
- **extra GPU memory**: trainer + engine `torch.cuda.max_memory_allocated` above what each held before
  a dense sync (peak stats reset right before it), max over the syncs.
"""

HOWTO = """\
Run (one GPU machine, devpack unpacked, one command within a 10-minute device call):
`scripts/bench-gpu1 OUTDIR`, then copy `OUTDIR/h200x1.json` (and `h200x1-raw.json`) to `bench/results/`,
redraw the plot with `python bench/colo_plot.py bench/results/h200x1.json` and re-render this page with
`python bench/report.py bench/results/h100x2.json bench/results/cpu.json bench/results/h200x1.json
--out docs/BENCHMARKS.md`.
"""


def _f(x, nd: int = 2) -> str:
    return "n/a" if x is None else f"{x:.{nd}f}"


def _ratio(a, b) -> str:
    return "n/a" if a is None or b in (None, 0) else f"{a / b:.1f}x"


def targets(shapes: dict) -> list[tuple[str, bool | None, str]]:
    """(target, met or None when not measured, the numbers) for issue 10's item 5."""
    s, b = shapes.get(SMALL, {}), shapes.get(BIG, {})

    def cmp(what: str, lhs, rhs, strict: bool = False) -> tuple[str, bool | None, str]:
        if lhs is None or rhs is None:
            return what, None, "not measured"
        return what, (lhs < rhs if strict else lhs <= rhs), f"{lhs:.2f} vs {rhs:.2f}"

    out = [cmp("0.5B dense <= vLLM ipc / 10", s.get("wsync_colo_dense_ms"), _div(s.get("vllm_ipc_ms"), 10)),
           cmp("7B dense <= 3 x floor", b.get("wsync_colo_dense_ms"), _mul(b.get("d2d_floor_ms"), 3))]
    for name, r in ((SMALL, s), (BIG, b)):
        out.append(cmp(f"{name} first dense < vLLM first", r.get("wsync_colo_dense_first_ms"),
                       r.get("vllm_ipc_first_ms"), strict=True))
    out.append(cmp("7B sparse 0.01 <= dense / 3", (b.get("wsync_colo_sparse_ms") or {}).get("0.01"),
                   _div(b.get("wsync_colo_dense_ms"), 3)))
    for name, r in ((SMALL, s), (BIG, b)):
        out.append(cmp(f"{name} extra GPU memory <= 64 MiB", r.get("extra_gpu_mem_mib"), 64.0))
    return out


def _div(x, k):
    return None if x is None else x / k


def _mul(x, k):
    return None if x is None else x * k


def render_one_gpu(path: Path, doc: Path | None = None) -> list[str]:
    """The section's lines; the plot (bench/colo_plot.py, `<stem>.png` beside the JSON) is linked relative
    to `doc` when it exists; the raw JSON (`<stem>-raw.json`) and an earlier run (`<stem>-run1.json`)
    beside it add the explanations and the history line."""
    lines = [TITLE, "", METHOD]
    if not path.exists():
        return lines + [f"Not run yet (`{path.name}` does not exist). {HOWTO}"]
    r = json.loads(path.read_text())
    shapes = r.get("shapes", {})
    lines += _table(r, shapes)
    png = path.with_suffix(".png")
    if png.exists():
        rel = os.path.relpath(png, doc.parent) if doc is not None else png.name
        lines += ["", f"![one GPU, {r.get('gpus')}, {r.get('date')}]({rel})"]
    raw = load_beside(path, "-raw")
    for block in (explain_sparse_miss(shapes, raw), crossover(shapes, raw), flatten_lines(raw),
                  history(shapes, load_beside(path, "-run1"))):
        if block:
            lines += [""] + block
    notes = path.with_suffix(".notes.md")
    if notes.exists():
        lines += ["", notes.read_text().rstrip()]
    return lines + ["", HOWTO]


def _table(r: dict, shapes: dict) -> list[str]:
    names = list(shapes)
    lines = [f"Run: {r.get('gpus')}, {r.get('date')}.", "", "| ms | " + " | ".join(names) + " |",
             "|---|" + "---|" * len(names)]
    rows = [("d2d floor", "d2d_floor_ms"), ("vLLM ipc, best steady", "vllm_ipc_ms"),
            ("vLLM ipc, first", "vllm_ipc_first_ms"), ("wsync colocated dense, steady", "wsync_colo_dense_ms"),
            ("wsync colocated dense, first", "wsync_colo_dense_first_ms")]
    for label, key in rows:
        lines.append(f"| {label} | " + " | ".join(_f(shapes[n].get(key)) for n in names) + " |")
    for d in DENSITIES:
        lines.append(f"| wsync colocated sparse, density {d} | "
                     + " | ".join(_f((shapes[n].get("wsync_colo_sparse_ms") or {}).get(d)) for n in names) + " |")
    lines.append("| extra GPU memory of a dense sync (MiB) | "
                 + " | ".join(_f(shapes[n].get("extra_gpu_mem_mib"), 1) for n in names) + " |")
    lines += ["", "Ratios: " + "; ".join(
        f"{n}: vLLM ipc / wsync dense {_ratio(shapes[n].get('vllm_ipc_ms'), shapes[n].get('wsync_colo_dense_ms'))}, "
        f"wsync dense / floor {_ratio(shapes[n].get('wsync_colo_dense_ms'), shapes[n].get('d2d_floor_ms'))}"
        for n in names), "", "| target (issue 10) | met | numbers |", "|---|---|---|"]
    for what, met, nums in targets(shapes):
        lines.append(f"| {what} | {'n/a' if met is None else 'yes' if met else 'MISS'} | {nums} |")
    return lines
