"""WsyncWorkerExtension's direct path (wsync_build_param_map / wsync_recv_dense_direct /
wsync_recv_sparse_direct) on CPU: a vLLM-shaped fake Qwen2 runtime model (tests/fakes/fake_vllm.py), a real
2-rank gloo SyncGroup (two threads), wsync's own send_dense / send_sparse on the other end."""

from __future__ import annotations

import pytest
import torch
from bench.shapes import SHAPES, Shape, fused_tensors, hf_metas, make_weights, runtime_layout

from tests.fakes.fake_vllm import FakeWorker, _Embedding, run_pair
from wsync.engines.vllm.detect import VLLMUnsupportedError
from wsync.transfer.delta import diff_patches
from wsync.transfer.dense import send_dense
from wsync.transfer.encodings import SparseMeta, SparsePatch
from wsync.transfer.group import Rendezvous, free_port, open_group
from wsync.transfer.sparse import plan_sparse, send_sparse

TINY = SHAPES["tiny"]
SMALL = Shape("small", 64, 2, 4, 2, 96, 200, True)  # vocab 200: padded to 256 rows in the fake
UNTIED = Shape("untied", 64, 2, 4, 2, 96, 192, False)
BUCKET = 8192  # many buckets, double buffering, big tensors alone


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def connect(worker: FakeWorker):
    rdv = Rendezvous("127.0.0.1", free_port(), 2, "gloo", "direct-test")

    def trainer():
        g = open_group(rdv, 0, "cpu", 30.0)
        g.barrier()  # wsync_open_sync_group(warmup=True) meets us here
        return g

    group, info = run_pair(trainer, lambda: worker.wsync_open_sync_group(rdv.to_dict(), 1, 30.0))
    assert info["rank"] == 1
    return group


def runtime_equals(worker: FakeWorker, weights: dict, shape: Shape) -> bool:
    params = dict(worker.model_runner.model.named_parameters())
    for rt, t in fused_tensors(weights, runtime_layout(hf_metas(shape), shape.tied)):
        p = params[rt].detach()
        if not torch.equal(bits(p[: t.shape[0]] if p.dim() else p), bits(t)):
            return False
    return True


@pytest.mark.parametrize("shape", [TINY, SMALL, UNTIED], ids=lambda s: s.name)
def test_map_dense_then_sparse_direct_bit_exact(shape):
    worker = FakeWorker(shape)
    metas = hf_metas(shape)
    built = worker.wsync_build_param_map([m.to_dict() for m in metas], BUCKET)
    want = {n: [rt, first, rows] for rt, parts in runtime_layout(metas, shape.tied).items() for n, first, rows in parts}
    assert built["slices"] == want and built["tensors"] == len(metas) and built["skipped"] == []
    assert built["padded_rows"] == ({"model.embed_tokens.weight": 56} if shape is SMALL else {})
    group = connect(worker)
    weights = make_weights(metas, torch.device("cpu"), seed=3)
    items = list(weights.items())
    _, got = run_pair(lambda: send_dense(group, items, BUCKET), worker.wsync_recv_dense_direct)
    assert got["bytes"] == sum(m.nbytes for m in metas) and got["messages"] > 3
    assert runtime_equals(worker, weights, shape)

    synced = {n: t.clone() for n, t in weights.items()}
    for t in weights.values():  # a real delta, incl. a sign flip of zero-valued bits
        t.view(-1)[::37] = (t.view(-1)[::37] * 3 + 1).to(t.dtype)
    patches = diff_patches(weights, synced)
    specs = {m.name: m for m in metas}
    for encoding in ("auto", "flat_int32"):
        sm = plan_sparse(patches, specs, encoding, weights)
        _, got = run_pair(lambda sm=sm: send_sparse(group, patches, sm, weights),
                          lambda sm=sm: worker.wsync_recv_sparse_direct([m.to_dict() for m in sm]))
        assert got["elements"] == sum(m.count for m in sm)
        assert runtime_equals(worker, weights, shape)
    group.close()
    worker.wsync_close_sync_group()


def test_tied_lm_head_in_metas_is_received_and_dropped():
    worker = FakeWorker(TINY)
    metas = hf_metas(TINY) + hf_metas(Shape("x", 256, 0, 4, 2, 768, 8192, False))[-1:]  # + lm_head.weight
    assert metas[-1].name == "lm_head.weight"
    built = worker.wsync_build_param_map([m.to_dict() for m in metas], BUCKET)
    assert built["skipped"] == ["lm_head.weight"]
    group = connect(worker)
    weights = make_weights(metas, torch.device("cpu"), seed=4)
    run_pair(lambda: send_dense(group, list(weights.items()), BUCKET), worker.wsync_recv_dense_direct)
    weights.pop("lm_head.weight")
    assert runtime_equals(worker, weights, TINY)
    group.close()


