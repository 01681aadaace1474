"""The one-GPU section's plot and explanations, built from the committed results of the 2026-12-01 H200
run (bench/results/h200x1*.json): the plot is a PNG, every miss gets its numbers from the raw JSON, a
missing raw JSON gives no breakdown (never a made-up number)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from bench import colo_explain, colo_plot, colo_report

RESULTS = Path(__file__).resolve().parents[2] / "bench" / "results"


def _load(name: str) -> dict:
    return json.loads((RESULTS / name).read_text())


def test_plot_from_the_committed_result(tmp_path):
    result = _load("h200x1.json")
    out = colo_plot.plot_colo(result, tmp_path / "p.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    labels = [label for label, _, _ in colo_plot.bars(result["shapes"]["qwen2.5-7b"])]
    assert labels[:5] == ["d2d\nfloor", "vLLM\nipc\nsteady", "vLLM\nipc\nfirst", "wsync\ndense\nsteady",
                          "wsync\ndense\nfirst"] and labels[-1] == "wsync\nsparse\n0.1" and len(labels) == 9
    missing = {"d2d_floor_ms": 1.0, "wsync_colo_sparse_ms": {"0.01": None}}
    assert [v for _, v, _ in colo_plot.bars(missing)] == [1.0] + [None] * 8
    colo_plot.plot_colo({"gpus": "g", "date": "d", "shapes": {"x": missing}}, tmp_path / "q.png")


def test_sparse_miss_breakdown_adds_up_from_the_raw_json():
    raw = _load("h200x1-raw.json")
    bd = colo_explain.sparse_breakdown(raw["qwen2.5-7b"], "0.01")
    assert bd["e2e"] == _load("h200x1.json")["shapes"]["qwen2.5-7b"]["wsync_colo_sparse_ms"]["0.01"]
    assert abs(bd["write"] + bd["ready"] + bd["rpc"] + bd["left"] - bd["e2e"]) < 1e-9
    assert abs(bd["prep"] + bd["apply"] + bd["engine_rest"] + bd["transport"] - bd["rpc"]) < 1e-9
    assert bd["chunks"] == 3 and bd["elements"] > 0


def test_section_explains_the_miss_and_links_the_plot(tmp_path):
    for name in ("h200x1.json", "h200x1-raw.json", "h200x1-run1.json"):
        shutil.copy(RESULTS / name, tmp_path / name)
    colo_plot.plot_colo(_load("h200x1.json"), tmp_path / "h200x1.png")
    (tmp_path / "docs").mkdir()
    text = "\n".join(colo_report.render_one_gpu(tmp_path / "h200x1.json", tmp_path / "docs" / "B.md"))
    assert "| 7B sparse 0.01 <= dense / 3 | MISS | 19.56 vs 4.86 |" in text
    assert "![one GPU, 1x NVIDIA H200, 2026-12-01](../h200x1.png)" in text
    assert "**Miss: 7B sparse at density 0.01 = 19.56 ms vs dense / 3 = 4.86 ms**" in text
    assert "3 chunks of 2^25 indices" in text and "236.93 ms (23 chunks)" in text
    assert "**Not implemented:**" in text and "History:" in text and "Engine flattening at map time" in text
    (tmp_path / "h200x1-raw.json").unlink()
    (tmp_path / "h200x1-run1.json").unlink()
    text = "\n".join(colo_report.render_one_gpu(tmp_path / "h200x1.json"))
    assert "raw JSON with the per-sync parts is missing" in text and "History:" not in text
