"""Publisher core against independent receivers (DenseReceiver / recv_sparse) on a real gloo group:
dense, auto (fallback to dense without a baseline; sparse with one; dense when sparse costs as much),
explicit sparse, the layout refusal, versions. The receivers' fingerprints must equal the report's."""

from __future__ import annotations

import threading

import pytest
import torch

from wsync.publish import LayoutError, Publisher, PublishError
from wsync.transfer.dense import DenseReceiver
from wsync.transfer.fingerprint import fingerprint
from wsync.transfer.meta import param_metas
from wsync.transfer.sparse import SparsePatch, apply_patches, recv_sparse

from .publish_helpers import run_group

BUCKET = 2048


class Policy(torch.nn.Module):
    def __init__(self, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.embed = torch.nn.Parameter(torch.randn(64, 16, generator=g).to(torch.bfloat16))
        self.w = torch.nn.Parameter(torch.randn(16, 16, generator=g))
        self.b = torch.nn.Parameter(torch.randn(16, generator=g).to(torch.float16))
        self.norm = torch.nn.Parameter(torch.ones(16, dtype=torch.bfloat16))


class DDPish(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.module = inner


def engine_params(seed: int = 9) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in Policy(seed).named_parameters()}


def publish_once(pub: Publisher, engine: dict[str, torch.Tensor], call):
    """Rank 0 runs ``call(pub, group, announce)``; rank 1 receives what the announced plan says."""
    box: dict = {}
    ready = threading.Event()

    def announce(plan):
        box["plan"] = plan
        ready.set()

    def rank0(group):
        return call(pub, group, announce)

    def rank1(group):
        assert ready.wait(60)
        plan = box["plan"]
        if plan.mode == "dense":
            DenseReceiver(plan.dense_metas, plan.bucket_bytes, engine).recv(group)
        else:
            apply_patches(engine, recv_sparse(group, plan.sparse_metas))
        return fingerprint(engine)

    report, engine_fps = run_group(2, [rank0, rank1])
    return report, engine_fps


def test_dense_then_auto_sparse_then_auto_dense():
    model = DDPish(Policy())  # names come as module.*, engines hold the plain names
    engine = engine_params()
    pub = Publisher(model, engine_metas=param_metas(engine.items()), bucket_bytes=BUCKET)
    assert [m.name for m in pub.metas()] == list(engine)

    # auto with nothing held: dense, and it says why
    rep, fps = publish_once(pub, engine, lambda p, g, a: p.auto(g, None, version=10, announce=a))
    assert (rep.mode, rep.requested, rep.version) == ("dense", "auto", "10")
    assert "no baseline" in rep.fallback
    assert rep.fingerprints == fps == fingerprint(dict(Policy().named_parameters()))
    assert rep.stats.wire_bytes == sum(t.numel() * t.element_size() for t in engine.values())

    # a few elements move: auto against version 10 sends only them
    with torch.no_grad():
        model.module.w[3, 4] += 1.0
        model.module.embed[7] = 0.5
    rep, fps = publish_once(pub, engine, lambda p, g, a: p.auto(g, "10", announce=a))
    assert (rep.mode, rep.version, rep.base_version, rep.fallback) == ("sparse", "11", "10", None)
    assert rep.elements == 1 + 16 and rep.tensors == 2
    assert rep.stats.wire_bytes < 300
    assert fps == fingerprint({n[len("module."):]: p for n, p in model.named_parameters()})
    assert rep.fingerprints == fps

    # everything moves: sparse would cost as much as dense, so auto sends dense and says so
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1)
    rep, fps = publish_once(pub, engine, lambda p, g, a: p.auto(g, "11", announce=a))
    assert (rep.mode, rep.version) == ("dense", "12") and "dense bytes" in rep.fallback
    assert rep.fingerprints == fps

    # the engines report a version the publisher holds no baseline of: never a patch, dense
    rep, fps = publish_once(pub, engine, lambda p, g, a: p.auto(g, "11", announce=a))
    assert rep.mode == "dense" and "'11'" in rep.fallback and rep.fingerprints == fps


def test_explicit_sparse_patch():
    model = Policy()
    engine = engine_params()
    pub = Publisher(model, bucket_bytes=BUCKET)
    publish_once(pub, engine, lambda p, g, a: p.dense(g, version="base", announce=a))
    idx = torch.tensor([0, 5, 17], dtype=torch.int32)
    vals = torch.tensor([1.0, 2.0, 3.0])
    with torch.no_grad():
        model.w.view(-1)[idx.long()] = vals
    patch = SparsePatch("w", idx, vals)
    rep, fps = publish_once(pub, engine,
                            lambda p, g, a: p.sparse(g, [patch], version="s1", base_version="base", announce=a))
    assert (rep.mode, rep.version, rep.base_version, rep.elements) == ("sparse", "s1", "base", 3)
    assert pub.baselines.keys() == ["s1"]  # the baseline moved forward by the patch
    assert rep.fingerprints == {"w": fps["w"]}
    assert fps == fingerprint(dict(model.named_parameters()))


def test_layout_mismatch_refused_before_any_byte():
    engine = engine_params()
    engine["w"] = torch.zeros(16, 17)
    with pytest.raises(LayoutError) as err:
        Publisher(Policy(), engine_metas=param_metas(engine.items()))
    assert (err.value.tensor, err.value.rule) == ("w", "shape")


def test_versions():
    pub = Publisher(Policy())
    assert pub.next_version() == "1" and pub.next_version(7) == "7"
    pub.version = "41"
    assert pub.next_version() == "42"
    pub.version = "step-a"
    with pytest.raises(PublishError, match="pass version="):
        pub.next_version()
    with pytest.raises(PublishError, match="mode must be"):
        pub.prepare("bogus")
