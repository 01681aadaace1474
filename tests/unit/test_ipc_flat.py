"""The flat IPC sparse format (transfer/ipc_flat.py) and flatten_by_dtype on CPU: bit-exact against the
per-tensor reference (apply_patches), several dtypes, fused slices sharing a storage, chunking, an
out-of-range index refused with nothing written, and the op count of a sync independent of the tensor
count (counted with a TorchDispatchMode)."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from wsync.transfer.apply import apply_patches
from wsync.transfer.encodings import SparsePatch
from wsync.transfer.flat import flatten_by_dtype, flatten_params
from wsync.transfer.ipc_flat import (
    FlatMeta,
    apply_flat,
    flat_layout,
    flat_metas,
    flat_ranges,
    read_flat,
    write_flat,
)

DTYPES = [torch.bfloat16, torch.float32, torch.float16]


def weights(n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i in range(n):
        shape = [int(torch.randint(1, 40, (1,), generator=g)), int(torch.randint(1, 9, (1,), generator=g))]
        out[f"t{i}"] = torch.randn(shape, generator=g).to(DTYPES[i % len(DTYPES)])
    return out


def patches_of(params: dict, density: float, seed: int) -> list[SparsePatch]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for name, t in params.items():
        idx = (torch.rand(t.numel(), generator=g) < density).nonzero().view(-1).to(torch.int32)
        out.append(SparsePatch(name, idx, torch.randn(idx.numel(), generator=g).to(t.dtype)))
    return out


def stage(patches, params):
    metas = flat_metas(patches, {n: t.shape for n, t in params.items()})
    buf = torch.full((flat_layout(metas).total + 32,), 0xAB, dtype=torch.uint8)
    write_flat(buf, metas, patches)
    return metas, buf


def clone(params):
    return {n: t.clone() for n, t in params.items()}


@pytest.mark.parametrize("layout", ["separate", "buckets", "by_dtype"])
@pytest.mark.parametrize("chunk", [None, 7])
def test_flat_apply_equals_per_tensor_reference(layout, chunk):
    base = weights(23, seed=1)
    for seed in (2, 3):
        patches = patches_of(base, 0.2, seed)
        ref, got = clone(base), clone(base)
        if layout == "buckets":
            flatten_params(got, 256)
        elif layout == "by_dtype":
            assert flatten_by_dtype(list(got.items()))["flattened"]
        apply_patches(ref, patches)
        metas, buf = stage(patches, base)
        staged = read_flat(buf, [m.to_list() for m in metas])  # plain data round trip
        out = apply_flat(flat_ranges(got), staged, chunk=chunk)
        assert out["elements"] == sum(p.count for p in patches)
        for n in base:
            assert torch.equal(ref[n].view(torch.uint8), got[n].view(torch.uint8)), n
        if layout == "by_dtype" and chunk is None:
            assert out["scatters"] == len(DTYPES)


def test_metas_grouped_by_dtype_and_layout_aligned():
    params = weights(7)
    metas = flat_metas(patches_of(params, 0.3, 0), {n: t.shape for n, t in params.items()})
    assert [m.dtype for m in metas] == sorted((m.dtype for m in metas), key=[m.dtype for m in metas].index)
    lay = flat_layout(metas)
    assert all(off % 16 == 0 for off, _, _ in lay.values.values())
    with pytest.raises(ValueError, match="grouped by dtype"):
        flat_layout([metas[0], metas[-1], metas[1]] if metas[0].dtype == metas[1].dtype else metas[::-1][:1]
                    + metas[:1] + metas[::-1][:1])
    with pytest.raises(ValueError, match="twice"):
        flat_layout([metas[0], metas[0]])
    assert FlatMeta.of(metas[0].to_list()) == metas[0]
    with pytest.raises(ValueError, match="count"):
        FlatMeta.of(["x", "bfloat16", [2], 3])


def test_fused_slices_of_one_storage_one_scatter():
    qkv = torch.zeros(40, 8, dtype=torch.bfloat16)
    targets = {"q": qkv[:24], "k": qkv[24:32], "v": qkv[32:]}
    params = {n: torch.randn(t.shape).to(torch.bfloat16) for n, t in targets.items()}
    patches = patches_of(params, 0.5, 4)
    ref = {n: t.clone() for n, t in targets.items()}
    apply_patches(ref, patches)
    metas, buf = stage(patches, params)
    out = apply_flat(flat_ranges(targets), read_flat(buf, metas))
    assert out["scatters"] == 1
    for n in targets:
        assert torch.equal(ref[n], targets[n])


def test_out_of_range_refused_nothing_written():
    params = weights(5)
    patches = patches_of(params, 0.5, 5)
    metas, buf = stage(patches, params)
    lay = flat_layout(metas)
    targets = clone(params)
    before = clone(targets)
    for bad in (-1, metas[-1].numel):
        buf2 = buf.clone()
        last = lay.starts[-1] - 1  # the last index of the last non-empty patch
        buf2[:4 * lay.count].view(torch.int32)[last] = bad
        with pytest.raises(ValueError, match="out of range"):
            apply_flat(flat_ranges(targets), read_flat(buf2, metas), chunk=3)
        for n in targets:
            assert torch.equal(before[n], targets[n])
    with pytest.raises(ValueError, match="not a target"):
        apply_flat(flat_ranges({"t0": targets["t0"]}), read_flat(buf, metas))


def test_skip_is_checked_not_written():
    params = weights(4)
    patches = patches_of(params, 0.5, 6)
    metas, buf = stage(patches, params)
    targets = clone(params)
    apply_flat(flat_ranges(targets, skip=["t1"]), read_flat(buf, metas))
    assert torch.equal(targets["t1"], params["t1"])
    ref = clone(params)
    apply_patches(ref, [p for p in patches if p.name != "t1"])
    assert all(torch.equal(ref[n], targets[n]) for n in params)


META_ONLY = ("view", "slice", "select", "alias", "split", "as_strided", "detach", "_unsafe_view", "set_", "empty")


class Count(TorchDispatchMode):
    """Every aten op run (view-like metadata ops included: they launch no kernel but are counted too)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def _ops_of_sync(n: int) -> tuple[list[str], list[str]]:
    params = weights(n, seed=9)
    for name in params:  # one dtype, as an LLM's weights
        params[name] = params[name].to(torch.bfloat16)
    targets = clone(params)
    flatten_by_dtype(list(targets.items()))
    patches = patches_of(params, 0.3, 10)
    shapes = {k: t.shape for k, t in params.items()}
    metas = flat_metas(patches, shapes)
    buf = torch.zeros(flat_layout(metas).total, dtype=torch.uint8)
    ranges = flat_ranges(targets)
    with Count() as w:
        write_flat(buf, metas, patches)
    staged = read_flat(buf, metas)
    with Count() as a:
        apply_flat(ranges, staged)
    return w.ops, a.ops


