"""Dense copy plans for the CUDA-IPC route (engine side, pure torch, CPU-testable): from the trainer's
mapped flat buffers into the engine's own tensors, as precomputed (dst, src) views.

Neighbouring layout entries that are contiguous on both sides (same trainer buffer, same target storage)
merge into one copy, so a target laid out like the trainer's buckets costs one copy per bucket and vLLM's
fused gate/up slices (adjacent in the trainer too) cost one. Each copy views its bytes as the widest
integer type its size and offsets allow; `CopyPlan.run()` is one `torch._foreach_copy_` per width. No
host sync (the caller synchronizes once).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from .ipc import IpcError, LayoutEntry, _u8
from .meta import dtype_name

__all__ = ["CopyPlan", "plan_copies"]

_WIDE = (torch.int64, torch.int32, torch.int16, torch.uint8)


def _widest(nbytes: int, *offsets: int) -> torch.dtype:
    for dt in _WIDE:
        if nbytes % dt.itemsize == 0 and all(o % dt.itemsize == 0 for o in offsets):
            return dt
    return torch.uint8


@dataclass
class CopyPlan:
    """Precomputed (dst, src) views grouped by element width: `run()` is one `_foreach_copy_` per group."""

    groups: dict[torch.dtype, tuple[list[torch.Tensor], list[torch.Tensor]]] = field(default_factory=dict)
    copies: int = 0
    tensors: int = 0
    bytes: int = 0

    def run(self) -> None:
        for dsts, srcs in self.groups.values():
            try:
                torch._foreach_copy_(dsts, srcs)
            except (AttributeError, NotImplementedError, RuntimeError):
                for d, s in zip(dsts, srcs):
                    d.copy_(s)


def _dst_bytes(name: str, t: torch.Tensor, e: LayoutEntry) -> tuple[torch.UntypedStorage, int]:
    t = t.detach()
    if not t.is_contiguous() or dtype_name(t.dtype) != e.dtype or tuple(t.shape) != e.shape:
        raise IpcError(f"{name}: target {dtype_name(t.dtype)}{list(t.shape)} (contiguous={t.is_contiguous()}) "
                       f"does not match the trainer's {e.dtype}{list(e.shape)}")
    st = t.untyped_storage()
    return st, t.data_ptr() - st.data_ptr()


def plan_copies(layout: Sequence[LayoutEntry], sources: Sequence[torch.Tensor],
                targets: Mapping[str, torch.Tensor], skip: Sequence[str] = ()) -> CopyPlan:
    """Copies of every layout entry (except `skip`) from `sources[bucket]` (uint8) into `targets[name]`;
    neighbours that are contiguous on both sides (same bucket, same target storage) merge into one copy,
    so a target laid out like the trainer's buckets costs one copy per bucket. Every target must exist."""
    skipped = set(skip)
    missing = [e.name for e in layout if e.name not in targets and e.name not in skipped]
    if missing:
        raise IpcError(f"no target for {len(missing)} trainer tensors, e.g. {missing[:3]}")
    runs: list[list] = []  # [bucket, src_off, dst_storage, dst_off, nbytes]
    plan = CopyPlan()
    for e in layout:
        if e.name in skipped or e.numel == 0:
            continue
        st, off = _dst_bytes(e.name, targets[e.name], e)
        if e.offset + e.nbytes > sources[e.bucket].numel():
            raise IpcError(f"{e.name}: bytes [{e.offset}, {e.offset + e.nbytes}) beyond buffer {e.bucket}")
        last = runs[-1] if runs else None
        if (last and last[0] == e.bucket and last[1] + last[4] == e.offset
                and last[2].data_ptr() == st.data_ptr() and last[3] + last[4] == off):
            last[4] += e.nbytes
        else:
            runs.append([e.bucket, e.offset, st, off, e.nbytes])
        plan.tensors += 1
        plan.bytes += e.nbytes
    for bucket, src_off, st, dst_off, n in runs:
        dt = _widest(n, src_off, dst_off, sources[bucket].data_ptr() % 16, st.data_ptr() % 16)
        src = sources[bucket][src_off:src_off + n].view(dt)
        dst = _u8(st)[dst_off:dst_off + n].view(dt)
        dsts, srcs = plan.groups.setdefault(dt, ([], []))
        dsts.append(dst)
        srcs.append(src)
    plan.copies = len(runs)
    return plan
