"""wsync.transfer.delta: bit-exact diffs, round trips diff -> apply == current, Snapshot bookkeeping."""

from __future__ import annotations

import pytest
import torch

from wsync.transfer.delta import DeltaError, Snapshot, diff_patches
from wsync.transfer.meta import INT32_MAX, TensorMeta
from wsync.transfer.sparse import apply_patch, apply_patches, decode, encode, plan_sparse


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a), bits(b))


def with_bits(dtype: torch.dtype, words: list[int]) -> torch.Tensor:
    view = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}[dtype]
    return torch.tensor(words, dtype=torch.int64).to(view).view(dtype)


def weights(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "emb": torch.randn(64, 16, generator=g).to(torch.bfloat16),
        "vec": torch.randn(301, generator=g),
        "half": torch.randn(3, 5, 7, generator=g).to(torch.float16),
        "dbl": torch.randn(40, generator=g).to(torch.float64),
        "i8": torch.randint(-100, 100, (50,), generator=g).to(torch.int8),
        "i32": torch.randint(-10**6, 10**6, (33,), generator=g).to(torch.int32),
        "flag": torch.rand(70, generator=g) > 0.5,
        "cplx": torch.randn(12, generator=g, dtype=torch.complex128),
        "scalar": torch.tensor(1.5),
    }


