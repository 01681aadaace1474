"""bench/: the CPU path end to end for the tiny shape (two processes over gloo), the vLLM phase's flow
with the CPU test double, the report, and the pieces the bench relies on. No timing assertions."""

from __future__ import annotations

import json

import pytest
import torch
from bench import report, sync_bench
from bench.proto import CheckError, build_sparse, check_equal, mutate, send_sparse_wire
from bench.shapes import (
    SHAPES,
    fused_tensors,
    hf_metas,
    make_weights,
    runtime_layout,
    runtime_patches,
    runtime_shapes,
)

from wsync.transfer.delta import diff_patches
from wsync.transfer.sparse import apply_patch, send_sparse

ISSUE_KEYS = ("nccl_broadcast_ms", "vllm_dense_ms", "vllm_dense_first_ms", "wsync_dense_ms", "wsync_dense_first_ms",
              "wsync_dense_send_ms", "wsync_ref_dense_ms", "vllm_sparse_ms", "wsync_sparse_ms",
              "wsync_sparse_send_ms", "wire_bytes_per_changed_elem", "model", "gpus", "date")
FAST = ["--device", "cpu", "--shape", "tiny", "--iters", "1", "--warmup", "0", "--densities", "0.01,0.3"]


def test_cpu_bench_runs_and_writes_the_issue_keys(tmp_path):
    out = tmp_path / "cpu.json"
    assert sync_bench.main(FAST + ["--skip-vllm", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    for key in ISSUE_KEYS:
        assert key in r, key
    for key in ("nccl_broadcast_ms", "wsync_dense_ms", "wsync_dense_first_ms", "wsync_dense_send_ms",
                "wsync_ref_dense_ms"):
        assert isinstance(r[key], float), key
    for key in ("wsync_sparse_ms", "wsync_sparse_send_ms", "wire_bytes_per_changed_elem", "wsync_ref_sparse_flat_ms",
                "diff_gbps"):
        assert set(r[key]) == {"0.01", "0.3"}, key
    assert r["vllm_dense_ms"] is None and r["vllm_sparse_ms"] == {} and r["wsync_dense_engine"] == "reference"
    assert r["errors"] == {} and r["check_failed"] is False and r["verified_syncs"] == 2 + 2 * 2 * 2
    assert r["device"] == "cpu" and r["backend"] == "gloo" and r["gpus"] == 0
    assert out.with_suffix(".png").exists()
    doc = tmp_path / "BENCHMARKS.md"
    assert report.main([str(out), str(tmp_path / "h100x2.json"), "--out", str(doc)]) == 0
    text = doc.read_text()
    assert "only ratios are shown" in text and "h100x2.json: not run yet" in text and "### Targets" in text
    assert "python bench/sync_bench.py --device cpu" in text


def test_vllm_phase_flow_with_the_cpu_test_double(tmp_path):
    out = tmp_path / "fake.json"
    assert sync_bench.main(FAST + ["--fake-vllm", "--encodings", "auto", "--no-plot", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["fake_vllm"] is True and r["errors"] == {} and r["check_failed"] is False
    assert r["wsync_dense_engine"] == "vllm" and r["wsync_sparse_engine"] == "vllm"
    for key in ("vllm_dense_ms", "vllm_dense_first_ms", "vllm_dense_unpacked_ms", "vllm_dense_packed_ms",
                "wsync_dense_ms", "wsync_dense_first_ms", "wsync_dense_map_build_ms"):
        assert isinstance(r[key], float), key
    assert set(r["vllm_sparse_ms"]) == set(r["wsync_sparse_ms"]) == {"0.01", "0.3"}
    raw = r["raw"]["tiny"]
    assert raw["wsync_vllm_dense"]["map"]["runtime_params"] == 30


def test_sparse_wire_of_the_bench_equals_send_sparse():
    """The bench splits build and send; the bytes on the wire must be wsync's exactly."""

    class Recorder:
        device = torch.device("cpu")

        def __init__(self):
            self.sent = []

        def broadcast_async(self, t, src=0):
            self.sent.append(t.detach().clone())
            return self

        def wait(self):
            return True

    metas = hf_metas(SHAPES["tiny"])
    specs = {m.name: m for m in metas}
    old = make_weights(metas, torch.device("cpu"), seed=0)
    cur = {n: t.clone() for n, t in old.items()}
    mutate(cur, 0.02, torch.Generator().manual_seed(1))
    patches = diff_patches(cur, old)
    for encoding in ("auto", "flat_int32", "gap", "bitmask"):
        sm, stream = build_sparse(patches, specs, encoding, cur, torch.device("cpu"))
        a, b = Recorder(), Recorder()
        send_sparse(a, patches, sm, cur)
        send_sparse_wire(b, sm, patches, stream)
        assert len(a.sent) == len(b.sent)
        for x, y in zip(a.sent, b.sent):
            assert x.dtype == y.dtype and torch.equal(x.view(-1).view(torch.uint8), y.view(-1).view(torch.uint8))


def test_mutate_changes_every_chosen_element_and_stays_finite():
    w = make_weights(hf_metas(SHAPES["tiny"]), torch.device("cpu"), seed=0)
    before = {n: t.clone() for n, t in w.items()}
    n = mutate(w, 0.05, torch.Generator().manual_seed(2))
    assert n == sum(p.count for p in diff_patches(w, before))
    assert all(torch.isfinite(t.float()).all() for t in w.values())


@pytest.mark.parametrize("shape", ["tiny", "qwen2.5-7b"])
def test_runtime_layout_and_patches_match_vllm_fusion(shape):
    s = SHAPES[shape]
    metas = hf_metas(s)
    layout = runtime_layout(metas, s.tied)
    shapes = runtime_shapes(layout, metas)
    assert ("lm_head.weight" in shapes) == (not s.tied)
    assert shapes["model.layers.0.self_attn.qkv_proj.weight"] == [(s.heads + 2 * s.kv_heads) * s.head_dim, s.hidden]
    assert shapes["model.layers.0.mlp.gate_up_proj.weight"] == [2 * s.intermediate, s.hidden]
    if shape != "tiny":
        return
    old = make_weights(metas, torch.device("cpu"), seed=5)
    cur = {n: t.clone() for n, t in old.items()}
    mutate(cur, 0.03, torch.Generator().manual_seed(3))
    fused_old = dict((n, t.clone()) for n, t in fused_tensors(old, layout))
    for p in runtime_patches(diff_patches(cur, old), layout, shapes):
        apply_patch(fused_old[p.name], p)
    for name, t in fused_tensors(cur, layout):
        assert torch.equal(fused_old[name], t), name


def test_check_equal_names_the_difference():
    check_equal("x", {"a": "1"}, {"a": "1"})
    with pytest.raises(CheckError, match="1 tensors differ"):
        check_equal("x", {"a": "1", "b": "2"}, {"a": "1", "b": "3"})
