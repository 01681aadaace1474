"""gap8: 8-bit gaps with escapes — bit-exact round trips, escape boundaries, and auto's choice."""

import pytest
import torch

from wsync.transfer.encodings import SparsePatch
from wsync.transfer.meta import TensorMeta
from wsync.transfer.sparse import decode, encode, plan_sparse

SPEC = TensorMeta("w", "bfloat16", [100, 1000])


def roundtrip(indices: list[int], encoding: str = "gap8"):
    idx = torch.tensor(indices, dtype=torch.int32)
    vals = torch.randn(len(indices)).to(torch.bfloat16)
    meta = plan_sparse([SparsePatch("w", idx, vals)], {"w": SPEC}, encoding)[0]
    back = decode(meta, encode(SparsePatch("w", idx, vals), meta))
    order = torch.argsort(idx.long())
    assert torch.equal(back.indices.long(), idx.long()[order])
    assert torch.equal(back.values.view(torch.int16), vals.view(torch.int16)[order])
    return meta


@pytest.mark.parametrize("indices", [
    [0], [SPEC.numel - 1], [0, SPEC.numel - 1], [254], [255], [256], [509, 510, 511],
    [0, 255, 511, 766], list(range(300)), [5, 3, 1],  # unsorted input is sorted with its values
])
def test_escape_boundaries_round_trip(indices):
    meta = roundtrip(indices)
    gaps = torch.diff(torch.tensor(sorted(indices)), prepend=torch.tensor([-1])) - 1
    assert meta.nbytes == len(indices) * 3 + int((gaps // 255).sum())


@pytest.mark.parametrize("density", [1e-4, 1e-3, 0.01, 0.03, 0.3, 1.0])
def test_random_densities_round_trip(density):
    torch.manual_seed(1)
    c = max(1, int(SPEC.numel * density))
    roundtrip(torch.randperm(SPEC.numel)[:c].tolist())


def test_auto_prefers_gap8_when_gaps_are_short():
    torch.manual_seed(2)
    c = SPEC.numel // 100
    meta = roundtrip(torch.randperm(SPEC.numel)[:c].tolist(), "auto")
    assert meta.encoding == "gap8" and meta.nbytes / c < 3.2


def test_empty_patch_is_zero_bytes():
    meta = plan_sparse([SparsePatch("w", torch.empty(0, dtype=torch.int32), torch.empty(0, dtype=torch.bfloat16))],
                       {"w": SPEC}, "gap8")[0]
    assert meta.nbytes == 0
