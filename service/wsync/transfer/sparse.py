"""Sparse sync: plan per-tensor encodings, broadcast patches from rank 0, apply them in place.

`flat_int32` metas go as vLLM does (per patch: indices, then values; one broadcast each, metas
order). All other metas go in ONE packed uint8 stream after them; each tensor's section starts at
an 8-byte aligned offset (zero padding), in metas order.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import torch

from .encodings import (
    AUTO, AUTO_ORDER, DENSE, ENCODINGS, FLAT, SparseMeta, SparsePatch, candidate_sizes, check_numel,
    decode, encode,
)
from .group import Handle, SyncGroup
from .meta import TensorMeta, Timer, TransferStats, first_device

__all__ = [
    "SparsePatch", "SparseMeta", "ENCODINGS", "plan_sparse", "send_sparse", "recv_sparse",
    "recv_sparse_with_stats", "apply_patch", "apply_patches", "payload_bytes", "stream_layout",
    "encode", "decode",
]
ALIGN = 8


def payload_bytes(patches: Iterable[SparsePatch]) -> int:
    """vLLM's sparse payload: int32 indices + values, per changed element."""
    return sum(p.count * 4 + p.count * p.values.element_size() for p in patches)


def _plan_one(patch: SparsePatch, spec: TensorMeta, encoding: str, full_ok: bool) -> SparseMeta:
    check_numel(spec)
    if patch.values.dtype != spec.torch_dtype:
        raise ValueError(f"{patch.name}: values are {patch.values.dtype}, parameter is {spec.dtype}")
    if encoding == FLAT:
        enc, nbytes = FLAT, patch.count * (4 + spec.itemsize)
    else:
        sizes = candidate_sizes(patch, spec, full_ok)
        if encoding == AUTO:
            enc = min(sizes, key=lambda e: (sizes[e], AUTO_ORDER.index(e)))
        elif encoding in sizes:
            enc = encoding
        else:
            raise ValueError(f"{patch.name}: encoding {encoding!r} does not fit this patch "
                             f"(rows needs whole rows of a 2-D tensor)")
        nbytes = sizes[enc]
    count = spec.numel if enc == DENSE else patch.count
    return SparseMeta(patch.name, spec.dtype, list(spec.shape), count, enc, nbytes)


def plan_sparse(patches: Sequence[SparsePatch], specs: Mapping[str, TensorMeta], encoding: str,
                params: Mapping[str, torch.Tensor] | None = None) -> list[SparseMeta]:
    """Per-tensor encoding and size. `auto` picks the smallest valid encoding per tensor.

    `dense` (auto only) needs every element: it is a candidate when the patch covers the whole
    tensor, or when `params` holds the sender's tensor, which must then equal baseline + patch.
    """
    encoding = str(getattr(encoding, "value", encoding))
    if encoding not in ENCODINGS:
        raise ValueError(f"unknown encoding {encoding!r}; use one of {', '.join(ENCODINGS)}")
    metas = []
    for patch in patches:
        if patch.name not in specs:
            raise ValueError(f"{patch.name}: no such parameter")
        full_ok = params is not None and patch.name in params
        metas.append(_plan_one(patch, specs[patch.name], encoding, full_ok))
    return metas


