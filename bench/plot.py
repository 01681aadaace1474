"""PNG of one result JSON: dense sync times (steady, first as markers) and sparse sync times by density.

    python bench/plot.py bench/results/h100x2.json [out.png]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

DENSE_BARS = (("NCCL floor\n(1 buffer)", "nccl_broadcast_ms", "nccl_broadcast_first_ms"),
              ("wsync send", "wsync_dense_send_ms", None),
              ("wsync\n-> reference", "wsync_ref_dense_ms", "wsync_ref_dense_first_ms"),
              ("wsync\n-> vLLM", "wsync_dense_ms", "wsync_dense_first_ms"),
              ("vLLM\nunpacked", "vllm_dense_unpacked_ms", "vllm_dense_unpacked_first_ms"),
              ("vLLM\npacked", "vllm_dense_packed_ms", "vllm_dense_packed_first_ms"))
SPARSE_LINES = (("vLLM sparse (flat int32), e2e", "vllm_sparse_ms", "C3", "-"),
                ("wsync sparse (auto), e2e", "wsync_sparse_ms", "C0", "-"),
                ("wsync sparse (auto), send only", "wsync_sparse_send_ms", "C0", ":"),
                ("wsync -> reference (auto), e2e", "wsync_ref_sparse_ms", "C2", "--"),
                ("wsync -> reference (flat int32), e2e", "wsync_ref_sparse_flat_ms", "C1", "--"))


def _dense(ax, r: dict) -> None:
    bars = [(label, r.get(k), r.get(f) if f else None) for label, k, f in DENSE_BARS
            if r.get(k) is not None and not (k == "wsync_dense_ms" and r.get("wsync_dense_engine") != "vllm")]
    xs = range(len(bars))
    ax.bar(xs, [b[1] for b in bars], color=["0.5"] + ["C0"] * 3 + ["C3"] * 2 if len(bars) == 6 else "C0")
    firsts = [(x, b[2]) for x, b in zip(xs, bars) if b[2] is not None]
    if firsts:
        ax.scatter([x for x, _ in firsts], [f for _, f in firsts], marker="v", color="k", zorder=3, label="first sync")
        ax.legend(loc="upper left", fontsize=8)
    for x, b in zip(xs, bars):
        ax.annotate(f"{b[1]:.3g}", (x, b[1]), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(xs), [b[0] for b in bars], fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("ms (steady median; ▼ first)")
    ax.set_title("dense sync, end to end unless 'send'", fontsize=10)


def _sparse(ax, r: dict) -> None:
    dens = r.get("densities") or []
    for label, key, color, style in SPARSE_LINES:
        vals = r.get(key) or {}
        pts = [(float(d), vals[d]) for d in dens if vals.get(d) is not None]
        if key == "wsync_sparse_ms" and r.get("wsync_sparse_engine") != "vllm":
            label = label.replace("wsync sparse", "wsync sparse -> reference")
        if pts and not (key == "wsync_ref_sparse_ms" and r.get("wsync_sparse_engine") != "vllm"):
            ax.plot(*zip(*pts), style, marker="o", color=color, label=label)
    for key, label, color in (("wsync_dense_ms", "wsync dense e2e", "C0"), ("nccl_broadcast_ms", "NCCL floor", "0.5")):
        if r.get(key) is not None:
            ax.axhline(r[key], color=color, lw=0.8, ls="-.", label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("density (changed fraction of every tensor)")
    ax.set_ylabel("ms (steady median)")
    ax.set_title("sparse sync of a real delta", fontsize=10)
    ax.legend(fontsize=7)


def plot_result(r: dict, path: Path | str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 4.8))
    _dense(a, r)
    _sparse(b, r)
    note = " (CPU: compare ratios only)" if r.get("device") == "cpu" else ""
    fig.suptitle(f"{r.get('model', '?')} - {r.get('machine', '?')}{note}", fontsize=10)
    return save(fig, path)


def save(fig, path) -> Path:
    """Lay out, write (creating the folder) and close a figure; the path written."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def cli(argv: list[str], plot, doc: str | None) -> int:
    """`python bench/<plot>.py RESULT.json [OUT.png]` for a plot function taking (result dict, path)."""
    if not argv:
        print(doc)
        return 2
    src = Path(argv[0])
    out = Path(argv[1]) if len(argv) > 1 else src.with_suffix(".png")
    print(plot(json.loads(src.read_text()), out))
    return 0


def main(argv: list[str]) -> int:
    return cli(argv, plot_result, __doc__)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
