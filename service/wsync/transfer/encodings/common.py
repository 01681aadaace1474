"""Shared vocabulary of the sparse encodings (the package __init__ is the public face; this module sits
below stats / pack / unpack so that none of them imports another's internals).

Holds the encoding names, the wire dataclasses (SparsePatch, SparseMeta), the kernel batch budgets,
and the small host/device helpers that the batched statistics, encode and decode all use:
segment offsets, host ints -> device in one non-blocking copy, per-segment repeats, item batching.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import accumulate
from typing import Any

import torch

from ..meta import INT32_MAX, TensorMeta, dtype_name, torch_dtype

FLAT, GAP, GAP8, BITMASK, ROWS, DENSE, AUTO = (
    "flat_int32", "gap", "gap8", "bitmask", "rows", "dense", "auto")
ENCODINGS = (FLAT, GAP, GAP8, BITMASK, ROWS, AUTO)  # what callers may ask for
WIRE_ENCODINGS = (FLAT, GAP, GAP8, BITMASK, ROWS, DENSE)  # what a SparseMeta may carry
AUTO_ORDER = (GAP8, GAP, ROWS, BITMASK, DENSE)  # tie-break among equal sizes
ESC = 255  # gap8 escape byte
GAP_DTYPES = {1: torch.uint8, 2: torch.int16, 4: torch.int32}  # gap width -> wire dtype
# Kernel batch budgets (read at call time through `kernel_budget`, so tests and benches may patch
# them here). Indices handled by one batch of kernels bound the scratch memory. On CPU a small batch
# keeps each temporary under glibc's mmap threshold (32 MiB), where a fresh mmap per call costs more
# in page faults than the kernel itself; a GPU's caching allocator has no such cost, so batches
# there are big. Bitmask budgets count expanded bits (bytes of scratch); a bigger tensor goes alone.
CHUNK_CPU = 1 << 21
CHUNK_DEVICE = 1 << 25
BITS_CHUNK_CPU = 1 << 24
BITS_CHUNK_DEVICE = 1 << 27


@dataclass
class SparsePatch:
    """One tensor's change: flat int32 element indices and the new values (param dtype)."""

    name: str
    indices: torch.Tensor
    values: torch.Tensor

    @property
    def count(self) -> int:
        return int(self.indices.numel())

    def to(self, device: torch.device | str) -> SparsePatch:
        return SparsePatch(self.name, self.indices.to(device), self.values.to(device))


@dataclass
class SparseMeta:
    """Out-of-band description of one tensor's encoded patch (JSON-able)."""

    name: str
    dtype: str
    shape: list[int]
    count: int
    encoding: str
    nbytes: int

    def __post_init__(self) -> None:
        if self.encoding not in WIRE_ENCODINGS:
            raise ValueError(f"{self.name}: unknown wire encoding {self.encoding!r}")
        self.shape = [int(s) for s in self.shape]
        self.dtype = dtype_name(torch_dtype(self.dtype))

    @property
    def spec(self) -> TensorMeta:
        return TensorMeta(self.name, self.dtype, self.shape)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape), "count": self.count,
                "encoding": self.encoding, "nbytes": self.nbytes}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SparseMeta:
        return cls(d["name"], d["dtype"], list(d["shape"]), int(d["count"]), d["encoding"], int(d["nbytes"]))


def check_numel(spec: TensorMeta) -> None:
    """int32 indices address at most 2**31-1 elements."""
    if spec.numel > INT32_MAX:
        raise ValueError(f"{spec.name}: {spec.numel} elements exceed the int32 index range "
                         f"(2**31-1); sparse sync cannot address this tensor")


# ---- small helpers ------------------------------------------------------------------------------
def kernel_budget(device: torch.device, bits: bool = False) -> int:
    """Indices (or, with `bits`, bitmask bits) one batch of kernels may handle on `device`."""
    if bits:
        return BITS_CHUNK_CPU if device.type == "cpu" else BITS_CHUNK_DEVICE
    return CHUNK_CPU if device.type == "cpu" else CHUNK_DEVICE


def gap_width(max_gap: int) -> int:
    """Bytes per gap for gaps up to `max_gap`."""
    return 1 if max_gap < 2**8 else 2 if max_gap < 2**16 else 4


def rows_cols(shape: Sequence[int], count: int) -> int:
    """Row length when `count` indices could be whole rows of this tensor (2-D, count % cols == 0), else 0."""
    if len(shape) != 2 or shape[1] <= 0 or count % shape[1]:
        return 0
    return int(shape[1])


def flat_index(idx: torch.Tensor) -> torch.Tensor:
    """1-D int32/int64 view (or copy) of an index tensor."""
    x = idx.reshape(-1)
    return x if x.dtype in (torch.int32, torch.int64) else x.long()


def device_ints(device: torch.device, *parts: Sequence[int] | torch.Tensor) -> list[torch.Tensor]:
    """Host ints (lists or CPU tensors) -> int64 tensors on `device` in ONE copy (pinned and
    non-blocking on CUDA, so no host sync; the caching host allocator keeps the pinned buffer
    alive until the copy has run)."""
    host_parts = [p.to(torch.int64) if isinstance(p, torch.Tensor) else torch.tensor(p, dtype=torch.int64)
                  for p in parts]
    sizes = [int(p.numel()) for p in host_parts]
    if device.type == "cpu":
        return host_parts
    host = torch.cat(host_parts) if host_parts else torch.empty(0, dtype=torch.int64)
    if device.type == "cuda":
        host = host.pin_memory()
    return list(torch.split(host.to(device, non_blocking=True), sizes))


def cat_parts(parts: Sequence[torch.Tensor], copy: bool = False) -> torch.Tensor:
    """torch.cat, but a single part is returned as is unless `copy`."""
    if len(parts) == 1 and not copy:
        return parts[0]
    return torch.cat(list(parts))


def seg_starts(counts: Sequence[int]) -> list[int]:
    """Offsets of consecutive segments of these lengths, and the total at the end."""
    return list(accumulate(counts, initial=0))


def repeat_per_segment(values: torch.Tensor, counts: Sequence[int], total: int) -> torch.Tensor:
    """values[i] repeated counts[i] times (values on the device, counts on the host; no host sync)."""
    if values.device.type != "cpu":
        (reps,) = device_ints(values.device, counts)
        return torch.repeat_interleave(values, reps, output_size=total)
    # CPU: repeat_interleave is serial there; one scatter of per-segment steps and a cumsum instead
    keep = [i for i, c in enumerate(counts) if c]
    firsts = seg_starts([counts[i] for i in keep])[:-1]
    v = values[keep] if len(keep) != len(counts) else values
    steps = torch.diff(v, prepend=v.new_zeros(1))
    out = torch.zeros(total, dtype=values.dtype)
    out[firsts] = steps
    return torch.cumsum(out, 0, dtype=values.dtype)


def chunk_ids(sizes: Sequence[int], budget: int) -> list[list[int]]:
    """Consecutive groups of item positions whose sizes add up to at most `budget` (or one item)."""
    out: list[list[int]] = []
    used = budget
    for i, size in enumerate(sizes):
        if used + size > budget:
            out.append([])
            used = 0
        out[-1].append(i)
        used += size
    return out