def mutate(w: dict[str, torch.Tensor], density: float, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in w.items():
        t = t.clone()
        flat = t.view(-1)
        mask = torch.rand(flat.numel(), generator=g) < density
        if t.dtype == torch.bool:
            flat[mask] = ~flat[mask]
        elif t.is_complex():
            flat[mask] = flat[mask] + 1j
        else:
            flat[mask] = (flat[mask] + 1).to(t.dtype) if not t.is_floating_point() else flat[mask] * 2 + 1
        out[name] = t
    return out


def test_identical_versions_give_no_patches_and_empty_ones_on_request():
    w = weights()
    assert diff_patches(w, {k: v.clone() for k, v in w.items()}) == []
    empty = diff_patches(w, {k: v.clone() for k, v in w.items()}, include_empty=True)
    assert [p.name for p in empty] == list(w)
    for p in empty:
        assert p.count == 0 and p.indices.dtype == torch.int32 and p.values.dtype == w[p.name].dtype


def test_signed_zero_counts_as_a_change():
    cur = {"x": torch.tensor([0.0, -0.0, 1.0, -0.0], dtype=torch.bfloat16)}
    old = {"x": torch.tensor([-0.0, -0.0, 1.0, 0.0], dtype=torch.bfloat16)}
    (p,) = diff_patches(cur, old)
    assert p.indices.tolist() == [0, 3]
    assert bits_equal(p.values, torch.tensor([0.0, -0.0], dtype=torch.bfloat16))


@pytest.mark.parametrize("dtype,nan_a,nan_b", [
    (torch.float32, 0x7FC00000, 0x7FC00001),  # quiet NaNs, different payloads
    (torch.float32, 0x7FC00000, 0xFFC00000),  # sign of a NaN
    (torch.bfloat16, 0x7FC0, 0x7FC1),
    (torch.float16, 0x7E00, 0x7E01),
])
def test_nan_payloads_count_and_survive(dtype, nan_a, nan_b):
    cur = {"x": with_bits(dtype, [nan_a, nan_b, nan_a])}
    old = {"x": with_bits(dtype, [nan_a, nan_a, nan_a])}
    (p,) = diff_patches(cur, old)
    assert p.indices.tolist() == [1]
    assert bits_equal(p.values, with_bits(dtype, [nan_b]))
    target = old["x"].clone()
    apply_patch(target, p)
    assert bits_equal(target, cur["x"])


def test_same_nan_bits_are_not_a_change():
    x = with_bits(torch.float32, [0x7FC00123, 0x7F800000, 0xFF800000])  # NaN, +inf, -inf
    assert diff_patches({"x": x}, {"x": x.clone()}) == []


@pytest.mark.parametrize("density", [0.0, 0.01, 0.3, 1.0])
def test_round_trip_diff_then_apply_equals_current(density):
    old = weights(1)
    cur = mutate(old, density, seed=7)
    patches = diff_patches(cur, old)
    target = {k: v.clone() for k, v in old.items()}
    apply_patches(target, patches)
    for name in cur:
        assert bits_equal(target[name], cur[name]), name
    for p in patches:
        idx = p.indices
        assert idx.dtype == torch.int32 and idx.dim() == 1 and p.values.dim() == 1
        assert p.values.dtype == cur[p.name].dtype and p.count > 0
        assert bool((idx[1:] > idx[:-1]).all())  # ascending and unique
    counts = {n: int((bits(cur[n]).view(-1, cur[n].element_size()) != bits(old[n]).view(-1, cur[n].element_size()))
                     .any(1).sum()) for n in cur}
    assert {p.name: p.count for p in patches} == {k: c for k, c in counts.items() if c}


def test_round_trip_through_every_wire_encoding():
    old = {"emb": torch.randn(96, 40).to(torch.bfloat16), "vec": torch.randn(1001)}
    cur = mutate(old, 0.05, seed=3)
    patches = diff_patches(cur, old)
    specs = {n: TensorMeta.of(n, t) for n, t in cur.items()}
    for enc in ("flat_int32", "gap", "bitmask", "auto"):
        metas = plan_sparse(patches, specs, enc, params=cur)
        target = {k: v.clone() for k, v in old.items()}
        for meta, patch in zip(metas, patches):
            apply_patch(target[meta.name], decode(meta, encode(patch, meta, cur[meta.name])))
        assert all(bits_equal(target[n], cur[n]) for n in cur), enc


def test_non_contiguous_current_uses_row_major_indices():
    base = torch.arange(12, dtype=torch.float32).view(3, 4)
    cur_t = base.t()  # non-contiguous [4, 3] view
    old_t = cur_t.contiguous().clone()
    old_t[1, 2] = -1.0  # flat row-major index 1 * 3 + 2 = 5
    (p,) = diff_patches({"w": cur_t}, {"w": old_t})
    assert p.indices.tolist() == [5] and p.values.tolist() == [cur_t[1, 2].item()]
    apply_patch(old_t, p)
    assert torch.equal(old_t, cur_t)


def test_list_of_pairs_and_order_of_current():
    a = {"b": torch.zeros(3), "a": torch.zeros(2)}
    cur = [("b", torch.ones(3)), ("a", torch.ones(2))]
    assert [p.name for p in diff_patches(cur, a)] == ["b", "a"]


@pytest.mark.parametrize("cur,old,match", [
    ({"x": torch.zeros(3)}, {"x": torch.zeros(4)}, "synced is"),
    ({"x": torch.zeros(3)}, {"x": torch.zeros(3, dtype=torch.float64)}, "synced is"),
    ({"x": torch.zeros(3)}, {}, "no synced version"),
    ({"x": torch.zeros(3)}, {"x": torch.zeros(3), "y": torch.zeros(1)}, "current lacks"),
    ({"x": torch.zeros(3)}, {"x": torch.zeros(3, device="meta")}, "device"),
])
def test_mismatches_are_refused(cur, old, match):
    with pytest.raises(DeltaError, match=match):
        diff_patches(cur, old)


def test_duplicate_names_refused():
    with pytest.raises(DeltaError, match="twice"):
        diff_patches([("x", torch.zeros(1)), ("x", torch.ones(1))], {"x": torch.zeros(1)})


def test_tensor_beyond_int32_range_is_rejected_clearly():
    big = torch.zeros(1, dtype=torch.uint8).expand(INT32_MAX + 1)  # no memory behind it
    with pytest.raises(DeltaError, match=r"int32 index range"):
        diff_patches({"huge": big}, {"huge": big})


def test_snapshot_refresh_update_diff():
    snap = Snapshot()
    w = weights(2)
    snap.refresh("e1", w)
    assert "e1" in snap and snap.keys() == ["e1"]
    assert snap.nbytes("e1") == sum(t.numel() * t.element_size() for t in w.values())
    assert snap.diff("e1", w) == []
    cur = mutate(w, 0.2, seed=5)
    patches = snap.diff("e1", cur)
    assert patches
    snap.update("e1", patches)  # after a sparse sync
    assert snap.diff("e1", cur) == []
    for name in cur:
        assert bits_equal(snap.get("e1")[name], cur[name])
    ptrs = {n: t.data_ptr() for n, t in snap.get("e1").items()}
    w2 = mutate(cur, 1.0, seed=9)
    snap.refresh("e1", w2)  # after a dense sync: buffers reused
    assert {n: t.data_ptr() for n, t in snap.get("e1").items()} == ptrs
    assert snap.diff("e1", w2) == []
    w2["vec"] += 1  # the snapshot is a copy, not a view
    assert [p.name for p in snap.diff("e1", w2)] == ["vec"]


def test_snapshot_keys_are_independent_and_errors_are_clear():
    snap = Snapshot()
    w = weights(3)
    snap.refresh("a", w)
    snap.refresh("b", w)
    cur = mutate(w, 0.5, seed=1)
    snap.update("a", snap.diff("a", cur))
    assert snap.diff("a", cur) == [] and snap.diff("b", cur)
    with pytest.raises(KeyError, match="no snapshot"):
        snap.diff("zzz", cur)
    with pytest.raises(DeltaError, match="not in the snapshot"):
        snap.update("a", diff_patches({"other": torch.ones(2)}, {"other": torch.zeros(2)}))
    snap.drop("b")
    assert snap.keys() == ["a"]


def test_snapshot_rename_moves_a_copy_forward_without_copying():
    snap = Snapshot()
    w = weights(4)
    snap.refresh("v1", w)
    ptrs = {n: t.data_ptr() for n, t in snap.get("v1").items()}
    cur = mutate(w, 0.1, seed=2)
    snap.update("v1", snap.diff("v1", cur))
    snap.rename("v1", "v2")
    assert snap.keys() == ["v2"] and snap.diff("v2", cur) == []
    assert {n: t.data_ptr() for n, t in snap.get("v2").items()} == ptrs
    with pytest.raises(KeyError, match="no snapshot"):
        snap.rename("v1", "v3")