def stream_layout(metas: Sequence[SparseMeta]) -> tuple[list[int], int]:
    """Offsets of the packed (non-flat) metas in the stream, and its total bytes."""
    offsets, total = [], 0
    for meta in metas:
        if meta.encoding == FLAT:
            continue
        offsets.append(total)
        total += -(-meta.nbytes // ALIGN) * ALIGN
    return offsets, total


def _by_name(patches: Sequence[SparsePatch]) -> dict[str, SparsePatch]:
    out: dict[str, SparsePatch] = {}
    for patch in patches:
        if patch.name in out:
            raise ValueError(f"{patch.name}: duplicate tensor in one sync")
        out[patch.name] = patch
    return out


def _pack_stream(metas: Sequence[SparseMeta], patches: Mapping[str, SparsePatch],
                 params: Mapping[str, torch.Tensor] | None, device: torch.device) -> torch.Tensor:
    offsets, total = stream_layout(metas)
    stream = torch.zeros(total, dtype=torch.uint8, device=device)
    packed = [m for m in metas if m.encoding != FLAT]
    for meta, offset in zip(packed, offsets):
        full = params.get(meta.name) if params is not None else None
        stream[offset:offset + meta.nbytes].copy_(encode(patches[meta.name], meta, full))
    return stream


def send_sparse(group: SyncGroup, patches: Sequence[SparsePatch], metas: Sequence[SparseMeta],
                params: Mapping[str, torch.Tensor] | None = None) -> TransferStats:
    """Broadcast `patches` (validated, planned by `plan_sparse`) from this rank (0)."""
    by_name = _by_name(patches)
    missing = [m.name for m in metas if m.name not in by_name]
    if missing:
        raise ValueError(f"no patch for {missing}")
    device = first_device((p.values for p in patches), group.device)
    stats = TransferStats(bytes=payload_bytes(patches))
    works: list[Handle] = []
    with torch.no_grad(), Timer(device) as timer:
        for meta in metas:
            if meta.encoding != FLAT or meta.count == 0:
                continue
            patch = by_name[meta.name]
            if patch.count != meta.count or patch.indices.dtype != torch.int32:
                raise ValueError(f"{meta.name}: patch does not match its meta (int32, {meta.count})")
            works.append(group.broadcast_async(patch.indices.contiguous(), src=0))
            works.append(group.broadcast_async(patch.values.contiguous(), src=0))
            stats.wire_bytes += meta.nbytes
            stats.messages += 2
        total = stream_layout(metas)[1]
        if total:
            stream = _pack_stream(metas, by_name, params, device)
            works.append(group.broadcast_async(stream, src=0))
            stats.wire_bytes += total
            stats.messages += 1
        for work in works:
            work.wait()
    stats.ms = timer.ms
    return stats


def recv_sparse_with_stats(group: SyncGroup, metas: Sequence[SparseMeta],
                           device: torch.device | str | None = None) -> tuple[list[SparsePatch], TransferStats]:
    """Receive what `send_sparse` sends; patches decoded on `device` (default the group's)."""
    dev = torch.device(device) if device is not None else group.device
    out: list[SparsePatch | None] = [None] * len(metas)
    stats = TransferStats(bytes=sum(m.count * (4 + m.spec.itemsize) for m in metas))
    works: list[Handle] = []
    with torch.no_grad(), Timer(dev) as timer:
        for i, meta in enumerate(metas):
            if meta.encoding != FLAT:
                continue
            idx = torch.empty(meta.count, dtype=torch.int32, device=dev)
            vals = torch.empty(meta.count, dtype=meta.spec.torch_dtype, device=dev)
            if meta.count:
                works += [group.broadcast_async(idx, src=0), group.broadcast_async(vals, src=0)]
                stats.wire_bytes += meta.nbytes
                stats.messages += 2
            out[i] = SparsePatch(meta.name, idx, vals)
        offsets, total = stream_layout(metas)
        stream = torch.empty(total, dtype=torch.uint8, device=dev)
        if total:
            works.append(group.broadcast_async(stream, src=0))
            stats.wire_bytes += total
            stats.messages += 1
        for work in works:
            work.wait()
        packed = [i for i, m in enumerate(metas) if m.encoding != FLAT]
        for i, offset in zip(packed, offsets):
            out[i] = decode(metas[i], stream[offset:offset + metas[i].nbytes])
    stats.ms = timer.ms
    return [p for p in out if p is not None], stats


def recv_sparse(group: SyncGroup, metas: Sequence[SparseMeta],
                device: torch.device | str | None = None) -> list[SparsePatch]:
    """Receive and decode the patches of one sparse sync (metas order)."""
    return recv_sparse_with_stats(group, metas, device)[0]


def apply_patch(param: torch.Tensor, patch: SparsePatch) -> None:
    """Write `patch` into `param` in place: O(changed elements), bit-exact."""
    if patch.values.dtype != param.dtype:
        raise ValueError(f"{patch.name}: values are {patch.values.dtype}, parameter is {param.dtype}")
    if patch.count == 0:
        return
    with torch.no_grad():
        target = param.detach()
        idx = patch.indices.to(target.device).long()
        vals = patch.values.to(target.device)
        if target.is_contiguous():
            target.view(-1).index_copy_(0, idx, vals)
        else:
            tmp = target.contiguous()
            tmp.view(-1).index_copy_(0, idx, vals)
            target.copy_(tmp)


def apply_patches(params: Mapping[str, torch.Tensor], patches: Iterable[SparsePatch]) -> None:
    """apply_patch for each patch, looked up by name in `params`."""
    for patch in patches:
        apply_patch(params[patch.name], patch)
