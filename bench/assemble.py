"""Raw section results -> the result JSON's keys (issue #4), the targets, and the printed table."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

DENSE_KEYS = ("nccl_broadcast_ms", "vllm_dense_ms", "vllm_dense_first_ms", "wsync_dense_ms",
              "wsync_dense_first_ms", "wsync_dense_send_ms", "wsync_ref_dense_ms")
SPARSE_KEYS = ("vllm_sparse_ms", "wsync_sparse_ms", "wsync_sparse_send_ms", "wire_bytes_per_changed_elem")


def _ok(section: Any) -> dict | None:
    return section if isinstance(section, dict) and "error" not in section and section else None


def _get(section: Any, *path: str) -> Any:
    cur = _ok(section)
    for key in path:
        if not isinstance(cur, dict) or key not in cur:
            return None
        cur = cur[key]
    return cur


def _dense(raw: dict, out: dict, vllm_ran: bool) -> None:
    floor, ref = raw.get("nccl_floor"), raw.get("ref_dense")
    out["nccl_broadcast_ms"] = _get(floor, "ms")
    out["nccl_broadcast_first_ms"] = _get(floor, "first", "ms")
    out["nccl_broadcast_gbps"] = _get(floor, "gbps")
    out["wsync_ref_dense_ms"] = _get(ref, "ms")
    out["wsync_ref_dense_first_ms"] = _get(ref, "first", "ms")
    out["wsync_ref_dense_send_ms"] = _get(ref, "send_ms")
    variants = {}
    for kind in ("unpacked", "packed"):
        sec = raw.get(f"vllm_dense_{kind}")
        out[f"vllm_dense_{kind}_ms"] = _get(sec, "ms")
        out[f"vllm_dense_{kind}_first_ms"] = _get(sec, "first", "ms")
        out[f"vllm_dense_{kind}_send_ms"] = _get(sec, "send_ms")
        if _get(sec, "ms") is not None:
            variants[kind] = sec
    best = min(variants, key=lambda k: variants[k]["ms"]) if variants else None
    out["vllm_dense_variant"] = best
    out["vllm_dense_ms"] = _get(variants.get(best), "ms")
    out["vllm_dense_first_ms"] = _get(variants.get(best), "first", "ms")
    direct = raw.get("wsync_vllm_dense")
    if vllm_ran:
        out["wsync_dense_engine"] = "vllm"
        out["wsync_dense_ms"] = _get(direct, "ms")
        out["wsync_dense_first_ms"] = _get(direct, "first_with_map_ms")
        out["wsync_dense_first_sync_only_ms"] = _get(direct, "first", "ms")
        out["wsync_dense_map_build_ms"] = _get(direct, "map_build_ms")
        out["wsync_dense_send_ms"] = _get(direct, "send_ms")
    else:  # no vLLM engine in this run: the reference engine stands in
        out["wsync_dense_engine"] = "reference"
        out["wsync_dense_ms"], out["wsync_dense_first_ms"] = out["wsync_ref_dense_ms"], out["wsync_ref_dense_first_ms"]
        out["wsync_dense_send_ms"] = out["wsync_ref_dense_send_ms"]


def _per_density(sec: Any, variant: str, key: str, first: bool = False) -> dict:
    out = {}
    for d, row in (_ok(sec) or {}).items():
        if not isinstance(row, dict):
            continue
        v = _get(row.get(variant), "first", key) if first else _get(row.get(variant), key)
        if v is not None:
            out[d] = v
    return out


def _sparse(raw: dict, out: dict, vllm_ran: bool) -> None:
    ref, vl = raw.get("ref_sparse"), raw.get("vllm_sparse")
    out["vllm_sparse_ms"] = _per_density(vl, "vllm", "ms")
    out["vllm_sparse_send_ms"] = _per_density(vl, "vllm", "send_ms")
    out["vllm_sparse_first_ms"] = _per_density(vl, "vllm", "ms", first=True)
    src, variant = (vl, "wsync_auto") if vllm_ran else (ref, "auto")
    out["wsync_sparse_engine"] = "vllm" if vllm_ran else "reference"
    out["wsync_sparse_ms"] = _per_density(src, variant, "ms")
    out["wsync_sparse_send_ms"] = _per_density(src, variant, "send_ms")
    out["wsync_sparse_first_ms"] = _per_density(src, variant, "ms", first=True)
    out["wsync_sparse_build_ms"] = _per_density(src, variant, "build_ms")
    out["wire_bytes_per_changed_elem"] = _per_density(ref, "auto", "wire_bytes_per_changed_elem") or \
        _per_density(src, variant, "wire_bytes_per_changed_elem")
    for enc, tag in (("auto", ""), ("flat_int32", "_flat")):
        out[f"wsync_ref_sparse{tag}_ms"] = _per_density(ref, enc, "ms")
        out[f"wsync_ref_sparse{tag}_send_ms"] = _per_density(ref, enc, "send_ms")
    out["wire_bytes_per_changed_elem_flat"] = _per_density(ref, "flat_int32", "wire_bytes_per_changed_elem")
    out["changed_elems"] = _per_density(ref, "auto", "changed") or _per_density(src, variant, "changed")
    out["diff_ms"] = _per_density(ref, "auto", "diff_ms") or _per_density(src, variant, "diff_ms")
    out["diff_gbps"] = _per_density(ref, "auto", "diff_gbps") or _per_density(src, variant, "diff_gbps")
    out["snapshot_update_ms"] = _per_density(ref, "auto", "snapshot_update_ms")
    out["auto_encodings"] = {d: row["auto"].get("encodings") for d, row in (_ok(ref) or {}).items()
                             if isinstance(row, dict) and isinstance(row.get("auto"), dict)
                             and "encodings" in row["auto"]}


def errors_of(raw: dict) -> dict:
    errs = {}
    for name, sec in raw.items():
        if isinstance(sec, dict) and "error" in sec:
            errs[name] = sec["error"]
        elif isinstance(sec, dict):
            for d, row in sec.items():
                for variant, res in (row.items() if isinstance(row, dict) else []):
                    if isinstance(res, dict) and "error" in res:
                        errs[f"{name}[{d}][{variant}]"] = res["error"]
    return errs


def assemble(raw: dict, vllm_ran: bool) -> dict:
    out: dict[str, Any] = {}
    _dense(raw, out, vllm_ran)
    _sparse(raw, out, vllm_ran)
    out["errors"] = errors_of(raw)
    out["check_failed"] = any(isinstance(s, dict) and s.get("check_failed") for s in raw.values())
    out["verified_syncs"] = sum(s.get("verified_in_section", 0) for s in raw.values() if isinstance(s, dict))
    return out


# ---- targets (issue #4, Qwen2.5-0.5B shapes) ------------------------------------------------------
def _d(r: dict, key: str, density: str) -> Any:
    return (r.get(key) or {}).get(density)


def _ratio(a: Any, b: Any, k: float = 1.0) -> tuple | None:
    return None if a is None or b is None else (a, b * k)


TARGETS: list[tuple[str, Callable[[dict], tuple | None], bool]] = [
    ("wsync_dense_send_ms <= 1.5 x nccl_broadcast_ms",
     lambda r: _ratio(r.get("wsync_dense_send_ms"), r.get("nccl_broadcast_ms"), 1.5), False),
    ("wsync_ref_dense_ms <= 3 x nccl_broadcast_ms",
     lambda r: _ratio(r.get("wsync_ref_dense_ms"), r.get("nccl_broadcast_ms"), 3.0), False),
    ("wsync_dense_ms <= vllm_dense_ms / 5",
     lambda r: _ratio(r.get("wsync_dense_ms"), r.get("vllm_dense_ms"), 0.2), False),
    ("wsync_dense_first_ms < vllm_dense_first_ms",
     lambda r: _ratio(r.get("wsync_dense_first_ms"), r.get("vllm_dense_first_ms")), True),
    ('wsync_sparse_send_ms["0.01"] <= wsync_dense_send_ms / 20',
     lambda r: _ratio(_d(r, "wsync_sparse_send_ms", "0.01"), r.get("wsync_dense_send_ms"), 0.05), False),
    ('wsync_sparse_ms["0.01"] < vllm_sparse_ms["0.01"]',
     lambda r: _ratio(_d(r, "wsync_sparse_ms", "0.01"), _d(r, "vllm_sparse_ms", "0.01")), True),
    ('wire_bytes_per_changed_elem["0.01"] <= 4',
     lambda r: _ratio(_d(r, "wire_bytes_per_changed_elem", "0.01"), 4.0), False),
    ('wire_bytes_per_changed_elem["0.03"] <= 4',
     lambda r: _ratio(_d(r, "wire_bytes_per_changed_elem", "0.03"), 4.0), False),
]


def targets(r: dict) -> list[dict]:
    """[{target, value, bound, ratio (value/bound), status: met | missed | n/a}]"""
    rows = []
    for name, fn, strict in TARGETS:
        vb = fn(r)
        if vb is None:
            rows.append({"target": name, "value": None, "bound": None, "ratio": None, "status": "n/a"})
            continue
        value, bound = vb
        met = value < bound if strict else value <= bound
        rows.append({"target": name, "value": value, "bound": bound,
                     "ratio": value / bound if bound else None, "status": "met" if met else "missed"})
    return rows


def fmt(x: Any, nd: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{nd}g}" if abs(x) < 1000 else f"{x:.0f}"
    return str(x)


def table_lines(r: dict) -> list[str]:
    """A plain-text table: dense, sparse per density, and the targets."""
    floor = r.get("nccl_broadcast_ms")
    lines = [f"{'dense':34s} {'ms':>10s} {'x floor':>8s}"]
    for key in ("nccl_broadcast_ms", "wsync_dense_send_ms", "wsync_ref_dense_send_ms", "wsync_ref_dense_ms",
                "wsync_dense_ms", "wsync_dense_first_ms", "vllm_dense_unpacked_ms", "vllm_dense_packed_ms",
                "vllm_dense_ms", "vllm_dense_first_ms"):
        v = r.get(key)
        lines.append(f"{key:34s} {fmt(v):>10s} {fmt(v / floor if v and floor else None):>8s}")
    lines.append(f"{'sparse (ms; wire B/changed elem)':34s} " + " ".join(f"{d:>9s}" for d in r.get("densities", [])))
    for key in ("vllm_sparse_ms", "wsync_sparse_ms", "wsync_sparse_send_ms", "wsync_sparse_build_ms",
                "wsync_ref_sparse_ms", "wsync_ref_sparse_flat_ms", "diff_gbps", "wire_bytes_per_changed_elem"):
        vals = r.get(key) or {}
        lines.append(f"{key:34s} " + " ".join(f"{fmt(vals.get(d)):>9s}" for d in r.get("densities", [])))
    for t in targets(r):
        lines.append(f"[{t['status']:6s}] {t['target']}: {fmt(t['value'])} vs {fmt(t['bound'])}")
    return lines
