"""A real 3-rank gloo group (trainer rank 0 + 2 receivers): dense and every sparse encoding, bit-exact."""

from __future__ import annotations

import json

import pytest
import torch
import torch.multiprocessing as mp

from wsync.transfer import (
    ENCODINGS,
    PatchValidationError,
    Rendezvous,
    SparseMeta,
    SparsePatch,
    SyncGroup,
    TensorMeta,
    apply_patches,
    digest,
    fingerprint,
    free_port,
    open_group,
    param_metas,
    plan_sparse,
    recv_dense,
    recv_sparse_with_stats,
    send_dense,
    send_sparse,
    validate_patches,
)

BUCKET = 4096
MODEL = {  # name: (shape, dtype)
    "embed": ([256, 48], torch.bfloat16),  # 24 KiB: own bucket
    "norm": ([48], torch.bfloat16),
    "scalar": ([], torch.float32),
    "odd": ([7], torch.float16),  # 14 bytes, not a multiple of 4
    "empty": ([0, 4], torch.bfloat16),
    "w1": ([48, 33], torch.float32),  # 6336 bytes: own bucket; rank 2 holds it non-contiguous
    "bias": ([33], torch.float32),
    "big": ([120, 100], torch.float32),
}
DENSITIES = [0.0, 1e-4, 0.01, 0.3, 1.0]


def make_model(seed: int, noncontiguous: bool, device: torch.device) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, (shape, dtype) in MODEL.items():
        t = torch.randn(shape, generator=gen).to(dtype)
        if name == "w1" and noncontiguous:
            t = t.t().contiguous().t()  # same values, non-contiguous storage
        out[name] = t.to(device)
    return out


def make_patches(encoding: str, seed: int, device: torch.device) -> list[SparsePatch]:
    gen = torch.Generator().manual_seed(seed)
    patches = []
    for i, (name, (shape, dtype)) in enumerate(MODEL.items()):
        numel = int(torch.tensor(shape).prod()) if shape else 1
        if encoding == "rows":
            if len(shape) != 2:
                continue
            rows = torch.randperm(shape[0], generator=gen)[: max(1, shape[0] // 10)]
            idx = (rows.unsqueeze(1) * shape[1] + torch.arange(shape[1])).reshape(-1)
        else:
            density = 0.99 if encoding == "dense-full" and name == "big" else DENSITIES[i % len(DENSITIES)]
            k = 0 if density == 0 else max(1, round(density * numel))
            idx = torch.randperm(numel, generator=gen)[:k]
        vals = torch.randn(idx.numel(), generator=gen).to(dtype)
        patches.append(SparsePatch(name, idx.to(torch.int32), vals).to(device))
    return patches


def bcast_json(group: SyncGroup, obj: object = None) -> object:
    """Out-of-band metadata stand-in: rank 0's JSON reaches everyone."""
    dev = group.device
    data = torch.tensor(list(json.dumps(obj).encode()), dtype=torch.uint8, device=dev) if group.rank == 0 else None
    size = torch.tensor([data.numel() if data is not None else 0], dtype=torch.int64, device=dev)
    group.broadcast(size)
    if data is None:
        data = torch.empty(int(size), dtype=torch.uint8, device=dev)
    group.broadcast(data)
    return json.loads(bytes(data.tolist()).decode())


def check_same_as_trainer(group: SyncGroup, params: dict[str, torch.Tensor], what: str) -> None:
    mine = fingerprint(params)
    theirs = bcast_json(group, mine if group.rank == 0 else None)
    assert mine == theirs, f"{what}: rank {group.rank} differs from trainer"
    assert mine == fingerprint({n: t.cpu() for n, t in params.items()})  # device-independent
    assert digest(fingerprint(params)) == bcast_json(group, digest(fingerprint(params)) if group.rank == 0 else None)


def dense_round(group: SyncGroup, params: dict[str, torch.Tensor]) -> None:
    if group.rank == 0:
        bcast_json(group, [m.to_dict() for m in param_metas(params.items())])
        stats = send_dense(group, list(params.items()), BUCKET)
        assert stats.bytes == stats.wire_bytes == sum(t.numel() * t.element_size() for t in params.values())
    else:
        metas = [TensorMeta.from_dict(d) for d in bcast_json(group)]
        storage = {n: t.data_ptr() for n, t in params.items()}
        stats = recv_dense(group, metas, BUCKET, params)
        assert {n: t.data_ptr() for n, t in params.items()} == storage  # written in place
        assert params["w1"].is_contiguous() == (group.rank != group.world_size - 1)
    assert stats.messages > 1
    check_same_as_trainer(group, params, "dense")


def sparse_round(group: SyncGroup, params: dict[str, torch.Tensor], encoding: str, seed: int) -> None:
    if group.rank == 0:
        patches = make_patches(encoding, seed, group.device)
        specs = {m.name: m for m in param_metas(params.items())}
        validate_patches(patches, specs)
        apply_patches(params, patches)  # the trainer moves first
        full = params if encoding == "dense-full" else None
        metas = plan_sparse(patches, specs, "auto" if full is not None else encoding, full)
        if encoding == "dense-full":
            assert any(m.encoding == "dense" and m.count > 0 for m in metas)
        bcast_json(group, [m.to_dict() for m in metas])
        send_sparse(group, patches, metas, full)
    else:
        metas = [SparseMeta.from_dict(d) for d in bcast_json(group)]
        patches, stats = recv_sparse_with_stats(group, metas)
        assert [p.name for p in patches] == [m.name for m in metas]
        assert stats.wire_bytes >= sum(m.nbytes for m in metas)
        apply_patches(params, patches)
    check_same_as_trainer(group, params, f"sparse/{encoding}")


def worker(rank: int, ports: list[int], backend: str, world: int) -> None:
    torch.manual_seed(rank)
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    group = open_group(Rendezvous("127.0.0.1", ports[0], world, backend), rank, device, timeout_s=60)
    assert group.device == device
    params = make_model(1 if rank == 0 else 2, rank == world - 1 and rank > 0, device)
    dense_round(group, params)
    for i, encoding in enumerate([*ENCODINGS, "dense-full"]):
        sparse_round(group, params, encoding, seed=100 + i)
    try:
        dup = SparsePatch("embed", torch.tensor([0, 0], dtype=torch.int32), torch.zeros(2, dtype=torch.bfloat16))
        validate_patches([dup.to(device)], {m.name: m for m in param_metas(params.items())})
        raise AssertionError("duplicate indices accepted")
    except PatchValidationError as err:
        assert err.rule == "indices_unique"
    group.barrier()
    group.close(abort=rank > 0)  # engines may abort while the trainer shuts down gracefully
    group.close()
    # the same process opens a second group later (no init_process_group)
    with open_group(Rendezvous("127.0.0.1", ports[1], world, backend, "second"), rank, device, 60) as again:
        t = torch.full((5,), 7 if rank == 0 else 0, dtype=torch.int32, device=device)
        assert again.broadcast(t).tolist() == [7] * 5
        again.barrier()


def test_three_rank_gloo_sync_dense_and_sparse() -> None:
    torch.manual_seed(0)
    mp.spawn(worker, args=([free_port(), free_port()], "gloo", 3), nprocs=3, join=True)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_two_rank_nccl_sync_dense_and_sparse() -> None:
    torch.manual_seed(0)
    mp.spawn(worker, args=([free_port(), free_port()], "nccl", 2), nprocs=2, join=True)
