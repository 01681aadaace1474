"""apply_patches: batched scatters over shared storages give exactly what one apply_patch per patch gives."""

from __future__ import annotations

import pytest
import torch

from wsync.transfer import apply as A
from wsync.transfer.encodings import SparsePatch
from wsync.transfer.flat import flatten_params
from wsync.transfer.sparse import apply_patch, apply_patches

DEVICES = ["cpu", pytest.param("cuda", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")])]
SHAPES = {"embed": [64, 16], "q": [16, 16], "k": [8, 16], "norm": [16], "scalar": [], "w": [40, 16]}


@pytest.fixture(autouse=True)
def batch_everywhere(monkeypatch):
    """The batched path runs on CPU too here (in the product it is for accelerators; see apply.py)."""
    monkeypatch.setattr(A, "BATCH_ON_CPU", True)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def params_of(device: str, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=gen).to(torch.bfloat16).to(device) for n, s in SHAPES.items()}


def patches_for(params: dict[str, torch.Tensor], density: float, seed: int) -> list[SparsePatch]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for name, t in params.items():
        n = t.numel()
        k = max(1, int(n * density)) if name != "norm" else 0  # one empty patch
        idx = torch.randperm(n, generator=gen)[:k].to(torch.int32)
        vals = torch.randn(k, generator=gen).to(t.dtype)
        out.append(SparsePatch(name, idx.to(t.device), vals.to(t.device)))
    return out


def one_by_one(params: dict[str, torch.Tensor], patches: list[SparsePatch]) -> dict[str, torch.Tensor]:
    want = {n: t.clone() for n, t in params.items()}
    for p in patches:
        apply_patch(want[p.name], p)
    return want


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(bits(a[n]), bits(b[n])) for n in a)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("density", [0.01, 0.3, 1.0])
def test_flat_layout_one_scatter_per_storage(device: str, density: float, monkeypatch) -> None:
    params = params_of(device)
    assert flatten_params(params, 4096) >= 1
    patches = patches_for(params, density, seed=3)
    want = one_by_one(params, patches)
    calls = []
    real = A._scatter_group
    monkeypatch.setattr(A, "_scatter_group", lambda g: calls.append(len(g)) or real(g))
    apply_patches(params, patches)
    assert same(params, want)
    storages = {t.untyped_storage().data_ptr() for t in params.values()}
    assert calls and len(calls) <= len(storages) and sum(calls) >= 3  # batched, not one per tensor


@pytest.mark.parametrize("device", DEVICES)
def test_fused_slices_and_small_kernel_budget(device: str, monkeypatch) -> None:
    """q and k as row slices of one qkv tensor (vLLM's layout); a tiny budget forces several chunks."""
    qkv = torch.randn(24, 16).to(torch.bfloat16).to(device)
    params = {"q": qkv.narrow(0, 0, 16), "k": qkv.narrow(0, 16, 8), "w": torch.zeros(40, 16, dtype=torch.bfloat16,
                                                                                      device=device)}
    patches = patches_for(params, 0.5, seed=4)
    want = one_by_one(params, patches)
    monkeypatch.setattr(A, "kernel_budget", lambda dev, bits=False: 7)
    apply_patches(params, patches)
    assert same(params, want)


def test_overlapping_targets_keep_the_order_of_patches() -> None:
    t = torch.zeros(10, dtype=torch.float32)
    params = {"a": t, "b": t}  # one tensor under two names, as tied weights would be
    patches = [SparsePatch("a", torch.tensor([1, 2], dtype=torch.int32), torch.tensor([1.0, 1.0])),
               SparsePatch("b", torch.tensor([2, 3], dtype=torch.int32), torch.tensor([2.0, 2.0]))]
    apply_patches(params, patches)
    assert t.tolist() == [0, 1, 2, 2, 0, 0, 0, 0, 0, 0]  # b was written after a


def test_a_wrong_dtype_writes_nothing() -> None:
    params = params_of("cpu")
    flatten_params(params, 4096)
    before = {n: t.clone() for n, t in params.items()}
    patches = patches_for(params, 0.1, seed=5)
    patches[-1] = SparsePatch(patches[-1].name, patches[-1].indices, patches[-1].values.float())
    with pytest.raises(ValueError, match="values are torch.float32"):
        apply_patches(params, patches)
    assert same(params, before)


def test_cpu_targets_take_one_scatter_per_patch_by_default(monkeypatch) -> None:
    monkeypatch.setattr(A, "BATCH_ON_CPU", False)
    monkeypatch.setattr(A, "_scatter_group", lambda g: pytest.fail("batched on CPU"))
    params = params_of("cpu")
    flatten_params(params, 4096)
    patches = patches_for(params, 0.1, seed=7)
    want = one_by_one(params, patches)
    apply_patches(params, patches)
    assert same(params, want)


def test_non_contiguous_target() -> None:
    w = torch.randn(16, 8).to(torch.bfloat16).t()  # non-contiguous
    params = {"w": w, "n": torch.zeros(5, dtype=torch.bfloat16)}
    patches = patches_for(params, 0.25, seed=6)
    want = one_by_one(params, patches)
    apply_patches(params, patches)
    assert same(params, want) and not params["w"].is_contiguous()
