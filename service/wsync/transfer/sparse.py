"""Sparse sync: plan per-tensor encodings, broadcast patches from rank 0, apply them in place.

`flat_int32` metas go as vLLM does (per patch: indices, then values; one broadcast each, metas
order). All other metas go in ONE packed uint8 stream after them; each tensor's section starts at
an 8-byte aligned offset (zero padding), in metas order.

Planning, packing and unpacking are batched over all tensors of a sync (see the encodings
subpackage): one host sync to plan (two when some patch is not ascending), none to pack the
stream of patches just planned, one to unpack and check it.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence

import torch

from .apply import apply_patch, apply_patches
from .encodings import (
    AUTO,
    AUTO_ORDER,
    DENSE,
    ENCODINGS,
    FLAT,
    IndexStats,
    SparseMeta,
    SparsePatch,
    check_numel,
    decode,
    decode_many,
    encode,
    encode_pieces,
    encoded_sizes,
    plan_stats,
)
from .group import Handle, SyncGroup
from .meta import INDEX_BYTES, TensorMeta, Timer, TransferStats, first_device

__all__ = [
    "SparsePatch", "SparseMeta", "ENCODINGS", "plan_sparse", "send_sparse", "recv_sparse",
    "recv_sparse_with_stats", "post_sparse", "SparseReceive", "apply_patch", "apply_patches", "payload_bytes",
    "stream_layout",
    "encode", "decode", "pack_stream",
]
ALIGN = 8


def payload_bytes(items: Iterable[SparsePatch | SparseMeta]) -> int:
    """THE sparse payload (vLLM's sparse wire): an int32 index + a value in the param dtype per
    changed element, whatever encoding actually carries it. Takes patches or their metas."""
    return sum(x.count * (INDEX_BYTES + (x.values.element_size() if isinstance(x, SparsePatch) else x.spec.itemsize))
               for x in items)


def _plan_one(patch: SparsePatch, spec: TensorMeta, encoding: str, full_ok: bool,
              st: IndexStats | None) -> SparseMeta:
    if encoding == FLAT:
        enc, nbytes = FLAT, patch.count * (4 + spec.itemsize)
    else:
        sizes = encoded_sizes(patch.count, spec, full_ok, st)
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

    All patches' index statistics come from one batched pass with one host sync (per device; a
    second only when some patch's indices are not ascending) and are cached on the indices, so
    `encode` / `send_sparse` of the same patches neither sort nor sync again.
    """
    encoding = str(getattr(encoding, "value", encoding))
    if encoding not in ENCODINGS:
        raise ValueError(f"unknown encoding {encoding!r}; use one of {', '.join(ENCODINGS)}")
    items: list[tuple[SparsePatch, TensorMeta, bool]] = []
    host_error: ValueError | None = None
    for patch in patches:
        try:
            if patch.name not in specs:
                raise ValueError(f"{patch.name}: no such parameter")
            spec = specs[patch.name]
            check_numel(spec)
            if patch.values.dtype != spec.torch_dtype:
                raise ValueError(f"{patch.name}: values are {patch.values.dtype}, parameter is {spec.dtype}")
        except ValueError as exc:  # raised after the patches before it, as a per-patch loop would
            host_error = exc
            break
        items.append((patch, spec, params is not None and patch.name in params))
    stats = plan_stats([p for p, _, _ in items], [spec for _, spec, _ in items], encoding)
    metas = [_plan_one(p, spec, encoding, full_ok, st) for (p, spec, full_ok), st in zip(items, stats)]
    if host_error is not None:
        raise host_error
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
    """The packed (non-flat) sections in metas order, each zero-padded to ALIGN: batched encode and
    ONE concatenation (no host sync for patches just planned)."""
    total = stream_layout(metas)[1]
    packed = [m for m in metas if m.encoding != FLAT]
    items = [(patches[m.name], m, params.get(m.name) if params is not None else None) for m in packed]
    zeros = torch.zeros(ALIGN, dtype=torch.uint8, device=device)
    parts: list[torch.Tensor] = []
    for meta, pieces in zip(packed, encode_pieces(items)):
        parts += [p if p.device == device else p.to(device) for p in pieces]
        pad = -(-meta.nbytes // ALIGN) * ALIGN - meta.nbytes
        if pad:
            parts.append(zeros[:pad])
    parts = [p for p in parts if p.numel()]
    if not parts:
        return torch.zeros(total, dtype=torch.uint8, device=device)
    return torch.cat(parts)


def pack_stream(patches: Sequence[SparsePatch], metas: Sequence[SparseMeta],
                params: Mapping[str, torch.Tensor] | None = None,
                device: torch.device | str | None = None) -> torch.Tensor:
    """The packed uint8 stream `send_sparse` broadcasts for these planned patches (the non-flat
    metas' sections, `stream_layout` order and padding), on `device` (default: the first patch's).
    Batched: a few kernels per encoding and no host sync for patches just planned by `plan_sparse`;
    byte-identical to `encode` of each patch copied to its `stream_layout` offset."""
    by_name = _by_name(patches)
    missing = [m.name for m in metas if m.encoding != FLAT and m.name not in by_name]
    if missing:
        raise ValueError(f"no patch for {missing}")
    dev = torch.device(device) if device is not None else first_device((p.values for p in patches),
                                                                        torch.device("cpu"))
    with torch.no_grad():
        return _pack_stream(metas, by_name, params, dev)


def _decode_stream(metas: Sequence[SparseMeta], stream: torch.Tensor) -> list[SparsePatch]:
    """The packed (non-flat) metas' patches from a stream laid out by `stream_layout` (metas order,
    flat ones left out): batched decode, one host sync."""
    offsets, _ = stream_layout(metas)
    packed = [m for m in metas if m.encoding != FLAT]
    return decode_many(packed, [stream[o:o + m.nbytes] for m, o in zip(packed, offsets)])


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


class SparseReceive:
    """A sparse receive whose buffers are allocated and broadcasts posted at construction (`post_sparse`);
    `wait()` then waits for them and decodes. Posting before telling the sender to go means the
    sender's broadcasts never wait on this side's set-up, and the set-up overlaps whatever runs between."""

    def __init__(self, group: SyncGroup, metas: Sequence[SparseMeta], device: torch.device | str | None = None):
        self.metas = list(metas)
        self.device = torch.device(device) if device is not None else group.device
        self._t0 = time.perf_counter()
        dev = self.device
        self.stats = TransferStats(bytes=sum(m.count * (4 + m.spec.itemsize) for m in self.metas))
        self._flat: list[tuple[int, SparsePatch]] = []
        self._works: list[Handle] = []
        with torch.no_grad():
            for i, meta in enumerate(self.metas):
                if meta.encoding != FLAT:
                    continue
                idx = torch.empty(meta.count, dtype=torch.int32, device=dev)
                vals = torch.empty(meta.count, dtype=meta.spec.torch_dtype, device=dev)
                if meta.count:
                    self._works += [group.broadcast_async(idx, src=0), group.broadcast_async(vals, src=0)]
                    self.stats.wire_bytes += meta.nbytes
                    self.stats.messages += 2
                self._flat.append((i, SparsePatch(meta.name, idx, vals)))
            total = stream_layout(self.metas)[1]
            self._stream = torch.empty(total, dtype=torch.uint8, device=dev)
            if total:
                self._works.append(group.broadcast_async(self._stream, src=0))
                self.stats.wire_bytes += total
                self.stats.messages += 1

    def wait(self) -> tuple[list[SparsePatch], TransferStats]:
        """The patches (metas order, decoded on the device) and the stats; `stats.ms` runs from the post."""
        works, self._works = self._works, []
        out: list[SparsePatch | None] = [None] * len(self.metas)
        with torch.no_grad():
            for work in works:
                work.wait()
            for i, patch in self._flat:
                out[i] = patch
            packed = [i for i, m in enumerate(self.metas) if m.encoding != FLAT]
            for i, patch in zip(packed, _decode_stream(self.metas, self._stream)):
                out[i] = patch
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
        self.stats.ms = (time.perf_counter() - self._t0) * 1e3
        return [p for p in out if p is not None], self.stats


def post_sparse(group: SyncGroup, metas: Sequence[SparseMeta],
                device: torch.device | str | None = None) -> SparseReceive:
    """Post the receives of one sparse sync now; `.wait()` for the decoded patches."""
    return SparseReceive(group, metas, device)


def recv_sparse_with_stats(group: SyncGroup, metas: Sequence[SparseMeta],
                           device: torch.device | str | None = None) -> tuple[list[SparsePatch], TransferStats]:
    """Receive what `send_sparse` sends; patches decoded on `device` (default the group's)."""
    return post_sparse(group, metas, device).wait()


def recv_sparse(group: SyncGroup, metas: Sequence[SparseMeta],
                device: torch.device | str | None = None) -> list[SparsePatch]:
    """Receive and decode the patches of one sparse sync (metas order)."""
    return recv_sparse_with_stats(group, metas, device)[0]
