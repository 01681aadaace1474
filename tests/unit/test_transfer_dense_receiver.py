"""DenseReceiver: built once, reused for many dense syncs into the same targets (as a vLLM worker does),
with staged buckets written out by fused copies, targets that are slices of fused tensors, a
non-contiguous target, and in-place buckets side by side. Real gloo groups, two processes."""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp

from wsync.transfer import Rendezvous, TensorMeta, fingerprint, free_port, open_group, param_metas
from wsync.transfer.dense import DenseReceiver, send_dense
from wsync.transfer.validate import PatchValidationError

from .test_transfer_group import MODEL, bcast_json, make_model

BUCKET = 4096
SYNCS = 3


def _fused_targets(params: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """norm and bias as row slices of one bigger buffer (vLLM's fused qkv / gate_up layout), w1
    non-contiguous, the rest as they are."""
    fused = torch.zeros(48 * 2 + 33 * 4, dtype=torch.uint8)
    out = dict(params)
    out["norm"] = fused[:96].view(torch.bfloat16)
    out["bias"] = fused[96:].view(torch.float32)
    out["w1"] = params["w1"].t().contiguous().t()
    return out, fused


def _worker(rank: int, port: int) -> None:
    group = open_group(Rendezvous("127.0.0.1", port, 2, "gloo"), rank, torch.device("cpu"), timeout_s=60)
    params = make_model(1 if rank == 0 else 2, False, torch.device("cpu"))
    if rank == 0:
        bcast_json(group, [m.to_dict() for m in param_metas(params.items())])
        gen = torch.Generator().manual_seed(5)
        for _ in range(SYNCS):
            for t in params.values():
                if t.numel():
                    t.copy_(torch.randn(t.shape, generator=gen).to(t.dtype))
            send_dense(group, list(params.items()), BUCKET)
            bcast_json(group, fingerprint(params))
    else:
        metas = [TensorMeta.from_dict(d) for d in bcast_json(group)]
        targets, fused = _fused_targets(params)
        rx = DenseReceiver(metas, BUCKET, targets)
        staged = sum(1 for _, slot, _ in rx.steps if slot >= 0)
        assert 0 < staged < len(rx.steps)  # both kinds of bucket are exercised
        before = None
        for _ in range(SYNCS):
            stats = rx.recv(group)
            assert stats.wire_bytes == stats.bytes == sum(m.nbytes for m in metas)
            assert stats.zero_copy == len(rx.steps) - staged
            got = fingerprint(targets)
            assert got == bcast_json(group)
            assert got != before  # every sync moved new values in
            before = got
        assert not targets["w1"].is_contiguous()
        assert torch.equal(fused[:96].view(torch.bfloat16), targets["norm"])
    group.close()


def test_dense_receiver_reused_across_syncs():
    assert {"norm", "bias", "w1"} <= set(MODEL)
    mp.spawn(_worker, args=(free_port(),), nprocs=2, join=True)


def test_dense_receiver_validates_before_anything_moves():
    params = make_model(1, False, torch.device("cpu"))
    metas = param_metas(params.items())
    bad = dict(params)
    bad["bias"] = torch.zeros(34, dtype=torch.float32)
    with pytest.raises(PatchValidationError, match="bias: shape_match"):
        DenseReceiver(metas, BUCKET, bad)