def test_map_refuses_what_it_cannot_map():
    metas = [m.to_dict() for m in hf_metas(TINY)]
    w = FakeWorker(TINY)
    with pytest.raises(ValueError, match="no checkpoint tensor maps"):
        w.wsync_build_param_map([m for m in metas if "layers.1.mlp.down_proj" not in m["name"]], BUCKET)
    with pytest.raises(ValueError, match="uncovered"):
        w.wsync_build_param_map([m for m in metas if "layers.1.self_attn.k_proj.weight" not in m["name"]], BUCKET)
    bad = [dict(m, shape=[m["shape"][0] + 64, m["shape"][1]]) if m["name"].endswith("q_proj.weight") else m
           for m in metas]
    with pytest.raises(ValueError, match="does not fit"):
        w.wsync_build_param_map(bad, BUCKET)
    with pytest.raises(ValueError, match="does not fit"):
        w.wsync_build_param_map([dict(m, dtype="float32") for m in metas], BUCKET)
    with pytest.raises(ValueError, match="twice"):
        w.wsync_build_param_map(metas + metas[:1], BUCKET)
    with pytest.raises(ValueError, match="no module"):
        w.wsync_build_param_map(metas + [{"name": "model.extra.weight", "dtype": "bfloat16", "shape": [4]}], BUCKET)
    w.vllm_config.parallel_config.world_size = 2
    with pytest.raises(VLLMUnsupportedError, match="TP=1"):
        w.wsync_build_param_map(metas, BUCKET)
    w2 = FakeWorker(TINY)
    w2.model_runner.model.__class__ = type("GemmaForCausalLM", (type(w2.model_runner.model),), {})
    with pytest.raises(VLLMUnsupportedError, match="not mapped"):
        w2.wsync_build_param_map(metas, BUCKET)


def test_padding_rows_only_for_embeddings():
    w = FakeWorker(TINY)
    norm = w.model_runner.model.model.norm
    norm.weight = torch.nn.Parameter(torch.zeros(300, dtype=torch.bfloat16), requires_grad=False)
    with pytest.raises(ValueError, match="cover 256 of 300"):
        w.wsync_build_param_map([m.to_dict() for m in hf_metas(TINY)], BUCKET)
    assert isinstance(w.model_runner.model.model.embed_tokens, _Embedding)


def test_recv_needs_group_and_map_and_rebuilds_a_stale_map():
    w = FakeWorker(TINY)
    with pytest.raises(RuntimeError, match="first"):
        w.wsync_recv_dense_direct()
    metas = hf_metas(TINY)
    w.wsync_build_param_map([m.to_dict() for m in metas], BUCKET)
    group = connect(w)
    o_proj = w.model_runner.model.model.layers[0].self_attn.o_proj
    old = o_proj.weight
    o_proj.weight = torch.nn.Parameter(old.detach().clone(), requires_grad=False)  # a reload did this
    weights = make_weights(metas, torch.device("cpu"), seed=9)
    run_pair(lambda: send_dense(group, list(weights.items()), BUCKET), w.wsync_recv_dense_direct)
    name = "model.layers.0.self_attn.o_proj.weight"
    assert torch.equal(bits(o_proj.weight), bits(weights[name]))  # the live parameter got the bytes
    assert not torch.equal(bits(old), bits(weights[name]))  # not the dead one
    assert w._wsync_map["targets"][name].data_ptr() == o_proj.weight.data_ptr()
    group.close()


def test_sparse_direct_checks_names_before_and_indices_after_receipt():
    w = FakeWorker(TINY)
    metas = hf_metas(TINY)
    w.wsync_build_param_map([m.to_dict() for m in metas], BUCKET)
    group = connect(w)
    bogus = SparseMeta("model.layers.0.self_attn.qkv_proj.weight", "bfloat16", [384, 256], 1, "flat_int32", 6)
    with pytest.raises(ValueError, match="not a mapped checkpoint tensor"):
        w.wsync_recv_sparse_direct([bogus.to_dict()])
    before = {n: p.detach().clone() for n, p in w.model_runner.model.named_parameters()}
    name = "model.layers.0.self_attn.k_proj.weight"
    numel = 128 * 256
    good = SparsePatch("model.norm.weight", torch.tensor([1], dtype=torch.int32), torch.ones(1, dtype=torch.bfloat16))
    bad = SparsePatch(name, torch.tensor([3, numel], dtype=torch.int32), torch.ones(2, dtype=torch.bfloat16))
    sm = [SparseMeta(p.name, "bfloat16", [256] if "norm" in p.name else [128, 256], p.count, "flat_int32", 6 * p.count)
          for p in (good, bad)]
    with pytest.raises(ValueError, match="out of range; nothing was applied"):
        run_pair(lambda: send_sparse(group, [good, bad], sm),
                 lambda: w.wsync_recv_sparse_direct([m.to_dict() for m in sm]))
    after = dict(w.model_runner.model.named_parameters())
    assert all(torch.equal(bits(before[n]), bits(after[n])) for n in before)
    group.close()


def test_index_range_check_catches_both_ends():
    check = FakeWorker._wsync_in_range
    idx = [torch.tensor([0, 5], dtype=torch.int32), torch.tensor([3], dtype=torch.int32)]
    assert check(idx, [6, 4])
    assert not check(idx, [5, 4])
    assert not check([torch.tensor([2, -1], dtype=torch.int32)], [4])
