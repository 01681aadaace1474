"""Pure-Python payloads for vLLM's weight-transfer API: update_info / init_info dicts, engine kwargs,
payload byte counts. Inputs may be meta dicts, TensorMeta / SparseMeta objects or patch objects."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

from wsync.transfer.meta import dtype_name, torch_dtype

from .detect import EXTENSION_QUALNAME, VLLMApi, VLLMUnsupportedError, _vllm, require_installed


def itemsize(dtype) -> int:
    return torch_dtype(dtype_name(dtype)).itemsize


def _get(m, key):
    return m.get(key) if isinstance(m, dict) else getattr(m, key, None)


def shape_of(m, shapes: dict | None = None):
    """full_shape, else shape, else shapes[name]; None if none is known."""
    found = (_get(m, "full_shape"), _get(m, "shape"), (shapes or {}).get(_get(m, "name")))
    return next((x for x in found if x is not None), None)


def meta_row(m, shapes: dict | None = None) -> tuple[str, str, list[int]]:
    """(name, dtype, shape) of a meta dict, a TensorMeta/SparseMeta, or a patch object."""
    name, values = _get(m, "name"), _get(m, "values")
    dtype = _get(m, "dtype") or (values.dtype if values is not None else None)
    shape = shape_of(m, shapes)
    if dtype is None or shape is None:
        raise ValueError(f"{name}: need dtype and shape (pass shapes={{name: shape}} for patch objects)")
    return name, dtype_name(dtype), [int(s) for s in shape]


def count_of(m) -> int:
    return int(c) if (c := _get(m, "count")) is not None else int(_get(m, "indices").numel())


def _columns(rows) -> dict:
    return {"names": [r[0] for r in rows], "dtype_names": [r[1] for r in rows], "shapes": [r[2] for r in rows]}


def dense_update_info(metas: Iterable, packed: bool = False, api: VLLMApi | None = None, *,
                      packed_buffer_size_bytes: int | None = None, packed_num_buffers: int | None = None) -> dict:
    """names, dtype_names, shapes (+ packed fields where they ride update_info, < 0.28). api=None: the
    worker extension's kwargs (no packing fields); Gen A: exactly the reference example's dict."""
    info: dict[str, Any] = _columns([meta_row(m) for m in metas])
    if api is not None and api.packed_in_update_info:
        info["packed"] = bool(packed)
        extra = {"packed_buffer_size_bytes": packed_buffer_size_bytes, "packed_num_buffers": packed_num_buffers}
        info.update({k: int(x) for k, x in extra.items() if packed and x is not None})
    elif packed:
        raise VLLMUnsupportedError("packed dense: packing rides update_info only on vLLM 0.23-0.27 "
                                   f"(vLLM {api.version if api else '?'}; the worker extension is unpacked only)")
    return info


def sparse_update_info(items: Iterable, api: VLLMApi | None = None, *, shapes: dict | None = None) -> dict:
    """From metas ({name, dtype, shape, count}) or patch objects: names, dtype_names, shapes (D: full
    checkpoint shapes), num_updates_list; Gen A adds update_kind="sparse_flat". api=None: the worker
    extension's kwargs."""
    items = list(items)
    info: dict[str, Any] = {**_columns([meta_row(m, shapes) for m in items]),
                            "num_updates_list": [count_of(m) for m in items]}
    if api is not None and api.generation == "A":
        info["update_kind"] = "sparse_flat"
    return info


def init_info(master_address: str, master_port: int, world_size: int, rank_offset: int = 1, *,
              packed: bool | None = None, packed_buffer_size_bytes: int | None = None) -> dict:
    """Worker init_info (NCCLWeightTransferInitInfo); packing fields only when given (they exist >= 0.28)."""
    info = {"master_address": str(master_address), "master_port": int(master_port),
            "rank_offset": int(rank_offset), "world_size": int(world_size)}
    extra = {"packed": packed, "packed_buffer_size_bytes": packed_buffer_size_bytes}
    return {**info, **{k: val for k, val in extra.items() if val is not None}}


def dense_payload_bytes(metas: Iterable) -> int:
    return sum(math.prod(s) * itemsize(d) for _, d, s in (meta_row(m) for m in metas))


def sparse_payload_bytes(items: Iterable) -> int:
    """int32 indices + values, per patch."""
    return sum(count_of(m) * (4 + itemsize(_get(m, "dtype") or _get(m, "values").dtype)) for m in items)


def engine_backend(api: VLLMApi) -> str:
    """weight_transfer_config backend of a wsync vLLM engine: the one that takes sparse ("nccl" on A,
    "sparse_nccl" on B-D); dense then goes where receive_plan says."""
    require_installed(api, "a vLLM engine")
    return str(api.sparse_backend)


def engine_kwargs(api: VLLMApi, gpu_memory_utilization: float = 0.5, enforce_eager: bool = True, *,
                  max_model_len: int | None = None, worker_extension: bool = True,
                  config_factory: Callable[[str], Any] | None = None) -> dict:
    """vllm.LLM kwargs: TP=1 on the "uni" executor, so the engine runs inside the Ray actor that owns
    the GPU (never a nested Ray executor asking Ray for another GPU)."""
    factory = config_factory or (lambda b: _vllm("vllm.config").WeightTransferConfig(backend=b))
    return {"tensor_parallel_size": 1, "gpu_memory_utilization": float(gpu_memory_utilization),
            "enforce_eager": bool(enforce_eager), "dtype": "bfloat16", "distributed_executor_backend": "uni",
            **({"max_model_len": int(max_model_len)} if max_model_len else {}),
            **({"worker_extension_cls": EXTENSION_QUALNAME} if worker_extension else {}),
            "weight_transfer_config": factory(engine_backend(api))}
