"""The one-GPU bench's CPU-side logic: the result JSON has exactly issue 10's keys, a failed or missing
section gives null (never a made-up number), and the trainer-step patches are exact."""

from __future__ import annotations

import json

import torch
from bench.colo_bench import DENSITIES, KEYS, assemble, main, shape_result
from bench.colo_run import mutate_patches


def test_cpu_smoke_writes_exactly_the_issue_keys(tmp_path):
    assert main(["--cpu-smoke", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "h200x1-smoke.json").read_text())
    assert set(result) == {"gpus", "date", "shapes"}
    assert set(result["shapes"]) == {"qwen2.5-0.5b", "qwen2.5-7b"}
    for r in result["shapes"].values():
        assert tuple(r) == KEYS
        assert set(r["wsync_colo_sparse_ms"]) == set(DENSITIES)
    small, big = result["shapes"]["qwen2.5-0.5b"], result["shapes"]["qwen2.5-7b"]
    assert small["vllm_ipc_ms"] == 110.0  # best steady of unpacked (150) and packed (110)
    assert small["vllm_ipc_first_ms"] == 120.0
    assert big["vllm_ipc_ms"] == 1500.0  # packed failed: unpacked stands
    raw = json.loads((tmp_path / "h200x1-smoke-raw.json").read_text())
    assert raw["qwen2.5-7b"]["errors"]["vllm_packed"]


def test_missing_sections_are_null():
    r = shape_result({"sections": {"floor": {"median": 1.5}}, "errors": {"engine": "boom"}})
    assert r["d2d_floor_ms"] == 1.5
    assert r["vllm_ipc_ms"] is None and r["wsync_colo_dense_ms"] is None and r["extra_gpu_mem_mib"] is None
    assert r["wsync_colo_sparse_ms"] == {d: None for d in DENSITIES}
    assert assemble({"x": {"sections": {}}}, "g", "d") == {"gpus": "g", "date": "d", "shapes": {"x": shape_result({})}}


def test_mutate_patches_changes_exactly_the_patched_elements():
    g = torch.Generator().manual_seed(0)
    weights = {"a": torch.randn(64, 32).to(torch.bfloat16), "b": torch.randn(100).to(torch.bfloat16)}
    before = {n: t.clone() for n, t in weights.items()}
    patches = mutate_patches(weights, 0.1, g)
    for p in patches:
        flat, old = weights[p.name].view(-1), before[p.name].view(-1)
        assert p.indices.dtype == torch.int32 and torch.all(p.indices[1:] > p.indices[:-1])
        assert torch.equal(flat[p.indices.long()], p.values)
        changed = (flat.view(torch.int16) != old.view(torch.int16)).nonzero().view(-1)
        assert torch.equal(changed, p.indices.long()) and p.count > 0
        assert torch.isfinite(flat.float()).all()


def test_report_renders_the_one_gpu_section(tmp_path):
    from bench import report

    missing = "\n".join(report.render([tmp_path / "h200x1.json"], tmp_path / "B.md").splitlines())
    assert "## One GPU (H200)" in missing and "Not run yet" in missing and "| target" not in missing
    main(["--cpu-smoke", str(tmp_path)])
    (tmp_path / "h200x1.json").write_text((tmp_path / "h200x1-smoke.json").read_text())
    text = report.render([tmp_path / "h200x1.json"], tmp_path / "B.md")
    assert "| wsync colocated dense, steady | 2.00 | 20.00 |" in text
    assert "| 0.5B dense <= vLLM ipc / 10 | yes | 2.00 vs 11.00 |" in text
