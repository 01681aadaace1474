"""Sparse encodings: bit-exact round trips, edge cases, auto choice, size limits (no process group)."""

from __future__ import annotations

import json

import pytest
import torch

from wsync.transfer import (
    ENCODINGS,
    SparseMeta,
    SparsePatch,
    TensorMeta,
    apply_patch,
    apply_patches,
    decode,
    dtype_name,
    encode,
    payload_bytes,
    plan_sparse,
    stream_layout,
)

DENSITIES = [0.0, 1e-4, 0.01, 0.3, 1.0]
SHAPES = {"emb": ([96, 40], torch.bfloat16), "vec": ([1001], torch.float32), "cube": ([3, 5, 7], torch.float16)}


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a), bits(b))


def random_patch(name: str, shape: list[int], dtype: torch.dtype, density: float,
                 gen: torch.Generator) -> SparsePatch:
    numel = int(torch.tensor(shape).prod()) if shape else 1
    k = 0 if density == 0 else max(1, round(density * numel))
    idx = torch.randperm(numel, generator=gen)[:k].to(torch.int32)
    vals = (torch.randn(k, generator=gen) * 3).to(dtype)
    if k:
        vals[0] = -0.0  # sign bit must survive
    return SparsePatch(name, idx, vals)


def row_patch(name: str, shape: list[int], dtype: torch.dtype, rows: list[int], gen: torch.Generator) -> SparsePatch:
    cols = shape[1]
    idx = (torch.tensor(rows, dtype=torch.int64).unsqueeze(1) * cols + torch.arange(cols)).reshape(-1)
    perm = torch.randperm(idx.numel(), generator=gen)  # arrive unsorted
    vals = torch.randn(idx.numel(), generator=gen).to(dtype)
    return SparsePatch(name, idx[perm].to(torch.int32), vals[perm])


def specs_for(names: dict) -> dict[str, TensorMeta]:
    return {n: TensorMeta(n, dtype_name(dt), shape) for n, (shape, dt) in names.items()}


