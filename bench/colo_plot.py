"""PNG of the one-GPU result (bench/results/h200x1.json, bench/colo_bench.py): per shape, one bar per
sync path (d2d floor, vLLM ipc steady and first, wsync colocated dense steady and first, wsync sparse
per density) on a log time axis, titled with the GPU and the date. Bars only for measured values; a
missing one is labelled "n/a" (never drawn as a number).

    python bench/colo_plot.py bench/results/h200x1.json [out.png]   # default: the JSON's .png
"""

from __future__ import annotations

import sys
from pathlib import Path

try:  # run as `python bench/colo_plot.py` or imported as bench.colo_plot
    from bench.plot import cli, save
except ImportError:  # pragma: no cover - the script's own folder on sys.path
    from plot import cli, save  # type: ignore[no-redef]

DENSITIES = ("0.001", "0.01", "0.03", "0.1")


def bars(r: dict) -> list[tuple[str, float | None, str]]:
    """(label, ms or None, colour) of one shape's bars, in plot order."""
    out = [("d2d\nfloor", r.get("d2d_floor_ms"), "0.5"),
           ("vLLM\nipc\nsteady", r.get("vllm_ipc_ms"), "C3"),
           ("vLLM\nipc\nfirst", r.get("vllm_ipc_first_ms"), "#f4a6a6"),
           ("wsync\ndense\nsteady", r.get("wsync_colo_dense_ms"), "C0"),
           ("wsync\ndense\nfirst", r.get("wsync_colo_dense_first_ms"), "#9cc3e6")]
    sparse = r.get("wsync_colo_sparse_ms") or {}
    out += [(f"wsync\nsparse\n{d}", sparse.get(d), "C2") for d in DENSITIES]
    return out


def _shape(ax, name: str, r: dict) -> None:
    rows = bars(r)
    xs = list(range(len(rows)))
    vals = [v for _, v, _ in rows if v is not None]
    floor = min(vals) / 2 if vals else 1.0
    for x, (_, v, colour) in zip(xs, rows):
        if v is None:
            ax.annotate("n/a", (x, floor), ha="center", va="bottom", fontsize=8)
            continue
        ax.bar(x, v, color=colour)
        ax.annotate(f"{v:.3g}", (x, v), ha="center", va="bottom", fontsize=7)
    ax.set_yscale("log")
    ax.set_xticks(xs, [label for label, _, _ in rows], fontsize=7)
    ax.set_ylabel("ms, end to end (steady = median)")
    ax.set_title(name, fontsize=10)


def plot_colo(result: dict, path: Path | str) -> Path:
    """Draw `result` (h200x1.json's dict) into `path` (PNG, matplotlib Agg); returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = result.get("shapes") or {}
    fig, axes = plt.subplots(1, max(1, len(shapes)), figsize=(7 * max(1, len(shapes)), 4.8), squeeze=False)
    for ax, (name, r) in zip(axes[0], shapes.items()):
        _shape(ax, name, r)
    fig.suptitle(f"One GPU, trainer and vLLM engine colocated (CUDA IPC) - {result.get('gpus', '?')}, "
                 f"{result.get('date', '?')}", fontsize=10)
    return save(fig, path)


def main(argv: list[str]) -> int:
    return cli(argv, plot_colo, __doc__)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
