"""TensorMeta, dtype names, bucket planning, and single-process group basics."""

from __future__ import annotations

import pytest
import torch

from wsync.transfer import (
    Rendezvous,
    TensorMeta,
    backend_for,
    dtype_name,
    free_port,
    open_group,
    param_metas,
    plan_buckets,
    torch_dtype,
)


def test_dtype_names() -> None:
    for dt in (torch.bfloat16, torch.float32, torch.float16, torch.int32, torch.uint8, torch.bool):
        assert torch_dtype(dtype_name(dt)) == dt
    assert dtype_name(torch.bfloat16) == "bfloat16" and torch_dtype("torch.float32") == torch.float32
    with pytest.raises(ValueError):
        torch_dtype("Size")


def test_tensor_meta() -> None:
    m = TensorMeta("w", "bfloat16", [3, 4])
    assert (m.numel, m.nbytes, m.torch_dtype) == (12, 24, torch.bfloat16)
    assert TensorMeta.from_dict(m.to_dict()) == m
    assert TensorMeta("s", "float32", []).numel == 1
    big = TensorMeta("huge", "bfloat16", [2**31])  # metadata only, nothing allocated
    assert big.nbytes == 2**32
    torch.manual_seed(0)
    metas = param_metas([("a", torch.zeros(2, 3)), ("b", torch.zeros(5, dtype=torch.float16))])
    assert [(x.name, x.dtype, x.shape) for x in metas] == [("a", "float32", [2, 3]), ("b", "float16", [5])]


def metas_of(sizes: list[int]) -> list[TensorMeta]:
    return [TensorMeta(f"t{i}", "uint8", [n]) for i, n in enumerate(sizes)]


def test_plan_buckets_rules() -> None:
    assert plan_buckets(metas_of([]), 10) == []
    assert plan_buckets(metas_of([4, 4, 2, 1]), 10) == [[0, 1, 2], [3]]  # 4+4+2 == 10 fits exactly
    assert plan_buckets(metas_of([4, 25, 3, 3]), 10) == [[0], [1], [2, 3]]  # oversized goes alone
    assert plan_buckets(metas_of([25, 30]), 10) == [[0], [1]]
    assert plan_buckets(metas_of([0, 0, 10, 0]), 10) == [[0, 1, 2, 3]]
    sizes = [7, 1, 9, 2, 2, 2, 11, 5]
    buckets = plan_buckets(metas_of(sizes), 10)
    assert [i for b in buckets for i in b] == list(range(len(sizes)))  # fixed order, all present
    for b in buckets:
        assert len(b) == 1 or sum(sizes[i] for i in b) <= 10
    with pytest.raises(ValueError):
        plan_buckets(metas_of([1]), 0)


def test_backend_for_and_rendezvous() -> None:
    assert backend_for("cpu") == "gloo" and backend_for(None) == "gloo"
    assert backend_for(torch.device("cuda", 1)) == "nccl"
    rdv = Rendezvous("127.0.0.1", free_port(), 3)
    assert Rendezvous.from_dict(rdv.to_dict()) == rdv and rdv.backend == "gloo" and rdv.name == "wsync"
    assert 0 < free_port() < 65536


def test_single_rank_groups_open_and_close_repeatedly() -> None:
    for i in range(2):
        group = open_group(Rendezvous("127.0.0.1", free_port(), 1, name=f"g{i}"), 0, timeout_s=20)
        t = torch.arange(4, dtype=torch.bfloat16)
        assert torch.equal(group.broadcast(t), torch.arange(4, dtype=torch.bfloat16))
        group.broadcast(torch.zeros(3, dtype=torch.float8_e4m3fn))  # non-native dtype goes as bytes
        group.barrier()
        assert (group.rank, group.world_size, group.backend, group.device.type) == (0, 1, "gloo", "cpu")
        group.close()
        group.close()
        assert group.closed
        with pytest.raises(RuntimeError, match="closed"):
            group.barrier()
    with pytest.raises(ValueError):
        open_group(Rendezvous("127.0.0.1", 1, 2), 2)
    with pytest.raises(ValueError, match="nccl"):
        open_group(Rendezvous("127.0.0.1", 1, 1, backend="nccl"), 0, device="cpu")
