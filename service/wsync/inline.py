"""Inline (JSON) patches -> validated torch SparsePatches, before anything is stored or sent."""

from __future__ import annotations

import torch

from wsync.errors import InvalidInput
from wsync.schemas import TensorPatch
from wsync.transfer.meta import INT32_MAX, INT32_MIN, TensorMeta
from wsync.transfer.sparse import SparsePatch
from wsync.transfer.validate import PatchValidationError, validate_patches


def inline_patches(patches: list[TensorPatch], specs: dict[str, dict], field: str = "patches") -> list[SparsePatch]:
    """Check every rule the transfer core checks; errors name ``patches.<i>.<field>`` and the rule."""
    metas = {name: TensorMeta.from_dict(spec) for name, spec in specs.items()}
    out: list[SparsePatch] = []
    where: dict[str, int] = {}
    for i, p in enumerate(patches):
        at = f"{field}.{i}"
        meta = metas.get(p.name)
        if meta is None:
            raise InvalidInput(f"{at}.name: no parameter {p.name!r} in the trainer's model",
                               field=f"{at}.name", rule="name_exists")
        if p.name in where:
            raise InvalidInput(f"{at}.name: {p.name!r} appears twice in one sync",
                               field=f"{at}.name", rule="duplicate_tensor")
        if p.index_dtype != "int32":
            raise InvalidInput(f"{at}.index_dtype: indices must be int32, got {p.index_dtype!r}",
                               field=f"{at}.index_dtype", rule="indices_int32")
        if p.dtype is not None and p.dtype != meta.dtype:
            raise InvalidInput(f"{at}.dtype: {p.name} is {meta.dtype}, patch says {p.dtype}",
                               field=f"{at}.dtype", rule="dtype_match")
        if p.shape is not None and list(p.shape) != list(meta.shape):
            raise InvalidInput(f"{at}.shape: {p.name} has shape {list(meta.shape)}, patch says {list(p.shape)}",
                               field=f"{at}.shape", rule="shape_match")
        if any(i < INT32_MIN or i > INT32_MAX for i in p.indices):
            raise InvalidInput(f"{at}.indices: values do not fit int32",
                               field=f"{at}.indices", rule="indices_int32")
        where[p.name] = i
        indices = torch.tensor(p.indices, dtype=torch.int32)
        values = torch.tensor(p.values, dtype=torch.float64).to(meta.torch_dtype)
        out.append(SparsePatch(p.name, indices, values))
    try:
        validate_patches(out, metas)
    except PatchValidationError as exc:
        i = where.get(exc.tensor, 0)
        sub = {"lengths_equal": "values", "values_finite": "values", "values_1d": "values"}.get(exc.rule, "indices")
        raise InvalidInput(f"{field}.{i}.{sub}: {exc}",
                               field=f"{field}.{i}.{sub}", rule=exc.rule) from None
    return out