def test_ops_per_sync_independent_of_tensor_count():
    w10, a10 = _ops_of_sync(10)
    w200, a200 = _ops_of_sync(200)
    assert w10 == w200 and a10 == a200
    assert sum("index_copy" in o for o in a200) == 1 and sum("cat" in o for o in w200) == 2
    compute = [o for o in a200 if not any(k in o for k in META_ONLY)]
    assert len(compute) <= 14, compute  # see the report: ~10 kernels on one dtype


def test_flatten_by_dtype_keeps_values_and_refuses_shared():
    params = weights(9)
    ps = {n: torch.nn.Parameter(t.clone(), requires_grad=False) for n, t in params.items()}
    out = flatten_by_dtype(list(ps.items()))
    assert out["flattened"] and not out["already"] and out["dtypes"] == len(DTYPES)
    for n, p in ps.items():
        assert torch.equal(p.data, params[n]) and p.data.is_contiguous()
        assert p.data.data_ptr() % 512 == p.data.untyped_storage().data_ptr() % 512
    assert len({p.data.untyped_storage().data_ptr() for p in ps.values()}) == len(DTYPES)
    assert flatten_by_dtype(list(ps.items()))["already"]
    base = torch.zeros(10)
    shared = [("a", torch.nn.Parameter(base[:5])), ("b", torch.nn.Parameter(torch.zeros(3))),
              ("c", torch.nn.Parameter(base[5:]))]
    got = flatten_by_dtype(shared)
    assert not got["flattened"] and "storage" in got["reason"]  # refused, whichever check fires first
    assert shared[1][1].data_ptr() != 0 and shared[0][1].data_ptr() == base.data_ptr()
    nc = [("a", torch.nn.Parameter(torch.zeros(4, 4).t())), ("b", torch.nn.Parameter(torch.zeros(3)))]
    assert "not contiguous" in flatten_by_dtype(nc)["reason"]


def test_ipc_staging_write_flat_round_trip_cpu():
    from wsync.transfer.ipc_sparse import IpcStaging

    params = weights(12, seed=4)
    patches = patches_of(params, 0.1, 8)
    staging = IpcStaging("cpu")
    metas, nbytes, grew = staging.write_flat(patches, {n: t.shape for n, t in params.items()})
    assert grew and nbytes == flat_layout(metas).total <= staging.capacity
    ref, got = clone(params), clone(params)
    apply_patches(ref, patches)
    apply_flat(flat_ranges(got), read_flat(staging.buf, [m.to_list() for m in metas]))
    assert all(torch.equal(ref[n], got[n]) for n in params)
    _, _, grew = staging.write_flat(patches, {n: t.shape for n, t in params.items()})
    assert not grew


def test_reference_engine_apply_flat():
    from types import SimpleNamespace

    from wsync.engines.reference import ReferenceEngineCore

    params = weights(6, seed=2)
    eng = SimpleNamespace(params=clone(params))
    flatten_params(eng.params, 512)
    patches = patches_of(params, 0.3, 1)
    metas, buf = stage(patches, params)
    out = ReferenceEngineCore.apply_flat(eng, read_flat(buf, metas))
    ref = clone(params)
    apply_patches(ref, patches)
    assert out["elements"] > 0 and all(torch.equal(ref[n], eng.params[n]) for n in params)
