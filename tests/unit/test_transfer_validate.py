"""validate_patches: every rule raises PatchValidationError naming tensor and rule, in contract order."""

from __future__ import annotations

import pickle

import pytest
import torch

from wsync.transfer import (
    MetaMismatchError,
    PatchValidationError,
    SparseMeta,
    SparsePatch,
    TensorMeta,
    check_metas,
    validate_patches,
)

SPECS = {"w": TensorMeta("w", "bfloat16", [4, 5]), "b": TensorMeta("b", "float32", [3])}
I32 = torch.int32


def patch(idx, vals, name: str = "w", idx_dtype=I32, dtype=torch.bfloat16) -> SparsePatch:
    return SparsePatch(name, torch.tensor(idx, dtype=idx_dtype), torch.tensor(vals, dtype=dtype))


def rule_of(patches) -> str:
    with pytest.raises(PatchValidationError) as info:
        validate_patches(patches, SPECS)
    err = info.value
    assert err.rule in str(err) and err.tensor in str(err) and err.message
    return err.rule


CASES = {
    "name_exists": [patch([0], [1.0], name="nope")],
    "duplicate_tensor": [patch([0], [1.0]), patch([1], [1.0])],
    "indices_1d": [patch([[0, 1]], [1.0, 2.0])],
    "values_1d": [patch([0, 1], [[1.0, 2.0]])],
    "indices_int32": [patch([0], [1.0], idx_dtype=torch.int64)],
    "lengths_equal": [patch([0, 1], [1.0])],
    "dtype_match": [patch([0], [1.0], dtype=torch.float32)],
    "indices_in_range": [patch([0, 20], [1.0, 2.0])],
    "indices_unique": [patch([3, 1, 3], [1.0, 2.0, 3.0])],
    "values_finite": [patch([0, 1], [1.0, float("nan")])],
}


@pytest.mark.parametrize("rule", list(CASES))
def test_each_rule(rule: str) -> None:
    assert rule_of(CASES[rule]) == rule


def test_negative_index_and_inf() -> None:
    assert rule_of([patch([-1], [1.0])]) == "indices_in_range"
    assert rule_of([patch([0], [float("-inf")], name="b", dtype=torch.float32)]) == "values_finite"


def test_rule_order_within_patch() -> None:
    # int64, unequal lengths and wrong dtype at once: indices_int32 comes first
    assert rule_of([patch([0, 1], [1.0], idx_dtype=torch.int64, dtype=torch.float32)]) == "indices_int32"
    # out of range and duplicated and NaN: range first
    assert rule_of([patch([30, 30], [float("nan"), 1.0])]) == "indices_in_range"


def test_first_failing_patch_wins() -> None:
    bad_range = patch([99], [1.0])
    bad_name = patch([0], [1.0], name="nope")
    assert rule_of([bad_range, bad_name]) == "indices_in_range"
    assert rule_of([bad_name, bad_range]) == "name_exists"


def test_valid_patches_pass() -> None:
    validate_patches([patch([0, 19, 7], [1.0, 2.0, -0.0]), patch([], [], name="b", dtype=torch.float32)], SPECS)
    validate_patches([], SPECS)


def test_error_pickles() -> None:
    err = PatchValidationError("w", "indices_unique", "indices must be unique")
    again = pickle.loads(pickle.dumps(err))
    assert (again.tensor, again.rule, again.message, str(again)) == (err.tensor, err.rule, err.message, str(err))


def test_check_metas() -> None:
    params = {"w": torch.zeros(4, 5, dtype=torch.bfloat16)}
    check_metas([SPECS["w"], SparseMeta("w", "torch.bfloat16", [4, 5], 2, "gap", 6)], params)
    want = r"^w: shape_match: receiver has bfloat16\[4, 5\], update says bfloat16\[5, 4\]"
    with pytest.raises(MetaMismatchError, match=want):
        check_metas([SparseMeta("w", "bfloat16", [5, 4], 2, "gap", 6)], params)
    for metas, rule in [([SPECS["b"]], "name_exists"), ([TensorMeta("w", "float32", [4, 5])], "dtype_match"),
                        ([TensorMeta("w", "bfloat16", [5, 4])], "shape_match")]:
        with pytest.raises(PatchValidationError) as info:
            check_metas(metas, params)
        assert info.value.rule == rule
    with pytest.raises(MetaMismatchError, match="dtype_match"):
        check_metas([TensorMeta("w", "bfloat16", [4, 5])], {"w": torch.zeros(4, 5)})
