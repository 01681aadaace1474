"""Patch validation: nothing moves before every patch passes every rule."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from .meta import INT32_MAX, TensorMeta, dtype_name, torch_dtype

if TYPE_CHECKING:
    from .sparse import SparsePatch

RULES = (
    "name_exists", "duplicate_tensor", "indices_1d", "values_1d", "indices_int32", "lengths_equal",
    "dtype_match", "shape_match", "indices_in_range", "indices_unique", "values_finite",
)
_DEVICE_RULES = ("indices_in_range", "indices_unique", "values_finite")
_Failure = tuple[str, str]  # (rule, message)


class PatchValidationError(Exception):
    """A patch broke `rule` for `tensor`; str() names both."""

    def __init__(self, tensor: str, rule: str, message: str) -> None:
        self.tensor = tensor
        self.rule = rule
        self.message = message
        super().__init__(f"{tensor}: {rule}: {message}")

    def __reduce__(self):  # picklable across processes (Ray, multiprocessing)
        return (type(self), (self.tensor, self.rule, self.message))

    def to_dict(self) -> dict[str, str]:
        return {"tensor": self.tensor, "rule": self.rule, "message": self.message}


def _host_checks(patch: SparsePatch, specs: Mapping[str, TensorMeta], seen: set[str]) -> _Failure | None:
    """Rules that need no device work, in contract order; the first failure or None."""
    name, idx, vals = patch.name, patch.indices, patch.values
    if name not in specs:
        return "name_exists", "no such parameter"
    if name in seen:
        return "duplicate_tensor", "tensor appears more than once in this sync"
    if idx.dim() != 1:
        return "indices_1d", f"indices must be 1-D, got shape {list(idx.shape)}"
    if vals.dim() != 1:
        return "values_1d", f"values must be 1-D, got shape {list(vals.shape)}"
    if idx.dtype != torch.int32:
        return "indices_int32", f"indices must be int32, got {dtype_name(idx.dtype)}"
    if idx.numel() != vals.numel():
        return "lengths_equal", f"{idx.numel()} indices but {vals.numel()} values"
    want = specs[name].torch_dtype
    if vals.dtype != want:
        return "dtype_match", f"values are {dtype_name(vals.dtype)}, parameter is {dtype_name(want)}"
    return None


def _device_flags(patch: SparsePatch, numel: int) -> torch.Tensor:
    """[in_range, unique, finite] as a bool tensor on the patch's device (no host sync)."""
    idx, vals = patch.indices, patch.values
    ok_range = (idx >= 0).all()
    if numel <= INT32_MAX:
        ok_range = ok_range & (idx < numel).all()
    if idx.numel() > 1:
        s = torch.sort(idx).values
        ok_unique = (s[1:] != s[:-1]).all()
    else:
        ok_unique = torch.ones((), dtype=torch.bool, device=idx.device)
    if vals.is_floating_point() or vals.is_complex():
        ok_finite = torch.isfinite(vals).all()
    else:
        ok_finite = torch.ones((), dtype=torch.bool, device=vals.device)
    return torch.stack([ok_range, ok_unique.to(ok_range.device), ok_finite.to(ok_range.device)])


def _messages(numel: int) -> dict[str, str]:
    return {
        "indices_in_range": f"indices must satisfy 0 <= i < {numel}",
        "indices_unique": "indices must be unique",
        "values_finite": "values must be finite (no NaN/Inf)",
    }


def validate_patches(patches: Sequence[SparsePatch], specs: Mapping[str, TensorMeta]) -> None:
    """Raise PatchValidationError for the first broken rule (patches in order, rules in order)."""
    seen: set[str] = set()
    checked: list[SparsePatch] = []
    host_failure: tuple[SparsePatch, _Failure] | None = None
    for patch in patches:
        failure = _host_checks(patch, specs, seen)
        if failure is not None:
            host_failure = (patch, failure)
            break
        seen.add(patch.name)
        checked.append(patch)
    flags = _all_device_flags(checked, specs)
    for patch, row in zip(checked, flags):
        for rule, ok in zip(_DEVICE_RULES, row):
            if not ok:
                raise PatchValidationError(patch.name, rule, _messages(specs[patch.name].numel)[rule])
    if host_failure is not None:
        patch, (rule, message) = host_failure
        raise PatchValidationError(patch.name, rule, message)


def _all_device_flags(patches: Sequence[SparsePatch], specs: Mapping[str, TensorMeta]) -> list[list[bool]]:
    """Device-side flags of every patch, fetched with one host sync per device."""
    per_device: dict[torch.device, list[tuple[int, torch.Tensor]]] = {}
    for i, patch in enumerate(patches):
        f = _device_flags(patch, specs[patch.name].numel)
        per_device.setdefault(f.device, []).append((i, f))
    rows: list[list[bool]] = [[] for _ in patches]
    for items in per_device.values():
        values = torch.stack([f for _, f in items]).tolist()
        for (i, _), row in zip(items, values):
            rows[i] = row
    return rows


class MetaMismatchError(PatchValidationError):
    """An update's metadata does not match the receiver's parameters (rule name_exists / dtype_match /
    shape_match); raised before any byte is received. str() names the tensor."""


def check_metas(metas: Iterable[Any], params: Mapping[str, torch.Tensor]) -> None:
    """THE metas-vs-parameters check: every meta (TensorMeta, SparseMeta, or anything with name,
    dtype and shape) names a parameter in `params` of the same dtype and shape; otherwise
    MetaMismatchError naming the tensor, e.g. ``w: dtype_match: receiver has float32[4, 4], update
    says bfloat16[4, 4]``. Host-only, no device work."""
    for meta in metas:
        name, dtype, shape = meta.name, meta.dtype, [int(s) for s in meta.shape]
        tensor = params.get(name)
        if tensor is None:
            raise MetaMismatchError(name, "name_exists", "no such parameter in the receiver")
        have_dtype, have_shape = dtype_name(tensor.dtype), list(tensor.shape)
        if _normalized(str(dtype)) != have_dtype or shape != have_shape:
            rule = "dtype_match" if _normalized(str(dtype)) != have_dtype else "shape_match"
            raise MetaMismatchError(name, rule, f"receiver has {have_dtype}{have_shape}, update says {dtype}{shape}")


#: Former name of `check_metas`, kept while callers switch.
validate_params = check_metas


def _normalized(dtype: str) -> str | None:
    try:
        return dtype_name(torch_dtype(dtype))
    except ValueError:
        return None
