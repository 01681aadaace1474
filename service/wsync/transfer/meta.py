"""Tensor metadata that travels out of band, dtype names, transfer stats and byte views."""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

import torch

#: THE int32 bounds: sparse indices are int32, so a tensor addresses at most INT32_MAX + 1 elements.
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
#: Bytes of one sparse index on vLLM's wire (int32); see `sparse.payload_bytes`.
INDEX_BYTES = 4


def dtype_name(dtype: torch.dtype) -> str:
    """`torch.bfloat16` -> `"bfloat16"`."""
    return str(dtype).removeprefix("torch.")


def torch_dtype(name: str) -> torch.dtype:
    """`"bfloat16"` (or `"torch.bfloat16"`) -> `torch.bfloat16`; ValueError if unknown."""
    dt = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dt


@dataclass
class TensorMeta:
    """Name, dtype name and shape of one tensor (JSON-able)."""

    name: str
    dtype: str
    shape: list[int]

    def __post_init__(self) -> None:
        self.shape = [int(s) for s in self.shape]
        self.dtype = dtype_name(torch_dtype(self.dtype))

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch_dtype(self.dtype)

    @property
    def itemsize(self) -> int:
        return self.torch_dtype.itemsize

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TensorMeta:
        return cls(name=d["name"], dtype=d["dtype"], shape=list(d["shape"]))

    @classmethod
    def of(cls, name: str, tensor: torch.Tensor) -> TensorMeta:
        return cls(name, dtype_name(tensor.dtype), list(tensor.shape))


def dense_payload_bytes(metas: Iterable[TensorMeta]) -> int:
    """THE dense payload: every element of every tensor in its own dtype."""
    return sum(m.nbytes for m in metas)


def param_metas(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> list[TensorMeta]:
    """TensorMeta for each (name, tensor), in the given order."""
    return [TensorMeta.of(name, t) for name, t in named_tensors]


@dataclass
class TransferStats:
    """What one send/recv moved: payload bytes, bytes broadcast, wall ms, broadcast count, and how many
    of those broadcasts went straight from/into the tensors' own storage (no pack/unpack copy)."""

    bytes: int = 0
    wire_bytes: int = 0
    ms: float = 0.0
    messages: int = 0
    zero_copy: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Timer:
    """Wall-clock timer that synchronizes `device` (when CUDA) at start and stop."""

    def __init__(self, device: torch.device | str | None) -> None:
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.ms = 0.0

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __enter__(self) -> Timer:
        self._sync()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self._sync()
        self.ms = (time.perf_counter() - self._t0) * 1000.0


def bytes_view(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of a contiguous tensor as a 1-D uint8 view (shares storage)."""
    if not t.is_contiguous():
        raise ValueError("bytes_view needs a contiguous tensor")
    flat = t.detach().reshape(-1)
    return flat if flat.dtype == torch.uint8 else flat.view(torch.uint8)


def view_as_dtype(buf: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Reinterpret a 1-D uint8 buffer as `dtype` (copies only if misaligned)."""
    size = dtype.itemsize
    if buf.numel() % size:
        raise ValueError(f"{buf.numel()} bytes is not a whole number of {dtype_name(dtype)}")
    if buf.numel() == 0:
        return torch.empty(0, dtype=dtype, device=buf.device)
    if buf.storage_offset() % size:
        buf = buf.clone()
    return buf.view(dtype)


def first_device(tensors: Iterable[torch.Tensor], default: torch.device) -> torch.device:
    """Device of the first tensor, else `default`."""
    for t in tensors:
        return t.device
    return default