def base_tensor(shape: list[int], dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(dtype)


def roundtrip(patch: SparsePatch, spec: TensorMeta, encoding: str, full: torch.Tensor | None = None):
    params = {spec.name: full} if full is not None else None
    (meta,) = plan_sparse([patch], {spec.name: spec}, encoding, params)
    buf = encode(patch, meta, full)
    assert buf.dtype == torch.uint8 and buf.numel() == meta.nbytes
    return meta, decode(meta, buf)


def assert_same_effect(patch: SparsePatch, back: SparsePatch, spec: TensorMeta) -> None:
    a = base_tensor(spec.shape, spec.torch_dtype, 7)
    b = a.clone()
    apply_patch(a, patch)
    apply_patch(b, back)
    assert bits_equal(a, b)
    assert back.indices.dtype == torch.int32 and back.values.dtype == spec.torch_dtype


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("density", DENSITIES)
def test_roundtrip_every_encoding_and_density(encoding: str, density: float) -> None:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(int(density * 1e4) + 1)
    specs = specs_for(SHAPES)
    for name, (shape, dtype) in SHAPES.items():
        spec = specs[name]
        if encoding == "rows":
            if len(shape) != 2:
                continue
            rows = sorted(torch.randperm(shape[0], generator=gen)[: round(density * shape[0])].tolist())
            patch = row_patch(name, shape, dtype, rows, gen)
        else:
            patch = random_patch(name, shape, dtype, density, gen)
        meta, back = roundtrip(patch, spec, encoding)
        assert meta.encoding == encoding or encoding == "auto"
        assert meta.count == patch.count or meta.encoding == "dense"
        if encoding == "flat_int32":  # vLLM wire keeps the given order
            assert torch.equal(back.indices, patch.indices) and bits_equal(back.values, patch.values)
        assert_same_effect(patch, back, spec)


def test_decoded_patch_matches_sorted_patch_bit_exact() -> None:
    gen = torch.Generator().manual_seed(3)
    spec = TensorMeta("w", "bfloat16", [50, 20])
    patch = random_patch("w", spec.shape, torch.bfloat16, 0.3, gen)
    order = torch.argsort(patch.indices.long())
    for enc in ("gap", "bitmask"):
        _, back = roundtrip(patch, spec, enc)
        assert torch.equal(back.indices, patch.indices[order])
        assert bits_equal(back.values, patch.values[order])


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_empty_patch(encoding: str) -> None:
    spec = TensorMeta("w", "float32", [8, 4])
    patch = SparsePatch("w", torch.empty(0, dtype=torch.int32), torch.empty(0))
    meta, back = roundtrip(patch, spec, encoding)
    assert back.count == 0 and meta.count == 0
    assert meta.nbytes == 0 and encode(patch, meta).numel() == 0
    assert payload_bytes([patch]) == 0


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_first_and_last_element(encoding: str) -> None:
    spec = TensorMeta("w", "bfloat16", [17, 9])
    if encoding == "rows":
        patch = row_patch("w", spec.shape, torch.bfloat16, [0, 16], torch.Generator().manual_seed(1))
    else:
        patch = SparsePatch("w", torch.tensor([152, 0], dtype=torch.int32),
                            torch.tensor([1.5, -2.25], dtype=torch.bfloat16))
    _, back = roundtrip(patch, spec, encoding)
    assert set(back.indices.tolist()) == set(patch.indices.tolist())
    assert_same_effect(patch, back, spec)


def test_every_element_changed_auto_is_dense() -> None:
    spec = TensorMeta("w", "float32", [30, 11])
    patch = random_patch("w", spec.shape, torch.float32, 1.0, torch.Generator().manual_seed(4))
    meta, back = roundtrip(patch, spec, "auto")
    assert meta.encoding == "dense" and meta.nbytes == spec.nbytes and meta.count == spec.numel
    assert_same_effect(patch, back, spec)


def test_rows_rejects_non_row_patches() -> None:
    spec = TensorMeta("w", "bfloat16", [10, 8])
    vec = TensorMeta("v", "bfloat16", [80])
    full_row_plus_one = SparsePatch("w", torch.arange(9, dtype=torch.int32), torch.ones(9, dtype=torch.bfloat16))
    shifted_row = SparsePatch("w", torch.arange(4, 12, dtype=torch.int32), torch.ones(8, dtype=torch.bfloat16))
    for patch in (full_row_plus_one, shifted_row):
        with pytest.raises(ValueError, match="rows"):
            plan_sparse([patch], {"w": spec}, "rows")
        forged = SparseMeta("w", "bfloat16", [10, 8], patch.count, "rows", patch.count * 2 + 4)
        with pytest.raises(ValueError, match="rows"):
            encode(patch, forged)
    one_d = SparsePatch("v", torch.arange(8, dtype=torch.int32), torch.ones(8, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="rows"):
        plan_sparse([one_d], {"v": vec}, "rows")


def test_auto_picks_rows_for_row_patches() -> None:
    spec = TensorMeta("emb", "bfloat16", [1000, 64])
    patch = row_patch("emb", spec.shape, torch.bfloat16, [3, 500, 999], torch.Generator().manual_seed(5))
    (meta,) = plan_sparse([patch], {"emb": spec}, "auto")
    assert meta.encoding == "rows" and meta.nbytes == patch.count * 2 + 3 * 4
    _, back = roundtrip(patch, spec, "auto")
    assert_same_effect(patch, back, spec)


@pytest.mark.parametrize("density", DENSITIES + [0.9, 0.97, 0.999])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_auto_is_smallest_and_never_exceeds_dense(density: float, dtype: torch.dtype) -> None:
    spec = TensorMeta("w", dtype_name(dtype), [64, 50])
    patch = random_patch("w", spec.shape, dtype, density, torch.Generator().manual_seed(6))
    full = base_tensor(spec.shape, dtype, 8)
    apply_patch(full, patch)  # the sender's tensor = baseline + patch
    meta, back = roundtrip(patch, spec, "auto", full)
    assert meta.nbytes <= spec.nbytes
    for enc in ("gap", "bitmask"):
        assert meta.nbytes <= plan_sparse([patch], {"w": spec}, enc)[0].nbytes
    target = base_tensor(spec.shape, dtype, 8)
    apply_patch(target, back)
    assert bits_equal(target, full)
    if density <= 0.3:  # without the full tensor auto stays within dense at these densities
        assert plan_sparse([patch], {"w": spec}, "auto")[0].nbytes <= spec.nbytes


def test_dense_of_partial_patch_needs_full_tensor() -> None:
    spec = TensorMeta("w", "float32", [100])
    patch = random_patch("w", spec.shape, torch.float32, 0.99, torch.Generator().manual_seed(9))
    (meta,) = plan_sparse([patch], {"w": spec}, "auto", {"w": torch.zeros(100)})
    assert meta.encoding == "dense"
    with pytest.raises(ValueError, match="full tensor"):
        encode(patch, meta)


@pytest.mark.parametrize("gap,width", [(255, 1), (256, 2), (65535, 2), (65536, 4), (2_000_000, 4)])
def test_gap_widths(gap: int, width: int) -> None:
    spec = TensorMeta("w", "bfloat16", [gap + 2])
    patch = SparsePatch("w", torch.tensor([gap + 1, 0], dtype=torch.int32),
                        torch.tensor([1.0, 2.0], dtype=torch.bfloat16))
    meta, back = roundtrip(patch, spec, "gap")
    assert meta.nbytes == 2 * (2 + width)
    assert back.indices.tolist() == [0, gap + 1]


def test_tensor_beyond_int32_rejected_without_allocating() -> None:
    patch = SparsePatch("huge", torch.empty(0, dtype=torch.int32), torch.empty(0, dtype=torch.bfloat16))
    for shape in ([2**31], [2**16, 2**15 + 1]):
        spec = TensorMeta("huge", "bfloat16", shape)
        for enc in ENCODINGS:
            with pytest.raises(ValueError, match="int32"):
                plan_sparse([patch], {"huge": spec}, enc)
        meta = SparseMeta("huge", "bfloat16", shape, 0, "gap", 0)
        with pytest.raises(ValueError, match="int32"):
            decode(meta, torch.empty(0, dtype=torch.uint8))


def test_plan_errors() -> None:
    spec = TensorMeta("w", "float32", [10])
    patch = SparsePatch("w", torch.tensor([1], dtype=torch.int32), torch.ones(1))
    with pytest.raises(ValueError, match="unknown encoding"):
        plan_sparse([patch], {"w": spec}, "zip")
    with pytest.raises(ValueError, match="no such"):
        plan_sparse([patch], {}, "gap")
    dup = SparsePatch("w", torch.tensor([1, 1], dtype=torch.int32), torch.ones(2))
    with pytest.raises(ValueError, match="unique"):
        plan_sparse([dup], {"w": spec}, "auto")


def test_meta_json_roundtrip_and_stream_layout() -> None:
    metas = [SparseMeta("a", "bfloat16", [4, 4], 3, "gap", 9), SparseMeta("b", "float32", [5], 1, "flat_int32", 8),
             SparseMeta("c", "float32", [5], 5, "dense", 20)]
    again = [SparseMeta.from_dict(d) for d in json.loads(json.dumps([m.to_dict() for m in metas]))]
    assert again == metas
    assert stream_layout(metas) == ([0, 16], 40)
    with pytest.raises(ValueError):
        SparseMeta("x", "float32", [1], 0, "auto", 0)


def test_payload_bytes_of_metas_equals_payload_bytes_of_patches() -> None:
    a = SparsePatch("a", torch.tensor([1, 3], dtype=torch.int32), torch.ones(2, dtype=torch.bfloat16))
    b = SparsePatch("b", torch.tensor([0], dtype=torch.int32), torch.ones(1, dtype=torch.float64))
    metas = plan_sparse([a, b], {"a": TensorMeta("a", "bfloat16", [8]), "b": TensorMeta("b", "float64", [2])}, "gap")
    assert payload_bytes(metas) == payload_bytes([a, b]) == 2 * 6 + 12


def test_payload_bytes_is_vllm_sparse_payload() -> None:
    a = SparsePatch("a", torch.zeros(10, dtype=torch.int32), torch.zeros(10, dtype=torch.bfloat16))
    b = SparsePatch("b", torch.zeros(3, dtype=torch.int32), torch.zeros(3, dtype=torch.float32))
    assert payload_bytes([a, b]) == 10 * 6 + 3 * 8


def test_apply_patch_in_place_noncontiguous_and_requires_grad() -> None:
    torch.manual_seed(0)
    param = torch.nn.Parameter(torch.randn(6, 4))
    storage = param.data_ptr()
    apply_patches({"p": param}, [SparsePatch("p", torch.tensor([0, 23], dtype=torch.int32), torch.tensor([5.0, 7.0]))])
    assert param.data_ptr() == storage and param[0, 0] == 5.0 and param[5, 3] == 7.0
    base = torch.zeros(4, 6)
    view = base.t()  # non-contiguous (6, 4) view
    apply_patch(view, SparsePatch("v", torch.tensor([1, 4], dtype=torch.int32), torch.tensor([1.0, 2.0])))
    assert view[0, 1] == 1.0 and view[1, 0] == 2.0 and base[1, 0] == 1.0
    with pytest.raises(ValueError, match="values are"):
        apply_patch(param, SparsePatch("p", torch.tensor([0], dtype=torch.int32), torch.ones(1, dtype=torch.float16)))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_encodings_match_cpu_bytes() -> None:
    from wsync.transfer import PatchValidationError, fingerprint, validate_patches

    cuda = torch.device("cuda")
    specs = specs_for(SHAPES)
    for density in DENSITIES:
        for name, (shape, dtype) in SHAPES.items():
            patch = random_patch(name, shape, dtype, density, torch.Generator().manual_seed(11))
            validate_patches([patch.to(cuda)], specs)
            for enc in ("flat_int32", "gap", "bitmask", "auto"):
                (meta,) = plan_sparse([patch.to(cuda)], specs, enc)
                assert meta == plan_sparse([patch], specs, enc)[0]
                on_gpu = encode(patch.to(cuda), meta)
                assert on_gpu.is_cuda and torch.equal(on_gpu.cpu(), encode(patch, meta))
                back = decode(meta, on_gpu)
                assert back.values.is_cuda and back.indices.is_cuda
                a = base_tensor(shape, dtype, 7).to(cuda)
                apply_patch(a, back)
                b = base_tensor(shape, dtype, 7)
                apply_patch(b, patch)
                assert fingerprint({"t": a}) == fingerprint({"t": b})
    bad = SparsePatch("vec", torch.tensor([5, 5], dtype=torch.int32), torch.ones(2)).to(cuda)
    with pytest.raises(PatchValidationError, match="indices_unique"):
        validate_patches([bad], specs)
